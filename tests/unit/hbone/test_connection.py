"""The connection state machine: flow control at window edges and every error path.

A scripted raw peer writes frames byte by byte-exact (with its own HPACK encoder) and reads back
what our connection sends, so each RFC 9113 rule is checked on the wire.
"""

from __future__ import annotations

import hpack
import pytest

from nodeagent.hbone.connection import (
    TRANSITIONS,
    ConnectionConfig,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    InvalidActionError,
    ProtocolError,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamInput,
    StreamReset,
    StreamState,
    TrailersReceived,
    TunnelConnection,
    WindowUpdated,
    format_authority,
    parse_authority,
)
from nodeagent.hbone.frames import (
    PREFACE,
    ContinuationFrame,
    DataFrame,
    FrameReader,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    UnknownFrame,
    WindowUpdateFrame,
    serialize,
)

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.2:80")]


class RawPeer:
    """The other end, written by hand: frames in, frames out."""

    def __init__(self, conn: TunnelConnection) -> None:
        self.conn = conn
        self.enc = hpack.Encoder()
        self.reader = FrameReader(max_frame_size=1 << 24)
        conn.initiate_connection()
        if not conn.client_side:
            hello = PREFACE + serialize(SettingsFrame()) + serialize(SettingsFrame(ack=True))
            self.conn_events = conn.receive_data(hello)
        else:
            self.conn_events = conn.receive_data(serialize(SettingsFrame()))
            assert conn.data_to_send_bytes().startswith(PREFACE)  # the rest of the greeting is ours
            self.conn_events += conn.receive_data(serialize(SettingsFrame(ack=True)))
        self.sent()  # drop the greeting

    def send(self, *frames) -> list:
        return self.conn.receive_data(b"".join(serialize(f) for f in frames))

    def headers(self, sid: int, fields, *, end_stream: bool = False) -> HeadersFrame:
        return HeadersFrame(stream_id=sid, block=self.enc.encode(fields), end_stream=end_stream)

    def sent(self) -> list:
        self.reader.feed(self.conn.data_to_send_bytes())
        return list(self.reader)

    def expect_goaway(self, frames, code: ErrorCode) -> None:
        with pytest.raises(ProtocolError) as err:
            self.send(*frames)
        assert err.value.error_code == code and err.value.stream_id == 0
        goaways = [f for f in self.sent() if isinstance(f, GoAwayFrame)]
        assert [g.error_code for g in goaways] == [code]
        assert self.conn.closed
        assert self.conn.receive_data(serialize(PingFrame(data=bytes(8)))) == []
        assert self.conn.data_to_send() == []


def server(**kw) -> RawPeer:
    return RawPeer(TunnelConnection(ConnectionConfig(client_side=False, **kw)))


def client(**kw) -> RawPeer:
    return RawPeer(TunnelConnection(ConnectionConfig(client_side=True, **kw)))


def pump(a: TunnelConnection, b: TunnelConnection) -> tuple[list, list]:
    ev_a: list = []
    ev_b: list = []
    while True:
        x, y = a.data_to_send_bytes(), b.data_to_send_bytes()
        if not x and not y:
            return ev_a, ev_b
        ev_b += b.receive_data(x)
        ev_a += a.receive_data(y)


def rsts(frames) -> list[tuple[int, int]]:
    return [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]


# --- greeting and settings ----------------------------------------------------------------------


def test_client_greeting_has_preface_settings_and_connection_window():
    conn = TunnelConnection(ConnectionConfig(client_side=True))
    conn.initiate_connection()
    wire = conn.data_to_send_bytes()
    assert wire.startswith(PREFACE)
    reader = FrameReader()
    reader.feed(wire[len(PREFACE) :])
    settings, update = list(reader)
    assert dict(settings.settings) == {2: 0, 3: 100, 4: 4 << 20, 5: 1 << 20, 6: 16 << 10}
    assert (update.stream_id, update.increment) == (0, (16 << 20) - 65535)


def test_server_greeting_and_settings_ack_both_ways():
    a = TunnelConnection(ConnectionConfig(client_side=True))
    b = TunnelConnection(ConnectionConfig(client_side=False))
    a.initiate_connection()
    b.initiate_connection()
    ev_a, ev_b = pump(a, b)
    assert any(isinstance(e, RemoteSettingsChanged) and e.changed[3] == 200 for e in ev_a)
    assert sum(type(e).__name__ == "SettingsAcked" for e in ev_a + ev_b) == 2
    assert a.max_outbound_streams == 200 and b.inbound_window(0) == 16 << 20


