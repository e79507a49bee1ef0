"""The in-memory API server: its store alone, and over plain HTTP on loopback with
the agent's real client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.kube.api import KubeError, redirection_patch
from nodeagent.kube.client import KubeClient, KubeEndpoint
from nodeagent.sandbox.kubeapi import (
    NAMESPACES,
    PODS,
    Gone,
    KubeApiServer,
    KubeObjectStore,
    Selector,
    parse_field_selector,
)

WAIT = 10.0  # seconds: a bound on every wait, never expected to pass
POD_PATH = "/api/v1/namespaces/demo/pods/web-1"


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, client_token: str = "secret"
) -> AsyncIterator[tuple[KubeApiServer, KubeClient]]:
    """A server that wants token `secret`, and a client that sends `client_token`."""
    token_file = tmp_path / "token"
    token_file.write_text(client_token + "\n")
    async with KubeApiServer(token="secret") as server:
        endpoint = KubeEndpoint(
            scheme="http",
            host="127.0.0.1",
            port=server.port,
            token_path=str(token_file),
            ca_path="",
        )
        yield server, KubeClient(endpoint, timeout=2.0, watch_idle_timeout=WAIT)


async def next_event(events: Any) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        event: dict[str, Any] = await anext(events)
        return event


def pod(name: str, node: str = "node1") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"nodeName": node},
    }


# -- the store -------------------------------------------------------------------------


def test_every_change_of_any_kind_takes_the_next_version() -> None:
    store = KubeObjectStore()
    store.create(NAMESPACES, {"metadata": {"name": "demo"}})
    _, created = store.create(PODS, pod("web-1"))
    _, patched = store.patch(NAMESPACES, ("", "demo"), {"metadata": {"labels": {"a": "b"}}})
    assert int(created["metadata"]["resourceVersion"]) + 1 == int(
        patched["metadata"]["resourceVersion"]
    )
    assert store.collection(Selector(kind=PODS))["metadata"]["resourceVersion"] == str(
        store.version
    )


def test_list_honours_the_node_field_selector() -> None:
    store = KubeObjectStore()
    for name, node in (("a", "node1"), ("b", "node2"), ("c", "node1")):
        store.create(PODS, pod(name, node))
    selector = Selector(kind=PODS, fields=parse_field_selector("spec.nodeName=node1"))
    assert [o["metadata"]["name"] for o in store.collection(selector)["items"]] == ["a", "c"]


def test_an_unsupported_field_selector_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unsupported field selector 'status\.phase=Running'"):
        parse_field_selector("status.phase=Running")


def test_events_since_a_version_and_gone_once_forgotten() -> None:
    store = KubeObjectStore(history_limit=3)
    start = store.version
    for name in ("a", "b", "c"):
        store.create(PODS, pod(name))
    lines = store.events_since(Selector(kind=PODS), start + 1)
    assert not isinstance(lines, Gone)
    assert [json.loads(x)["object"]["metadata"]["name"] for x in lines] == ["b", "c"]
    store.delete(PODS, ("demo", "a"))  # the fourth event pushes the first out
    assert isinstance(store.events_since(Selector(kind=PODS), start), Gone)
    assert not isinstance(store.events_since(Selector(kind=PODS), start + 1), Gone)
    store.compact()
    assert isinstance(store.events_since(Selector(kind=PODS), start + 3), Gone)
    assert store.events_since(Selector(kind=PODS), store.version) == []


# -- over HTTP -------------------------------------------------------------------------


async def test_create_get_patch_and_delete_over_http(tmp_path: Path) -> None:
    async with serving(tmp_path) as (server, client):
        created = await client.request("POST", "/api/v1/namespaces/demo/pods", pod("web-1"))
        assert created.status == 201
        again = await client.request("POST", "/api/v1/namespaces/demo/pods", pod("web-1"))
        assert (again.status, again.body["reason"]) == (409, "AlreadyExists")
        version = created.body["metadata"]["resourceVersion"]

        stale = redirection_patch(enabled=True, resource_version="1")
        assert (await client.patch_pod("demo", "web-1", stale)).status == 409
        fresh = redirection_patch(enabled=True, resource_version=version)
        assert (await client.patch_pod("demo", "web-1", fresh)).status == 200
        assert server.annotations_of("demo", "web-1") == {"ambient.istio.io/redirection": "enabled"}

        ns = await client.request("POST", "/api/v1/namespaces", {"metadata": {"name": "demo"}})
        assert ns.status == 201
        labels = {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}
        patched = await client.request(
            "PATCH", "/api/v1/namespaces/demo", labels, "application/merge-patch+json"
        )
        assert patched.body["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}

        assert (await client.request("DELETE", POD_PATH)).status == 200
        assert (await client.get_pod("demo", "web-1")).status == 404
        assert [c.method for c in server.calls()] == [
            "POST", "POST", "PATCH", "PATCH", "POST", "PATCH", "DELETE", "GET",
        ]  # fmt: skip


async def test_list_over_http_carries_the_version_and_only_this_nodes_pods(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as (server, client):
        server.add_pod("demo", "here", node="node1")
        server.add_pod("demo", "there", node="node2")
        got = await client.list("/api/v1/pods", {"fieldSelector": "spec.nodeName=node1"})
        assert [o["metadata"]["name"] for o in got.body["items"]] == ["here"]
        assert got.body["metadata"]["resourceVersion"] == str(server.store.version)
        bad = await client.list("/api/v1/pods", {"fieldSelector": "status.phase=Running"})
        assert bad.status == 400


async def test_watch_replays_from_a_version_then_follows(tmp_path: Path) -> None:
    async with serving(tmp_path) as (server, client):
        server.add_pod("demo", "a", node="node1")
        listed = (await client.list("/api/v1/pods")).body["metadata"]["resourceVersion"]
        server.add_pod("demo", "b", node="node1")  # after the list: replayed
        server.add_pod("demo", "far", node="node2")  # another node: filtered out
        params = {"resourceVersion": listed, "fieldSelector": "spec.nodeName=node1"}
        events = client.watch("/api/v1/pods", params)
        try:
            first = await next_event(events)
            assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "b")
            server.set_labels(PODS, "demo", "b", {"app": "web"})
            second = await next_event(events)
            assert second["type"] == "MODIFIED"
            assert second["object"]["metadata"]["labels"] == {"app": "web"}
            server.delete_pod("demo", "b")
            assert (await next_event(events))["type"] == "DELETED"
        finally:
            await events.aclose()
        [watch] = [c for c in server.calls() if c.params.get("watch")]
        assert watch.route == "/api/v1/pods"


async def test_bookmarks_go_only_to_watches_that_asked(tmp_path: Path) -> None:
    async with serving(tmp_path) as (server, client):
        server.add_namespace("demo")
        version = str(server.store.version)
        asked = client.watch(
            "/api/v1/namespaces", {"resourceVersion": version, "allowWatchBookmarks": "true"}
        )
        plain = client.watch("/api/v1/namespaces", {"resourceVersion": version})
        try:
            # Both watches are open once the server counts them (bounded).
            first = asyncio.ensure_future(next_event(asked))
            other = asyncio.ensure_future(next_event(plain))
            async with asyncio.timeout(WAIT):
                await server.wait_until(lambda: server.watch_count() == 2)
            server.bookmark()
            server.add_namespace("later")
            assert (await first)["type"] == "BOOKMARK"
            assert (await other)["object"]["metadata"]["name"] == "later"
        finally:
            await asyncio.gather(asked.aclose(), plain.aclose())


async def test_a_compacted_version_gets_an_error_event_with_410(tmp_path: Path) -> None:
    async with serving(tmp_path) as (server, client):
        server.add_pod("demo", "a", node="node1")
        old = str(server.store.version)
        server.add_pod("demo", "b", node="node1")
        server.compact()
        events = client.watch("/api/v1/pods", {"resourceVersion": old})
        try:
            error = await next_event(events)
        finally:
            await events.aclose()
        assert error["type"] == "ERROR"
        assert (error["object"]["code"], error["object"]["reason"]) == (410, "Expired")


async def test_drop_watches_cuts_the_connection(tmp_path: Path) -> None:
    async with serving(tmp_path) as (server, client):
        events = client.watch("/api/v1/pods", {"resourceVersion": str(server.store.version)})
        try:
            waiting = asyncio.ensure_future(next_event(events))
            async with asyncio.timeout(WAIT):
                await server.wait_until(lambda: server.watch_count() == 1)
            server.drop_watches()
            with pytest.raises(KubeError, match=r"closed|reset"):
                await waiting
        finally:
            await events.aclose()


async def test_a_wrong_token_gets_401_and_no_token_accepts_anyone(tmp_path: Path) -> None:
    async with serving(tmp_path, client_token="wrong") as (server, client):
        assert (await client.list("/api/v1/namespaces")).status == 401
        server.token = ""
        assert (await client.list("/api/v1/namespaces")).status == 200


async def test_answer_forces_statuses_on_a_path_whatever_its_query(tmp_path: Path) -> None:
    async with serving(tmp_path) as (server, client):
        server.answer("GET", "/api/v1/pods", 500)
        assert (await client.list("/api/v1/pods", {"fieldSelector": "x=y"})).status == 500
        assert (await client.list("/api/v1/pods")).status == 200


async def test_standalone_serves_the_seed_until_sigterm(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(
        json.dumps(
            {
                "items": [
                    {"kind": "Namespace", "metadata": {"name": "demo", "labels": {"a": "b"}}},
                    pod("web-1"),
                ]
            }
        )
    )
    token_file = tmp_path / "token"
    token_file.write_text("t\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nodeagent.sandbox.kubeapi",
        "--listen",
        "127.0.0.1:0",
        "--seed",
        str(seed),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(WAIT):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        endpoint = KubeEndpoint(
            scheme="http", host="127.0.0.1", port=port, token_path=str(token_file), ca_path=""
        )
        client = KubeClient(endpoint, timeout=5.0)
        assert (await client.get_pod("demo", "web-1")).body["spec"]["nodeName"] == "node1"
        namespaces = await client.list("/api/v1/namespaces")
        assert [n["metadata"]["labels"] for n in namespaces.body["items"]] == [{"a": "b"}]
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
