"""`ByteStream`s for the waypoint's codecs: over a TCP socket (asyncio streams) and over an
HBONE CONNECT tunnel (`TunnelStream`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nodeagent.hbone.aio import TunnelStream
from nodeagent.hbone.connection import InvalidActionError

__all__ = ["READ_SIZE", "SocketByteStream", "TunnelByteStream"]

READ_SIZE = 256 * 1024  # large reads: the codecs cost per read, not per byte


class SocketByteStream:
    """A `ByteStream` over an asyncio StreamReader/StreamWriter pair. The socket is closed once
    both directions ended (our write_eof and the peer's EOF), or by abort()/close()."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_size: int = READ_SIZE
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.read_size = read_size
        self._read_eof = False
        self._wrote_eof = False
        self.peer_ended = False  # its EOF or the connection's loss arrived, read or not
        self._on_peer_end: Callable[[], None] | None = None
        transport = writer.transport
        inner = transport.get_protocol()
        if isinstance(inner, asyncio.Protocol):
            transport.set_protocol(_PeerEndTap(inner, self))

    @classmethod
    async def connect(cls, host: str, port: int) -> SocketByteStream:
        # The reader's limit bounds what it buffers before pausing the socket: keep it above
        # one read so a large read is not cut into small ones.
        reader, writer = await asyncio.open_connection(host, port, limit=2 * READ_SIZE)
        return cls(reader, writer)

    async def read(self) -> bytes:
        data = await self.reader.read(self.read_size)
        if not data:
            self._read_eof = True
            if self._wrote_eof:
                self.writer.close()
        return data

    def write(self, data: bytes) -> object:
        self.writer.write(data)
        return None

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if self._wrote_eof:
            return
        self._wrote_eof = True
        if self.writer.transport.is_closing():
            return
        if self._read_eof or not self.writer.can_write_eof():
            self.writer.close()
        else:
            self.writer.write_eof()

    def abort(self) -> None:
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()

    def watch_end(self, callback: Callable[[], None] | None) -> None:
        """From the tap on the transport's events: no read, no task."""
        self._on_peer_end = callback
        if callback is not None and self.peer_ended:
            self._on_peer_end = None
            asyncio.get_running_loop().call_soon(callback)

    def _peer_end(self) -> None:
        self.peer_ended = True
        callback, self._on_peer_end = self._on_peer_end, None
        if callback is not None:
            callback()


class _PeerEndTap(asyncio.Protocol):
    """Stands in for a socket stream's protocol: passes every event on, and tells the stream
    of the peer's EOF or the connection's loss as it arrives, even with bytes still unread.

    (With the reader's buffer full the transport stops reading, so a FIN behind that much
    unread data is seen only once the bytes are read; Envoy's early-close detection would see
    it. The waypoint's production downstream is a tunnel, whose END_STREAM always arrives.)"""

    def __init__(self, inner: asyncio.Protocol, stream: SocketByteStream) -> None:
        self.inner = inner
        self.stream = stream

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        self.stream._peer_end()
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream._peer_end()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class TunnelByteStream:
    """A `ByteStream` over one HBONE CONNECT tunnel; abort() resets the HTTP/2 stream.

    Writing to a stream that is already reset or ended raises ConnectionError, as on a
    socket, instead of the HTTP/2 layer's InvalidActionError."""

    __slots__ = ("tunnel",)

    def __init__(self, tunnel: TunnelStream) -> None:
        self.tunnel = tunnel

    async def read(self) -> bytes:
        return await self.tunnel.read()

    def write(self, data: bytes) -> object:
        try:
            return self.tunnel.write(data)
        except InvalidActionError as error:
            raise ConnectionError(str(error)) from error

    async def drain(self) -> None:
        await self.tunnel.drain()

    def write_eof(self) -> None:
        tunnel = self.tunnel
        if tunnel.error is not None:
            raise ConnectionError(str(tunnel.error))
        try:
            tunnel.write_eof()
        except InvalidActionError as error:
            raise ConnectionError(str(error)) from error

    def abort(self) -> None:
        self.tunnel.reset()

    def watch_end(self, callback: Callable[[], None] | None) -> None:
        """On the stream's hooks: END_STREAM, a reset and the connection's loss all arrive
        whether or not the stream is read (its DATA waits in the stream's window)."""
        tunnel = self.tunnel
        if callback is None:
            tunnel.on_end = tunnel.on_reset = tunnel.on_lost = None
            return
        if tunnel.eof or tunnel.error is not None:
            asyncio.get_running_loop().call_soon(callback)
            return

        def ended(_why: object = None) -> None:
            tunnel.on_end = tunnel.on_reset = tunnel.on_lost = None
            callback()

        tunnel.on_end = tunnel.on_reset = tunnel.on_lost = ended