@pytest.mark.parametrize(
    ("settings", "code"),
    [
        (((2, 2),), ErrorCode.PROTOCOL_ERROR),  # ENABLE_PUSH must be 0 or 1
        (((4, 1 << 31),), ErrorCode.FLOW_CONTROL_ERROR),
        (((5, 16_383),), ErrorCode.PROTOCOL_ERROR),
        (((5, 1 << 24),), ErrorCode.PROTOCOL_ERROR),
    ],
)
def test_invalid_settings_values_are_connection_errors(settings, code):
    peer = server()
    peer.expect_goaway([SettingsFrame(settings=settings)], code)


def test_unknown_settings_and_frame_types_and_priority_are_ignored():
    peer = server()
    events = peer.send(
        SettingsFrame(settings=((0x99, 7),)),
        UnknownFrame(type=0xEE, flags=0, stream_id=0, payload=b"junk"),
    )
    assert events == [RemoteSettingsChanged(changed={})]
    assert [type(f).__name__ for f in peer.sent()] == ["SettingsFrame"]  # just the ACK


def test_client_rejects_server_enabling_push():
    peer = client()
    peer.expect_goaway([SettingsFrame(settings=((2, 1),))], ErrorCode.PROTOCOL_ERROR)


def test_bad_preface_is_protocol_error():
    conn = TunnelConnection(ConnectionConfig(client_side=False))
    conn.initiate_connection()
    conn.data_to_send()
    with pytest.raises(ProtocolError) as err:
        conn.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert err.value.error_code == ErrorCode.PROTOCOL_ERROR
    assert b"\x07" in conn.data_to_send_bytes()[:9]  # a GOAWAY frame header


def test_first_frame_must_be_settings():
    conn = TunnelConnection(ConnectionConfig(client_side=False))
    with pytest.raises(ProtocolError, match="first frame"):
        conn.receive_data(PREFACE + serialize(PingFrame(data=bytes(8))))


def test_ping_is_answered_with_ack():
    peer = server()
    assert [type(e).__name__ for e in peer.send(PingFrame(data=b"01234567"))] == ["PingReceived"]
    (ack,) = peer.sent()
    assert ack == PingFrame(data=b"01234567", ack=True)


# --- CONNECT semantics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        [(":method", "CONNECT")],  # no :authority
        [*CONNECT, (":path", "/")],  # CONNECT must not carry :path
        [*CONNECT, (":scheme", "https")],
        [(":method", "CONNECT"), ("x", "1"), (":authority", "a:1")],  # pseudo after regular
        [*CONNECT, (":protocol", "websocket")],  # no extended CONNECT
        [*CONNECT, (":method", "CONNECT")],  # repeated pseudo-header
        [*CONNECT, ("Upper", "x")],
        [*CONNECT, ("connection", "close")],
        [*CONNECT, ("te", "gzip")],
        [*CONNECT, ("x", " padded")],
        [*CONNECT, (":status", "200")],
        [(":method", "GET"), (":authority", "a")],  # GET needs :scheme and :path
    ],
)
def test_malformed_requests_are_stream_errors(fields):
    peer = server()
    events = peer.send(peer.headers(1, fields))
    assert events == []
    assert rsts(peer.sent()) == [(1, ErrorCode.PROTOCOL_ERROR)]
    # the connection survives and serves the next stream
    assert [type(e).__name__ for e in peer.send(peer.headers(3, CONNECT))] == ["RequestReceived"]


def test_request_with_end_stream_is_request_then_half_close():
    peer = server()
    events = peer.send(peer.headers(1, [*CONNECT, ("baggage", "a=b")], end_stream=True))
    assert events == [
        RequestReceived(
            stream_id=1, method="CONNECT", authority="10.0.0.2:80", headers=(("baggage", "a=b"),)
        ),
        StreamEnded(stream_id=1),
    ]
    assert peer.conn.stream_state(1) is StreamState.HALF_CLOSED_REMOTE


def test_response_refusal_sends_end_stream_and_trailers_are_reported():
    peer = server()
    peer.send(peer.headers(1, CONNECT), peer.headers(3, CONNECT))
    peer.conn.send_response(1, 503)
    peer.conn.send_response(3, 200)
    h1, h3 = peer.sent()
    assert (h1.end_stream, h3.end_stream) == (True, False)
    dec = hpack.Decoder()
    assert dec.decode(bytes(h1.block)) == [(":status", "503")]
    events = peer.send(peer.headers(3, [("x-trailer", "1")], end_stream=True))
    assert events == [
        TrailersReceived(stream_id=3, headers=(("x-trailer", "1"),)),
        StreamEnded(stream_id=3),
    ]
    with pytest.raises(InvalidActionError):
        peer.conn.send_response(3, 200)


