"""A deliberately small asyncio HTTP/1.1 server for the admin, metrics and readiness ports.

One request per connection (`Connection: close`), bodies up to a small limit,
routes by exact path with per-path allowed methods. That is all three
endpoints need, and it keeps the agent free of a web framework. Every
connection handler is tracked so `stop()` leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import json
import logging
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
# A client that does not finish its request in this time is dropped, so a
# stuck scraper cannot pin a handler forever.
REQUEST_TIMEOUT_S = 10.0
ACCEPT_SETTLE_TURNS = 4


@dataclass(frozen=True, kw_only=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(frozen=True, kw_only=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status=status, body=text.encode())

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        body = json.dumps(data, indent=2, default=str).encode() + b"\n"
        return cls(status=status, body=body, content_type="application/json")


Handler = Callable[[Request], Response | Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    handler: Handler


def route(handler: Handler, *methods: str) -> Route:
    return Route(frozenset(methods or ("GET",)), handler)


class HttpServer:
    """Serves `routes` on any number of TCP and Unix-socket listeners."""

    def __init__(self, name: str, routes: Mapping[str, Route]) -> None:
        self.name = name
        self._routes = dict(routes)
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0 picks a port); returns the bound address."""
        server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEADER_BYTES)
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def listen_unix(self, path: str) -> str:
        """Listen on a Unix socket, replacing a stale one; only root may connect."""
        _clear_socket_path(path)
        server = await asyncio.start_unix_server(self._serve, path, limit=MAX_HEADER_BYTES)
        Path(path).chmod(0o600)  # noqa: ASYNC240 -- one syscall; the admin API can stop the agent
        self._servers.append(server)
        self._unix_paths.append(path)
        return path

    async def stop(self) -> None:
        self._closing = True
        for server in self._servers:
            server.close()
        # A connection the loop already accepted takes a few turns to reach
        # _serve (accept task, then connection_made); let it arrive so it is
        # cancelled below rather than left running. Later arrivals see _closing.
        for _ in range(ACCEPT_SETTLE_TURNS):
            await asyncio.sleep(0)
        current = asyncio.current_task()
        handlers = [t for t in self._handlers if t is not current]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            _remove(path)
        self._unix_paths.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if self._closing:
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):  # keeps a shutdown's cancel
                    request = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                return
            except _BadRequest as exc:
                response = Response.text(400, f"bad request: {exc}\n")
                method = ""
            else:
                response = await self._dispatch(request)
                method = request.method
            await _write_response(writer, response, head_only=method == "HEAD")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, request: Request) -> Response:
        target = self._routes.get(request.path)
        if target is None:
            return Response.text(404, f"no such endpoint: {request.path}\n")
        method = "GET" if request.method == "HEAD" else request.method
        if method not in target.methods:
            allowed = ", ".join(sorted(target.methods))
            text = f"method {request.method} not allowed on {request.path}; use {allowed}\n"
            return Response(
                status=405,
                body=text.encode(),
                headers={"Allow": allowed},
            )
        try:
            result = target.handler(request)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as exc:  # one bad provider must not take the admin down
            log.exception("%s: %s %s failed", self.name, request.method, request.path)
            return Response.text(500, f"internal error: {type(exc).__name__}: {exc}\n")


class _BadRequest(Exception):
    pass


def _clear_socket_path(path: str) -> None:
    """Make the socket's directory and remove a stale socket (never a regular file)."""
    sock_path = Path(path)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(sock_path.lstat().st_mode):
            sock_path.unlink()


def _remove(path: str) -> None:
    Path(path).unlink(missing_ok=True)


async def _read_request(reader: asyncio.StreamReader) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("headers too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"malformed request line {lines[0][:80]!r}")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    body = b""
    length_text = headers.get("content-length")
    if length_text:
        try:
            length = int(length_text)
        except ValueError as exc:
            raise _BadRequest("bad content-length") from exc
        if length < 0 or length > MAX_BODY_BYTES:
            raise _BadRequest("body too large")
        body = await reader.readexactly(length)
    url = urlsplit(target)
    return Request(
        method=method.upper(),
        path=url.path or "/",
        query=parse_qs(url.query, keep_blank_values=True),
        headers=headers,
        body=body,
    )


async def _write_response(
    writer: asyncio.StreamWriter, response: Response, *, head_only: bool
) -> None:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    head = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in response.headers.items()),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(response.body)
    await writer.drain()


def parse_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError names what is wrong."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ValueError(f"address {address!r}: port {port_text!r} is not a number") from exc
    if not 0 <= port <= 65535:
        raise ValueError(f"address {address!r}: port {port} out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "HttpServer",
    "Request",
    "Response",
    "Route",
    "is_loopback",
    "parse_host_port",
    "route",
]
