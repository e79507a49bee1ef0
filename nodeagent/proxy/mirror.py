"""TCP mirroring (a nodeagent extension): a copy of the client bytes to a shadow upstream.

The mirror may never slow, stall or fail the primary connection: the primary's
app end hands each read to `Mirror.feed`, which only appends to a bounded
queue; a task of its own opens the shadow upstream and writes the queue out.
If the shadow cannot be opened, or falls `MIRROR_BUFFER` bytes behind, the
mirror is dropped (counted, logged) and the primary goes on untouched. What the
shadow answers is read and discarded, so it never blocks on its own replies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from nodeagent.hbone.aio import TunnelStream
from nodeagent.proxy.relay import TcpRelayEnd

log = logging.getLogger(__name__)

MIRROR_BUFFER = 1 << 20  # bytes a mirror may fall behind before it is dropped
LINGER = 5.0  # seconds a finished mirror waits for the shadow to close its side

Opener = Callable[[], Awaitable[TunnelStream | socket.socket]]


class MirroredTcpEnd(TcpRelayEnd):
    """The app end of a mirrored connection: every read also goes to `tap`."""

    tap: Callable[[bytes], None] | None = None

    def on_data(self, data: bytes | bytearray | memoryview) -> None:
        super().on_data(data)  # the early bytes, read before the relay was wired
        if self.tap is not None:
            self.tap(bytes(data))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.tap is not None and self.relay is not None:
            self.tap(data)


class Mirror:
    """One shadow connection fed by `feed`; `close` ends it after the queued bytes."""

    def __init__(self, open_upstream: Opener, on_drop: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._ready = asyncio.Event()
        self._ending = False
        self._dropped = False
        self._on_drop = on_drop
        self.sent = 0
        self.closed: asyncio.Future[None] = loop.create_future()
        self._task = loop.create_task(self._run(open_upstream))
        # Also when the task is cancelled before it ever ran (a drop right after start).
        self._task.add_done_callback(self._ended)

    def feed(self, data: bytes) -> None:
        if self._dropped or self._ending:
            return
        if self._queued + len(data) > MIRROR_BUFFER:
            self._drop(f"more than {MIRROR_BUFFER} bytes behind")
            return
        self._queue.append(data)
        self._queued += len(data)
        self._ready.set()

    def _ended(self, _task: asyncio.Task[None]) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        """The primary ended: send what is queued, then end the shadow connection."""
        self._ending = True
        self._ready.set()

    def _drop(self, why: str) -> None:
        if self._dropped:
            return
        self._dropped = True
        self._queue.clear()
        self._queued = 0
        self._task.cancel()
        self._on_drop(why)

    async def _run(self, open_upstream: Opener) -> None:
        upstream: TunnelStream | socket.socket | None = None
        reader: asyncio.Task[None] | None = None
        try:
            try:
                upstream = await open_upstream()
            except Exception as exc:  # any failure to open only drops the mirror
                self._drop(f"cannot open: {exc}")
                return
            if isinstance(upstream, socket.socket):
                reader = asyncio.get_running_loop().create_task(_discard(upstream))
            else:
                upstream.on_data = lambda _data: None  # replies are discarded (acked at once)
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._queue:
                    chunk = self._queue.popleft()
                    self._queued -= len(chunk)
                    await _send(upstream, chunk)
                    self.sent += len(chunk)
                if self._ending:
                    break
            _end(upstream)
            if reader is not None:
                # Read the shadow's replies to its end: closing with unread bytes would reset
                # the connection and could cut the copy short.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LINGER):
                        await asyncio.shield(reader)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a failing shadow never touches the primary
            self._drop(f"send failed: {exc}")
        finally:
            if reader is not None:
                reader.cancel()
            if upstream is not None:
                _close(upstream, abort=self._dropped)


async def _send(upstream: TunnelStream | socket.socket, data: bytes) -> None:
    if isinstance(upstream, socket.socket):
        await asyncio.get_running_loop().sock_sendall(upstream, data)
    elif not upstream.write(data):
        await upstream.drain()


async def _discard(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while await loop.sock_recv(sock, 65536):
            pass


def _end(upstream: TunnelStream | socket.socket) -> None:
    with contextlib.suppress(OSError):
        if isinstance(upstream, socket.socket):
            upstream.shutdown(socket.SHUT_WR)
        else:
            upstream.write_eof()


def _close(upstream: TunnelStream | socket.socket, *, abort: bool) -> None:
    if isinstance(upstream, socket.socket):
        upstream.close()
    elif abort:
        upstream.reset()
