"""The direct paths of the connection core: DATA handed to a stream's sink during
`receive_data`, and small DATA frames built for the caller to write (`data_frame`).

Both exist only to save Python calls per read, so the tests hold them to the general paths:
same bytes in the same order, same windows, same frames on the wire, same errors.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.hbone.connection import (
    DataReceived,
    DataSinkFailed,
    ErrorCode,
    InvalidActionError,
    ProtocolError,
    StreamEnded,
    StreamReset,
    TunnelConnection,
)
from nodeagent.hbone.frames import (
    DataFrame,
    GoAwayFrame,
    PingFrame,
    RstStreamFrame,
    WindowUpdateFrame,
    serialize,
)
from tests.unit.hbone.test_connection import CONNECT, client, server


class Recorder:
    """A sink that keeps what it was given, and acks it (or not) as told."""

    def __init__(self, consumed: bool = True) -> None:
        self.consumed = consumed
        self.chunks: list[bytes] = []

    def __call__(self, data: memoryview) -> bool:
        self.chunks.append(bytes(data))
        return self.consumed


def test_whole_data_frames_go_to_the_sink_without_events():
    peer = server(initial_window_size=100_000, connection_window_size=400_000)
    peer.send(peer.headers(1, CONNECT))
    sink = Recorder()
    peer.conn.set_data_sink(1, sink)
    events = peer.send(DataFrame(stream_id=1, data=b"a" * 10), DataFrame(stream_id=1, data=b"b"))
    assert events == []
    assert sink.chunks == [b"a" * 10, b"b"]
    # charged and acked at once: the windows are back, below the WINDOW_UPDATE threshold
    assert peer.conn.inbound_window(1) == 100_000 - 11
    assert peer.sent() == []
    peer.send(DataFrame(stream_id=1, data=bytes(25_000)))
    assert peer.sent() == [WindowUpdateFrame(stream_id=1, increment=25_011)]
    assert peer.conn.inbound_window(1) == 100_000


def test_sink_views_alias_the_received_buffer():
    peer = server()
    peer.send(peer.headers(1, CONNECT))
    seen: list[memoryview] = []
    peer.conn.set_data_sink(1, lambda view: seen.append(view) or True)
    wire = bytearray(serialize(DataFrame(stream_id=1, data=b"xyz")))
    peer.conn.receive_data(wire)
    assert seen[0].obj is wire and bytes(seen[0]) == b"xyz"


def test_a_sink_that_does_not_consume_leaves_the_window_to_the_application():
    peer = server(initial_window_size=80_000)
    peer.send(peer.headers(1, CONNECT))
    peer.conn.set_data_sink(1, Recorder(consumed=False))
    peer.send(DataFrame(stream_id=1, data=bytes(30_000)))
    assert peer.conn.inbound_window(1) == 50_000 and peer.sent() == []
    peer.conn.acknowledge_received_data(1, 30_000)
    assert peer.sent() == [WindowUpdateFrame(stream_id=1, increment=30_000)]


def test_end_stream_split_and_padded_frames_still_come_as_events_in_order():
    peer = server()
    peer.send(peer.headers(1, CONNECT))
    sink = Recorder()
    peer.conn.set_data_sink(1, sink)
    padded = serialize(DataFrame(stream_id=1, data=b"p", pad_length=3))
    split = serialize(DataFrame(stream_id=1, data=b"0123456789"))
    events = peer.conn.receive_data(serialize(DataFrame(stream_id=1, data=b"first")) + padded)
    assert sink.chunks == [b"first"]
    assert [(type(e), bytes(e.data)) for e in events] == [(DataReceived, b"p")]
    # a frame cut by the read: its pieces are events, and so is everything after it
    events = peer.conn.receive_data(split[:12])
    events += peer.conn.receive_data(split[12:] + serialize(DataFrame(stream_id=1, data=b"z")))
    assert [bytes(e.data) for e in events] == [b"012", b"3456789", b"z"]
    events = peer.send(DataFrame(stream_id=1, data=b"last", end_stream=True))
    assert [bytes(e.data) for e in events if isinstance(e, DataReceived)] == [b"last"]
    assert events[-1] == StreamEnded(stream_id=1)
    assert sink.chunks == [b"first"]


def test_sink_is_dropped_when_the_receiving_side_ends():
    peer = server()
    peer.send(peer.headers(1, CONNECT), peer.headers(3, CONNECT))
    for sid in (1, 3):
        peer.conn.set_data_sink(sid, Recorder())
    peer.send(DataFrame(stream_id=1, data=b"", end_stream=True))
    events = peer.send(DataFrame(stream_id=1, data=b"late"))
    assert events == [
        StreamReset(stream_id=1, error_code=ErrorCode.STREAM_CLOSED, remote_reset=False)
    ]
    events = peer.send(RstStreamFrame(stream_id=3, error_code=ErrorCode.CANCEL))
    assert events == [StreamReset(stream_id=3, error_code=ErrorCode.CANCEL)]
    with pytest.raises(InvalidActionError):
        peer.conn.set_data_sink(3, Recorder())


def test_overruns_are_refused_exactly_as_without_a_sink():
    outcomes = []
    for with_sink in (False, True):
        peer = server(initial_window_size=70_000, connection_window_size=65_535 * 2)
        peer.send(peer.headers(1, CONNECT))
        if with_sink:
            peer.conn.set_data_sink(1, Recorder(consumed=False))
        events = peer.send(
            DataFrame(stream_id=1, data=bytes(16_384)),
            DataFrame(stream_id=1, data=bytes(70_000 - 16_384)),
            DataFrame(stream_id=1, data=b"x"),
        )
        outcomes.append(([type(e) for e in events][-1:], events[-1:], rsts_of(peer.sent())))
    assert outcomes[0][1:] == outcomes[1][1:]
    assert outcomes[1][1] == [
        StreamReset(stream_id=1, error_code=ErrorCode.FLOW_CONTROL_ERROR, remote_reset=False)
    ]


def rsts_of(frames) -> list[tuple[int, int]]:
    return [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]


def test_a_failing_sink_is_reported_and_its_bytes_returned():
    peer = server(connection_window_size=65_535)
    peer.send(peer.headers(1, CONNECT), peer.headers(3, CONNECT))
    error = RuntimeError("app gone")

    def broken(_view: memoryview) -> bool:
        raise error

    good = Recorder()
    peer.conn.set_data_sink(1, broken)
    peer.conn.set_data_sink(3, good)
    events = peer.send(
        DataFrame(stream_id=1, data=bytes(20_000)), DataFrame(stream_id=3, data=b"fine")
    )
    assert events == [DataSinkFailed(stream_id=1, error=error)]
    assert good.chunks == [b"fine"]  # the rest of the read still went through
    assert peer.conn.inbound_window(0) == 65_535 - 4  # the dropped 20000 came back
    assert peer.sent() == [WindowUpdateFrame(stream_id=0, increment=20_000)]


def test_a_sink_may_reset_its_own_stream():
    peer = server()
    peer.send(peer.headers(1, CONNECT))

    def resetting(_view: memoryview) -> bool:
        peer.conn.reset_stream(1)
        return True

    peer.conn.set_data_sink(1, resetting)
    events = peer.send(DataFrame(stream_id=1, data=b"a"), DataFrame(stream_id=1, data=b"b"))
    assert events == []  # the second frame is for a stream we reset: ignored
    assert rsts_of(peer.sent()) == [(1, ErrorCode.CANCEL)]


def test_protocol_errors_after_direct_frames_still_close_the_connection():
    peer = server()
    peer.send(peer.headers(1, CONNECT))
    sink = Recorder()
    peer.conn.set_data_sink(1, sink)
    with pytest.raises(ProtocolError):
        peer.send(DataFrame(stream_id=1, data=b"ok"), DataFrame(stream_id=7, data=b"idle"))
    assert sink.chunks == [b"ok"]
    assert any(isinstance(f, GoAwayFrame) for f in peer.sent())


def test_only_open_streams_take_a_sink():
    peer = server()
    with pytest.raises(InvalidActionError):
        peer.conn.set_data_sink(1, Recorder())
    peer.send(peer.headers(1, CONNECT, end_stream=True))  # half-closed (remote) at once
    with pytest.raises(InvalidActionError):
        peer.conn.set_data_sink(1, Recorder())
    peer.conn.set_data_sink(1, None)  # removing is always allowed


# Frames a peer may send on two open streams (no END_STREAM, so both stay open), cut into
# reads at arbitrary points: the sink path and the event path must agree on everything.
FRAME = st.one_of(
    st.builds(
        lambda sid, size, pad: DataFrame(stream_id=sid, data=bytes([sid]) * size, pad_length=pad),
        st.sampled_from([1, 3]),
        st.integers(0, 40_000),
        st.one_of(st.none(), st.integers(0, 20)),
    ),
    st.builds(lambda d: PingFrame(data=bytes([d]) * 8), st.integers(0, 255)),
    st.builds(
        lambda sid: WindowUpdateFrame(stream_id=sid, increment=1000), st.sampled_from([0, 1])
    ),
)


def run(frames, cuts, *, with_sinks: bool):
    peer = server(initial_window_size=300_000, connection_window_size=1 << 21)
    peer.send(peer.headers(1, CONNECT), peer.headers(3, CONNECT))
    conn: TunnelConnection = peer.conn
    got: dict[int, bytearray] = {1: bytearray(), 3: bytearray()}
    if with_sinks:
        for sid in (1, 3):
            conn.set_data_sink(sid, lambda view, sid=sid: got[sid].extend(view) is None)
    wire = b"".join(serialize(f) for f in frames)
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    other = []
    for start, end in itertools.pairwise(points):
        for event in conn.receive_data(wire[start:end]):
            if isinstance(event, DataReceived):
                got[event.stream_id].extend(event.data)
                conn.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
            else:
                other.append(event)
    sent = peer.sent()
    updates = {
        sid: sum(
            f.increment for f in sent if isinstance(f, WindowUpdateFrame) and f.stream_id == sid
        )
        for sid in (0, 1, 3)
    }
    pings = [f for f in sent if isinstance(f, PingFrame)]
    windows = [conn.inbound_window(sid) for sid in (0, 1, 3)]
    return got, other, updates, pings, windows


@settings(max_examples=150, deadline=None)
@given(st.lists(FRAME, max_size=12), st.lists(st.integers(0, 1 << 20), max_size=6))
def test_sink_path_agrees_with_the_event_path(frames, cuts):
    via_events = run(frames, cuts, with_sinks=False)
    via_sinks = run(frames, cuts, with_sinks=True)
    # Padding is flow-controlled: the event path acks it, the sink path never sees those
    # frames (padded frames always take the event path), so everything matches exactly.
    assert via_sinks == via_events


# --- data_frame: the send side ----------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 100, 4096])
def test_data_frame_is_the_frame_send_data_would_queue(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    results = []
    for direct in (False, True):
        peer = client()
        sid = peer.conn.open_tunnel("10.0.0.1:9")
        peer.sent()
        if direct:
            frame = peer.conn.data_frame(sid, payload)
            assert frame is not None and peer.conn.data_to_send() == []
        else:
            assert peer.conn.send_data(sid, payload) == size
            frame = peer.conn.data_to_send_bytes()
        results.append(
            (frame, peer.conn.outbound_window(sid), peer.conn.connection_outbound_window)
        )
    assert results[0] == results[1]
    assert results[0][0] == serialize(DataFrame(stream_id=1, data=payload))


def test_data_frame_declines_whatever_the_general_path_must_handle():
    peer = client(initial_window_size=65_535)
    sid = peer.conn.open_tunnel("10.0.0.1:9")
    assert peer.conn.data_frame(sid, b"x") is None  # the HEADERS are still queued: they go first
    peer.sent()
    assert peer.conn.data_frame(sid, b"") is None
    assert peer.conn.data_frame(sid, bytes(4097)) is None  # large: sent by reference instead
    assert peer.conn.data_frame(sid, memoryview(b"x")) is None
    assert peer.conn.data_frame(99, b"x") is None
    peer.conn.send_data(sid, bytes(65_535 - 10) + bytes(4000))  # fills the window, queues the rest
    peer.sent()
    assert peer.conn.data_frame(sid, b"x") is None  # buffered bytes go first
    before = peer.conn.outbound_window(sid)
    other = peer.conn.open_tunnel("10.0.0.1:10")
    peer.sent()
    peer.conn.end_stream(other)
    peer.sent()
    assert peer.conn.data_frame(other, b"x") is None  # half-closed (local)
    assert peer.conn.outbound_window(sid) == before  # nothing was charged
