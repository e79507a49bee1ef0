"""asyncio adapter: drives a sans-IO `TunnelConnection` over a (TLS) transport.

`HboneConnection` is an `asyncio.Protocol` (the Protocol API, not streams: about 2x faster
here, machine.md §5.2). Each CONNECT tunnel is a `TunnelStream` with awaitable read/drain for
simple users; the relay can instead take the stream's events (`TunnelStream.consume`, or the
`on_data`/`on_end`/`on_reset` callbacks) and DATA as memoryviews without copies.

Lessons from machine.md §5.5 are built in: streams are registered synchronously when their
HEADERS arrive (DATA in the same read must not be lost), and an exception from one stream's
callback resets that stream instead of killing the shared connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Literal, Protocol, cast

from nodeagent.hbone.connection import (
    ConnectionConfig,
    ConnectionTerminated,
    DataReceived,
    DataSink,
    DataSinkFailed,
    ErrorCode,
    Event,
    InvalidActionError,
    PingAckReceived,
    ProtocolError,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    StreamState,
    TrailersReceived,
    TunnelConnection,
    WindowUpdated,
)
from nodeagent.hbone.frames import Buffer
from nodeagent.hbone.keepalive import KeepaliveAction, KeepaliveSchedule

log = logging.getLogger(__name__)


class TunnelError(ConnectionError):
    """A tunnel stream was reset, refused, or its connection died."""


class StreamConsumer(Protocol):
    """Takes a stream's events as methods of one object (`TunnelStream.consume`): a relay end
    then stores no bound method per callback on every stream it relays."""

    def stream_data(self, data: memoryview) -> None:
        """DATA, not acknowledged: the consumer acks it (as with `manual_ack`)."""

    def stream_end(self) -> None:
        """The peer's END_STREAM."""

    def stream_reset(self, error_code: int) -> None:
        """The peer reset the stream."""

    def stream_lost(self, error: BaseException) -> None:
        """Called soon (from the loop, once): the stream's connection ended, or a handler of
        the stream failed."""


