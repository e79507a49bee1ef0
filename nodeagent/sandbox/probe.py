"""Clients that run inside a sandbox namespace: HTTP GET and TCP echo.

Used by the demo and the tests. The socket is created in the source pod's
namespace (see NetnsAdapter.socket) and then used from the calling thread, so a
probe costs no process.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any, Protocol


class SocketFactory(Protocol):
    """Makes sockets inside a named namespace (NetnsAdapter is the real one)."""

    def socket(self, netns: str, family: int = ..., type: int = ...) -> socket.socket: ...


class ProbeError(RuntimeError):
    """A probe failed; the message says which call and why."""


def _connect(
    adapter: SocketFactory, netns: str, ip: str, port: int, timeout: float
) -> socket.socket:
    sock = adapter.socket(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
    except OSError as exc:
        sock.close()
        raise ProbeError(f"connect from {netns} to {ip}:{port}: {exc.strerror or exc}") from None
    return sock


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def http_get(
    adapter: SocketFactory,
    netns: str,
    ip: str,
    port: int,
    path: str = "/",
    timeout: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """GET http://ip:port/path from inside `netns`; return the JSON answer."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with _connect(adapter, netns, ip, port, timeout) as sock:
        try:
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\n{extra}Connection: close\r\n\r\n"
            )
            sock.sendall(request.encode())
            raw = _recv_all(sock)
        except OSError as exc:
            raise ProbeError(f"HTTP from {netns} to {ip}:{port}: {exc}") from None
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    if not status.startswith("HTTP/1.1 200"):
        raise ProbeError(f"HTTP from {netns} to {ip}:{port}: got {status!r}")
    try:
        answer = json.loads(body)
    except ValueError:
        raise ProbeError(f"HTTP from {netns} to {ip}:{port}: body is not JSON") from None
    if not isinstance(answer, dict):
        raise ProbeError(f"HTTP from {netns} to {ip}:{port}: JSON is not an object")
    return answer


def echo(
    adapter: SocketFactory, netns: str, ip: str, port: int, payload: bytes, timeout: float = 5.0
) -> bytes:
    """Send `payload` to a TCP echo server from inside `netns`, half-close, return the reply."""
    with _connect(adapter, netns, ip, port, timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return _recv_all(sock)
        except OSError as exc:
            raise ProbeError(f"echo from {netns} to {ip}:{port}: {exc}") from None
