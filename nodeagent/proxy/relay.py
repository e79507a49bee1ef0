"""Byte relay between two connection ends, on asyncio's Protocol API.

Why the Protocol API: on this machine a streams-based relay moved half the bytes
of a Protocol-based one at full CPU (see the design notes), so bytes go straight
from `data_received` into the other side's `write`, with no task per chunk.

A relay joins two `RelayEnd`s. Each end is an adapter for one kind of
connection (a TCP transport here, an HBONE CONNECT stream in
`nodeagent.proxy.tunnel_end`) and gives the relay its verbs: send bytes,
send end-of-stream, reset, close, pause and resume reading.
Semantics carried through, both ways:

* bytes, exactly and in order;
* backpressure: when one side's write buffer is full, the other side stops
  reading until it drains, so memory stays bounded;
* half-close: an EOF (FIN) from one side becomes an EOF on the other, and the
  opposite direction keeps flowing;
* reset: an abortive close on one side becomes an abortive close (RST) on the
  other, so errors are not turned into clean EOFs.

The relay ends when both directions have ended or one side was reset; `done`
resolves with a `RelayStats`.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RelayStats:
    """What a finished relay moved, from the point of view of end `a`."""

    a_to_b: int
    b_to_a: int
    error: str = ""


class RelayEnd:
    """One side of a relay. Subclasses implement the `do_*` verbs for their transport.

    Ends and relays are slotted: an agent holds two ends and a relay per live connection.
    """

    __slots__ = ("closed", "got_eof", "name", "peer", "received", "relay", "sent_eof")

    def __init__(self, name: str) -> None:
        self.name = name
        self.peer: RelayEnd | None = None
        self.received = 0  # bytes that arrived on this end (and went to the peer)
        self.got_eof = False
        self.sent_eof = False
        self.closed = False
        self.relay: Relay | None = None

    # -- events from this end's transport, forwarded to the peer --------------

    def on_data(self, data: bytes | bytearray | memoryview) -> None:
        self.received += len(data)
        if self.peer is not None and not self.peer.closed:
            self.peer.do_send(data)

    def on_eof(self) -> None:
        self.got_eof = True
        if self.peer is not None and not self.peer.closed and not self.peer.sent_eof:
            self.peer.sent_eof = True
            self.peer.do_send_eof()
        if self.relay is not None:
            self.relay.end_if_done()

    def on_reset(self, error: str) -> None:
        """This end was reset or failed: reset the peer and end the relay."""
        self.closed = True
        if self.peer is not None and not self.peer.closed:
            self.peer.closed = True
            self.peer.do_reset()
        if self.relay is not None:
            self.relay.finish(error)

    def on_closed(self) -> None:
        """This end closed cleanly (both ways)."""
        self.closed = True
        if self.relay is not None:
            self.relay.end_if_done()

    def on_write_paused(self) -> None:
        if self.peer is not None:
            self.peer.do_pause_reading()

    def on_write_resumed(self) -> None:
        if self.peer is not None:
            self.peer.do_resume_reading()

    # -- verbs the subclass implements ----------------------------------------

    def do_send(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def do_send_eof(self) -> None:
        raise NotImplementedError

    def do_reset(self) -> None:
        raise NotImplementedError

    def do_close(self) -> None:
        raise NotImplementedError

    def do_pause_reading(self) -> None:
        raise NotImplementedError

    def do_resume_reading(self) -> None:
        raise NotImplementedError


class Relay:
    """Joins two ends; `done` resolves when traffic has ended both ways."""

    __slots__ = ("a", "b", "done")

    def __init__(self, a: RelayEnd, b: RelayEnd) -> None:
        self.a, self.b = a, b
        a.peer, b.peer = b, a
        a.relay = b.relay = self
        self.done: asyncio.Future[RelayStats] = asyncio.get_running_loop().create_future()

    def end_if_done(self) -> None:
        a, b = self.a, self.b
        both_eof = a.got_eof and b.got_eof
        if both_eof or (a.closed and b.closed):
            self.finish("")

    def finish(self, error: str) -> None:
        for end in (self.a, self.b):
            if not end.closed:
                end.closed = True
                end.do_close()
        if not self.done.done():
            self.done.set_result(RelayStats(self.a.received, self.b.received, error))

    def abort(self, reason: str) -> None:
        """End the relay now, resetting both sides (policy change, shutdown)."""
        for end in (self.a, self.b):
            if not end.closed:
                end.closed = True
                end.do_reset()
        if not self.done.done():
            self.done.set_result(RelayStats(self.a.received, self.b.received, reason))


class TcpRelayEnd(RelayEnd, asyncio.Protocol):
    """A relay end over an asyncio TCP (or TLS) transport.

    Plain Protocol, not BufferedProtocol: each read yields its own bytes object,
    which is safe to hand to another transport (some transports keep a reference
    to written data instead of copying it, so a reused read buffer would be
    overwritten under them).
    """

    __slots__ = ("_early", "_early_eof", "_paused", "_wired", "transport")

    def __init__(self, name: str, transport: asyncio.Transport | None = None) -> None:
        super().__init__(name)
        self.transport = transport
        self._paused = False
        # Data that arrived before the relay was wired (uvloop may deliver
        # data even while reading is paused); made by the first such read.
        self._early: list[bytes] | None = None
        self._early_eof = False
        self._wired = False

    # asyncio.Protocol ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have the same methods.
        # No TCP_NODELAY here: uvloop's TCP transports set it themselves, and
        # `connect_tcp_end` sets it under asyncio's loop (asking the transport for its
        # socket made a socket object per connection).
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self._wired:
            if self._early is None:
                self._early = []
            self._early.append(data)
            return
        # `on_data`, inlined: once per read.
        self.received += len(data)
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.do_send(data)

    def eof_received(self) -> bool:
        if not self._wired:
            self._early_eof = True
            return True
        self.on_eof()
        # Keep the transport open: the other direction may still be flowing.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._wired:
            self.closed = True
            return
        if self.closed:
            return
        if exc is not None:
            self.on_reset(f"{self.name}: {exc}")
        elif not self.got_eof:
            # Closed without a FIN we saw (e.g. a TLS close): treat as EOF then close.
            self.on_eof()
            self.on_closed()
        else:
            self.on_closed()

    def pause_writing(self) -> None:
        self.on_write_paused()

    def resume_writing(self) -> None:
        self.on_write_resumed()

    # relay verbs --------------------------------------------------------------

    def wire(self) -> None:
        """Start relaying; replays anything that arrived before the relay existed."""
        self._wired = True
        early, self._early = self._early, None
        for chunk in early or ():
            self.on_data(chunk)
        if self._early_eof:
            self.on_eof()
        if self.closed and self.peer is not None and not self.peer.closed:
            self.on_reset(f"{self.name}: closed before the relay started")

    def do_send(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(data)

    def do_send_eof(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        elif not self.transport.is_closing():
            self.transport.close()

    def do_reset(self) -> None:
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER 0 makes close() send RST: the reset is carried, not
            # turned into a clean FIN.
            try:
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            except OSError:
                pass
        self.transport.abort()

    def do_close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def do_pause_reading(self) -> None:
        if self.transport is not None and not self._paused and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def do_resume_reading(self) -> None:
        if self.transport is not None and self._paused and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # the socket may report writable again before the waiter runs
        waiter.set_result(None)


def _finished(sock: socket.socket) -> bool:
    """Whether a connect that returned EINPROGRESS has already finished, either way.

    A connect to an address of this host (an inbound connection to the pod's app, over lo)
    normally completes inside connect(2), which still returns EINPROGRESS: one poll(2) then
    spares the loop a poll handle (four epoll_ctl calls in libuv) and a turn of the loop.
    """
    poller = select.poll()  # not select(): an agent's descriptors run past FD_SETSIZE
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


async def connect_socket(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect a non-blocking TCP socket to `address`; raises OSError as the connect failed.

    Not `loop.sock_connect` for an address that is an IP literal: uvloop resolves every
    address through getaddrinfo on its thread pool, literals too (it asks with no socket
    type, which its in-line path for literals does not take), about 70 us of CPU and two
    thread hand-offs per connect on this machine. A host name still goes that way.
    """
    loop = asyncio.get_running_loop()
    try:
        socket.inet_pton(sock.family, address[0])
    except (OSError, TypeError):
        await loop.sock_connect(sock, address)
        return
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    if not _finished(sock):
        writable: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, writable)
        try:
            await writable
        finally:
            loop.remove_writer(fd)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, f"Connect call failed {address}")


async def connect_tcp_end(
    name: str,
    sock: socket.socket,
    *,
    connect_to: tuple[str, int] | None = None,
    end: Callable[[str], TcpRelayEnd] = TcpRelayEnd,
) -> TcpRelayEnd:
    """Wrap a socket (already connected, or connected here) as a relay end of type `end`."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    if connect_to is not None:
        await connect_socket(sock, connect_to)
    if isinstance(loop, asyncio.BaseEventLoop) and sock.family in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        # Small writes (interactive protocols) must not wait for Nagle. uvloop's transports
        # set it; asyncio's only on sockets whose proto says TCP, which accepted ones do not.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    _, proto = await loop.connect_accepted_socket(lambda: end(name), sock)
    return proto


def relay_pair(a: TcpRelayEnd, b: RelayEnd) -> Relay:
    """Join two ends and start moving bytes."""
    relay = Relay(a, b)
    a.wire()
    if isinstance(b, TcpRelayEnd):
        b.wire()
    return relay