class TunnelStream:
    """One CONNECT tunnel on an `HboneConnection`.

    Slotted, and what only some streams need is made on first use: the inbox (DATA before a
    consumer takes the stream, or for `read`), the reader's and writer's events (`read`,
    `drain`) and the response future (a stream we opened, until its answer). A relay in
    callback mode holds none of them while idle; an idle tunnel is mostly this object.
    """

    __slots__ = (
        "_eof",
        "_error",
        "_inbox",
        "_readable",
        "_writable",
        "_write_blocked",
        "authority",
        "consumer",
        "headers",
        "manual_ack",
        "on_data",
        "on_end",
        "on_lost",
        "on_reset",
        "owner",
        "response",
        "stream_id",
    )

    def __init__(
        self,
        owner: HboneConnection,
        stream_id: int,
        authority: str,
        headers: tuple[tuple[str, str], ...],
    ):
        self.owner = owner
        self.stream_id = stream_id
        self.authority = authority
        self.headers = headers
        # Streams we open (`HboneConnection.open_tunnel`): the future of the answer to our
        # CONNECT while it is awaited, then the answer itself. None on streams the peer opened.
        self.response: asyncio.Future[ResponseReceived] | None = None
        self.on_data: Callable[[memoryview], None] | None = None  # set for callback mode
        self.on_end: Callable[[], None] | None = None
        self.on_reset: Callable[[int], None] | None = None
        # Called soon (from the loop, once) when the stream can carry nothing more because its
        # connection ended or a handler of it failed, with why: a hook on the stream rather
        # than a callback per stream on the connection's `closed` future.
        self.on_lost: Callable[[BaseException], None] | None = None
        # Takes the events before the callbacks above, which still run if also set.
        self.consumer: StreamConsumer | None = None
        # Callback mode acknowledges DATA as soon as on_data returns. A relay that must hold the
        # peer back until its upstream socket drains sets manual_ack and calls ack() itself.
        self.manual_ack = False
        self._inbox: collections.deque[tuple[memoryview, int]] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._readable: asyncio.Event | None = None  # made by the first `read` that waits
        # Bytes of ours wait for the peer's windows; `_writable` is made by the first `drain`
        # that waits, and set whenever `_write_blocked` goes back to False.
        self._write_blocked = False
        self._writable: asyncio.Event | None = None

    # --- server side ---
    def respond(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer the CONNECT; any status but 2xx also ends the stream."""
        conn = self.owner.conn
        conn.send_response(self.stream_id, status, headers)
        if not 200 <= status < 300 and conn.stream_state(self.stream_id) is not StreamState.CLOSED:
            # RFC 9113 §8.1: after a complete refusal, ask the client to stop sending with
            # RST_STREAM(NO_ERROR), so refused tunnels cannot eat the connection window.
            conn.reset_stream(self.stream_id, ErrorCode.NO_ERROR)
            self._release_inbox()
            self.owner.streams.pop(self.stream_id, None)
        self.owner.flush()

    # --- both sides ---
    def write(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue bytes (not copied: don't mutate `data` afterwards). True if all of it went to
        the transport and the transport still takes more: no need to wait in `drain()`."""
        if self._error is not None:
            raise self._error
        owner = self.owner
        conn = owner.conn
        if owner.can_write:
            # A small write with nothing queued: one frame straight to the transport.
            frame = conn.data_frame(self.stream_id, data)
            if frame is not None:
                transport = owner.transport
                if transport is not None and not transport.is_closing():
                    transport.write(frame)
                return owner.can_write
        clear = True
        # All sent now (the usual case) means nothing buffered: skip asking.
        if conn.send_data(self.stream_id, data) != len(data) and conn.buffered_bytes(
            self.stream_id
        ):
            self._write_blocked = True
            if self._writable is not None:
                self._writable.clear()
            clear = False
        owner.flush()
        return clear and owner.can_write

    async def drain(self) -> None:
        """Wait until the peer's windows took everything written (and the transport is writable)."""
        while True:
            if self._error is not None:
                raise self._error
            if not self._write_blocked:
                if self.owner.writable.is_set():
                    return
                await self.owner.writable.wait()
                continue
            if self._writable is None:
                self._writable = asyncio.Event()  # clear: set when the windows take the bytes
            await self._writable.wait()

    def write_eof(self) -> None:
        """Half-close our direction (END_STREAM); reading continues."""
        self.owner.conn.end_stream(self.stream_id)
        self.owner.flush()
        if self._eof:
            self.owner._forget_if_closed(self.stream_id)

    def reset(self, error_code: int = ErrorCode.CANCEL) -> None:
        if not self.owner.conn.closed:
            self.owner.conn.reset_stream(self.stream_id, error_code)
            self._release_inbox()
            self.owner.flush()
        self.owner.streams.pop(self.stream_id, None)
        self._fail(TunnelError(f"stream {self.stream_id} reset locally"))

    def _release_inbox(self) -> None:
        """Unread bytes of a stream we abandon still count against the connection window."""
        if self._inbox is None:
            return
        unread = sum(length for _, length in self._inbox)
        self._inbox = None
        if unread:
            self.owner.conn.acknowledge_received_data(self.stream_id, unread)

    def deliver_to(self, sink: DataSink | None) -> None:
        """Take this stream's DATA by a direct call from the connection's read, without events
        (`TunnelConnection.set_data_sink`: `sink` returns whether the bytes may be acked now).
        Everything the direct path does not take still arrives through `on_data`, so set that
        too. None goes back to `on_data` alone."""
        conn = self.owner.conn
        if sink is None or conn.stream_state(self.stream_id) in (
            StreamState.OPEN,
            StreamState.HALF_CLOSED_LOCAL,
        ):
            conn.set_data_sink(self.stream_id, sink)

    def ack(self, size: int, *, flush: bool = True) -> None:
        """Return `size` consumed bytes to the peer's windows (callback mode with manual_ack).
        flush=False only queues the WINDOW_UPDATE: for callers inside the connection's read,
        which flushes once the whole read is dispatched."""
        self.owner.conn.acknowledge_received_data(self.stream_id, size)
        if flush:
            self.owner.flush()

    def consume(self, consumer: StreamConsumer) -> None:
        """Hand the stream's events to `consumer`, which acknowledges the DATA it takes."""
        self.manual_ack = True
        self.consumer = consumer

    def take_buffered(self) -> list[tuple[memoryview, int]]:
        """Hand over the DATA that arrived before a consumer took the stream, as
        (bytes, flow-control length) pairs, not yet acked: the taker acks them."""
        if self._inbox is None:
            return []
        taken = list(self._inbox)
        self._inbox = None
        return taken

    @property
    def eof(self) -> bool:
        """The peer's END_STREAM arrived."""
        return self._eof

    @property
    def error(self) -> BaseException | None:
        """Why the stream failed (reset either way, refused, connection gone), or None."""
        return self._error

    @property
    def closed(self) -> bool:
        """The stream is closed both ways at the HTTP/2 level."""
        return self.owner.conn.stream_state(self.stream_id) is StreamState.CLOSED

    @property
    def connection_closed(self) -> asyncio.Future[None]:
        """Resolves when the stream's HTTP/2 connection is gone."""
        return self.owner.closed

    async def read(self) -> bytes:
        """The next chunk of tunnel bytes; b"" at the peer's END_STREAM."""
        while not self._inbox:
            if self._eof:
                return b""  # the peer's direction finished cleanly, whatever happened since
            if self._error is not None:
                raise self._error
            if self._readable is None:
                self._readable = asyncio.Event()
            else:
                self._readable.clear()
            await self._readable.wait()
        assert self._inbox is not None
        data, length = self._inbox.popleft()
        # The window reopens only as the application reads: that is the backpressure.
        self.owner.conn.acknowledge_received_data(self.stream_id, length)
        self.owner.flush()
        return bytes(data)

    # --- driven by the connection ---
    def _on_data(self, data: memoryview, length: int) -> None:
        consumer = self.consumer
        if consumer is not None or self.on_data is not None:
            padding = length - len(data)
            if padding and self.manual_ack:
                # A consumer acks the bytes it was given; padding never reaches it,
                # so return that part of the window here or it leaks away.
                self.owner.conn.acknowledge_received_data(self.stream_id, padding)
            if consumer is not None:
                consumer.stream_data(data)
            else:
                assert self.on_data is not None
                self.on_data(data)
            return
        if self._inbox is None:
            self._inbox = collections.deque()
        self._inbox.append((data, length))
        if self._readable is not None:
            self._readable.set()

    def _on_end(self) -> None:
        self._eof = True
        if self._readable is not None:
            self._readable.set()
        if self.consumer is not None:
            self.consumer.stream_end()
        if self.on_end is not None:
            self.on_end()

    def _lost_hooks(self) -> list[Callable[[BaseException], None]]:
        hooks: list[Callable[[BaseException], None]] = []
        if self.consumer is not None:
            hooks.append(self.consumer.stream_lost)
        if self.on_lost is not None:
            hooks.append(self.on_lost)
        return hooks

    def _unblock_writes(self) -> None:
        """Everything written went out (or never will): `drain` may return."""
        self._write_blocked = False
        if self._writable is not None:
            self._writable.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        response = self.response
        if response is not None and not response.done():
            response.set_exception(error)
            response.exception()  # retrieved: nobody may be waiting on a refused stream
        if self._readable is not None:
            self._readable.set()
        self._unblock_writes()


# Decrypted bytes are read into a buffer of ours, reused while nothing references it. Without
# it the TLS layer reads into a fresh 256 KiB bytes object per record and shrinks it, and
# glibc then trims and refaults the heap on every read: about 20 us per small read here,
# a quarter of the CPU a 64-byte message costs an agent.
_READ_BUFFER_SIZE = 256 * 1024


# Buffers still referenced after their read, kept to be taken back once their holders let go:
# one or two suffice for a bulk transfer, and each stays resident until a later read takes
# it back (with eight, a waypoint kept 2 MiB of them idle after a burst, by tracemalloc).
_LENT_MAX = 2


def _unreferenced(buffer: bytearray) -> bool:
    # A bytearray with live views refuses to change size, so a one-byte resize is the test.
    try:
        buffer.append(0)
    except BufferError:
        return False
    del buffer[-1]
    return True


class SharedReadBuffer:
    """The read buffer that every HBONE connection of one thread reads into, in turn.

    A read is taken whole before the next one starts (the transport calls `get_buffer`,
    fills it and calls `buffer_updated` in one go), so one buffer serves all connections:
    an agent holding fifty pooled connections kept fifty buffers of 256 KiB, all written
    (zero-filled) and so all resident, mostly idle. After a read, `give_back` keeps the
    buffer if no view of it survived. Otherwise (a partial frame kept by the reader, DATA a
    transport has queued: uvloop holds every write until the end of the loop's iteration)
    the buffer is set aside, and a later read takes it back once its holders have let go,
    before it makes a new one: making one per read (zero-filling 256 KiB and faulting its
    pages in) was about 8% of the receiving agent's user CPU in a bulk transfer.
    """

    __slots__ = ("_buffer", "_lent", "_view", "size")

    def __init__(self, size: int = _READ_BUFFER_SIZE) -> None:
        self.size = size
        self._buffer: bytearray | None = None
        self._view: memoryview | None = None
        self._lent: list[bytearray] = []

    def view(self) -> memoryview:
        """The buffer to read into (the same view until a read `lend`s it)."""
        view = self._view
        if view is None:
            buffer = self._buffer
            if buffer is None:
                buffer = self._reclaim()
            if buffer is None:
                # One byte of spare capacity: the `_unreferenced` test appends a byte, which
                # must not reallocate (a full bytearray grows by an eighth).
                buffer = bytearray(self.size + 1)
                del buffer[-1]
            self._buffer = buffer
            view = self._view = memoryview(buffer)
        return view

    def _reclaim(self) -> bytearray | None:
        """A set-aside buffer nobody references any more; the other free ones are dropped,
        so that what a burst set aside does not stay resident."""
        lent = self._lent
        if not lent:
            return None
        found = None
        for buffer in list(lent):
            if _unreferenced(buffer):
                lent.remove(buffer)
                if found is None:
                    found = buffer
        return found

    def lend(self, view: memoryview) -> bytearray | None:
        """Take the buffer behind `view` out of the pool while its bytes are processed, so a
        read that starts meanwhile (a nested one, in tests with in-memory transports) gets a
        buffer of its own. None if `view` is not the pool's current one."""
        if view is not self._view:
            return None
        buffer = self._buffer
        self._view = self._buffer = None
        return buffer

    def give_back(self, buffer: bytearray | None, view: memoryview) -> None:
        """The read through `view` (of `buffer`, from `lend`) is processed: put the buffer back
        if no view of it survived, else set it aside until none does."""
        if buffer is None:
            return
        try:
            view.release()
        except BufferError:  # someone holds our view itself: never reuse this buffer
            return
        if not _unreferenced(buffer):
            if len(self._lent) < _LENT_MAX:
                self._lent.append(buffer)
            return  # beyond that, theirs alone: it goes when they let go
        if self._buffer is None:
            self._buffer = buffer


_per_thread = threading.local()


def shared_read_buffer() -> SharedReadBuffer:
    """This thread's `SharedReadBuffer` (each event loop's connections share one; two loops in
    two threads must not, since a TLS read fills the buffer with the GIL released)."""
    try:
        buffer: SharedReadBuffer = _per_thread.read_buffer
    except AttributeError:
        buffer = _per_thread.read_buffer = SharedReadBuffer()
    return buffer


_TLS_RECORD = 16384  # the largest TLS plaintext record


def coalesce_records(buffers: list[Buffer]) -> list[Buffer]:
    """Regroup output so that no small piece becomes a TLS record of its own.

    The TLS layer encrypts each buffer it is given separately, so a 9-byte DATA frame header
    written before its payload costs a record (and a decryption at the peer) of its own.
    Small pieces are joined, and topped up with the head of the next large one to fill one
    record; large payloads otherwise pass through as views. The byte stream is unchanged.
    """
    result: list[Buffer] = []
    pending: list[Buffer] = []
    pending_len = 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        size = len(view)
        if pending_len + size <= _TLS_RECORD:
            pending.append(view)
            pending_len += size
            continue
        if pending:
            take = _TLS_RECORD - pending_len
            pending.append(view[:take])
            result.append(b"".join(pending))
            pending, pending_len = [], 0
            view, size = view[take:], size - take
        if size < _TLS_RECORD:
            pending, pending_len = [view], size
        else:
            result.append(view)
    if pending:
        result.append(b"".join(pending) if len(pending) > 1 else pending[0])
    return result


class HboneConnection(asyncio.BufferedProtocol):
    """One HTTP/2 connection carrying tunnels. Server: `on_request(stream)` is called
    synchronously for each CONNECT (answer with `stream.respond`).

    `admit(transport)`, if given, runs when the (TLS) transport is up, before a byte of
    HTTP/2 is sent: False aborts the connection with nothing sent (`refused` is then set).
    It must not raise.
    """

    def __init__(
        self,
        *,
        client_side: bool,
        config: ConnectionConfig | None = None,
        on_request: Callable[[TunnelStream], None] | None = None,
        admit: Callable[[asyncio.BaseTransport], bool] | None = None,
    ) -> None:
        self.conn = TunnelConnection(config or ConnectionConfig(client_side=client_side))
        self.loop = asyncio.get_running_loop()
        self.on_request = on_request
        self._admit = admit
        self.refused = False
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self.pings_acked = 0
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, TunnelStream] = {}
        self.ready: asyncio.Future[None] = self.loop.create_future()  # peer SETTINGS seen
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.can_write = True  # the same as writable.is_set(), without a call on the hot path
        self._reads = shared_read_buffer()
        self._read_view: memoryview | None = None  # what `get_buffer` lent for this read

    # --- asyncio.BufferedProtocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports are not asyncio.Transport
        # subclasses, though they have the same methods.
        self.transport = transport  # type: ignore[assignment]
        if self._admit is not None and not self._admit(transport):
            self.refused = True
            cast(asyncio.Transport, transport).abort()
            return
        self.conn.initiate_connection()
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._read_view = self._reads.view()
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view = self._read_view
        assert view is not None
        reads = self._reads
        buffer = reads.lend(view)
        # No copy: the frame reader and the relay get views of this buffer.
        # (`data_received`, inlined: this runs once per read.)
        conn = self.conn
        try:
            events = conn.receive_data(view[:nbytes])
        except ProtocolError as err:
            self._protocol_error(err)
        else:
            if events:
                self._dispatch(events)
            if conn.outgoing:
                self.flush()
        self._read_view = None
        reads.give_back(buffer, view)

    def data_received(self, data: Buffer) -> None:
        """Feed received bytes (also usable directly, as by a plain `asyncio.Protocol`)."""
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as err:
            self._protocol_error(err)
            return
        self._dispatch(events)
        self.flush()

    def _protocol_error(self, err: ProtocolError) -> None:
        log.info("HBONE connection error: %s", err)
        self._dispatch(cast(list[Event], list(err.events)))
        self.flush()
        self._terminate(TunnelError(f"HTTP/2 protocol error: {err}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: HTTP/2 has no half-closed connections

    def connection_lost(self, exc: Exception | None) -> None:
        self._terminate(TunnelError(f"connection lost: {exc}" if exc else "connection closed"))

    def pause_writing(self) -> None:
        self.can_write = False
        self.writable.clear()

    def resume_writing(self) -> None:
        self.can_write = True
        self.writable.set()

    # --- API ---
    @property
    def open_outbound_streams(self) -> int:
        """Streams we opened that are not closed yet."""
        return self.conn.open_outbound_streams

    @property
    def max_outbound_streams(self) -> int:
        """How many streams the peer lets us hold open (its SETTINGS_MAX_CONCURRENT_STREAMS)."""
        return self.conn.max_outbound_streams

    @property
    def can_open_stream(self) -> bool:
        """A new tunnel may be opened now: below the peer's limit, no GOAWAY either way."""
        return self.conn.can_open_stream

    async def open_tunnel(
        self,
        authority: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        answers: list[ResponseReceived] | None = None,
    ) -> TunnelStream:
        """Client: CONNECT to `authority`; returns once the peer answered 200. The response
        is appended to `answers` if given (the stream does not keep it: memory per tunnel)."""
        await self.ready
        sid = self.conn.open_tunnel(authority, headers)
        stream = TunnelStream(self, sid, authority, ())
        waiter: asyncio.Future[ResponseReceived] = self.loop.create_future()
        stream.response = waiter
        self.streams[sid] = stream
        self.flush()
        try:
            response = await waiter
        except asyncio.CancelledError:
            stream.reset()  # given up before the answer: free the peer's stream and our slot
            raise
        finally:
            stream.response = None  # a done future per tunnel is 144 bytes for nothing
        if answers is not None:
            answers.append(response)
        if response.status != 200:
            raise TunnelError(f"CONNECT {authority} answered {response.status}")
        return stream

    async def ping(self, ack_within: float) -> bool:
        """Send a PING; True once its ACK arrives, False after `ack_within` seconds without
        one or if the connection ends first."""
        data = os.urandom(8)
        try:
            self.conn.ping(data)
        except InvalidActionError:
            return False
        acked = self.loop.create_future()
        self._pings[data] = acked
        self.flush()
        try:
            # Whichever comes first: the default (all of them) waited out `ack_within`
            # after every answered PING, holding the keep-alive loop (and the idle close).
            await asyncio.wait(
                {acked, self.closed}, timeout=ack_within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._pings.pop(data, None)
        if not acked.done():
            return False
        self.pings_acked += 1
        return True

    def flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if not self.conn.outgoing:
            return
        out = self.conn.data_to_send()
        if not transport.is_closing():
            transport.writelines(coalesce_records(out) if len(out) > 1 else out)

    def close(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """GOAWAY, then close the transport."""
        if not self.conn.closed:
            try:
                self.conn.close(error_code)
            except InvalidActionError:
                pass
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # --- internals ---
    def _dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        for event in events:
            if type(event) is DataReceived:
                # The hot path, ahead of the general one: DATA for a stream we know.
                stream = streams.get(event.stream_id)
                if stream is not None:
                    try:
                        stream._on_data(event.data, event.flow_controlled_length)
                        if not stream.manual_ack and stream.on_data is not None:
                            self.conn.acknowledge_received_data(
                                event.stream_id, event.flow_controlled_length
                            )
                    except Exception as exc:
                        self._stream_failed(event.stream_id, exc)
                    continue
            if type(event) is DataSinkFailed:
                self._stream_failed(event.stream_id, event.error)
                continue
            if not self.ready.done():
                self.ready.set_result(None)
            sid = getattr(event, "stream_id", 0)
            stream = streams.get(sid)
            try:
                self._apply(event, stream)
                if isinstance(event, StreamEnded | StreamReset):
                    self._forget_if_closed(sid)
            except Exception as exc:
                self._stream_failed(sid, exc)

    def _stream_failed(self, sid: int, exc: Exception) -> None:
        # One broken stream must not take down the shared tunnel (machine.md §5.5).
        log.error("HBONE stream %s handler failed", sid, exc_info=exc)
        stream = self.streams.get(sid)  # it may have been created by this very event
        if stream is not None:
            stream.reset(ErrorCode.INTERNAL_ERROR)
            error = TunnelError(f"stream handler failed: {exc!r}")
            stream._fail(error)
            for hook in stream._lost_hooks():
                self.loop.call_soon(hook, error)

    def _apply(self, event: Event, stream: TunnelStream | None) -> None:
        # DATA for a known stream never gets here: `_dispatch` handles it first.
        if isinstance(event, RequestReceived):
            new = TunnelStream(self, event.stream_id, event.authority, event.headers)
            self.streams[event.stream_id] = new
            if event.method != "CONNECT":
                new.respond(400)  # not a tunnel (as ztunnel answers)
            elif self.on_request is None:
                new.respond(503)
            else:
                self.on_request(new)
        elif stream is None:
            if isinstance(event, DataReceived):
                self.conn.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, WindowUpdated) and event.stream_id == 0:
                for s in self.streams.values():
                    if s._write_blocked and not self.conn.buffered_bytes(s.stream_id):
                        s._unblock_writes()
            elif isinstance(event, ConnectionTerminated) and event.error_code:
                self._terminate(TunnelError(f"peer sent GOAWAY {event.error_code}"))
            elif isinstance(event, PingAckReceived):
                acked = self._pings.get(event.data)
                if acked is not None and not acked.done():
                    acked.set_result(None)
        elif isinstance(event, ResponseReceived):
            if stream.response is not None and not stream.response.done():
                stream.response.set_result(event)
            if event.status != 200:
                stream._fail(TunnelError(f"CONNECT answered {event.status}"))
        elif isinstance(event, StreamEnded):
            stream._on_end()
        elif isinstance(event, StreamReset):
            self.streams.pop(event.stream_id, None)
            stream._fail(
                TunnelError(f"stream {event.stream_id} reset by peer (code {event.error_code})")
            )
            if stream.consumer is not None:
                stream.consumer.stream_reset(event.error_code)
            if stream.on_reset is not None:
                stream.on_reset(event.error_code)
        elif isinstance(event, WindowUpdated):
            if stream._write_blocked and not self.conn.buffered_bytes(event.stream_id):
                stream._unblock_writes()
        elif isinstance(event, TrailersReceived):
            pass

    def _forget_if_closed(self, stream_id: int) -> None:
        # Only at a stream's last event: the core may already be further along in this batch.
        if self.conn.stream_state(stream_id) is StreamState.CLOSED:
            self.streams.pop(stream_id, None)

    def _terminate(self, error: BaseException) -> None:
        first = not self.closed.done()
        lost = []
        for stream in list(self.streams.values()):
            stream._fail(error)  # wakes readers and writers blocked in drain()
            if first:
                lost += stream._lost_hooks()
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()
        if first:
            self.closed.set_result(None)
        for hook in lost:  # after `closed`'s own callbacks, as callbacks on it would run
            self.loop.call_soon(hook, error)
        if self.transport is not None:
            self.transport.close()


KeepaliveEnd = Literal["closed", "idle", "ping_timeout"]


async def keep_alive(
    conn: HboneConnection,
    schedule: KeepaliveSchedule,
    *,
    clock: Callable[[], float],
    ping_timeout: float = 20.0,
) -> KeepaliveEnd:
    """Drive `schedule` on `conn` until the connection ends, and say how it ended:
    "closed" (by either side, or elsewhere), "idle" (closed here with GOAWAY after
    idle_timeout without a stream) or "ping_timeout" (a PING went unanswered: aborted).
    Both the client pool (nodeagent.proxy.pool) and the 15008 server run their
    connections through this."""
    core = conn.conn
    while not conn.closed.done():
        action = schedule.due(clock(), core.open_outbound_streams + core.open_inbound_streams)
        if action is KeepaliveAction.CLOSE_IDLE:
            conn.close()
            return "idle"
        if action is KeepaliveAction.PING and not await conn.ping(ping_timeout):
            if conn.closed.done():
                break
            if conn.transport is not None:
                conn.transport.abort()
            return "ping_timeout"
        delay = schedule.wait(clock(), core.open_outbound_streams + core.open_inbound_streams)
        await asyncio.wait({conn.closed}, timeout=delay)
    return "closed"