def test_client_handles_interim_and_malformed_responses():
    peer = client()
    sid = peer.conn.open_tunnel("[fd00::1]:443", [("traceparent", "00-1-2-00")])
    (hdrs,) = peer.sent()
    assert hpack.Decoder().decode(bytes(hdrs.block)) == [
        (":method", "CONNECT"),
        (":authority", "[fd00::1]:443"),
        ("traceparent", "00-1-2-00"),
    ]
    assert peer.send(peer.headers(sid, [(":status", "100")])) == []
    assert peer.send(peer.headers(sid, [(":status", "200")])) == [
        ResponseReceived(stream_id=sid, status=200, headers=())
    ]
    sid2 = peer.conn.open_tunnel("10.0.0.1:1")
    peer.sent()
    events = peer.send(peer.headers(sid2, [(":status", "20x")]))
    assert events == [
        StreamReset(stream_id=sid2, error_code=ErrorCode.PROTOCOL_ERROR, remote_reset=False)
    ]
    assert rsts(peer.sent()) == [(sid2, ErrorCode.PROTOCOL_ERROR)]
    sid3 = peer.conn.open_tunnel("10.0.0.1:1")
    peer.sent()
    events = peer.send(DataFrame(stream_id=sid3, data=b"early"))
    assert events == [
        StreamReset(stream_id=sid3, error_code=ErrorCode.PROTOCOL_ERROR, remote_reset=False)
    ]
    assert rsts(peer.sent()) == [(sid3, ErrorCode.PROTOCOL_ERROR)]


def test_authority_parsing_and_formatting():
    assert parse_authority("10.0.0.1:8080") == ("10.0.0.1", 8080)
    assert parse_authority("[fd00::1]:80") == ("fd00::1", 80)
    assert format_authority("fd00::1", 80) == "[fd00::1]:80"
    for bad in ("10.0.0.1", "fd00::1:80", "[fd00::1:80", ":80", "a:0", "a:70000", "a:x"):
        with pytest.raises(ValueError):
            parse_authority(bad)


# --- flow control -------------------------------------------------------------------------------


def test_stream_window_exactly_full_is_accepted_one_byte_more_is_flow_control_error():
    peer = server(initial_window_size=70_000)
    peer.send(peer.headers(1, CONNECT), peer.headers(3, CONNECT))
    events = peer.send(
        DataFrame(stream_id=1, data=bytes(16_384)),
        DataFrame(stream_id=1, data=bytes(70_000 - 16_384)),
    )
    assert sum(e.flow_controlled_length for e in events if isinstance(e, DataReceived)) == 70_000
    assert peer.conn.inbound_window(1) == 0
    events = peer.send(DataFrame(stream_id=1, data=b"x"))
    assert events == [
        StreamReset(stream_id=1, error_code=ErrorCode.FLOW_CONTROL_ERROR, remote_reset=False)
    ]
    assert rsts(peer.sent()) == [(1, ErrorCode.FLOW_CONTROL_ERROR)]
    # padding counts against the window too (§6.9.1)
    events = peer.send(DataFrame(stream_id=3, data=bytes(16_000), pad_length=255))
    assert events[0].flow_controlled_length == 16_256


def test_connection_window_exactly_full_then_one_byte_more_is_goaway():
    peer = server(initial_window_size=40_000, connection_window_size=65_535)
    peer.send(peer.headers(1, CONNECT), peer.headers(3, CONNECT))
    peer.send(
        DataFrame(stream_id=1, data=bytes(16_384)), DataFrame(stream_id=1, data=bytes(23_616))
    )
    peer.send(DataFrame(stream_id=3, data=bytes(16_384)), DataFrame(stream_id=3, data=bytes(9_151)))
    assert peer.conn.inbound_window(0) == 0
    peer.expect_goaway([DataFrame(stream_id=3, data=b"x")], ErrorCode.FLOW_CONTROL_ERROR)


