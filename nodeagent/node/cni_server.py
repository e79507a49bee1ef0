"""The agent's end of nodeagent-cni: a Unix-socket HTTP/1.1 server for CNI pod events.

The plugin (nodeagent/cni/plugin.py) runs in the container runtime for each new pod and
posts it here before the pod starts: `POST /cmdadd` (and `/cmdcheck`, the same body) with
`{"netns", "container_id", "pod_name", "pod_namespace", "pod_uid", "interface", "ips"}`,
`POST /cmddel` without "ips". One JSON request and one JSON reply per connection; the
reply is `{"state", "message"}` with the handler's status. 200 means the pod is captured
or not enrolled; anything else makes the plugin hold the pod itself (fail closed).

What happens to a pod is injected (`on_add`, `on_del`, optionally `on_check`, which
defaults to `on_add`: the agent's add is idempotent, so asking again is the check). The
socket is root-only (0600): whoever can post here can make the agent capture a namespace.
ADD outcomes and latencies are counted in `stats` and passed to `observe` for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/nodeagent/cni.sock"
MAX_REQUEST_BYTES = 64 * 1024
# A plugin that does not finish its request in this time is dropped.
REQUEST_TIMEOUT_S = 10.0
LATENCY_SAMPLES = 1024  # add_seconds keeps the most recent ones only


@dataclass(frozen=True, kw_only=True)
class _PodEvent:
    netns: str
    container_id: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    interface: str


@dataclass(frozen=True, kw_only=True)
class CniAdd(_PodEvent):
    """A pod the runtime is starting (ADD, or CHECK of a running one)."""

    ips: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class CniDel(_PodEvent):
    """A pod the runtime tore down; `netns` may be empty (already gone)."""


@dataclass(frozen=True)
class CniReply:
    """The handler's answer. status 200 with state "captured", "not_enrolled" or
    "removed" is success for the plugin; anything else makes it fail closed."""

    status: int
    state: str
    message: str = ""


@dataclass
class CniStats:
    """ADDs by result ("captured", "not_enrolled", "error", ...) and recent latencies."""

    adds: dict[str, int] = field(default_factory=dict)
    add_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


class RequestError(ValueError):
    """A request we refuse, with the status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_STRINGS = ("netns", "container_id", "pod_name", "pod_namespace", "pod_uid", "interface")


def parse_event(path: str, body: bytes) -> CniAdd | CniDel:
    """The event a request carries; RequestError(400) naming what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "body is not JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body is not a JSON object")
    fields: dict[str, Any] = {}
    for name in _STRINGS:
        value = data.get(name, "")
        if not isinstance(value, str):
            raise RequestError(400, f"field {name!r} must be a string")
        fields[name] = value
    if not fields["container_id"]:
        raise RequestError(400, "field 'container_id' is required")
    if path == "/cmddel":
        return CniDel(**fields)
    if not fields["netns"]:
        raise RequestError(400, "field 'netns' is required")
    ips = data.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
        raise RequestError(400, "field 'ips' must be a list of strings")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise RequestError(400, f"field 'ips': {ip!r} is not an IP address") from None
    return CniAdd(**fields, ips=tuple(ips))


AddHandler = Callable[[CniAdd], Awaitable[CniReply]]
DelHandler = Callable[[CniDel], Awaitable[CniReply]]
Observer = Callable[[str, float], None]


class CniEventServer:
    """Serves CNI pod events on a Unix socket (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        on_add: AddHandler,
        on_del: DelHandler,
        *,
        on_check: AddHandler | None = None,
        observe: Observer | None = None,
        request_timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self._on_add = on_add
        self._on_del = on_del
        self._on_check = on_check or on_add
        self._observe = observe
        self._timeout = request_timeout
        self.stats = CniStats()
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen: the directory is created, a stale socket file replaced, and the socket
        is bound under a temporary name and made 0600 before it appears at `path`."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _remove_stale(self.path)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            tmp.chmod(0o600)
            sock.listen(128)
            tmp.replace(self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self._inode = self.path.stat().st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def stop(self) -> None:
        """Stop listening, finish nothing in flight (the plugin fails closed), remove the file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:  # only our own socket: a newer agent may already have replaced it
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._inode = None

    async def __aenter__(self) -> CniEventServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can drop a cancel that
                # lands as the read completes, and shutdown cancels this task.
                async with asyncio.timeout(self._timeout):
                    method, target, body = await _read_request(conn, reader)
                reply = await self._dispatch(method, target, body)
            except RequestError as exc:
                reply = CniReply(exc.status, "error", str(exc))
            except (TimeoutError, ConnectionError):
                return
            await _write_reply(conn, writer, reply)
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _dispatch(self, method: str, target: str, body: bytes) -> CniReply:
        if target not in ("/cmdadd", "/cmddel", "/cmdcheck"):
            raise RequestError(404, f"no such path {target!r} (want /cmdadd, /cmddel, /cmdcheck)")
        if method != "POST":
            raise RequestError(405, f"{method} {target}: only POST")
        event = parse_event(target, body)
        started = time.monotonic()
        try:
            if isinstance(event, CniDel):
                return await self._on_del(event)
            if target == "/cmdcheck":
                return await self._on_check(event)
            reply = await self._on_add(event)
        except Exception as exc:
            log.exception("CNI %s for %s/%s failed", target, event.pod_namespace, event.pod_name)
            reply = CniReply(500, "error", f"{type(exc).__name__}: {exc}")
            if target != "/cmdadd":
                return reply
        self._record(reply.state or ("captured" if reply.status == 200 else "error"), started)
        return reply

    def _record(self, result: str, started: float) -> None:
        seconds = time.monotonic() - started
        self.stats.adds[result] = self.stats.adds.get(result, 0) + 1
        self.stats.add_seconds.append(seconds)
        if self._observe is not None:
            self._observe(result, seconds)


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
    path.unlink()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[str, str, bytes]:
    method = target = ""
    body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise RequestError(exc.error_status_hint, f"bad HTTP request: {exc}") from None
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and conn.their_state is h11.SEND_BODY:
                raise RequestError(400, "request body ends early")
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            method, target = event.method.decode(), event.target.decode()
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BYTES:
                raise RequestError(413, f"body larger than {MAX_REQUEST_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return method, target, body
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("closed before a whole request")


async def _write_reply(conn: h11.Connection, writer: asyncio.StreamWriter, reply: CniReply) -> None:
    payload = json.dumps({"state": reply.state, "message": reply.message}).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Connection", "close"),
    ]
    writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers)))
    writer.write(conn.send(h11.Data(data=payload)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
