"""Drive the sans-IO HBONE core (`TunnelConnection`) with fuzzed peer bytes, in either role.

The input is split in three: a flags byte (see `Plan`), a schedule of choices, and the wire
bytes the peer sends. The driver plays the local application the way `hbone/aio.py` and the
HBONE server do: it feeds the peer's preface and SETTINGS if asked, then the wire bytes in
chunks whose sizes come from the schedule, and between chunks it answers CONNECTs, sends and
echoes data, acknowledges received bytes (now, later, or through a data sink), ends, resets
and opens streams, pings and closes. Every local action is guarded by the state the core
reports (`stream_state`, `can_open_stream`, ...), so an `InvalidActionError` is a crash: the
core refused something its own state said was allowed.

The only error swallowed is `ProtocolError` from `receive_data`, the documented way to reject
a peer. Beyond "no other exception" the driver checks what a peer would see:

* every frame we write decodes (RFC 9113 §6 layout), none is larger than any
  SETTINGS_MAX_FRAME_SIZE the peer allowed, and a connection error ends with our GOAWAY;
* we never send more DATA than the peer's connection window allows (65,535 plus every
  connection WINDOW_UPDATE it sent, counted by an independent parse of its bytes);
* our receive windows never exceed 2^31-1;
* events are consistent: no DATA or END_STREAM after a stream ended or was reset, requests
  only on a server and responses only on a client for a stream it opened, data sinks only
  called on streams that may still receive DATA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from nodeagent.hbone.connection import (
    ConnectionConfig,
    ConnectionTerminated,
    DataReceived,
    DataSink,
    DataSinkFailed,
    ErrorCode,
    Event,
    PingAckReceived,
    PingReceived,
    ProtocolError,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcked,
    StreamEnded,
    StreamReset,
    StreamState,
    TrailersReceived,
    TunnelConnection,
    WindowUpdated,
    parse_authority,
)
from nodeagent.hbone.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
    FLAG_ACK,
    MAX_FRAME_SIZE_LIMIT,
    MAX_WINDOW,
    PREFACE,
    Buffer,
    DataFrame,
    FrameReader,
    FrameType,
    GoAwayFrame,
    SettingCode,
    SettingsFrame,
    decode_frame,
    serialize,
)

# Bits of the flags byte.
FEED_PREAMBLE = 0x01  # the driver sends the peer's preface/SETTINGS before the wire bytes
ACK_OUR_SETTINGS = 0x02  # ... and a SETTINGS ACK, so our window settings take effect
CONFIG_SHIFT = 2  # two bits: the variant of `config`
TUNNELS_SHIFT = 4  # three bits: CONNECTs a client opens before the first byte arrives
USE_SINKS = 0x80  # accepted streams take DATA through `set_data_sink`

# Enough streams for every limit in `config`; more only slow each run down.
MAX_TUNNELS = 32
AUTHORITIES = ("10.0.0.1:8080", "[fd00::1]:15008", "10.96.0.10:80")
_MASK31 = 0x7FFF_FFFF


@dataclass(frozen=True)
class Plan:
    """One fuzz input, decoded. `encode()` is its inverse (the seeds are built with it)."""

    flags: int
    schedule: bytes
    wire: bytes

    @classmethod
    def decode(cls, data: bytes) -> Plan:
        flags = data[0] if data else FEED_PREAMBLE
        length = data[1] if len(data) > 1 else 0
        return cls(flags, data[2 : 2 + length], data[2 + length :])

    def encode(self) -> bytes:
        if len(self.schedule) > 255:
            raise ValueError("a schedule holds at most 255 choices")
        return bytes([self.flags, len(self.schedule)]) + self.schedule + self.wire


def flags(
    *, preamble: bool = True, ack: bool = True, config: int = 0, tunnels: int = 0, sinks: bool
) -> int:
    """The flags byte of a `Plan` (for seeds)."""
    return (
        (FEED_PREAMBLE if preamble else 0)
        | (ACK_OUR_SETTINGS if ack else 0)
        | (config & 3) << CONFIG_SHIFT
        | (tunnels & 7) << TUNNELS_SHIFT
        | (USE_SINKS if sinks else 0)
    )


def config(variant: int, *, client_side: bool) -> ConnectionConfig:
    """Our side's settings, picked by the flags: ztunnel's defaults, and small limits that make
    window exhaustion, stream limits and header-list limits reachable with short inputs."""
    if variant == 1:
        return ConnectionConfig(
            client_side=client_side,
            initial_window_size=1024,
            connection_window_size=DEFAULT_WINDOW,
            max_concurrent_streams=2,
            max_header_list_size=512,
        )
    if variant == 2:
        return ConnectionConfig(client_side=client_side, initial_window_size=1, header_table_size=0)
    if variant == 3:
        return ConnectionConfig(
            client_side=client_side, max_frame_size=DEFAULT_MAX_FRAME_SIZE, max_concurrent_streams=1
        )
    return ConnectionConfig(client_side=client_side)


class _Choices:
    """The schedule, read cyclically; an empty schedule always answers 0."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._pos = 0

    def next(self) -> int:
        if not self._raw:
            return 0
        value = self._raw[self._pos % len(self._raw)]
        self._pos += 1
        return value