def test_acknowledged_data_reopens_windows_with_window_update():
    peer = server(initial_window_size=80_000, connection_window_size=65_535 * 4)
    peer.send(peer.headers(1, CONNECT))
    peer.send(
        DataFrame(stream_id=1, data=bytes(16_384)), DataFrame(stream_id=1, data=bytes(16_384))
    )
    peer.conn.acknowledge_received_data(1, 16_384)
    assert peer.sent() == []  # below a quarter of either window: no update yet
    peer.conn.acknowledge_received_data(1, 16_384)
    assert peer.sent() == [WindowUpdateFrame(stream_id=1, increment=32_768)]
    assert peer.conn.inbound_window(1) == 80_000
    peer.conn.acknowledge_received_data(1, 32_767)
    peer.conn.acknowledge_received_data(1, 1)
    assert WindowUpdateFrame(stream_id=0, increment=65_535) in peer.sent()


@pytest.mark.parametrize("size", [1, 4096, 4097, 16_384, 16_385, 65_535, 65_536, 100_000])
def test_send_fast_path_frames_exactly_like_the_queued_path(size):
    # bytes take the one-test fast path when they fit; a bytearray always goes through the
    # queue. Same frames, same return value, same windows and buffering either way.
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    results = []
    for data in (payload, bytearray(payload), memoryview(payload)):
        peer = client()
        sid = peer.conn.open_tunnel("10.0.0.1:9")
        peer.sent()
        sent = peer.conn.send_data(sid, data)
        frames = peer.sent()
        results.append(
            (
                sent,
                [(f.stream_id, bytes(f.data), f.end_stream) for f in frames],
                peer.conn.buffered_bytes(sid),
                peer.conn.outbound_window(sid),
            )
        )
    assert results[0] == results[1] == results[2]
    sent, frames, buffered, _window = results[0]
    assert sent == min(size, 65_535) and buffered == size - sent
    assert b"".join(data for _, data, _ in frames) == payload[:sent]


def test_sender_never_exceeds_peer_window_and_resumes_on_window_update():
    peer = client()
    sid = peer.conn.open_tunnel("10.0.0.1:9")
    peer.sent()
    assert peer.conn.send_data(sid, bytes(100_000), end_stream=True) == 65_535
    frames = peer.sent()
    assert sum(len(f.data) for f in frames if isinstance(f, DataFrame)) == 65_535
    assert all(
        len(f.data) <= 16_384 for f in frames if isinstance(f, DataFrame)
    )  # peer's max frame
    assert not any(f.end_stream for f in frames if isinstance(f, DataFrame))
    assert peer.conn.buffered_bytes(sid) == 100_000 - 65_535
    # a stream update alone does not help: the connection window is also empty
    peer.send(WindowUpdateFrame(stream_id=sid, increment=50_000))
    assert peer.sent() == []
    events = peer.send(WindowUpdateFrame(stream_id=0, increment=10_000))
    assert WindowUpdated(stream_id=0, delta=10_000) in events
    (frame,) = peer.sent()
    assert (len(frame.data), frame.end_stream) == (10_000, False)
    peer.send(WindowUpdateFrame(stream_id=0, increment=1 << 20))
    last = peer.sent()
    assert sum(len(f.data) for f in last) == 100_000 - 75_535 and last[-1].end_stream
    assert peer.conn.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL


def test_settings_initial_window_change_applies_to_open_streams_even_negative():
    peer = client()
    sid = peer.conn.open_tunnel("10.0.0.1:9")
    peer.sent()
    peer.conn.send_data(sid, bytes(30_000))
    peer.sent()
    peer.send(SettingsFrame(settings=((4, 20_000),)))
    assert peer.conn.outbound_window(sid) == 0  # 20000 - 30000 < 0: blocked
    peer.sent()
    peer.send(WindowUpdateFrame(stream_id=sid, increment=10_001))
    assert peer.conn.outbound_window(sid) == 1


def test_window_overflow_is_stream_then_connection_flow_control_error():
    peer = client()
    sid = peer.conn.open_tunnel("10.0.0.1:9")
    peer.sent()
    events = peer.send(WindowUpdateFrame(stream_id=sid, increment=(1 << 31) - 65_535))
    assert events[-1] == StreamReset(
        stream_id=sid, error_code=ErrorCode.FLOW_CONTROL_ERROR, remote_reset=False
    )
    peer.sent()
    peer.expect_goaway(
        [WindowUpdateFrame(stream_id=0, increment=(1 << 31) - 65_535)], ErrorCode.FLOW_CONTROL_ERROR
    )


# --- stream states and errors -------------------------------------------------------------------


def test_data_fast_path_agrees_with_the_table():
    allowed = {state for (state, event) in TRANSITIONS if event is StreamInput.RECV_DATA}
    assert allowed == {StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL}


