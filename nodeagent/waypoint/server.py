"""The waypoint's HBONE side: accept on 15008, answer each CONNECT, serve the HTTP inside.

Each tunnel's first bytes say what it carries (nodeagent.waypoint.sniff): the
HTTP/2 preface goes to the h2 codec, an HTTP/1.x request line to the h11
codec, anything else is relayed as TCP to an endpoint the service's tcp
routes pick (the L4 rules, as the node agent would apply them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable
from dataclasses import dataclass

from nodeagent.datapath.netns import LISTEN_BACKLOG
from nodeagent.hbone.server import AcceptedStream, HboneServer
from nodeagent.model.identity import Identity
from nodeagent.proxy.sockets import hostport
from nodeagent.waypoint.exchange import HTTP1, ByteStream, Endpoint, LocalReply, UpstreamError
from nodeagent.waypoint.http1 import Http1Upstreams, serve_http1
from nodeagent.waypoint.http2 import Http2Upstreams, serve_http2
from nodeagent.waypoint.router import TunnelDispatcher, WaypointRouter
from nodeagent.waypoint.sniff import classify
from nodeagent.waypoint.streams import TunnelByteStream

log = logging.getLogger(__name__)

SNIFF_TIMEOUT = 5.0  # a client that sends nothing is relayed as TCP (server-first protocols)
RELAY_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class WaypointEnd:
    """The waypoint as the HBONE server's local end."""

    identity: Identity
    label: str


class WaypointTunnels:
    """The HBONE server's stream handler: one dispatcher and one codec per tunnel."""

    def __init__(self, router: WaypointRouter) -> None:
        self.router = router
        self.h1 = Http1Upstreams()
        self.h2 = Http2Upstreams()
        self.tunnels = 0
        self.refused = 0
        self.live = 0  # tunnels being served now (the trim after a burst watches it)

    def __call__(self, local: WaypointEnd, accepted: AcceptedStream) -> Awaitable[None] | None:
        dispatcher = self.router.accept(accepted)
        if isinstance(dispatcher, str):
            self.refused += 1
            log.info("waypoint: CONNECT %s refused: %s", accepted.authority, dispatcher)
            accepted.stream.respond(400)
            return None
        self.tunnels += 1
        return self._serve(accepted, dispatcher)

    async def _serve(self, accepted: AcceptedStream, dispatcher: TunnelDispatcher) -> None:
        self.live += 1
        try:
            await self._serve_tunnel(accepted, dispatcher)
        finally:
            self.live -= 1

    async def _serve_tunnel(self, accepted: AcceptedStream, dispatcher: TunnelDispatcher) -> None:
        accepted.stream.respond(200)
        downstream = TunnelByteStream(accepted.stream)
        first = b""
        kind = "more"
        try:
            async with asyncio.timeout(SNIFF_TIMEOUT):
                while kind == "more":
                    data = await downstream.read()
                    if not data:
                        break
                    first += data
                    kind = classify(first)
        except TimeoutError:
            kind = "opaque"
        except ConnectionError:
            return
        if kind == "h2":
            await serve_http2(downstream, first, dispatcher, self.h2)
        elif kind == "http1":
            await serve_http1(downstream, first, dispatcher, self.h1)
        else:
            await self._relay(downstream, first, dispatcher)

    async def _relay(
        self, downstream: ByteStream, first: bytes, dispatcher: TunnelDispatcher
    ) -> None:
        """Not HTTP: one endpoint for the whole connection, bytes both ways."""
        picked = dispatcher.pick_l4()
        if isinstance(picked, LocalReply):
            log.info("waypoint: %s: tcp: %s", dispatcher.label, picked.flags)
            downstream.abort()
            return
        endpoint: Endpoint = picked
        try:
            upstream = await dispatcher.open(endpoint, HTTP1)
        except UpstreamError:
            dispatcher.finish_l4(endpoint, ok=False)
            downstream.abort()
            return
        try:
            if first:
                upstream.write(first)
            await asyncio.gather(_copy(downstream, upstream), _copy(upstream, downstream))
        except ConnectionError:
            downstream.abort()
            upstream.abort()
        finally:
            dispatcher.finish_l4(endpoint)


async def _copy(source: ByteStream, sink: ByteStream) -> None:
    while True:
        data = await source.read()
        if not data:
            sink.write_eof()
            return
        sink.write(data)
        await sink.drain()


class WaypointListener:
    """Accepts on the waypoint's 15008 and hands each connection to the HBONE server."""

    def __init__(self, server: HboneServer[WaypointEnd], local: WaypointEnd) -> None:
        self._server = server
        self._local = local
        self._tasks: set[asyncio.Task[None]] = set()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and listen (the backlog as deep as net.core.somaxconn allows, as the agent's
        listeners); OSError names the address when that fails, with nothing left open."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"listen on {hostport(host, port)}: {exc.strerror}") from None
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept(sock), name="waypoint-accept")
        bound = sock.getsockname()
        return bound[0], bound[1]

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._server.serve(self._local, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._sock is not None:
            self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
