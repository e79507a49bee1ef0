"""A small in-memory Kubernetes API server: the tests' fake and the sandbox's API.

It serves the few endpoints the agent uses, with the API server's semantics
where the agent depends on them:

* pods, namespaces and DaemonSets in memory, every change stamped with the next
  `resourceVersion` from one counter (as etcd's revision is one counter);
* GET one object, LIST a collection (`fieldSelector` on `spec.nodeName`,
  `metadata.name`, `metadata.namespace`), POST (create), DELETE, and PATCH as a
  JSON merge patch whose `metadata.resourceVersion` is a precondition (409);
* WATCH (`?watch=1`): chunked JSON lines from a `resourceVersion`, replayed
  from a bounded event history; a version older than the history gets an ERROR
  event with code 410 (as the real server's watch cache answers), after which
  the client must relist. `compact()` forgets the history so tests can force
  that, `drop_watches()` cuts every open watch, `bookmark()` sends a BOOKMARK to
  watches that asked for them; a watch ends after its `timeoutSeconds`;
* a bearer token check when a token is set; plain HTTP, or HTTPS with a
  certificate; every request recorded; `answer()` forces statuses (or HANG).

`KubeObjectStore` is the objects, versions and history, with no I/O;
`KubeApiServer` is the asyncio HTTP adapter around it. Run it standalone with
`python -m nodeagent.sandbox.kubeapi --listen HOST:PORT [--seed FILE.json]`
(serves until SIGTERM; the seed is a JSON list of objects, or `{"items": [...]}`,
each with its `kind`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from nodeagent.kube.api import MERGE_PATCH

HANG = -1  # an `answer()` status that never answers (the client must time out)
# Events kept for watches to resume from; an older version gets 410 Gone.
HISTORY_LIMIT = 1000
FIRST_VERSION = 100

PODS, NAMESPACES, DAEMONSETS = "pods", "namespaces", "daemonsets"
# kind -> (apiVersion, Kind) of its objects
KINDS: dict[str, tuple[str, str]] = {
    PODS: ("v1", "Pod"),
    NAMESPACES: ("v1", "Namespace"),
    DAEMONSETS: ("apps/v1", "DaemonSet"),
}
_KIND_OF = {name: kind for kind, (_, name) in KINDS.items()}

Key = tuple[str, str]  # (namespace, name); namespaces are ("", name)


@dataclass(frozen=True)
class Recorded:
    """One request as received; `path` is the whole target, query included."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # decoded JSON, or None

    @property
    def route(self) -> str:
        return unquote(urlsplit(self.path).path)

    @property
    def params(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.path).query))


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """RFC 7386, in place."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping):
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
            merge_patch(child, value)
        else:
            target[key] = value


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


Answer = tuple[int, dict[str, Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Selector:
    """Which objects of a kind a LIST or WATCH covers."""

    kind: str
    namespace: str = ""  # "" = all namespaces
    fields: tuple[tuple[str, str], ...] = ()  # (field path, value), all must match

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace and meta.get("namespace") != self.namespace:
            return False
        return all(_field(obj, path) == value for path, value in self.fields)


_FIELDS = ("spec.nodeName", "metadata.name", "metadata.namespace")


def _field(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return str(value or "")


def parse_field_selector(text: str) -> tuple[tuple[str, str], ...]:
    """`spec.nodeName=node1,metadata.name=x`; raises ValueError on anything else."""
    fields = []
    for term in filter(None, text.split(",")):
        path, sep, value = term.partition("=")
        path = path.rstrip("=")  # `==` is allowed too
        value = value.lstrip("=")
        if not sep or path not in _FIELDS:
            raise ValueError(f"unsupported field selector {term!r}")
        fields.append((path, value))
    return tuple(fields)


@dataclass(frozen=True, slots=True)
class _Event:
    version: int
    kind: str
    obj: dict[str, Any]  # a snapshot, never the live object
    line: bytes  # the watch line, encoded once


@dataclass(frozen=True, slots=True)
class Gone:
    """A watch asked for a version older than the history holds."""

    version: int
    oldest: int


class KubeObjectStore:
    """The objects, their versions and the recent events; pure (no I/O).

    `listeners` are called with every event, synchronously, as it happens: the
    server fans them out to open watches.
    """

    def __init__(self, *, history_limit: int = HISTORY_LIMIT) -> None:
        self.objects: dict[str, dict[Key, dict[str, Any]]] = {kind: {} for kind in KINDS}
        self.version = FIRST_VERSION
        self._history: deque[_Event] = deque(maxlen=history_limit)
        # A watch from a version below this has missed events: 410.
        self._floor = 0
        self._uids = 0
        self.listeners: list[Callable[[_Event], None]] = []

    # -- reading --------------------------------------------------------------------

    def get(self, kind: str, key: Key) -> dict[str, Any] | None:
        return self.objects[kind].get(key)

    def collection(self, selector: Selector) -> dict[str, Any]:
        api_version, name = KINDS[selector.kind]
        items = [o for o in self.objects[selector.kind].values() if selector.matches(o)]
        return {
            "kind": f"{name}List",
            "apiVersion": api_version,
            "metadata": {"resourceVersion": str(self.version)},
            "items": items,
        }

    def events_since(self, selector: Selector, version: int) -> list[bytes] | Gone:
        """The watch lines after `version` for `selector`, or Gone if some are forgotten."""
        if version < self._floor:
            return Gone(version, self._floor)
        return [
            e.line
            for e in self._history
            if e.version > version and e.kind == selector.kind and selector.matches(e.obj)
        ]

    def compact(self) -> None:
        """Forget the history, as etcd compaction does: older watches get 410."""
        self._history.clear()
        self._floor = self.version

    # -- writing ---------------------------------------------------------------------

    def create(self, kind: str, obj: dict[str, Any]) -> Answer:
        meta = obj.setdefault("metadata", {})
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if not key[1]:
            return 422, status_body(422, "Invalid", "metadata.name: Required value")
        if key in self.objects[kind]:
            return 409, status_body(409, "AlreadyExists", f'{kind} "{key[1]}" already exists')
        api_version, name = KINDS[kind]
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", name)
        if not meta.get("uid"):
            self._uids += 1
            meta["uid"] = f"00000000-0000-4000-8000-{self._uids:012d}"
        self.objects[kind][key] = obj
        self._record(kind, "ADDED", obj)
        return 201, obj

    def patch(self, kind: str, key: Key, patch: Mapping[str, Any]) -> Answer:
        obj = self.objects[kind].get(key)
        if obj is None:
            return _not_found(kind, key)
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != obj["metadata"]["resourceVersion"]:
            return 409, status_body(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind} "{key[1]}": '
                "the object has been modified; please apply your changes to the latest version",
            )
        merge_patch(obj, patch)
        self._record(kind, "MODIFIED", obj)
        return 200, obj

    def delete(self, kind: str, key: Key) -> Answer:
        obj = self.objects[kind].pop(key, None)
        if obj is None:
            return _not_found(kind, key)
        self._record(kind, "DELETED", obj)
        return 200, obj

    def _record(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0].version  # about to be forgotten
        line = json.dumps({"type": type_, "object": obj}).encode() + b"\n"
        event = _Event(self.version, kind, json.loads(line)["object"], line)
        self._history.append(event)
        for listener in list(self.listeners):
            listener(event)


def _not_found(kind: str, key: Key) -> Answer:
    return 404, status_body(404, "NotFound", f'{kind} "{key[1]}" not found')


@dataclass(frozen=True, slots=True)
class _Route:
    kind: str
    key: Key | None  # None: the collection
    namespace: str = ""


def parse_route(path: str) -> _Route | None:
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if parts[:2] == ["api", "v1"]:
        rest = parts[2:]
    elif parts[:3] == ["apis", "apps", "v1"]:
        rest = parts[3:]
        if rest[-2:-1] != [DAEMONSETS] and rest[-1:] != [DAEMONSETS]:
            return None
    else:
        return None
    match rest:
        case [kind] if kind in (PODS, DAEMONSETS, NAMESPACES):
            return _Route(kind, None)
        case ["namespaces", name]:
            return _Route(NAMESPACES, ("", name))
        case ["namespaces", namespace, kind] if kind in (PODS, DAEMONSETS):
            return _Route(kind, None, namespace)
        case ["namespaces", namespace, kind, name] if kind in (PODS, DAEMONSETS):
            return _Route(kind, (namespace, name), namespace)
    return None


@dataclass(eq=False, slots=True)
class _Watch:
    selector: Selector
    bookmarks: bool
    writer: asyncio.StreamWriter
    queue: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[Any] | None = None


class KubeApiServer:
    """The store behind an HTTP(S) listener; `async with` starts and stops it."""

    HANG = HANG

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = "",
        cert_path: str | Path | None = None,
        key_path: str | Path | None = None,
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token  # "" accepts any caller
        self.cert_path = cert_path
        self.key_path = key_path
        self.store = KubeObjectStore(history_limit=history_limit)
        self.store.listeners.append(self._fan_out)
        self.requests: list[Recorded] = []
        # (METHOD, target or path) -> statuses to answer with before behaving normally.
        self.overrides: dict[tuple[str, str], list[int]] = {}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._watches: set[_Watch] = set()
        self._changed: asyncio.Event | None = None

    # -- objects ---------------------------------------------------------------------

    @property
    def pods(self) -> dict[Key, dict[str, Any]]:
        return self.store.objects[PODS]

    @property
    def namespaces(self) -> dict[Key, dict[str, Any]]:
        return self.store.objects[NAMESPACES]

    @property
    def daemonsets(self) -> dict[Key, dict[str, Any]]:
        return self.store.objects[DAEMONSETS]

    def add(self, obj: Mapping[str, Any]) -> None:
        """Create an object from its manifest (`kind` says which store)."""
        kind = _KIND_OF.get(str(obj.get("kind")))
        if kind is None:
            raise ValueError(f"unsupported kind {obj.get('kind')!r}")
        status, answer = self.store.create(kind, json.loads(json.dumps(obj)))
        if status >= 300:
            raise ValueError(answer["message"])
        self._notify()

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        node: str,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        ips: Iterable[str] = (),
        host_network: bool = False,
    ) -> None:
        addresses = list(ips)
        pod: dict[str, Any] = {
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(labels or {}),
                "annotations": dict(annotations or {}),
            },
            "spec": {"nodeName": node},
        }
        if host_network:
            pod["spec"]["hostNetwork"] = True
        if addresses:
            pod["status"] = {"podIP": addresses[0], "podIPs": [{"ip": ip} for ip in addresses]}
        self.add(pod)

    def add_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        self.add({"kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}})

    def add_daemonset(self, namespace: str, name: str, *, deleting: bool = False) -> None:
        meta: dict[str, Any] = {"name": name, "namespace": namespace}
        if deleting:
            meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        self.add({"kind": "DaemonSet", "metadata": meta})

    def set_labels(self, kind: str, namespace: str, name: str, labels: Mapping[str, str]) -> None:
        """Replace an object's labels (kind: pods or namespaces; a namespace's namespace is "")."""
        key = ("", name) if kind == NAMESPACES else (namespace, name)
        obj = self.store.get(kind, key)
        if obj is None:
            raise KeyError(f"no {kind} {namespace}/{name}")
        old = dict(obj["metadata"].get("labels") or {})
        change: dict[str, Any] = {k: None for k in old if k not in labels} | dict(labels)
        self.store.patch(kind, key, {"metadata": {"labels": change}})
        self._notify()

    def delete_pod(self, namespace: str, name: str) -> None:
        self.store.delete(PODS, (namespace, name))
        self._notify()

    def delete_namespace(self, name: str) -> None:
        self.store.delete(NAMESPACES, ("", name))
        self._notify()

    def annotations_of(self, namespace: str, name: str) -> dict[str, str]:
        return dict(self.pods[(namespace, name)]["metadata"].get("annotations") or {})

    # -- watches ---------------------------------------------------------------------

    def compact(self) -> None:
        self.store.compact()

    def drop_watches(self) -> None:
        """Cut every open watch connection at once (no more events reach them)."""
        for watch in list(self._watches):
            self._end_watch(watch)

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current version to the watches that asked for them."""
        for watch in self._watches:
            if watch.bookmarks:
                api_version, name = KINDS[watch.selector.kind]
                obj = {
                    "kind": name,
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(self.store.version)},
                }
                watch.queue.put_nowait(_line("BOOKMARK", obj))

    def watch_count(self) -> int:
        return len(self._watches)

    # -- test helpers ----------------------------------------------------------------

    def answer(self, method: str, path: str, *statuses: int) -> None:
        """Answer the next requests to METHOD path with these statuses (HANG: never).
        `path` is the whole target (with a query) or just the path (any query)."""
        self.overrides.setdefault((method, path), []).extend(statuses)

    def calls(self, method: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if method is None or r.method == method]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate()` holds, re-checked after every request and change."""
        while not predicate():
            changed = self._changed_event()
            changed.clear()
            await changed.wait()

    # -- serving ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.cert_path else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        context = None
        if self.cert_path:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.cert_path, self.key_path)
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self.drop_watches()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> KubeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _changed_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _fan_out(self, event: _Event) -> None:
        for watch in self._watches:
            if watch.selector.kind == event.kind and watch.selector.matches(event.obj):
                watch.queue.put_nowait(event.line)

    def _end_watch(self, watch: _Watch) -> None:
        self._watches.discard(watch)
        watch.writer.transport.abort()
        if watch.task is not None:
            watch.task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            with contextlib.suppress(
                ConnectionError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ssl.SSLError,
            ):
                await self._one(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        call = Recorded(method, target, headers, body)
        self.requests.append(call)
        self._notify()
        forced = self._forced(method, call)
        if forced == HANG:
            await asyncio.Event().wait()  # until the server closes and cancels us
        if forced is not None:
            reply = status_body(forced, "Forced", f"forced {forced} for {call.route}")
            await _respond(writer, forced, reply, chunked=False)
            return
        route = parse_route(call.route)
        params = call.params
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            status, reply = 401, status_body(401, "Unauthorized", "Unauthorized")
        elif route is None:
            status, reply = 404, status_body(404, "NotFound", f"no route {call.route}")
        elif method == "GET" and route.key is None and params.get("watch") in ("1", "true"):
            await self._watch(writer, route, params)
            return
        else:
            status, reply = self._route(method, route, params, headers, body)
            self._notify()
        # Pod reads come chunked, as the real API server sends larger objects.
        chunked = method == "GET" and route is not None and route.kind == PODS and bool(route.key)
        await _respond(writer, status, reply, chunked=chunked)

    def _forced(self, method: str, call: Recorded) -> int | None:
        for key in ((method, call.path), (method, call.route)):
            queued = self.overrides.get(key)
            if queued:
                return queued.pop(0)
        return None

    def _selector(self, route: _Route, params: Mapping[str, str]) -> Selector:
        fields = parse_field_selector(params.get("fieldSelector", ""))
        return Selector(kind=route.kind, namespace=route.namespace, fields=fields)

    def _route(
        self,
        method: str,
        route: _Route,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        body: Any,
    ) -> Answer:
        store = self.store
        if route.key is None:
            if method == "GET":
                try:
                    return 200, store.collection(self._selector(route, params))
                except ValueError as exc:
                    return 400, status_body(400, "BadRequest", str(exc))
            if method == "POST" and route.kind in (PODS, NAMESPACES):
                if not isinstance(body, dict):
                    return 400, status_body(400, "BadRequest", "expected a JSON object")
                if route.namespace:
                    body.setdefault("metadata", {})["namespace"] = route.namespace
                return store.create(route.kind, body)
            return 405, status_body(405, "MethodNotAllowed", method)
        if method == "GET":
            obj = store.get(route.kind, route.key)
            return (200, obj) if obj is not None else _not_found(route.kind, route.key)
        if method == "PATCH" and route.kind in (PODS, NAMESPACES):
            if headers.get("content-type") != MERGE_PATCH:
                return 415, status_body(415, "UnsupportedMediaType", "bad content type")
            if not isinstance(body, dict):
                return 400, status_body(400, "BadRequest", "expected a JSON object")
            return store.patch(route.kind, route.key, body)
        if method == "DELETE" and route.kind in (PODS, NAMESPACES):
            return store.delete(route.kind, route.key)
        return 405, status_body(405, "MethodNotAllowed", method)

    async def _watch(
        self, writer: asyncio.StreamWriter, route: _Route, params: Mapping[str, str]
    ) -> None:
        try:
            selector = self._selector(route, params)
            since = int(params.get("resourceVersion") or 0)
            timeout = float(params.get("timeoutSeconds") or 1800)
        except ValueError as exc:
            await _respond(writer, 400, status_body(400, "BadRequest", str(exc)), chunked=False)
            return
        watch = _Watch(selector, params.get("allowWatchBookmarks") == "true", writer)
        watch.task = asyncio.current_task()
        # The backlog and the subscription are taken together (no await between),
        # so no event falls between them.
        if since:
            backlog: list[bytes] | Gone = self.store.events_since(selector, since)
        else:  # "any version": the current objects as ADDED, then what follows
            backlog = [_line("ADDED", o) for o in self.store.collection(selector)["items"]]
        if not isinstance(backlog, Gone):
            self._watches.add(watch)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        try:
            if isinstance(backlog, Gone):
                message = f"too old resource version: {backlog.version} ({backlog.oldest})"
                writer.write(_chunk(_line("ERROR", status_body(410, "Expired", message))))
            else:
                for line in backlog:
                    writer.write(_chunk(line))
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        while True:
                            writer.write(_chunk(await watch.queue.get()))
                            await writer.drain()
            writer.write(b"0\r\n\r\n")  # the server ends the watch
            await writer.drain()
        finally:
            self._watches.discard(watch)


def _line(type_: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode() + b"\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _respond(
    writer: asyncio.StreamWriter, status: int, reply: Mapping[str, Any], *, chunked: bool
) -> None:
    payload = json.dumps(reply).encode()
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json", "Connection: close"]
    if chunked:
        half = len(payload) // 2
        data = _chunk(payload[:half]) + _chunk(payload[half:]) + b"0\r\n\r\n"
        lines.append("Transfer-Encoding: chunked")
    else:
        data = payload
        lines.append(f"Content-Length: {len(payload)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    await writer.drain()


# -- standalone ----------------------------------------------------------------------


def load_seed(text: str) -> list[dict[str, Any]]:
    """A seed file's objects: a JSON list, or a List object's `items`."""
    value = json.loads(text)
    items = value.get("items") if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(o, dict) for o in items):
        raise ValueError('expected a JSON list of objects or {"items": [...]}')
    return items


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(server: KubeApiServer) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        print(f"listening on {server.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.sandbox.kubeapi")
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--seed", type=Path, help="JSON objects to start with")
    parser.add_argument("--token-file", type=Path, help="require this bearer token")
    parser.add_argument("--cert", type=Path, help="serve HTTPS with this certificate")
    parser.add_argument("--key", type=Path, help="the certificate's key")
    args = parser.parse_args(argv)
    host, port = args.listen
    token = args.token_file.read_text(encoding="utf-8").strip() if args.token_file else ""
    server = KubeApiServer(
        host=host, port=port, token=token, cert_path=args.cert, key_path=args.key
    )
    if args.seed:
        try:
            for obj in load_seed(args.seed.read_text(encoding="utf-8")):
                server.add(obj)
        except (OSError, ValueError) as exc:
            print(f"kubeapi: --seed {args.seed}: {exc}", file=sys.stderr)
            return 2
    asyncio.run(serve(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
