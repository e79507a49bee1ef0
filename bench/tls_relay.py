"""A bare mutual-TLS relay pair in Python (uvloop, Protocol API), for `bench.mesh`'s `py_relay`.

The floor under any Python tunnel on the benchmark's path: the same event loop and the same
OpenSSL memory-BIO transport as our agents, but no HTTP/2, no capture, no policy. Set beside
stunnel and the mesh, it splits the mesh's cost into "Python relaying TLS at all" and "ours".

    python -m bench.tls_relay client|server CERT KEY CA LISTEN_HOST:PORT=CONNECT_HOST:PORT ...

The client side listens in plain TCP and connects with TLS; the server side the reverse.
Runs until killed. A FIN closes the TLS connection (asyncio's TLS transports have no
half-close), which the benchmark's traffic does not need.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop


def context(role: str, cert: str, key: str, ca: str) -> ssl.SSLContext:
    server = role == "server"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual, as stunnel and the mesh
    ctx.check_hostname = False
    return ctx


class End(asyncio.Protocol):
    """One side of a relayed connection; `peer` is the other side once it is connected."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: End | None = None
        self.early: list[bytes] = []
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        elif self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.early_eof = True
        else:
            self.peer.send_eof()
        return True  # the other direction may still flow

    def send_eof(self) -> None:
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()  # TLS has no half-close: close_notify

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def join(self, other: End) -> None:
        self.peer, other.peer = other, self
        for end in (self, other):
            for chunk in end.early:
                assert end.peer is not None and end.peer.transport is not None
                end.peer.transport.write(chunk)
            end.early.clear()
            if end.early_eof:
                end.peer.send_eof()  # type: ignore[union-attr]


class Accepted(End):
    """An accepted connection: once it is made, it dials its upstream (`dial`)."""

    def __init__(self, dial: Callable[[End], Coroutine[Any, Any, None]]) -> None:
        super().__init__()
        self.dial = dial
        self.dialing: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.dialing = asyncio.get_running_loop().create_task(self.dial(self))


async def serve(
    role: str, ctx: ssl.SSLContext, listen: tuple[str, int], upstream: tuple[str, int]
) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    async def connect(accepted: End) -> None:
        try:
            _, out = await loop.create_connection(
                End,
                *upstream,
                ssl=ctx if role == "client" else None,
                server_hostname="relay" if role == "client" else None,
            )
        except (OSError, ssl.SSLError):
            if accepted.transport is not None:
                accepted.transport.close()
            return
        accepted.join(out)

    return await loop.create_server(
        lambda: Accepted(connect),
        *listen,
        ssl=ctx if role == "server" else None,
        reuse_address=True,
    )


def address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


async def main(argv: list[str]) -> None:
    role, cert, key, ca, *maps = argv
    if role not in ("client", "server") or not maps:
        raise SystemExit(__doc__)
    ctx = context(role, cert, key, ca)
    for mapping in maps:
        listen, upstream = mapping.split("=")
        await serve(role, ctx, address(listen), address(upstream))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))