def _chunk_size(choice: int, left: int) -> int:
    # 0: everything that is left; small values byte-exact (frame edges), large ones up to 16 KiB.
    if choice == 0:
        return left
    if choice < 192:
        return min(choice, left)
    return min((choice - 191) * 256, left)


def _payload_size(choice: int) -> int:
    # Tiny writes take the `data_frame` fast path; the largest overrun the default window.
    if choice < 128:
        return choice + 1
    if choice < 250:
        return (choice - 127) * 512
    return DEFAULT_WINDOW + 4465


class _SinkFailure(Exception):
    """Raised by a data sink on purpose: the core must report it as `DataSinkFailed`."""


@dataclass
class _App:
    """The application's view of one stream."""

    ours: bool
    headers_sent: bool = False  # our CONNECT (client) or our response (server) went out
    local_ended: bool = False
    remote_ended: bool = False
    response: int | None = None
    reset: bool = False  # by either side; no event may follow
    sink: bool = False


class _PeerView:
    """An independent parse of the bytes the core accepted: the peer's promises to us."""

    def __init__(self, client_side: bool) -> None:
        self._skip = 0 if client_side else len(PREFACE)
        self._reader = FrameReader(max_frame_size=MAX_FRAME_SIZE_LIMIT)
        self.conn_increments = 0
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE

    def feed(self, chunk: Buffer) -> None:
        view = memoryview(chunk)
        if self._skip:
            n = min(self._skip, len(view))
            view, self._skip = view[n:], self._skip - n
        self._reader.feed(bytes(view))
        while (raw := self._reader.next_raw()) is not None:
            frame_type, frame_flags, sid, payload = raw
            if frame_type == FrameType.WINDOW_UPDATE and sid == 0 and len(payload) == 4:
                self.conn_increments += int.from_bytes(payload, "big") & _MASK31
            elif (
                frame_type == FrameType.SETTINGS
                and not frame_flags & FLAG_ACK
                and len(payload) % 6 == 0
            ):
                for off in range(0, len(payload), 6):
                    code = int.from_bytes(payload[off : off + 2], "big")
                    value = int.from_bytes(payload[off + 2 : off + 6], "big")
                    if code == SettingCode.MAX_FRAME_SIZE and value <= MAX_FRAME_SIZE_LIMIT:
                        self.max_frame_size = max(self.max_frame_size, value)


@dataclass
class _OutputCheck:
    """Parses everything we write, as the peer would."""

    client_side: bool
    peer: _PeerView
    data_sent: int = 0
    last_frame: object = None
    _preface_left: bytes = b""
    _reader: FrameReader = field(
        default_factory=lambda: FrameReader(max_frame_size=MAX_FRAME_SIZE_LIMIT)
    )

    def __post_init__(self) -> None:
        self._preface_left = PREFACE if self.client_side else b""

    def feed(self, buffers: list[Buffer]) -> None:
        for buf in buffers:
            raw = bytes(buf)
            if self._preface_left:
                n = min(len(self._preface_left), len(raw))
                assert raw[:n] == self._preface_left[:n], f"client preface corrupted: {raw[:n]!r}"
                self._preface_left, raw = self._preface_left[n:], raw[n:]
            self._reader.feed(raw)
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                raw = self._reader.next_raw()
            except ProtocolError as err:
                raise AssertionError(f"we wrote a frame the peer must refuse: {err}") from err
            if raw is None:
                return
            frame_type, frame_flags, sid, payload = raw
            assert len(payload) <= self.peer.max_frame_size, (
                f"we wrote a {FrameType(frame_type).name} frame of {len(payload)} bytes; the peer"
                f" allowed at most {self.peer.max_frame_size}"
            )
            try:
                frame = decode_frame(frame_type, frame_flags, sid, payload)
            except ProtocolError as err:
                raise AssertionError(f"we wrote a malformed frame: {err}") from err
            if isinstance(frame, DataFrame):
                self.data_sent += frame.flow_controlled_length
            self.last_frame = frame