def test_state_table_covers_rfc_lifecycle():
    s, i = StreamState, StreamInput
    assert TRANSITIONS[(s.OPEN, i.SEND_END_STREAM)] is s.HALF_CLOSED_LOCAL
    assert TRANSITIONS[(s.HALF_CLOSED_LOCAL, i.RECV_END_STREAM)] is s.CLOSED
    assert TRANSITIONS[(s.HALF_CLOSED_REMOTE, i.SEND_END_STREAM)] is s.CLOSED
    for state in s:
        if state is not s.IDLE:
            assert (state, i.RECV_DATA) in TRANSITIONS or state in (s.HALF_CLOSED_REMOTE, s.CLOSED)
        assert (s.HALF_CLOSED_REMOTE, i.RECV_DATA) not in TRANSITIONS
        assert (s.IDLE, i.RECV_DATA) not in TRANSITIONS


def test_data_after_peer_end_stream_is_stream_closed_error():
    peer = server()
    peer.send(peer.headers(1, CONNECT, end_stream=True))
    events = peer.send(DataFrame(stream_id=1, data=b"late"))
    assert events == [
        StreamReset(stream_id=1, error_code=ErrorCode.STREAM_CLOSED, remote_reset=False)
    ]
    # the late frame's bytes count as consumed: 4 MiB of such frames reopen the connection window
    peer.conn.acknowledge_received_data(1, (4 << 20) - 4)
    assert WindowUpdateFrame(stream_id=0, increment=4 << 20) in peer.sent()


def test_data_on_fully_closed_stream_is_connection_stream_closed():
    peer = server()
    peer.send(peer.headers(1, CONNECT, end_stream=True))
    peer.conn.send_response(1, 400)
    peer.expect_goaway([DataFrame(stream_id=1, data=b"x")], ErrorCode.STREAM_CLOSED)


def test_frames_on_stream_we_reset_are_ignored():
    peer = server()
    peer.send(peer.headers(1, CONNECT))
    peer.conn.reset_stream(1)
    assert rsts(peer.sent()) == [(1, ErrorCode.CANCEL)]
    events = peer.send(
        DataFrame(stream_id=1, data=b"in flight"),
        WindowUpdateFrame(stream_id=1, increment=5),
        peer.headers(1, [("t", "1")], end_stream=True),
    )
    assert events == [] and peer.sent() == []
    peer.conn.reset_stream(1)  # no-op on a closed stream


def test_remote_reset_closes_stream_and_drops_buffered_data():
    peer = client()
    sid = peer.conn.open_tunnel("10.0.0.1:9")
    peer.conn.send_data(sid, bytes(100_000))
    peer.sent()
    assert peer.send(RstStreamFrame(stream_id=sid, error_code=ErrorCode.REFUSED_STREAM)) == [
        StreamReset(stream_id=sid, error_code=ErrorCode.REFUSED_STREAM)
    ]
    assert peer.conn.buffered_bytes(sid) == 0
    with pytest.raises(InvalidActionError):
        peer.conn.send_data(sid, b"x")
    # DATA after the peer's reset: stream error STREAM_CLOSED
    peer.send(peer.headers(sid, [(":status", "200")]))
    assert rsts(peer.sent()) == [(sid, ErrorCode.STREAM_CLOSED)]


@pytest.mark.parametrize(
    ("make_frames", "code"),
    [
        (lambda p: [p.headers(2, CONNECT)], ErrorCode.PROTOCOL_ERROR),  # even id from a client
        (
            lambda p: [p.headers(5, CONNECT), p.headers(3, CONNECT)],
            ErrorCode.PROTOCOL_ERROR,
        ),  # decreasing
        (lambda p: [DataFrame(stream_id=7, data=b"x")], ErrorCode.PROTOCOL_ERROR),  # idle stream
        (lambda p: [RstStreamFrame(stream_id=7, error_code=0)], ErrorCode.PROTOCOL_ERROR),
        (lambda p: [WindowUpdateFrame(stream_id=7, increment=1)], ErrorCode.PROTOCOL_ERROR),
        (
            lambda p: [
                HeadersFrame(stream_id=1, block=p.enc.encode(CONNECT)[:2], end_headers=False),
                PingFrame(data=bytes(8)),
            ],
            ErrorCode.PROTOCOL_ERROR,
        ),  # a header block interrupted
        (
            lambda p: [
                HeadersFrame(stream_id=1, block=p.enc.encode(CONNECT)[:2], end_headers=False),
                ContinuationFrame(stream_id=3, block=b""),
            ],
            ErrorCode.PROTOCOL_ERROR,
        ),  # CONTINUATION for another stream
        (lambda p: [ContinuationFrame(stream_id=1, block=b"")], ErrorCode.PROTOCOL_ERROR),
        (
            lambda p: [HeadersFrame(stream_id=1, block=b"\xff\xff\xff\xff")],
            ErrorCode.COMPRESSION_ERROR,
        ),
        (
            lambda p: [HeadersFrame(stream_id=1, block=b"\xbf")],
            ErrorCode.COMPRESSION_ERROR,
        ),  # bad index
        (
            lambda p: [PushPromiseFrame(stream_id=1, promised_stream_id=2, block=b"")],
            ErrorCode.PROTOCOL_ERROR,
        ),
        (
            lambda p: [UnknownFrame(type=0, flags=0, stream_id=1, payload=bytes(1 << 20 | 1))],
            ErrorCode.FRAME_SIZE_ERROR,
        ),
    ],
)
def test_connection_errors_send_goaway_with_rfc_code(make_frames, code):
    peer = server()
    peer.expect_goaway(make_frames(peer), code)


