"""The pods/namespaces cache and its watcher: the real client against the loopback
API server (tests/conftest.py), and a scripted API for what a server rarely sends."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import pytest

from nodeagent.kube.api import ApiResponse, KubeError
from nodeagent.kube.client import KubeClient, KubeEndpoint, resolve_endpoint
from nodeagent.kube.watch import (
    EventType,
    KubeMetaCache,
    KubeWatcher,
    default_backoff,
    parse_event,
)
from nodeagent.model.enrollment import DATAPLANE_MODE_LABEL, NamespaceMeta, PodMeta

NODE = "node1"
AMBIENT = {DATAPLANE_MODE_LABEL: "ambient"}
WAIT = 10.0  # seconds: a bound on every wait, never expected to pass


class Changes:
    """The watcher's on_change: counts calls and wakes waiters."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._event.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate()` holds, re-checked after every change (bounded)."""
        async with asyncio.timeout(WAIT):
            while not predicate():
                self._event.clear()
                await self._event.wait()


def client_for(api: Any, **options: Any) -> KubeClient:
    endpoint = resolve_endpoint(api.config(), {})
    assert endpoint is not None
    return KubeClient(endpoint, timeout=2.0, **options)


@contextlib.asynccontextmanager
async def watching(api: Any) -> AsyncIterator[tuple[KubeMetaCache, Changes]]:
    """A KubeWatcher on NODE running against `api` (a client) until the block ends."""
    cache, changes = KubeMetaCache(), Changes()
    watcher = KubeWatcher(api, NODE, cache, changes, backoff=lambda attempt: 0.01)
    task = asyncio.create_task(watcher.run())
    try:
        yield cache, changes
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def bounded(awaitable: Any) -> None:
    async with asyncio.timeout(WAIT):
        await awaitable


def watches(api: Any, path: str) -> list[dict[str, str]]:
    return [c.params for c in api.calls("GET") if c.route == path and c.params.get("watch")]


def lists(api: Any, path: str) -> list[dict[str, str]]:
    return [c.params for c in api.calls("GET") if c.route == path and not c.params.get("watch")]


def keys(cache: KubeMetaCache) -> set[str]:
    return {p.key for p in cache.pods()}


def labels_of(cache: KubeMetaCache, key: str) -> Mapping[str, str]:
    found = cache.pod(key)
    return found.labels if found is not None else {}


# -- against the loopback API server ---------------------------------------------------