class HboneDriver:
    """One run of the core on one fuzz input."""

    def __init__(self, data: bytes, *, client_side: bool) -> None:
        self.plan = Plan.decode(data)
        variant = (self.plan.flags >> CONFIG_SHIFT) & 3
        self.conn = TunnelConnection(config(variant, client_side=client_side))
        self.client_side = client_side
        self.choices = _Choices(self.plan.schedule)
        self.apps: dict[int, _App] = {}
        self.deferred: list[tuple[int, int]] = []  # (stream id, bytes) to acknowledge later
        self.peer = _PeerView(client_side)
        self.out = _OutputCheck(client_side, self.peer)
        self.goaway_sent = False

    # --- the run ------------------------------------------------------------------------

    def run(self) -> None:
        conn = self.conn
        conn.initiate_connection()
        self._flush()
        if self.client_side:
            for _ in range((self.plan.flags >> TUNNELS_SHIFT) & 7):
                self._open_tunnel()
        if self.plan.flags & FEED_PREAMBLE:
            preamble = b"" if self.client_side else PREFACE
            preamble += serialize(SettingsFrame())
            if self.plan.flags & ACK_OUR_SETTINGS:
                preamble += serialize(SettingsFrame(ack=True))
            if not self._receive(preamble):
                return
        wire = memoryview(self.plan.wire)
        pos = 0
        while pos < len(wire):
            size = _chunk_size(self.choices.next(), len(wire) - pos)
            chunk = wire[pos : pos + size]
            pos += size
            if not self._receive(chunk):
                return
            self._act()
        if not conn.closed and not self.goaway_sent:
            conn.close()
            self._flush()
            assert isinstance(self.out.last_frame, GoAwayFrame), "close() wrote no GOAWAY"

    def _receive(self, chunk: Buffer) -> bool:
        """Feed one chunk; False once the core has refused the peer (the run ends)."""
        try:
            events = self.conn.receive_data(chunk)
        except ProtocolError as err:
            # The reference parse may now count frames after the error too: that only loosens
            # the checks on what we wrote before it.
            self.peer.feed(chunk)
            assert self.conn.closed, f"ProtocolError without closing the connection: {err}"
            self._check_events(cast(list[Event], list(err.events)))
            self._flush()
            last = self.out.last_frame
            assert isinstance(last, GoAwayFrame) and last.error_code == int(err.error_code), (
                f"connection error {err} did not end with our GOAWAY (last frame: {last!r})"
            )
            return False
        self.peer.feed(chunk)
        self._check_events(events)
        self._handle(events)
        self._flush()
        return True

    def _flush(self) -> None:
        self.out.feed(self.conn.data_to_send())
        allowed = DEFAULT_WINDOW + self.peer.conn_increments
        assert self.out.data_sent <= allowed, (
            f"sent {self.out.data_sent} DATA bytes; the peer's connection window allowed {allowed}"
        )
        assert self.conn.inbound_window(0) <= MAX_WINDOW, "our connection window is over 2^31-1"

    def _ack(self, sid: int, n: int) -> None:
        # Only an acknowledgement grows our windows: check them right there.
        self.conn.acknowledge_received_data(sid, n)
        assert self.conn.inbound_window(sid) <= MAX_WINDOW, f"stream {sid} window over 2^31-1"

    # --- events ---------------------------------------------------------------------------

    def _check_events(self, events: list[Event]) -> None:
        """What the core reports must be possible, whatever the peer sent."""
        for ev in events:
            if isinstance(ev, RequestReceived):
                assert not self.client_side, f"a client got a request: {ev}"
                assert ev.stream_id % 2 == 1, f"request on a server-side stream id: {ev}"
                assert ev.stream_id not in self.apps, f"stream {ev.stream_id} requested twice"
                assert ev.method, "request without a method"
                self.apps[ev.stream_id] = _App(ours=False)
                continue
            sid = getattr(ev, "stream_id", 0)
            app = self.apps.get(sid)
            if isinstance(ev, DataReceived | TrailersReceived | StreamEnded):
                assert app is not None, f"{type(ev).__name__} on unknown stream {sid}"
                assert not app.reset, f"{type(ev).__name__} on stream {sid} after its reset"
                assert not app.remote_ended, f"{type(ev).__name__} on stream {sid} after its end"
                if isinstance(ev, DataReceived):
                    assert len(ev.data) <= ev.flow_controlled_length, f"bad length in {ev}"
                elif isinstance(ev, StreamEnded):
                    app.remote_ended = True
            elif isinstance(ev, ResponseReceived):
                assert self.client_side, f"a server got a response: {ev}"
                assert app is not None and app.ours, f"response on a stream we never opened: {ev}"
                assert not app.reset, f"response on stream {sid} after its reset"
                assert app.response is None, f"second response on stream {sid}"
                assert 200 <= ev.status <= 999, f"bad final status in {ev}"
                app.response = ev.status
            elif isinstance(ev, StreamReset):
                assert app is not None, f"reset of unknown stream {sid}"
                assert not app.reset, f"stream {sid} reset twice"
                app.reset = True
            elif isinstance(ev, DataSinkFailed):
                assert app is not None and app.sink, f"sink failure on stream {sid} without one"
                assert isinstance(ev.error, _SinkFailure), f"sink failed with {ev.error!r}"
            elif isinstance(ev, WindowUpdated):
                assert ev.delta > 0, f"non-positive window update {ev}"
                assert sid == 0 or app is not None, f"window update on unknown stream {sid}"
            elif isinstance(ev, PingReceived | PingAckReceived):
                assert len(ev.data) == 8, f"bad ping {ev}"
            else:
                assert isinstance(
                    ev, ConnectionTerminated | SettingsAcked | RemoteSettingsChanged
                ), f"unknown event {ev!r}"

    def _handle(self, events: list[Event]) -> None:
        """Answer the events in order, as the application would."""
        conn = self.conn
        for ev in events:
            if conn.closed:
                return
            if isinstance(ev, RequestReceived):
                self._on_request(ev)
            elif isinstance(ev, ResponseReceived):
                if 200 <= ev.status < 300 and self.choices.next() & 1:
                    self._send(ev.stream_id, self.choices.next())
            elif isinstance(ev, DataReceived):
                self._on_data(ev)
            elif isinstance(ev, StreamEnded):
                if self.choices.next() & 1:
                    self._end(ev.stream_id)
            elif isinstance(ev, DataSinkFailed):
                self._reset(ev.stream_id, ErrorCode.INTERNAL_ERROR)

    def _on_request(self, ev: RequestReceived) -> None:
        sid = ev.stream_id
        try:
            parse_authority(ev.authority)
            good = ev.method == "CONNECT"
        except ValueError:
            good = False
        choice = self.choices.next() % 5
        if not good:
            self._respond(sid, 400)  # what the HBONE server answers
        elif choice in (0, 1):
            self._respond(sid, 200)
            if choice == 1:
                self._send(sid, self.choices.next())
        elif choice == 2:
            self._respond(sid, 503)
        elif choice == 3:
            self._reset(sid, ErrorCode.REFUSED_STREAM)
        # 4: no answer yet; `_act` may answer later
        if self.plan.flags & USE_SINKS and self._may_receive(sid):
            self.apps[sid].sink = True
            self.conn.set_data_sink(sid, self._sink_for(sid))

    def _on_data(self, ev: DataReceived) -> None:
        n = ev.flow_controlled_length
        choice = self.choices.next()
        if choice & 3 == 3:
            self.deferred.append((ev.stream_id, n))  # a slow reader acknowledges later
        else:
            self._ack(ev.stream_id, n)
        if choice & 4 and ev.data:
            self._send_bytes(ev.stream_id, bytes(ev.data))  # echo, as a relay would

    def _sink_for(self, sid: int) -> DataSink:
        def sink(view: memoryview) -> bool:
            state = self.conn.stream_state(sid)
            assert state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL), (
                f"data sink of stream {sid} called in state {state.value}"
            )
            choice = self.choices.next()
            if choice % 16 == 15:
                raise _SinkFailure(f"sink of stream {sid} refused {len(view)} bytes")
            if choice & 3 == 1:
                self.deferred.append((sid, len(view)))
                return False
            return True

        return sink

    # --- local actions (each guarded by the state the core reports) -----------------------

    def _act(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        choice = self.choices.next()
        if choice & 0x80 and self.deferred:
            for sid, n in self.deferred:
                self._ack(sid, n)
            self.deferred.clear()
        action = choice & 0x0F
        live = sorted(s for s, a in self.apps.items() if not a.reset)
        target = live[self.choices.next() % len(live)] if live else 0
        if action == 0:
            conn.ping(bytes(range(8)))
        elif action == 1:
            self._open_tunnel()
        elif action == 2 and target:
            self._send(target, self.choices.next())
        elif action == 3 and target:
            self._end(target)
        elif action == 4 and target:
            self._reset(target, ErrorCode.CANCEL)
        elif action == 5 and choice & 0x40 and not self.goaway_sent:  # rarely: it ends the run
            conn.close()
            self.goaway_sent = True
        elif action == 6 and target and not self.client_side:
            self._respond(target, 200)
        self._flush()

    def _open_tunnel(self) -> None:
        if not self.client_side or len(self.apps) >= MAX_TUNNELS or not self.conn.can_open_stream:
            return
        authority = AUTHORITIES[self.choices.next() % len(AUTHORITIES)]
        sid = self.conn.open_tunnel(authority, (("baggage", "k8s.namespace.name=fuzz"),))
        assert sid % 2 == 1 and sid not in self.apps, f"open_tunnel returned stream {sid}"
        self.apps[sid] = _App(ours=True, headers_sent=True)
        if self.plan.flags & USE_SINKS and self.choices.next() & 1:
            self.apps[sid].sink = True
            self.conn.set_data_sink(sid, self._sink_for(sid))
        self._flush()

    def _respond(self, sid: int, status: int) -> None:
        app = self.apps.get(sid)
        if (
            app is None
            or app.ours
            or app.headers_sent
            or self.conn.closed
            or self.conn.stream_state(sid) not in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
        ):
            return
        self.conn.send_response(sid, status)
        app.headers_sent = True
        if not 200 <= status < 300:
            app.local_ended = True
            if self.conn.stream_state(sid) is not StreamState.CLOSED:
                # As `TunnelStream.respond` does after a refusal (RFC 9113 §8.1).
                self._reset(sid, ErrorCode.NO_ERROR)

    def _may_send(self, sid: int) -> bool:
        app = self.apps.get(sid)
        return (
            app is not None
            and app.headers_sent
            and not app.local_ended
            and not self.conn.closed
            and self.conn.stream_state(sid) in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
        )

    def _may_receive(self, sid: int) -> bool:
        return not self.conn.closed and self.conn.stream_state(sid) in (
            StreamState.OPEN,
            StreamState.HALF_CLOSED_LOCAL,
        )

    def _send(self, sid: int, choice: int) -> None:
        self._send_bytes(sid, bytes([choice]) * _payload_size(choice))

    def _send_bytes(self, sid: int, payload: bytes) -> None:
        if not self._may_send(sid):
            return
        if len(payload) <= 4096 and self.choices.next() & 1:
            self._flush()  # `data_frame` only answers with nothing queued
            frame = self.conn.data_frame(sid, payload)
            if frame is not None:
                self.out.feed([frame])
                return
        self.conn.send_data(sid, payload)

    def _end(self, sid: int) -> None:
        if self._may_send(sid):
            self.conn.end_stream(sid)
            self.apps[sid].local_ended = True

    def _reset(self, sid: int, code: ErrorCode) -> None:
        app = self.apps.get(sid)
        if app is None or self.conn.closed:
            return
        self.conn.reset_stream(sid, code)
        app.reset = True


def run(data: bytes, *, client_side: bool) -> None:
    """One fuzz input against one role of the core."""
    HboneDriver(data, client_side=client_side).run()