def test_continuation_flood_is_enhance_your_calm_and_split_headers_work():
    peer = server()
    block = peer.enc.encode([*CONNECT, ("baggage", "x" * 5000)])
    events = peer.send(
        HeadersFrame(stream_id=1, block=block[:10], end_headers=False),
        ContinuationFrame(stream_id=1, block=block[10:20], end_headers=False),
        ContinuationFrame(stream_id=1, block=block[20:], end_headers=True),
    )
    assert events[0].headers == (("baggage", "x" * 5000),)
    frames = [HeadersFrame(stream_id=3, block=b"", end_headers=False)]
    frames += [ContinuationFrame(stream_id=3, block=bytes(16_000), end_headers=False)] * 17
    peer.expect_goaway(frames, ErrorCode.ENHANCE_YOUR_CALM)


def test_streams_beyond_our_limit_are_refused():
    peer = server(max_concurrent_streams=2)
    peer.send(peer.headers(1, CONNECT), peer.headers(3, CONNECT))
    assert peer.send(peer.headers(5, CONNECT)) == []
    assert rsts(peer.sent()) == [(5, ErrorCode.REFUSED_STREAM)]


def test_goaway_received_refuses_our_unprocessed_streams():
    peer = client()
    a = peer.conn.open_tunnel("10.0.0.1:1")
    b = peer.conn.open_tunnel("10.0.0.1:2")
    events = peer.send(GoAwayFrame(last_stream_id=a, error_code=0))
    assert events == [
        ConnectionTerminated(error_code=0, last_stream_id=a, additional_data=b""),
        StreamReset(stream_id=b, error_code=ErrorCode.REFUSED_STREAM),
    ]
    assert peer.conn.stream_state(a) is StreamState.OPEN
    with pytest.raises(InvalidActionError, match="going away"):
        peer.conn.open_tunnel("10.0.0.1:3")


def test_graceful_goaway_ignores_newer_streams():
    peer = server()
    peer.send(peer.headers(1, CONNECT))
    peer.conn.close()
    assert peer.sent() == [GoAwayFrame(last_stream_id=1, error_code=0)]
    assert peer.send(peer.headers(3, CONNECT), DataFrame(stream_id=3, data=b"x")) == []
    assert peer.send(DataFrame(stream_id=1, data=b"ok"))[0].stream_id == 1


def test_local_misuse_raises_invalid_action():
    srv = server()
    with pytest.raises(InvalidActionError):
        srv.conn.open_tunnel("10.0.0.1:1")
    with pytest.raises(InvalidActionError):
        srv.conn.send_data(1, b"x")
    cli = client()
    with pytest.raises(InvalidActionError):
        cli.conn.send_response(1, 200)
    with pytest.raises(ValueError):
        cli.conn.open_tunnel("no-port")
    with pytest.raises(ValueError):
        cli.conn.open_tunnel("a:1", [(":path", "/")])
    cli.send(SettingsFrame(settings=((3, 1),)))
    sid = cli.conn.open_tunnel("10.0.0.1:1")
    with pytest.raises(InvalidActionError, match="at most 1"):
        cli.conn.open_tunnel("10.0.0.1:2")
    cli.conn.end_stream(sid)
    with pytest.raises(InvalidActionError):
        cli.conn.send_data(sid, b"after FIN")


# --- DATA frames still arriving are delivered in pieces -----------------------------------------


