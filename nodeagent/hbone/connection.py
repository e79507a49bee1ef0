"""Sans-IO HTTP/2 connection for HBONE CONNECT tunnels (RFC 9113), client and server roles.

Feed received bytes to `receive_data()` and get keyword-only events back; call the send
methods and then take the bytes to write from `data_to_send()` (a list of buffers: frame
headers plus memoryview slices of the caller's payloads, for `writelines`/`sendmsg`). Nothing
here does I/O, keeps time, or imports an event loop.

Only what a CONNECT tunnel needs is implemented: preface, SETTINGS/ACK, HEADERS/CONTINUATION
with HPACK, DATA with stream- and connection-level flow control in both directions, PING,
RST_STREAM and GOAWAY. PRIORITY and unknown frames are ignored; server push is refused.

DATA arrives as memoryview slices of the received buffers; a large frame that spans several
reads is delivered piece by piece as its bytes come in (windows are charged for the whole
frame at its start), so nothing on the receive path is joined or copied. The application
acknowledges consumed bytes with `acknowledge_received_data()`, which sends WINDOW_UPDATEs.
A relay, for which the event path costs more than the bytes, can instead have a stream's
whole DATA frames handed to a callable during `receive_data()` (`set_data_sink()`) and get
small DATA frames ready to write (`data_frame()`); both fall back to the general path for
anything else.

Protocol errors by the peer are answered as RFC 9113 §5.4 says: a stream error queues
RST_STREAM and yields `StreamReset(remote_reset=False)`; a connection error queues GOAWAY
and raises `ProtocolError` (whose `events` holds what was parsed before the error).
Local misuse (sending on a closed stream, a client method on a server) raises
`InvalidActionError` and queues nothing.

The core is split as h2 splits its own: `events` (what receive_data returns), `stream`
(the §5.1 state table and the per-stream record), `windows` (how flow-control windows
grow and when credit is returned), `settings` (ours and the peer's), `headers` (field
rules and the authority). This module is the connection that ties them together; it
re-exports their public names.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

import hpack

from nodeagent.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    DataSinkFailed,
    Event,
    Headers,
    PingAckReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcked,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from nodeagent.hbone.frames import (
    DATA_FRAGMENT,
    DEFAULT_WINDOW,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FRAME_HEADER_SIZE,
    MAX_WINDOW,
    PREFACE,
    Buffer,
    ContinuationFrame,
    DataFrame,
    ErrorCode,
    Frame,
    FrameReader,
    FrameType,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    ProtocolError,
    PushPromiseFrame,
    RstStreamFrame,
    SettingCode,
    SettingsFrame,
    UnknownFrame,
    WindowUpdateFrame,
    decode_frame,
    encode_frame,
    frame_header,
    pack_header,
    unpack_header,
)
from nodeagent.hbone.headers import (
    REQUEST_PSEUDO,
    check_extra_headers,
    format_authority,
    parse_authority,
    split_pseudo,
)
from nodeagent.hbone.hpack_plain import decode_plain, encode_block, header_list_size
from nodeagent.hbone.settings import (
    DEFAULT_REMOTE_SETTINGS,
    MIB,
    ConnectionConfig,
    check_remote_setting,
)
from nodeagent.hbone.stream import (
    TRANSITIONS,
    ClosedStreams,
    StreamClosedBy,
    StreamInput,
    StreamRecord,
    StreamState,
    next_state,
)
from nodeagent.hbone.windows import grow, update_threshold

__all__ = [
    "DEFAULT_REMOTE_SETTINGS",
    "MIB",
    "TRANSITIONS",
    "ConnectionConfig",
    "ConnectionTerminated",
    "DataReceived",
    "DataSink",
    "DataSinkFailed",
    "ErrorCode",
    "Event",
    "Headers",
    "InvalidActionError",
    "PingAckReceived",
    "PingReceived",
    "ProtocolError",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "SettingsAcked",
    "StreamClosedBy",
    "StreamEnded",
    "StreamInput",
    "StreamRecord",
    "StreamReset",
    "StreamState",
    "TrailersReceived",
    "TunnelConnection",
    "WindowUpdated",
    "check_extra_headers",
    "format_authority",
    "next_state",
    "parse_authority",
]

# Takes one DATA payload (a view of the received bytes); True if the bytes were consumed and
# their window may be returned now, False if the application acknowledges them later.
DataSink: TypeAlias = Callable[[memoryview], bool]

# A server keeps each CONNECT's fields while its tunnel lives. Names, and the values that
# repeat from one CONNECT to the next (the authority, the source's baggage), are decoded
# once and shared, not held as a copy per tunnel; the others (forwarded, traceparent) are
# new every time.
_REPEATING = frozenset({b":method", b":authority", b":scheme", b":status", b"baggage"})


@functools.lru_cache(maxsize=1024)
def _shared_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# Bound on one (compressed) header block across CONTINUATION frames: a CONTINUATION flood is
# a known memory DoS, so more than this is ENHANCE_YOUR_CALM.
_MAX_HEADER_BLOCK = 256 * 1024
# How many closed stream ids we remember, to tell "closed" from "never opened" for late frames.
_CLOSED_MEMORY = 1024
# DATA payloads up to this size are copied next to their frame header: cheaper than writing a
# separate buffer (and a separate TLS record) for them. Larger payloads are never copied.
_COPY_LIMIT = 4096


class InvalidActionError(Exception):
    """The local application asked for something the protocol state does not allow."""


# --- the connection -----------------------------------------------------------------------------


class TunnelConnection:
    """One HTTP/2 connection carrying CONNECT tunnels; `config.client_side` picks the role."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self.client_side = config.client_side
        self.remote_settings: dict[int, int] = dict(DEFAULT_REMOTE_SETTINGS)
        self._reader = FrameReader(max_frame_size=config.max_frame_size, stream_data=True)
        self._fragment_stream = 0  # stream of the DATA frame still arriving (0: drop its bytes)
        # We send no field into the dynamic table (hpack_plain); owed: a size update (§4.2).
        self._table_size_update: int | None = None
        self._decoder = hpack.Decoder(max_header_list_size=config.header_list_limit)
        self._decoder.max_allowed_table_size = config.header_table_size
        self.outgoing: list[Buffer] = []  # queued output, read-only: take it with data_to_send()
        self._out_bytes = 0
        self._streams: dict[int, StreamRecord] = {}
        self._closed_streams = ClosedStreams(_CLOSED_MEMORY)
        self._next_outbound_id = 1 if config.client_side else 2
        self._highest_inbound_id = 0
        self._preface_pending = b"" if config.client_side else PREFACE
        self._remote_settings_seen = False
        self._settings_unacked = 0
        # The stream window the peer assumes for us: the default until it ACKs our SETTINGS
        # (it sends that ACK before any DATA that relies on the new value, §6.9.2).
        self._local_initial_window = DEFAULT_WINDOW
        self._conn_outbound_window = DEFAULT_WINDOW
        self._conn_inbound_window = DEFAULT_WINDOW
        self._conn_unacked = 0
        self._header_block: tuple[int, bool, bytearray] | None = None
        self._goaway_sent: int | None = None
        self.goaway_received: ConnectionTerminated | None = None
        self.closed = False  # after a connection error: no more frames are read or sent
        # Streams whose DATA goes straight to a callable during receive_data (set_data_sink).
        self._sinks: dict[int, StreamRecord] = {}  # streams with a sink (`StreamRecord.sink`)
        self._conn_update_at = update_threshold(config.connection_window_size)
        self._stream_update_at = update_threshold(config.initial_window_size)

    # --- public: sending ------------------------------------------------------------------

    def initiate_connection(self) -> None:
        """Queue the client preface (client), our SETTINGS, and the connection-window boost."""
        if self.client_side:
            self._queue(PREFACE)
        settings = [
            (SettingCode.MAX_CONCURRENT_STREAMS, self.config.inbound_stream_limit),
            (SettingCode.INITIAL_WINDOW_SIZE, self.config.initial_window_size),
            (SettingCode.MAX_FRAME_SIZE, self.config.max_frame_size),
            (SettingCode.MAX_HEADER_LIST_SIZE, self.config.header_list_limit),
        ]
        if self.config.header_table_size != 4096:
            settings.insert(0, (SettingCode.HEADER_TABLE_SIZE, self.config.header_table_size))
        if self.client_side:
            settings.insert(0, (SettingCode.ENABLE_PUSH, 0))  # a server may not send it as 1
        self._queue_frame(SettingsFrame(settings=tuple((int(c), v) for c, v in settings)))
        self._settings_unacked += 1
        boost = self.config.connection_window_size - DEFAULT_WINDOW
        if boost > 0:
            self._queue_frame(WindowUpdateFrame(stream_id=0, increment=boost))
            self._conn_inbound_window += boost

    def open_tunnel(self, authority: str, headers: Iterable[tuple[str, str]] = ()) -> int:
        """Client: send `CONNECT authority` (no :scheme/:path) and return the new stream id."""
        self._require_open()
        if not self.client_side:
            raise InvalidActionError("only the client side opens CONNECT tunnels")
        if self._goaway_sent is not None or self.goaway_received is not None:
            raise InvalidActionError(
                "connection is going away; open the tunnel on another connection"
            )
        if not self.can_open_stream:
            raise InvalidActionError(
                f"peer allows at most {self.max_outbound_streams} concurrent streams"
            )
        if self._next_outbound_id > MAX_WINDOW:
            raise InvalidActionError("stream ids exhausted on this connection")
        parse_authority(authority)
        extra = check_extra_headers(headers)
        stream_id = self._next_outbound_id
        self._next_outbound_id += 2
        stream = self._new_stream(stream_id)
        self._send_headers(
            stream, ((":method", "CONNECT"), (":authority", authority), *extra), False
        )
        return stream_id

    def send_response(
        self,
        stream_id: int,
        status: int,
        headers: Iterable[tuple[str, str]] = (),
        *,
        end_stream: bool | None = None,
    ) -> None:
        """Server: answer a CONNECT. `end_stream` defaults to True for any status but 2xx."""
        self._require_open()
        if self.client_side:
            raise InvalidActionError("only the server side sends responses")
        if not 100 <= status <= 999:
            raise ValueError(f"status {status} is not a 3-digit HTTP status")
        stream = self._live_stream(stream_id)
        if stream.headers_sent:
            raise InvalidActionError(f"stream {stream_id} already has a response")
        if end_stream is None:
            end_stream = not 200 <= status < 300
        extra = check_extra_headers(headers)
        self._send_headers(stream, ((":status", str(status)), *extra), end_stream)

    def send_data(self, stream_id: int, data: Buffer, *, end_stream: bool = False) -> int:
        """Queue tunnel bytes (not copied). Sends what the peer's windows allow now and keeps the
        rest buffered until WINDOW_UPDATE; returns the bytes sent now (see `buffered_bytes`)."""
        stream = self._streams.get(stream_id)
        if (
            stream is not None
            and not end_stream
            and not stream.pending
            and stream.headers_sent
            and not stream.pending_end
            and not self.closed
            and (stream.state is StreamState.OPEN or stream.state is StreamState.HALF_CLOSED_REMOTE)
            and (type(data) is bytes or (type(data) is memoryview and data.format == "B"))
        ):
            # The common case, with the checks below in one test: all of `data` fits the
            # windows and one frame, so it goes out now without queueing.
            n = len(data)
            if (
                0 < n <= stream.outbound_window
                and n <= self._conn_outbound_window
                and n <= self.remote_settings[SettingCode.MAX_FRAME_SIZE]
            ):
                stream.outbound_window -= n
                self._conn_outbound_window -= n
                head = frame_header(n, FrameType.DATA, 0, stream_id)
                if n <= _COPY_LIMIT:
                    self.outgoing.append(head + data)
                else:
                    self.outgoing.append(head)
                    self.outgoing.append(data)
                self._out_bytes += n + 9
                return n
        self._require_open()
        stream = self._live_stream(stream_id)
        if not stream.headers_sent:
            raise InvalidActionError(f"stream {stream_id} has no response yet; DATA must follow it")
        if stream.pending_end or next_state(stream.state, StreamInput.SEND_DATA) is None:
            raise InvalidActionError(
                f"stream {stream_id} is {stream.state.value}; cannot send DATA"
            )
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes:
            if stream.pending is None:
                stream.pending = deque()
            stream.pending.append(view)
            stream.pending_bytes += view.nbytes
        stream.pending_end = end_stream
        before = stream.pending_bytes
        self._flush_stream(stream)
        return before - stream.pending_bytes

    def data_frame(self, stream_id: int, data: Buffer) -> bytes | None:
        """The fast case of `send_data`, for a relay's small writes: if nothing is queued for
        output and `data` (bytes, at most 4 KiB) may go out now, charge the windows and return
        the whole DATA frame for the caller to write itself; else None and nothing changes
        (then use `send_data`)."""
        if self.outgoing:
            return None  # queued frames go first
        n = len(data)
        stream = self._streams.get(stream_id)
        if (
            stream is None
            or type(data) is not bytes
            or not 0 < n <= _COPY_LIMIT
            or n > stream.outbound_window
            or n > self._conn_outbound_window
            or stream.pending
            or stream.pending_end
            or not stream.headers_sent
            or self.closed
            or (
                stream.state is not StreamState.OPEN
                and stream.state is not StreamState.HALF_CLOSED_REMOTE
            )
        ):
            return None
        stream.outbound_window -= n
        self._conn_outbound_window -= n
        # _COPY_LIMIT is below every allowed max frame size: one frame always holds it.
        return pack_header(n >> 8, n & 0xFF, FrameType.DATA, 0, stream_id) + data

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (END_STREAM, a FIN), after any buffered data."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort a stream with RST_STREAM; a no-op on a stream that is already closed."""
        self._require_open()
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                raise InvalidActionError(f"stream {stream_id} was never opened")
            return
        self._queue_frame(RstStreamFrame(stream_id=stream_id, error_code=int(error_code)))
        self._close_stream(stream, StreamClosedBy.RESET_SENT)

    def acknowledge_received_data(self, stream_id: int, size: int) -> None:
        """The application consumed `size` flow-controlled bytes; reopen the windows."""
        if size < 0:
            raise ValueError(f"acknowledged size {size} is negative")
        if self.closed or size == 0:
            return
        self._conn_unacked += size
        if self._conn_unacked >= self._conn_update_at:
            self._queue_frame(WindowUpdateFrame(stream_id=0, increment=self._conn_unacked))
            self._conn_inbound_window += self._conn_unacked
            self._conn_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            return  # no more DATA can come on it; the connection window is what matters
        stream.unacked += size
        if stream.unacked >= self._stream_update_at:
            self._queue_frame(WindowUpdateFrame(stream_id=stream_id, increment=stream.unacked))
            stream.inbound_window += stream.unacked
            stream.unacked = 0

    def set_data_sink(self, stream_id: int, sink: DataSink | None) -> None:
        """Hand this stream's DATA to `sink` during `receive_data` instead of as events.

        For a relay, where the event path costs more than the bytes: a whole unpadded DATA
        frame without END_STREAM, at the start of a received chunk or right after another such
        frame, is checked against the windows and given to `sink` at once. Every other frame
        of the stream (pieces of a frame split across reads, END_STREAM, padding) still comes
        as `DataReceived` and the other events, so the two paths never reorder a stream's
        bytes. An exception from `sink` becomes a `DataSinkFailed` event. None removes the sink;
        so does the end of the stream's receiving side.
        """
        if sink is None:
            self._sinks.pop(stream_id, None)
            return
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            raise InvalidActionError(f"stream {stream_id} cannot receive DATA")
        stream.sink = sink  # on the record: no (record, sink) pair per stream
        self._sinks[stream_id] = stream

    def ping(self, data: bytes = b"\0" * 8) -> None:
        self._require_open()
        if len(data) != 8:
            raise ValueError(f"PING data must be 8 bytes, got {len(data)}")
        self._queue_frame(PingFrame(data=bytes(data)))

    def close(
        self,
        error_code: int = ErrorCode.NO_ERROR,
        additional_data: bytes = b"",
        last_stream_id: int | None = None,
    ) -> None:
        """Send GOAWAY. With NO_ERROR it is graceful: streams up to `last_stream_id` (default: the
        highest the peer opened) keep running, newer ones are ignored."""
        self._require_open()
        last = self._highest_inbound_id if last_stream_id is None else last_stream_id
        self._queue_frame(
            GoAwayFrame(
                last_stream_id=last, error_code=int(error_code), additional_data=additional_data
            )
        )
        self._goaway_sent = last

    def data_to_send(self) -> list[Buffer]:
        """Take the queued output: buffers to write in order (views alias the caller's data)."""
        out = self.outgoing
        self.outgoing = []
        self._out_bytes = 0
        return out

    def data_to_send_bytes(self) -> bytes:
        """The queued output joined into one bytes object (a copy; tests and small writes)."""
        return b"".join(self.data_to_send())

    # --- public: inspection -------------------------------------------------------------------

    @property
    def outbound_bytes(self) -> int:
        """Bytes queued in `data_to_send()` but not yet taken."""
        return self._out_bytes

    @property
    def max_outbound_streams(self) -> int:
        return self.remote_settings[SettingCode.MAX_CONCURRENT_STREAMS]

    @property
    def open_outbound_streams(self) -> int:
        parity = self._next_outbound_id % 2
        return sum(1 for sid in self._streams if sid % 2 == parity)

    @property
    def open_inbound_streams(self) -> int:
        parity = self._next_outbound_id % 2
        return sum(1 for sid in self._streams if sid % 2 != parity)

    @property
    def can_open_stream(self) -> bool:
        return (
            not self.closed
            and self.goaway_received is None
            and self._goaway_sent is None
            and self.open_outbound_streams < self.max_outbound_streams
        )

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.state
        return StreamState.IDLE if self._is_idle(stream_id) else StreamState.CLOSED

    def outbound_window(self, stream_id: int) -> int:
        """Bytes we may send on the stream right now (stream and connection windows)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, min(stream.outbound_window, self._conn_outbound_window))

    @property
    def connection_outbound_window(self) -> int:
        return self._conn_outbound_window

    def inbound_window(self, stream_id: int) -> int:
        """What the peer may still send us: the stream window (0 = the connection's)."""
        if stream_id == 0:
            return self._conn_inbound_window
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.inbound_window

    def buffered_bytes(self, stream_id: int) -> int:
        """Bytes accepted by `send_data` and still waiting for window."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.pending_bytes

    # --- public: receiving --------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> list[Event]:
        """Process received bytes; return the events. Raises ProtocolError on a connection error
        (GOAWAY is then queued: write `data_to_send()` and close the transport)."""
        events: list[Event] = []
        if self.closed:
            return events
        reader = self._reader
        sinks = self._sinks
        if (
            sinks
            and not reader.buffered
            and reader.streaming is None
            and self._header_block is None
            and self._remote_settings_seen
        ):
            # The direct path of `set_data_sink` (inline: it runs once per read): whole DATA
            # frames from the start of the chunk go to their sinks; the rest goes on below.
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            total = len(view)
            pos = 0
            max_frame = self.config.max_frame_size
            while total - pos > FRAME_HEADER_SIZE and not self.closed:
                hi, lo, frame_type, flags, sid = unpack_header(view, pos)
                length = (hi << 8) | lo
                end = pos + FRAME_HEADER_SIZE + length
                stream = sinks.get(sid) if frame_type == 0 and not flags else None
                if stream is None or not 0 < length <= max_frame or end > total:
                    break
                sink = stream.sink
                assert sink is not None
                if length > self._conn_inbound_window or length > stream.inbound_window:
                    break  # the general path raises the flow-control error
                self._conn_inbound_window -= length
                stream.inbound_window -= length
                pos = end
                try:
                    consumed = sink(view[end - length : end])
                except Exception as exc:
                    events.append(DataSinkFailed(stream_id=sid, error=exc))
                    consumed = True  # dropped: the window is returned all the same
                if consumed:
                    conn_unacked = self._conn_unacked + length
                    stream_unacked = stream.unacked + length
                    if (
                        conn_unacked < self._conn_update_at
                        and stream_unacked < self._stream_update_at
                        and sid in sinks
                    ):
                        self._conn_unacked = conn_unacked
                        stream.unacked = stream_unacked
                    else:  # a WINDOW_UPDATE is due, or the sink closed the stream
                        self.acknowledge_received_data(sid, length)
            if pos == total:
                return events
            data = view[pos:]
        try:
            if self._preface_pending:
                data = self._consume_preface(data)
            reader = self._reader
            reader.feed(data)
            while reader.buffered:
                raw = reader.next_raw()
                if raw is None:
                    break
                frame_type, flags, sid, payload = raw
                try:
                    if (
                        frame_type == FrameType.DATA
                        and sid
                        and not flags & FLAG_PADDED
                        and self._header_block is None
                        and self._remote_settings_seen
                    ):
                        # The bulk path: no frame object, straight to the stream. The frame
                        # may still be arriving: the reader hands its bytes out as they come.
                        size = self._reader.last_frame_length
                        end = flags & FLAG_END_STREAM
                        self._on_data(sid, payload, size, len(payload), end, events)
                    elif frame_type == DATA_FRAGMENT:
                        self._on_data_fragment(sid, payload, flags & FLAG_END_STREAM, events)
                    else:
                        self._handle(decode_frame(frame_type, flags, sid, payload), events)
                except ProtocolError as err:
                    if not err.stream_id:
                        raise
                    self._stream_error(err, events)
        except ProtocolError as err:
            err.events = events
            self._connection_error(err)
            raise
        return events

    # --- internals: output ----------------------------------------------------------------------

    def _queue(self, buf: Buffer) -> None:
        self.outgoing.append(buf)
        self._out_bytes += len(buf)

    def _queue_frame(self, frame: Frame) -> None:
        for buf in encode_frame(frame):
            self._queue(buf)

    def _require_open(self) -> None:
        if self.closed:
            raise InvalidActionError("connection is closed after a protocol error")

    def _send_headers(
        self, stream: StreamRecord, fields: Sequence[tuple[str, str]], end_stream: bool
    ) -> None:
        self._transition(stream, StreamInput.SEND_HEADERS)
        block = memoryview(encode_block(fields, self._table_size_update))
        self._table_size_update = None
        limit = self.remote_settings[SettingCode.MAX_FRAME_SIZE]
        first, rest = block[:limit], block[limit:]
        self._queue_frame(
            HeadersFrame(
                stream_id=stream.stream_id, block=first, end_stream=end_stream, end_headers=not rest
            )
        )
        while rest:
            piece, rest = rest[:limit], rest[limit:]
            self._queue_frame(
                ContinuationFrame(stream_id=stream.stream_id, block=piece, end_headers=not rest)
            )
        stream.headers_sent = True
        if end_stream:
            stream.pending_end = True
            self._transition(stream, StreamInput.SEND_END_STREAM)

    def _flush_stream(self, stream: StreamRecord) -> None:
        max_frame = self.remote_settings[SettingCode.MAX_FRAME_SIZE]
        sid = stream.stream_id
        pending = stream.pending
        while pending:
            allowed = min(stream.outbound_window, self._conn_outbound_window, max_frame)
            if allowed <= 0:
                return
            chunk = pending[0]
            n = len(chunk)
            if n > allowed:
                pending[0] = chunk[allowed:]
                chunk = chunk[:allowed]
                n = allowed
            else:
                pending.popleft()
            stream.outbound_window -= n
            self._conn_outbound_window -= n
            stream.pending_bytes -= n
            end = stream.pending_end and not pending
            head = frame_header(n, FrameType.DATA, FLAG_END_STREAM if end else 0, sid)
            if n <= _COPY_LIMIT:
                self.outgoing.append(head + chunk)  # one small buffer: one TLS record, not two
            else:
                self.outgoing.append(head)
                self.outgoing.append(chunk)  # the caller's bytes, by reference
            self._out_bytes += n + 9
            if not pending:
                stream.pending = None  # drained: no queue held while the stream idles
            if end:
                self._transition(stream, StreamInput.SEND_END_STREAM)
                return
        if stream.pending_end and stream.state in (
            StreamState.OPEN,
            StreamState.HALF_CLOSED_REMOTE,
        ):
            self._queue(frame_header(0, FrameType.DATA, FLAG_END_STREAM, sid))
            self._transition(stream, StreamInput.SEND_END_STREAM)

    def _flush_all(self) -> None:
        for stream in list(self._streams.values()):
            if stream.pending and self._conn_outbound_window > 0:
                self._flush_stream(stream)

    # --- internals: streams ----------------------------------------------------------------------

    def _new_stream(self, stream_id: int) -> StreamRecord:
        stream = StreamRecord(
            stream_id=stream_id,
            outbound_window=self.remote_settings[SettingCode.INITIAL_WINDOW_SIZE],
            inbound_window=self._local_initial_window,
        )
        self._streams[stream_id] = stream
        return stream

    def _live_stream(self, stream_id: int) -> StreamRecord:
        stream = self._streams.get(stream_id)
        if stream is None:
            state = "idle" if self._is_idle(stream_id) else "closed"
            raise InvalidActionError(f"stream {stream_id} is {state}")
        return stream

    def _is_idle(self, stream_id: int) -> bool:
        ours = stream_id % 2 == self._next_outbound_id % 2
        if ours:
            return stream_id >= self._next_outbound_id
        return stream_id > self._highest_inbound_id

    def _transition(
        self,
        stream: StreamRecord,
        event: StreamInput,
        closed_by: StreamClosedBy = StreamClosedBy.ENDED,
    ) -> None:
        """Apply `event` to the stream's state; a stream it closes is remembered as
        `closed_by`."""
        new = next_state(stream.state, event)
        if new is None:
            if event.name.startswith("SEND"):
                raise InvalidActionError(
                    f"stream {stream.stream_id} is {stream.state.value}: cannot {event.value}"
                )
            # §5.1: a frame the state does not allow; half-closed (remote) answers STREAM_CLOSED.
            raise ProtocolError(
                f"{event.value} on stream {stream.stream_id} in state {stream.state.value}",
                error_code=ErrorCode.STREAM_CLOSED,
                stream_id=stream.stream_id,
            )
        stream.state = new
        if new is StreamState.HALF_CLOSED_REMOTE:
            self._sinks.pop(stream.stream_id, None)
        elif new is StreamState.CLOSED:
            self._close_stream(stream, closed_by)

    def _close_stream(self, stream: StreamRecord, how: StreamClosedBy) -> None:
        stream.state = StreamState.CLOSED
        stream.pending = None
        stream.pending_bytes = 0
        self._streams.pop(stream.stream_id, None)
        self._sinks.pop(stream.stream_id, None)
        self._closed_streams.add(stream.stream_id, how)

    def _stream_error(self, err: ProtocolError, events: list[Event]) -> None:
        sid = err.stream_id
        self._queue_frame(RstStreamFrame(stream_id=sid, error_code=int(err.error_code)))
        stream = self._streams.get(sid)
        if stream is not None:
            self._close_stream(stream, StreamClosedBy.RESET_SENT)
            events.append(
                StreamReset(stream_id=sid, error_code=int(err.error_code), remote_reset=False)
            )
        else:
            self._closed_streams.update(sid, StreamClosedBy.RESET_SENT)

    def _connection_error(self, err: ProtocolError) -> None:
        if self.closed:
            return
        self._queue_frame(
            GoAwayFrame(
                last_stream_id=self._highest_inbound_id,
                error_code=int(err.error_code),
                additional_data=str(err).encode()[:256],
            )
        )
        self.closed = True
        for stream in list(self._streams.values()):
            self._close_stream(stream, StreamClosedBy.RESET_SENT)

    def _unknown_stream(self, stream_id: int, what: str) -> None:
        """A frame for a stream we do not track: an error if it was never opened, an error or
        nothing if it was closed (§5.1). Returns when the frame is to be ignored."""
        if self._is_idle(stream_id):
            raise ProtocolError(f"{what} on idle stream {stream_id}")
        how = self._closed_streams.get(stream_id)
        if how is StreamClosedBy.RESET_SENT or what in ("WINDOW_UPDATE", "RST_STREAM"):
            return  # frames in flight when we reset it, or racing a normal close
        if how is None and what == "HEADERS":
            # §5.1.1: a new stream must use an id above every id the peer used before.
            raise ProtocolError(
                f"HEADERS on stream {stream_id}, below the peer's highest stream id"
            )
        if how is StreamClosedBy.ENDED:
            raise ProtocolError(
                f"{what} on closed stream {stream_id}", error_code=ErrorCode.STREAM_CLOSED
            )
        raise ProtocolError(
            f"{what} on reset stream {stream_id}",
            error_code=ErrorCode.STREAM_CLOSED,
            stream_id=stream_id,
        )

    # --- internals: input ------------------------------------------------------------------------

    def _consume_preface(self, data: Buffer) -> Buffer:
        want = self._preface_pending
        got = bytes(memoryview(data)[: len(want)])
        if not want.startswith(got):
            raise ProtocolError("invalid connection preface (not an HTTP/2 client)")
        self._preface_pending = want[len(got) :]
        return memoryview(data)[len(got) :]

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        if self._header_block is not None and not isinstance(frame, ContinuationFrame):
            raise ProtocolError(
                f"{type(frame).__name__} interleaved in a header block (expected CONTINUATION)"
            )
        if not self._remote_settings_seen:
            if not isinstance(frame, SettingsFrame) or frame.ack:
                raise ProtocolError("the peer's first frame must be SETTINGS")
            self._remote_settings_seen = True
        if isinstance(frame, DataFrame):
            data = frame.data if isinstance(frame.data, memoryview) else memoryview(frame.data)
            self._on_data(
                frame.stream_id,
                data,
                frame.flow_controlled_length,
                frame.flow_controlled_length,
                frame.end_stream,
                events,
            )
        elif isinstance(frame, HeadersFrame):
            if frame.end_headers:
                self._on_header_block(frame.stream_id, bytes(frame.block), frame.end_stream, events)
            else:
                self._header_block = (frame.stream_id, frame.end_stream, bytearray(frame.block))
        elif isinstance(frame, ContinuationFrame):
            self._on_continuation(frame, events)
        elif isinstance(frame, WindowUpdateFrame):
            self._on_window_update(frame, events)
        elif isinstance(frame, SettingsFrame):
            self._on_settings(frame, events)
        elif isinstance(frame, PingFrame):
            if frame.ack:
                events.append(PingAckReceived(data=frame.data))
            else:
                self._queue_frame(PingFrame(data=frame.data, ack=True))
                events.append(PingReceived(data=frame.data))
        elif isinstance(frame, RstStreamFrame):
            self._on_rst_stream(frame, events)
        elif isinstance(frame, GoAwayFrame):
            self._on_goaway(frame, events)
        elif isinstance(frame, PushPromiseFrame):
            raise ProtocolError("PUSH_PROMISE received, but push is disabled")
        elif isinstance(frame, PriorityFrame | UnknownFrame):
            pass  # §5.3.2: priority signals are advisory; §5.5: unknown types are ignored

    def _on_data(
        self,
        sid: int,
        data: memoryview,
        size: int,
        delivered: int,
        end_stream: int | bool,
        events: list[Event],
    ) -> None:
        """A DATA frame (or its first piece): `size` is the whole frame's flow-controlled length,
        checked against the windows up front; `delivered` is the part in `data`."""
        self._fragment_stream = 0  # pieces of a refused frame are dropped
        # The connection window counts every DATA frame, even on streams we then refuse (§6.9).
        # A zero-length frame (e.g. a bare END_STREAM) consumes nothing, so it can never
        # overrun a window, even one a SETTINGS change has made negative (§6.9.2).
        if size and size > self._conn_inbound_window:
            raise ProtocolError(
                f"DATA of {size} bytes overruns the connection window {self._conn_inbound_window}",
                error_code=ErrorCode.FLOW_CONTROL_ERROR,
            )
        self._conn_inbound_window -= size
        stream = self._streams.get(sid)
        try:
            if stream is None:
                self._unknown_stream(sid, "DATA")
                self.acknowledge_received_data(sid, size)
                return
            if not stream.headers_received:
                raise ProtocolError(f"DATA before HEADERS on stream {sid}", stream_id=sid)
            state = stream.state
            if state is not StreamState.OPEN and state is not StreamState.HALF_CLOSED_LOCAL:
                # Same as TRANSITIONS for RECV_DATA, checked by identity on the hot path;
                # the table then raises the right error.
                self._transition(stream, StreamInput.RECV_DATA)
            if size and size > stream.inbound_window:
                raise ProtocolError(
                    f"DATA of {size} bytes overruns stream {sid} window {stream.inbound_window}",
                    error_code=ErrorCode.FLOW_CONTROL_ERROR,
                    stream_id=sid,
                )
        except ProtocolError as err:
            if err.stream_id:
                self.acknowledge_received_data(0, size)  # never delivered: return it ourselves
            raise
        stream.inbound_window -= size
        self._fragment_stream = sid
        if delivered or size == 0:
            events.append(DataReceived(stream_id=sid, data=data, flow_controlled_length=delivered))
        if end_stream:
            self._transition(stream, StreamInput.RECV_END_STREAM)
            events.append(StreamEnded(stream_id=sid))

    def _on_data_fragment(
        self, sid: int, data: memoryview, end_stream: int, events: list[Event]
    ) -> None:
        """More bytes of the DATA frame in progress (windows were charged at its start)."""
        stream = self._streams.get(sid) if self._fragment_stream == sid else None
        if stream is None:
            if self._fragment_stream == sid:
                # reset locally since the frame began: return the bytes to the connection window
                self.acknowledge_received_data(0, len(data))
            return
        events.append(DataReceived(stream_id=sid, data=data, flow_controlled_length=len(data)))
        if end_stream:
            self._transition(stream, StreamInput.RECV_END_STREAM)
            events.append(StreamEnded(stream_id=sid))

    def _on_continuation(self, frame: ContinuationFrame, events: list[Event]) -> None:
        if self._header_block is None:
            raise ProtocolError(f"CONTINUATION on stream {frame.stream_id} without HEADERS")
        sid, end_stream, block = self._header_block
        if frame.stream_id != sid:
            raise ProtocolError(
                f"CONTINUATION on stream {frame.stream_id} inside stream {sid}'s header block"
            )
        block += frame.block
        if len(block) > _MAX_HEADER_BLOCK:
            raise ProtocolError(
                f"header block over {_MAX_HEADER_BLOCK} bytes",
                error_code=ErrorCode.ENHANCE_YOUR_CALM,
            )
        if frame.end_headers:
            self._header_block = None
            self._on_header_block(sid, bytes(block), end_stream, events)

    def _decode_headers(self, block: bytes) -> list[tuple[str, str]]:
        plain = decode_plain(block)
        if plain is not None and header_list_size(plain) <= self.config.header_list_limit:
            return [
                (
                    _shared_text(n),
                    _shared_text(v) if n in _REPEATING else v.decode("utf-8", "surrogateescape"),
                )
                for n, v in plain
            ]
        try:
            decoded = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            # Over the SETTINGS_MAX_HEADER_LIST_SIZE we advertised. Decoding stopped half way,
            # so the HPACK table is out of step and the connection cannot continue (§10.5.1).
            raise ProtocolError(
                f"header list over our limit of {self.config.header_list_limit} bytes",
                error_code=ErrorCode.ENHANCE_YOUR_CALM,
            ) from exc
        except Exception as exc:
            # Any failure leaves the shared HPACK table unknown, so the connection is lost (§4.3).
            raise ProtocolError(
                f"HPACK decoding failed: {exc!r}", error_code=ErrorCode.COMPRESSION_ERROR
            ) from exc
        return [
            (
                bytes(n).decode("utf-8", "surrogateescape"),
                bytes(v).decode("utf-8", "surrogateescape"),
            )
            for n, v in decoded
        ]

    def _on_header_block(
        self, sid: int, block: bytes, end_stream: bool, events: list[Event]
    ) -> None:
        fields = self._decode_headers(block)  # always decode first: it updates the HPACK table
        stream = self._streams.get(sid)
        ours = sid % 2 == self._next_outbound_id % 2
        if stream is None:
            if ours or not self._is_idle(sid):
                self._unknown_stream(sid, "HEADERS")
                return
            if self.client_side:
                raise ProtocolError(f"server opened stream {sid}, but push is disabled")
            self._highest_inbound_id = sid
            if self._goaway_sent is not None and sid > self._goaway_sent:
                # §6.8: ignore it and its frames
                self._closed_streams.add(sid, StreamClosedBy.RESET_SENT)
                return
            if self.open_inbound_streams >= self.config.inbound_stream_limit:
                raise ProtocolError(
                    f"stream {sid} exceeds our limit of {self.config.inbound_stream_limit} streams",
                    error_code=ErrorCode.REFUSED_STREAM,
                    stream_id=sid,
                )
            request = self._request_event(sid, fields)  # validate before the stream exists
            stream = self._new_stream(sid)
            self._transition(stream, StreamInput.RECV_HEADERS)
            stream.headers_received = True
            events.append(request)
        elif not stream.headers_received:
            self._transition(stream, StreamInput.RECV_HEADERS)
            event = self._response_event(sid, fields, end_stream)
            if event is None:
                return  # 1xx interim response: the final one is still to come
            stream.headers_received = True
            events.append(event)
        else:
            self._transition(stream, StreamInput.RECV_HEADERS)
            if not end_stream:
                raise ProtocolError(f"trailers on stream {sid} without END_STREAM", stream_id=sid)
            try:
                _, regular = split_pseudo(fields, frozenset())
            except ValueError as exc:
                raise ProtocolError(
                    f"malformed trailers on stream {sid}: {exc}", stream_id=sid
                ) from exc
            events.append(TrailersReceived(stream_id=sid, headers=regular))
        if end_stream:
            self._transition(stream, StreamInput.RECV_END_STREAM)
            events.append(StreamEnded(stream_id=sid))

    def _request_event(self, sid: int, fields: Sequence[tuple[str, str]]) -> RequestReceived:
        try:
            pseudo, regular = split_pseudo(fields, REQUEST_PSEUDO)
            method = pseudo.get(":method")
            if not method:
                raise ValueError(":method missing")
            if method == "CONNECT":
                # §8.5: CONNECT carries :authority only; :scheme and :path must be omitted.
                if not pseudo.get(":authority"):
                    raise ValueError("CONNECT without :authority")
                if ":scheme" in pseudo or ":path" in pseudo:
                    raise ValueError("CONNECT with :scheme or :path")
            elif not pseudo.get(":scheme") or not pseudo.get(":path"):
                raise ValueError(f"{method} request without :scheme and :path")
        except ValueError as exc:
            raise ProtocolError(f"malformed request on stream {sid}: {exc}", stream_id=sid) from exc
        return RequestReceived(
            stream_id=sid, method=method, authority=pseudo.get(":authority", ""), headers=regular
        )

    def _response_event(
        self, sid: int, fields: Sequence[tuple[str, str]], end_stream: bool
    ) -> ResponseReceived | None:
        try:
            pseudo, regular = split_pseudo(fields, frozenset({":status"}))
            text = pseudo.get(":status", "")
            if len(text) != 3 or not text.isdigit():
                raise ValueError(f"bad :status {text!r}")
            status = int(text)
            if status < 200 and end_stream:
                raise ValueError("interim response with END_STREAM")
        except ValueError as exc:
            raise ProtocolError(
                f"malformed response on stream {sid}: {exc}", stream_id=sid
            ) from exc
        if status < 200:
            return None
        return ResponseReceived(stream_id=sid, status=status, headers=regular)

    def _on_window_update(self, frame: WindowUpdateFrame, events: list[Event]) -> None:
        sid = frame.stream_id
        if sid == 0:
            self._conn_outbound_window = grow(
                self._conn_outbound_window, frame.increment, "connection window over 2^31-1"
            )
            events.append(WindowUpdated(stream_id=0, delta=frame.increment))
            self._flush_all()
            return
        stream = self._streams.get(sid)
        if stream is None:
            self._unknown_stream(sid, "WINDOW_UPDATE")
            return
        self._transition(stream, StreamInput.RECV_WINDOW_UPDATE)
        stream.outbound_window = grow(
            stream.outbound_window,
            frame.increment,
            f"stream {sid} window over 2^31-1",
            stream_id=sid,
        )
        events.append(WindowUpdated(stream_id=sid, delta=frame.increment))
        if stream.pending or stream.pending_end:
            self._flush_stream(stream)

    def _on_settings(self, frame: SettingsFrame, events: list[Event]) -> None:
        if frame.ack:
            if self._settings_unacked:
                self._settings_unacked -= 1
                delta = self.config.initial_window_size - self._local_initial_window
                if delta:
                    # §6.9.2: a new initial window changes every open stream's window by the
                    # difference (the receiver's view too); it may go negative.
                    self._local_initial_window = self.config.initial_window_size
                    for stream in self._streams.values():
                        stream.inbound_window += delta
            events.append(SettingsAcked())
            return
        changed: dict[int, int] = {}
        for code, value in frame.settings:
            check_remote_setting(code, value, client_side=self.client_side)
            if code not in DEFAULT_REMOTE_SETTINGS:
                continue  # §6.5.2: unknown settings are ignored
            if code == SettingCode.INITIAL_WINDOW_SIZE:
                # §6.9.2: the change applies to every open stream and may make windows negative.
                delta = value - self.remote_settings[code]
                for stream in self._streams.values():
                    stream.outbound_window = grow(
                        stream.outbound_window,
                        delta,
                        "SETTINGS_INITIAL_WINDOW_SIZE pushes a stream window over 2^31-1",
                    )
            if code == SettingCode.HEADER_TABLE_SIZE:
                self._table_size_update = 0  # ours stays empty: say so, within any limit
            self.remote_settings[code] = value
            changed[code] = value
        self._queue_frame(SettingsFrame(ack=True))
        events.append(RemoteSettingsChanged(changed=changed))
        if SettingCode.INITIAL_WINDOW_SIZE in changed:
            self._flush_all()

    def _on_rst_stream(self, frame: RstStreamFrame, events: list[Event]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._unknown_stream(frame.stream_id, "RST_STREAM")
            return
        self._transition(stream, StreamInput.RECV_RST, StreamClosedBy.RESET_RECEIVED)
        events.append(
            StreamReset(stream_id=frame.stream_id, error_code=frame.error_code, remote_reset=True)
        )

    def _on_goaway(self, frame: GoAwayFrame, events: list[Event]) -> None:
        term = ConnectionTerminated(
            error_code=frame.error_code,
            last_stream_id=frame.last_stream_id,
            additional_data=frame.additional_data,
        )
        self.goaway_received = term
        events.append(term)
        parity = self._next_outbound_id % 2
        for sid, stream in list(self._streams.items()):
            if sid % 2 == parity and sid > frame.last_stream_id:
                # Never processed by the peer: safe to retry elsewhere (§6.8).
                self._close_stream(stream, StreamClosedBy.RESET_RECEIVED)
                events.append(
                    StreamReset(
                        stream_id=sid, error_code=ErrorCode.REFUSED_STREAM, remote_reset=True
                    )
                )