async def test_watcher_lists_then_follows_pods_and_namespace_labels(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api:
        api.add_namespace("demo", AMBIENT)
        api.add_pod("demo", "web-1", node=NODE, ips=["10.0.0.5"], labels={"app": "web"})
        api.add_pod("demo", "far", node="node2", ips=["10.0.1.5"])
        async with watching(client_for(api)) as (cache, changes):
            await changes.until(lambda: cache.synced)
            assert keys(cache) == {"demo/web-1"}
            web = cache.pod_by_ip("10.0.0.5")
            assert web is not None and web.labels == {"app": "web"}
            assert cache.pod_by_uid(web.uid) == web
            assert cache.namespace("demo") == NamespaceMeta(name="demo", labels=AMBIENT)

            api.add_pod("demo", "web-2", node=NODE, ips=["10.0.0.6"])
            api.add_pod("demo", "far-2", node="node2")
            await changes.until(lambda: "demo/web-2" in keys(cache))

            api.set_labels("pods", "demo", "web-1", {"app": "web", "version": "v2"})
            await changes.until(lambda: labels_of(cache, "demo/web-1").get("version") == "v2")

            api.delete_pod("demo", "web-1")
            await changes.until(lambda: "demo/web-1" not in keys(cache))
            assert cache.pod_by_ip("10.0.0.5") is None

            api.set_labels("namespaces", "", "demo", {})
            await changes.until(lambda: cache.namespace("demo") == NamespaceMeta(name="demo"))
            api.add_namespace("other", AMBIENT)
            await changes.until(lambda: cache.namespace("other") is not None)
            api.delete_namespace("other")
            await changes.until(lambda: cache.namespace("other") is None)

            assert keys(cache) == {"demo/web-2"}  # node2's pods never arrived
        # The pods LIST and WATCH both carried the node's field selector.
        assert lists(api, "/api/v1/pods") == [{"fieldSelector": "spec.nodeName=node1"}]
        [pods_watch] = watches(api, "/api/v1/pods")
        assert pods_watch["fieldSelector"] == "spec.nodeName=node1"
        assert pods_watch["allowWatchBookmarks"] == "true"
        assert pods_watch["timeoutSeconds"] == "300"


async def test_dropped_watch_resumes_from_the_last_version_without_relisting(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api:
        api.add_namespace("demo")
        api.add_pod("demo", "web-1", node=NODE)
        async with watching(client_for(api)) as (cache, changes):
            await changes.until(lambda: cache.synced)
            await bounded(api.wait_until(lambda: api.watch_count() == 2))
            api.add_pod("demo", "web-2", node=NODE)
            await changes.until(lambda: "demo/web-2" in keys(cache))
            seen = api.pods[("demo", "web-2")]["metadata"]["resourceVersion"]

            api.drop_watches()
            await bounded(api.wait_until(lambda: len(watches(api, "/api/v1/pods")) == 2))
            api.add_pod("demo", "web-3", node=NODE)
            await changes.until(lambda: "demo/web-3" in keys(cache))

        first, second = watches(api, "/api/v1/pods")
        assert second["resourceVersion"] == seen != first["resourceVersion"]
        assert len(lists(api, "/api/v1/pods")) == 1
        assert len(lists(api, "/api/v1/namespaces")) == 1


async def test_compacted_history_gets_410_and_a_relist_drops_pods_deleted_meanwhile(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api:
        api.add_namespace("demo", AMBIENT)
        api.add_pod("demo", "web-1", node=NODE)
        api.add_pod("demo", "web-2", node=NODE)
        async with watching(client_for(api)) as (cache, changes):
            await changes.until(lambda: cache.synced)
            await bounded(api.wait_until(lambda: api.watch_count() == 2))
            # All at once, with no await between: the watcher is away while the pod
            # goes and the history that recorded it is compacted.
            api.drop_watches()
            api.delete_pod("demo", "web-2")
            api.set_labels("namespaces", "", "demo", {})
            api.compact()
            await changes.until(lambda: len(lists(api, "/api/v1/pods")) == 2)
            await changes.until(lambda: keys(cache) == {"demo/web-1"})
            await changes.until(lambda: cache.namespace("demo") == NamespaceMeta(name="demo"))
            assert cache.synced


async def test_an_http_410_on_a_watch_also_relists(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        api.add_namespace("demo")
        async with watching(client_for(api)) as (cache, changes):
            await changes.until(lambda: cache.synced)
            await bounded(api.wait_until(lambda: api.watch_count() == 2))
            api.answer("GET", "/api/v1/namespaces", 410)  # the next request there
            api.drop_watches()
            await changes.until(lambda: len(lists(api, "/api/v1/namespaces")) == 2)
            api.add_namespace("late", AMBIENT)
            await changes.until(lambda: cache.namespace("late") is not None)
        assert len(lists(api, "/api/v1/pods")) == 1


async def test_ten_thousand_pods_elsewhere_leave_only_this_nodes_five_in_a_small_cache(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api:
        for i in range(10_000):
            api.add_pod(f"ns-{i % 50}", f"pod-{i}", node=f"node-{2 + i % 100}")
        for i in range(5):
            api.add_pod("demo", f"local-{i}", node=NODE, ips=[f"10.0.0.{10 + i}"])
        gc.collect()
        tracemalloc.start()
        try:
            async with watching(client_for(api)) as (cache, changes):
                await changes.until(lambda: cache.synced)
            gc.collect()
            # What was allocated during the run and is still alive: the cache,
            # the server's few request records, the loop's bookkeeping.
            retained, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert keys(cache) == {f"demo/local-{i}" for i in range(5)}
        assert retained < 1024 * 1024, f"{retained} bytes retained"
        assert lists(api, "/api/v1/pods") == [{"fieldSelector": "spec.nodeName=node1"}]


async def test_client_watch_reports_a_silent_connection(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        client = client_for(api, watch_idle_timeout=0.2)
        events = client.watch("/api/v1/namespaces", {"resourceVersion": "100"})
        with pytest.raises(KubeError, match=r"watch silent for 0\.2 s"):
            await bounded(anext(events))
        await events.aclose()


async def test_client_watch_surfaces_an_http_error_status(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        api.answer("GET", "/api/v1/pods", 410)
        events = client_for(api).watch("/api/v1/pods", {"resourceVersion": "1"})
        with pytest.raises(KubeError, match="410") as raised:
            await bounded(anext(events))
        assert getattr(raised.value, "status", None) == 410
        await events.aclose()


async def test_client_watch_treats_a_line_that_is_not_json_as_a_broken_stream(
    tmp_path: Any,
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"type": "ADDED", "object": {"metadata": {"name": "a"}}}\nnot json\n'
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    token = tmp_path / "token"
    token.write_text("t\n")
    endpoint = KubeEndpoint(
        scheme="http", host="127.0.0.1", port=port, token_path=str(token), ca_path=""
    )
    try:
        events = KubeClient(endpoint, timeout=2.0).watch("/api/v1/pods")
        first = await anext(events)
        assert first["object"]["metadata"]["name"] == "a"
        with pytest.raises(KubeError, match="not JSON"):
            await bounded(anext(events))
        await events.aclose()
    finally:
        server.close()
        await server.wait_closed()


# -- against a scripted API --------------------------------------------------------------


class ScriptedApi:
    """LIST answers and WATCH streams per path, in order; an exhausted watch
    script hangs (as a quiet watch does) until the test ends."""

    def __init__(
        self,
        lists: Mapping[str, list[ApiResponse]],
        watches: Mapping[str, list[list[Any]]],
    ) -> None:
        self._lists = {path: list(answers) for path, answers in lists.items()}
        self._watches = {path: list(scripts) for path, scripts in watches.items()}
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.called = asyncio.Event()

    async def list(self, path: str, params: Mapping[str, str] | None = None) -> ApiResponse:
        self.calls.append(("LIST", path, dict(params or {})))
        self.called.set()
        answers = self._lists[path]
        return answers.pop(0) if len(answers) > 1 else answers[0]

    async def watch(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        self.calls.append(("WATCH", path, dict(params or {})))
        self.called.set()
        scripts = self._watches.get(path) or []
        if not scripts:
            await asyncio.Event().wait()
        for item in scripts.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item

    def watch_versions(self, path: str) -> list[str]:
        return [p["resourceVersion"] for m, q, p in self.calls if m == "WATCH" and q == path]

    async def until_calls(self, n: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.calls) < n:
                self.called.clear()
                await self.called.wait()


def listed(version: str, *items: dict[str, Any]) -> ApiResponse:
    return ApiResponse(200, {"metadata": {"resourceVersion": version}, "items": list(items)})


def pod(name: str, version: str, node: str = NODE, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "demo",
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": version,
            "labels": labels,
        },
        "spec": {"nodeName": node},
    }


def event(type_: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "object": obj}


QUIET_NAMESPACES: dict[str, Any] = {"/api/v1/namespaces": [listed("1")]}


async def test_bookmarks_move_the_resume_version_forward() -> None:
    api = ScriptedApi(
        lists={"/api/v1/pods": [listed("10", pod("web-1", "10"))], **QUIET_NAMESPACES},
        watches={
            "/api/v1/pods": [
                [event("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "57"}})],
            ]
        },
    )
    async with watching(api) as (cache, _changes):
        await api.until_calls(5)  # 2 lists, the namespaces watch, 2 pods watches
        assert api.watch_versions("/api/v1/pods") == ["10", "57"]
        assert keys(cache) == {"demo/web-1"}


async def test_bad_and_unknown_events_are_logged_and_skipped(caplog: Any) -> None:
    caplog.set_level("WARNING", logger="nodeagent.kube.watch")
    api = ScriptedApi(
        lists={"/api/v1/pods": [listed("10")], **QUIET_NAMESPACES},
        watches={
            "/api/v1/pods": [
                [
                    {"type": "SURPRISE", "object": {}},
                    {"type": "ADDED"},
                    {"type": "ADDED", "object": {"metadata": {}}},
                    {"type": "MODIFIED", "object": "not an object"},
                    {"no": "type"},
                    event("ADDED", pod("web-1", "11")),
                    event("ERROR", {"kind": "Status", "code": 500, "message": "etcd hiccup"}),
                ],
                [event("ADDED", pod("web-2", "12"))],
            ]
        },
    )
    async with watching(api) as (cache, changes):
        await changes.until(lambda: keys(cache) == {"demo/web-1", "demo/web-2"})
        await api.until_calls(6)  # 2 lists, the namespaces watch, 3 pods watches
    # The error event ended the first watch; the next resumed after web-1.
    assert api.watch_versions("/api/v1/pods") == ["10", "11", "12"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("pods watch: skipped an event: unknown event type 'SURPRISE'" in w for w in warnings)
    assert any("without an object" in w for w in warnings)
    assert any("without metadata.name" in w for w in warnings)
    assert any("pods watch: error event 500: etcd hiccup" in w for w in warnings)


async def test_failures_back_off_and_a_failing_on_change_does_not_stop_the_watch(
    caplog: Any,
) -> None:
    caplog.set_level("WARNING", logger="nodeagent.kube.watch")
    api = ScriptedApi(
        lists={
            "/api/v1/pods": [
                ApiResponse(403, {"reason": "Forbidden", "message": "no"}),
                listed("10", pod("web-1", "10")),
            ],
            **QUIET_NAMESPACES,
        },
        watches={
            "/api/v1/pods": [
                [KubeError("connection reset")],
                [event("ADDED", pod("b", "11")), KubeError("reset again")],
                [event("ADDED", pod("c", "12"))],
            ]
        },
    )
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    def on_change() -> None:
        raise RuntimeError("consumer bug")

    cache = KubeMetaCache()
    watcher = KubeWatcher(api, NODE, cache, on_change, sleep=sleep, clock=lambda: 0.0)
    task = asyncio.create_task(watcher.run())
    try:
        async with asyncio.timeout(WAIT):
            while "demo/c" not in keys(cache):
                await api.until_calls(len(api.calls) + 1)
        await api.until_calls(7)  # 2 lists, 1 namespaces watch, 4 pods watches
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Failures count up until a watch holds (the refused list, then the lost watch);
    # a watch that carried events and is then lost waits the first step again; one
    # that the server ends after events is followed at once.
    assert delays == [default_backoff(1), default_backoff(2), default_backoff(1)]
    assert "pods list failed: 403 Forbidden: no" in caplog.text
    assert "pods watch lost at version 10: connection reset" in caplog.text
    assert "on_change failed" in caplog.text


# -- the cache alone -------------------------------------------------------------------


def meta(name: str, *ips: str, uid: str = "", host_network: bool = False) -> PodMeta:
    return PodMeta(
        namespace="demo",
        name=name,
        uid=uid or f"uid-{name}",
        node=NODE,
        ips=ips,
        host_network=host_network,
    )


def test_cache_is_synced_only_once_both_lists_are_applied() -> None:
    cache = KubeMetaCache()
    cache.replace_pods([])
    assert not cache.synced
    cache.replace_namespaces([NamespaceMeta(name="demo")])
    assert cache.synced


def test_cache_indexes_pods_by_ip_and_uid_and_forgets_them_on_delete() -> None:
    cache = KubeMetaCache()
    cache.replace_pods([meta("a", "10.0.0.1", "fd00::1")])
    assert cache.pod_by_ip("fd00::1") == cache.pod("demo/a") == cache.pod_by_uid("uid-a")
    assert cache.apply_pod(EventType.DELETED, meta("a"))
    assert cache.pod_by_ip("10.0.0.1") is None and cache.pod_by_uid("uid-a") is None
    assert not cache.apply_pod(EventType.DELETED, meta("a"))


def test_a_reused_ip_still_finds_the_pod_that_holds_it() -> None:
    cache = KubeMetaCache()
    cache.replace_pods([meta("done", "10.0.0.1"), meta("new", "10.0.0.1")])
    cache.apply_pod(EventType.DELETED, meta("new", "10.0.0.1"))
    assert cache.pod_by_ip("10.0.0.1") == cache.pod("demo/done")


def test_host_network_pods_are_not_found_by_the_nodes_ip() -> None:
    cache = KubeMetaCache()
    cache.replace_pods([meta("kube-proxy", "192.168.1.2", host_network=True)])
    assert cache.pod_by_ip("192.168.1.2") is None
    assert cache.pod("demo/kube-proxy") is not None


def test_a_relist_replaces_everything_and_a_recreated_pod_takes_its_new_uid() -> None:
    cache = KubeMetaCache()
    cache.replace_pods([meta("a", "10.0.0.1"), meta("b", "10.0.0.2")])
    cache.replace_pods([meta("a", "10.0.0.3", uid="uid-a2")])
    assert keys(cache) == {"demo/a"}
    assert cache.pod_by_ip("10.0.0.2") is None and cache.pod_by_ip("10.0.0.1") is None
    assert cache.pod_by_uid("uid-a") is None
    assert cache.pod_by_uid("uid-a2") == cache.pod_by_ip("10.0.0.3")


def test_an_unchanged_object_is_not_a_change() -> None:
    cache = KubeMetaCache()
    cache.replace_namespaces([NamespaceMeta(name="demo", labels=AMBIENT)])
    assert not cache.apply_namespace(EventType.MODIFIED, NamespaceMeta(name="demo", labels=AMBIENT))
    assert cache.apply_namespace(EventType.MODIFIED, NamespaceMeta(name="demo"))
    assert not cache.apply_pod(EventType.BOOKMARK, meta("a"))


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"type": "NOPE", "object": {}}, "unknown event type 'NOPE'"),
        ({"object": {}}, "unknown event type None"),
        ({"type": "DELETED", "object": []}, "DELETED event without an object"),
        ({"type": "ADDED", "object": {"metadata": {"name": ""}}}, "without metadata.name"),
    ],
)
def test_parse_event_names_what_is_wrong(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_event(raw)


def test_parse_event_reads_version_and_error_code() -> None:
    bookmark = parse_event(
        json.loads('{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"7"}}}')
    )
    assert (bookmark.type, bookmark.resource_version) == (EventType.BOOKMARK, "7")
    gone = parse_event({"type": "ERROR", "object": {"kind": "Status", "code": 410}})
    assert gone.code == 410
