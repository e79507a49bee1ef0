"""Our HTTP/2 core against python-hyper `h2` as the peer, in both roles, shuttled in memory."""

from __future__ import annotations

import hashlib
import os

import h2.config
import h2.connection
import h2.events
import h2.settings

from nodeagent.hbone.connection import (
    ConnectionConfig,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    PingAckReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TunnelConnection,
)

MIB = 1 << 20


class Pair:
    """Our connection and an h2 connection joined back to back; both sides ack what they read."""

    def __init__(self, *, ours_is_client: bool) -> None:
        self.ours = TunnelConnection(ConnectionConfig(client_side=ours_is_client))
        cfg = h2.config.H2Configuration(client_side=not ours_is_client, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(cfg)
        self.ours_events: list = []
        self.h2_events: list = []
        self.received_ours: dict[int, bytearray] = {}
        self.received_h2: dict[int, bytearray] = {}
        self.h2_pending: dict[int, tuple[memoryview, bool]] = {}
        self.ours.initiate_connection()
        self.h2.initiate_connection()
        self.pump()

    def h2_send(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        self.h2_pending[stream_id] = (memoryview(data), end_stream)
        self.pump()

    def _flush_h2(self) -> None:
        for sid, (view, end) in list(self.h2_pending.items()):
            while True:
                window = min(
                    self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size
                )
                if not view and end:
                    self.h2.end_stream(sid)
                    del self.h2_pending[sid]
                    break
                if not view:
                    del self.h2_pending[sid]
                    break
                if window <= 0:
                    self.h2_pending[sid] = (view, end)
                    break
                self.h2.send_data(sid, bytes(view[:window]), end_stream=end and len(view) <= window)
                if len(view) <= window:
                    del self.h2_pending[sid]
                    break
                view = view[window:]

    def pump(self) -> None:
        for _ in range(100_000):
            self._flush_h2()
            a = self.ours.data_to_send_bytes()
            b = self.h2.data_to_send()
            if not a and not b:
                return
            if a:
                for ev in self.h2.receive_data(a):
                    self.h2_events.append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        self.received_h2.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if b:
                for ev in self.ours.receive_data(b):
                    self.ours_events.append(ev)
                    if isinstance(ev, DataReceived):
                        self.received_ours.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                        self.ours.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
        raise AssertionError("connections never went quiet")

    def of(self, kind: type, *, h2_side: bool = False) -> list:
        return [e for e in (self.h2_events if h2_side else self.ours_events) if isinstance(e, kind)]


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def open_tunnel_to_h2(pair: Pair) -> int:
    sid = pair.ours.open_tunnel(
        "10.0.0.7:8080",
        [("forwarded", 'for="10.0.0.1:5555"'), ("baggage", "k8s.namespace.name=ns")],
    )
    pair.pump()
    (req,) = pair.of(h2.events.RequestReceived, h2_side=True)
    assert dict(req.headers)[":method"] == "CONNECT"
    assert dict(req.headers)[":authority"] == "10.0.0.7:8080"
    assert ":path" not in dict(req.headers) and ":scheme" not in dict(req.headers)
    assert dict(req.headers)["forwarded"] == 'for="10.0.0.1:5555"'
    pair.h2.send_headers(sid, [(":status", "200"), ("baggage", "service.name=b")])
    pair.pump()
    (resp,) = pair.of(ResponseReceived)
    assert resp.status == 200 and resp.headers == (("baggage", "service.name=b"),)
    return sid


def h2_open_tunnel(pair: Pair, authority: str = "[fd00::7]:8080") -> int:
    sid = pair.h2.get_next_available_stream_id()
    pair.h2.send_headers(
        sid, [(":method", "CONNECT"), (":authority", authority), ("traceparent", "00-ab-cd-00")]
    )
    pair.pump()
    req = pair.of(RequestReceived)[-1]
    assert (req.stream_id, req.method, req.authority) == (sid, "CONNECT", authority)
    assert req.headers == (("traceparent", "00-ab-cd-00"),)
    return sid


def test_our_client_tunnels_large_payloads_both_ways_through_h2_server():
    pair = Pair(ours_is_client=True)
    sid = open_tunnel_to_h2(pair)
    up = os.urandom(9 * MIB + 123)  # beyond h2's 64 KiB windows and our 4 MiB stream window
    sent = pair.ours.send_data(sid, up)
    assert sent < len(up)  # flow control held the rest back
    pair.pump()
    assert digest(pair.received_h2[sid]) == digest(up)
    down = os.urandom(11 * MIB + 7)  # beyond our 4 MiB stream window: needs our WINDOW_UPDATEs
    pair.h2_send(sid, down)
    assert digest(pair.received_ours[sid]) == digest(down)
    assert pair.ours.buffered_bytes(sid) == 0


def test_our_client_half_close_then_h2_server_still_sends():
    pair = Pair(ours_is_client=True)
    sid = open_tunnel_to_h2(pair)
    pair.ours.send_data(sid, b"request", end_stream=True)
    pair.pump()
    assert [e.stream_id for e in pair.of(h2.events.StreamEnded, h2_side=True)] == [sid]
    pair.h2_send(sid, b"reply after FIN", end_stream=True)
    assert bytes(pair.received_ours[sid]) == b"reply after FIN"
    assert pair.of(StreamEnded) == [StreamEnded(stream_id=sid)]
    assert pair.ours.stream_state(sid).name == "CLOSED"


def test_h2_server_half_closes_first_and_our_client_keeps_sending():
    pair = Pair(ours_is_client=True)
    sid = open_tunnel_to_h2(pair)
    pair.h2_send(sid, b"", end_stream=True)
    assert pair.of(StreamEnded) == [StreamEnded(stream_id=sid)]
    pair.ours.send_data(sid, b"late bytes", end_stream=True)
    pair.pump()
    assert bytes(pair.received_h2[sid]) == b"late bytes"
    assert pair.of(h2.events.StreamEnded, h2_side=True)


def test_h2_server_refusal_400_ends_stream():
    pair = Pair(ours_is_client=True)
    sid = pair.ours.open_tunnel("10.0.0.7:8080")
    pair.pump()
    pair.h2.send_headers(sid, [(":status", "401")], end_stream=True)
    pair.pump()
    assert [(e.stream_id, e.status) for e in pair.of(ResponseReceived)] == [(sid, 401)]
    assert pair.of(StreamEnded) == [StreamEnded(stream_id=sid)]


def test_reset_each_way_with_h2_server():
    pair = Pair(ours_is_client=True)
    a = open_tunnel_to_h2(pair)
    pair.ours.reset_stream(a, ErrorCode.CANCEL)
    pair.pump()
    (reset,) = pair.of(h2.events.StreamReset, h2_side=True)
    assert (reset.stream_id, reset.error_code) == (a, ErrorCode.CANCEL)
    b = pair.ours.open_tunnel("10.0.0.8:80")
    pair.pump()
    pair.h2.reset_stream(b, error_code=ErrorCode.CONNECT_ERROR)
    pair.pump()
    assert pair.of(StreamReset) == [StreamReset(stream_id=b, error_code=ErrorCode.CONNECT_ERROR)]


def test_ping_and_goaway_with_h2_server():
    pair = Pair(ours_is_client=True)
    pair.ours.ping(b"12345678")
    pair.pump()
    assert pair.of(PingAckReceived) == [PingAckReceived(data=b"12345678")]
    pair.h2.ping(b"abcdefgh")
    pair.pump()
    assert [e.ping_data for e in pair.of(h2.events.PingAckReceived, h2_side=True)] == [b"abcdefgh"]
    sid = open_tunnel_to_h2(pair)
    pair.h2.close_connection(last_stream_id=sid)
    pair.pump()
    (term,) = pair.of(ConnectionTerminated)
    assert (term.error_code, term.last_stream_id) == (0, sid)
    assert not pair.ours.can_open_stream


def test_many_streams_with_h2_server():
    pair = Pair(ours_is_client=True)
    payloads = {}
    for i in range(60):
        sid = pair.ours.open_tunnel(f"10.0.1.{i}:9000")
        payloads[sid] = os.urandom(100_000 + i)
        pair.ours.send_data(sid, payloads[sid], end_stream=True)
    pair.pump()
    assert {sid: bytes(pair.received_h2[sid]) for sid in payloads} == payloads


def test_h2_client_tunnels_through_our_server_both_ways():
    pair = Pair(ours_is_client=False)
    sid = h2_open_tunnel(pair)
    pair.ours.send_response(sid, 200, [("baggage", "service.name=dest")])
    pair.pump()
    (resp,) = pair.of(h2.events.ResponseReceived, h2_side=True)
    assert dict(resp.headers)[":status"] == "200"
    up = os.urandom(10 * MIB + 1)
    pair.h2_send(sid, up, end_stream=True)
    assert digest(pair.received_ours[sid]) == digest(up)
    assert pair.of(StreamEnded) == [StreamEnded(stream_id=sid)]
    down = os.urandom(6 * MIB + 5)
    pair.ours.send_data(sid, down, end_stream=True)
    pair.pump()
    assert digest(pair.received_h2[sid]) == digest(down)
    assert pair.of(h2.events.StreamEnded, h2_side=True)


def test_our_server_answers_non_connect_with_400_and_malformed_connect_with_reset():
    pair = Pair(ours_is_client=False)
    a = pair.h2.get_next_available_stream_id()
    pair.h2.send_headers(
        a, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")]
    )
    pair.pump()
    (req,) = pair.of(RequestReceived)
    assert req.method == "GET"
    pair.ours.send_response(a, 400)
    pair.pump()
    assert pair.of(h2.events.StreamEnded, h2_side=True)
    b = pair.h2.get_next_available_stream_id()
    # CONNECT without :authority is malformed (§8.5): stream error, no request event.
    pair.h2.config.validate_outbound_headers = False
    pair.h2.send_headers(b, [(":method", "CONNECT")], end_stream=False)
    pair.pump()
    assert len(pair.of(RequestReceived)) == 1
    (reset,) = pair.of(h2.events.StreamReset, h2_side=True)
    assert (reset.stream_id, reset.error_code) == (b, ErrorCode.PROTOCOL_ERROR)


def test_our_server_reset_ping_goaway_and_many_streams_with_h2_client():
    pair = Pair(ours_is_client=False)
    streams = [h2_open_tunnel(pair, f"10.0.2.{i}:80") for i in range(40)]
    for sid in streams:
        pair.ours.send_response(sid, 200)
        pair.ours.send_data(sid, sid.to_bytes(4, "big") * 1000, end_stream=True)
    pair.pump()
    assert all(bytes(pair.received_h2[s]) == s.to_bytes(4, "big") * 1000 for s in streams)
    pair.h2.reset_stream(streams[0], error_code=ErrorCode.CANCEL)
    pair.h2.ping(b"pingpong")
    pair.pump()
    # streams[0] is half-closed (local): the client's reset closes it.
    assert pair.of(StreamReset) == [StreamReset(stream_id=streams[0], error_code=ErrorCode.CANCEL)]
    assert pair.ours.stream_state(streams[0]).name == "CLOSED"
    assert [e.ping_data for e in pair.of(h2.events.PingAckReceived, h2_side=True)] == [b"pingpong"]
    pair.ours.close()
    pair.pump()
    (term,) = pair.of(h2.events.ConnectionTerminated, h2_side=True)
    assert (term.error_code, term.last_stream_id) == (0, streams[-1])