def test_data_frame_split_across_reads_is_delivered_as_views_of_each_read():
    peer = server()
    peer.send(peer.headers(1, CONNECT))
    wire = serialize(
        DataFrame(stream_id=1, data=bytes(range(256)) * 4096, end_stream=True)
    )  # 1 MiB
    reads = [wire[i : i + 300_000] for i in range(0, len(wire), 300_000)]
    events = []
    for r in reads:
        events += peer.conn.receive_data(r)
    data = [e for e in events if isinstance(e, DataReceived)]
    assert len(data) == len(reads)
    assert all(e.data.obj is r for e, r in zip(data, reads, strict=True))  # no join, no copy
    assert b"".join(bytes(e.data) for e in data) == bytes(range(256)) * 4096
    assert sum(e.flow_controlled_length for e in data) == 1 << 20
    assert events[-1] == StreamEnded(stream_id=1)


def test_overrun_is_caught_at_the_start_of_a_frame_still_arriving():
    peer = server(initial_window_size=70_000)
    peer.send(peer.headers(1, CONNECT))
    wire = serialize(DataFrame(stream_id=1, data=bytes(70_001)))
    events = peer.conn.receive_data(wire[:100])
    assert events == [
        StreamReset(stream_id=1, error_code=ErrorCode.FLOW_CONTROL_ERROR, remote_reset=False)
    ]
    assert peer.conn.receive_data(wire[100:]) == []  # the rest of the refused frame is dropped


def test_local_reset_mid_frame_drops_the_rest_and_returns_connection_credit():
    peer = server(connection_window_size=65_535)
    peer.send(peer.headers(1, CONNECT))
    wire = serialize(DataFrame(stream_id=1, data=bytes(60_000)))
    (first,) = peer.conn.receive_data(wire[:10_009])
    assert first.flow_controlled_length == 10_000
    peer.conn.reset_stream(1)
    assert peer.conn.receive_data(wire[10_009:]) == []
    # the 50000 bytes never delivered go straight back to the peer
    assert peer.sent() == [
        RstStreamFrame(stream_id=1, error_code=ErrorCode.CANCEL),
        WindowUpdateFrame(stream_id=0, increment=50_000),
    ]
    assert peer.conn.inbound_window(0) == 65_535 - 10_000  # the rest is the application's to ack


# --- every (state, input) pair of the stream table, driven through a real connection -------------

LIVE_STATES = [StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE]


def server_stream_in(state: StreamState) -> RawPeer:
    peer = server()
    peer.send(peer.headers(1, CONNECT, end_stream=state is StreamState.HALF_CLOSED_REMOTE))
    peer.conn.send_response(1, 200, end_stream=state is StreamState.HALF_CLOSED_LOCAL)
    peer.sent()
    assert peer.conn.stream_state(1) is state
    return peer


def expected_after(state: StreamState, *inputs: StreamInput) -> StreamState | None:
    for step in inputs:
        nxt = TRANSITIONS.get((state, step))
        if nxt is None:
            return None
        state = nxt
    return state


RECEIVED = {
    # input -> (frame builder, the table inputs that frame means)
    "HEADERS(trailers)": (
        lambda p: p.headers(1, [("x-t", "1")], end_stream=True),
        (StreamInput.RECV_HEADERS, StreamInput.RECV_END_STREAM),
    ),
    "DATA": (lambda p: DataFrame(stream_id=1, data=b"x"), (StreamInput.RECV_DATA,)),
    "DATA(END_STREAM)": (
        lambda p: DataFrame(stream_id=1, data=b"x", end_stream=True),
        (StreamInput.RECV_DATA, StreamInput.RECV_END_STREAM),
    ),
    "RST_STREAM": (
        lambda p: RstStreamFrame(stream_id=1, error_code=8),
        (StreamInput.RECV_RST,),
    ),
    "WINDOW_UPDATE": (
        lambda p: WindowUpdateFrame(stream_id=1, increment=1),
        (StreamInput.RECV_WINDOW_UPDATE,),
    ),
}


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("received", list(RECEIVED))
def test_every_received_frame_in_every_state_follows_the_table(state, received):
    peer = server_stream_in(state)
    build, inputs = RECEIVED[received]
    want = expected_after(state, *inputs)
    events = peer.send(build(peer))
    if want is None:
        # §5.1: frames a half-closed (remote) stream may not receive are STREAM_CLOSED errors
        assert rsts(peer.sent()) == [(1, ErrorCode.STREAM_CLOSED)]
        assert peer.conn.stream_state(1) is StreamState.CLOSED
    else:
        assert rsts(peer.sent()) == []
        assert peer.conn.stream_state(1) is want
        assert not any(isinstance(e, StreamReset) and not e.remote_reset for e in events)


SENT = {
    "DATA": (lambda c: c.send_data(1, b"x"), (StreamInput.SEND_DATA,)),
    "END_STREAM": (lambda c: c.end_stream(1), (StreamInput.SEND_END_STREAM,)),
    "RST_STREAM": (lambda c: c.reset_stream(1), (StreamInput.SEND_RST,)),
}


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("action", list(SENT))
def test_every_local_action_in_every_state_follows_the_table(state, action):
    peer = server_stream_in(state)
    act, inputs = SENT[action]
    want = expected_after(state, *inputs)
    if want is None:
        with pytest.raises(InvalidActionError):
            act(peer.conn)
        assert peer.sent() == []
        assert peer.conn.stream_state(1) is state
    else:
        act(peer.conn)
        assert peer.sent()
        assert peer.conn.stream_state(1) is want


def test_header_list_over_our_advertised_limit_closes_the_connection():
    peer = client()
    sid = peer.conn.open_tunnel("10.0.0.1:1")
    peer.sent()
    big = peer.headers(sid, [(":status", "200"), ("baggage", "x" * 17_000)])
    peer.expect_goaway([big], ErrorCode.ENHANCE_YOUR_CALM)


def test_our_smaller_window_applies_only_once_the_peer_acks_our_settings():
    conn = TunnelConnection(ConnectionConfig(client_side=False, initial_window_size=1000))
    conn.initiate_connection()
    enc = hpack.Encoder()
    hello = PREFACE + serialize(SettingsFrame())
    early = HeadersFrame(stream_id=1, block=enc.encode(CONNECT))
    # before the ACK the peer may still assume the default 65535-byte window
    events = conn.receive_data(
        hello + serialize(early) + serialize(DataFrame(stream_id=1, data=bytes(5000)))
    )
    assert events[-1].flow_controlled_length == 5000
    conn.receive_data(serialize(SettingsFrame(ack=True)))
    assert conn.inbound_window(1) == 1000 - 5000  # §6.9.2: the change applies, even below zero
    events = conn.receive_data(serialize(DataFrame(stream_id=1, data=b"x")))
    assert events == [
        StreamReset(stream_id=1, error_code=ErrorCode.FLOW_CONTROL_ERROR, remote_reset=False)
    ]


def test_large_sends_are_queued_by_reference_small_ones_with_their_header():
    peer = client()
    sid = peer.conn.open_tunnel("10.0.0.1:9")
    peer.send(
        WindowUpdateFrame(stream_id=0, increment=1 << 20),
        SettingsFrame(settings=((5, 1 << 20), (4, 1 << 20))),
    )
    peer.conn.data_to_send()
    big = bytearray(300_000)
    peer.conn.send_data(sid, big)
    out = peer.conn.data_to_send()
    assert [len(b) for b in out] == [9, 300_000] and out[1].obj is big
    peer.conn.send_data(sid, b"ping")
    assert peer.conn.data_to_send_bytes() == bytes.fromhex("000004 00 00 00000001") + b"ping"


def test_connects_share_their_repeating_fields_and_keep_their_own() -> None:
    """A server keeps each CONNECT's fields while the tunnel lives: names and repeating
    values (authority, baggage) are one string for all tunnels, not a copy each."""
    cli = TunnelConnection(ConnectionConfig(client_side=True))
    srv = TunnelConnection(ConnectionConfig(client_side=False))
    cli.initiate_connection()
    srv.initiate_connection()
    pump(cli, srv)
    for port in (4001, 4002):
        cli.open_tunnel(
            "10.0.0.1:8080",
            [("forwarded", f'for="10.0.0.2:{port}"'), ("baggage", "k8s.namespace.name=a")],
        )
    _, events = pump(cli, srv)
    first, second = [e for e in events if isinstance(e, RequestReceived)]
    assert first.authority == second.authority == "10.0.0.1:8080"
    assert first.authority is second.authority
    assert dict(first.headers)["baggage"] is dict(second.headers)["baggage"]
    assert [n for n, _ in first.headers] == ["forwarded", "baggage"]
    assert all(a is b for (a, _), (b, _) in zip(first.headers, second.headers, strict=True))
    assert dict(second.headers)["forwarded"] == 'for="10.0.0.2:4002"'
