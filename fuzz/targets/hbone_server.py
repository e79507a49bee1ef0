"""Fuzz target: the HBONE core in the server role (what a peer's bytes do to port 15008).

The fuzzed peer is a client: the driver answers its CONNECTs, echoes and acknowledges its
DATA (see `fuzz.hbone_driver`). Only `ProtocolError` from `receive_data` is expected.
"""

from __future__ import annotations

import hpack

from fuzz.hbone_driver import Plan, flags, run
from nodeagent.hbone.frames import (
    DEFAULT_WINDOW,
    PREFACE,
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    Priority,
    PriorityFrame,
    RstStreamFrame,
    SettingCode,
    SettingsFrame,
    UnknownFrame,
    WindowUpdateFrame,
    serialize,
)

INSTRUMENT = ("nodeagent", "hpack")
MAX_LEN = 16384


def fuzz_one(data: bytes) -> None:
    run(data, client_side=False)


def _connect(enc: hpack.Encoder, authority: str = "10.0.0.1:8080") -> bytes:
    return enc.encode(
        [(":method", "CONNECT"), (":authority", authority), ("baggage", "k8s.cluster.name=c")]
    )


def _wire(*frames: Frame) -> bytes:
    return b"".join(serialize(f) for f in frames)


# Schedules: everything in one read; byte by byte; mixed sizes with every action.
WHOLE = bytes([0])
BYTEWISE = bytes([1])
MIXED = bytes([7, 0x81, 2, 1, 9, 0x82, 3, 200, 0x13, 5, 4, 1, 0x86, 6, 0, 0x21, 0x44])


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}

    enc = hpack.Encoder()
    tunnel = _wire(
        HeadersFrame(stream_id=1, block=_connect(enc)),
        DataFrame(stream_id=1, data=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        DataFrame(stream_id=1, data=b"", end_stream=True),
    )
    out["connect-data-end"] = Plan(flags(sinks=False), WHOLE, tunnel).encode()
    out["connect-data-end-bytewise"] = Plan(flags(sinks=False), BYTEWISE, tunnel).encode()
    out["connect-data-end-sinks"] = Plan(flags(sinks=True), MIXED, tunnel).encode()

    # The whole greeting on the wire, with settings the core must apply.
    enc = hpack.Encoder()
    greeting = PREFACE + _wire(
        SettingsFrame(
            settings=(
                (SettingCode.HEADER_TABLE_SIZE, 1024),
                (SettingCode.ENABLE_PUSH, 0),
                (SettingCode.MAX_CONCURRENT_STREAMS, 100),
                (SettingCode.INITIAL_WINDOW_SIZE, 1 << 20),
                (SettingCode.MAX_FRAME_SIZE, 1 << 20),
                (SettingCode.MAX_HEADER_LIST_SIZE, 1 << 16),
                (0x99, 7),
            )
        ),
        SettingsFrame(ack=True),
        WindowUpdateFrame(stream_id=0, increment=(1 << 24) - DEFAULT_WINDOW),
        HeadersFrame(stream_id=1, block=_connect(enc)),
        DataFrame(stream_id=1, data=b"x" * 300),
        PingFrame(data=b"12345678"),
        PingFrame(data=b"87654321", ack=True),
        WindowUpdateFrame(stream_id=1, increment=100_000),
        DataFrame(stream_id=1, data=b"", end_stream=True),
        GoAwayFrame(last_stream_id=0, error_code=0, additional_data=b"bye"),
    )
    out["full-greeting"] = Plan(flags(preamble=False, sinks=False), MIXED, greeting).encode()

    # Many streams, interleaved, with resets, priorities and unknown frames.
    enc = hpack.Encoder()
    many = _wire(
        HeadersFrame(stream_id=1, block=_connect(enc)),
        HeadersFrame(stream_id=3, block=_connect(enc, "[fd00::1]:80")),
        PriorityFrame(stream_id=3, priority=Priority(depends_on=1, weight=200)),
        DataFrame(stream_id=3, data=b"three"),
        DataFrame(stream_id=1, data=b"one"),
        RstStreamFrame(stream_id=3, error_code=8),
        UnknownFrame(type=0xFA, flags=0, stream_id=0, payload=b"ext"),
        HeadersFrame(stream_id=5, block=_connect(enc, "10.96.0.10:80"), end_stream=True),
        DataFrame(stream_id=1, data=b"more", end_stream=True),
        WindowUpdateFrame(stream_id=1, increment=1),
    )
    out["many-streams"] = Plan(flags(sinks=False), MIXED, many).encode()
    out["many-streams-small-config"] = Plan(flags(config=1, sinks=True), MIXED, many).encode()

    # Padding, priority on HEADERS, a header block split in CONTINUATIONs, trailers.
    enc = hpack.Encoder()
    block = _connect(enc)
    trailers = enc.encode([("x-trailer", "done")])
    shapes = _wire(
        HeadersFrame(
            stream_id=1,
            block=block[:5],
            end_headers=False,
            priority=Priority(depends_on=0, weight=16, exclusive=True),
            pad_length=3,
        ),
        ContinuationFrame(stream_id=1, block=block[5:10], end_headers=False),
        ContinuationFrame(stream_id=1, block=block[10:]),
        DataFrame(stream_id=1, data=b"padded", pad_length=10),
        HeadersFrame(stream_id=1, block=trailers, end_stream=True),
    )
    out["padding-continuation-trailers"] = Plan(flags(sinks=False), MIXED, shapes).encode()

    # A large DATA frame arriving in many reads (the streaming path), and a window change.
    enc = hpack.Encoder()
    large = _wire(
        HeadersFrame(stream_id=1, block=_connect(enc)),
        DataFrame(stream_id=1, data=bytes(range(256)) * 12),
        SettingsFrame(settings=((SettingCode.INITIAL_WINDOW_SIZE, 10),)),
        DataFrame(stream_id=1, data=b"tail", end_stream=True),
    )
    out["large-data-in-pieces"] = Plan(flags(sinks=True), bytes([200, 3, 0x90]), large).encode()
    out["large-data-tiny-windows"] = Plan(flags(config=2, sinks=False), MIXED, large).encode()

    # Requests the server must refuse: not CONNECT, a bad authority, a malformed header.
    enc = hpack.Encoder()
    refused = _wire(
        HeadersFrame(
            stream_id=1,
            block=enc.encode(
                [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a")]
            ),
            end_stream=True,
        ),
        HeadersFrame(stream_id=3, block=_connect(enc, "no-port")),
        HeadersFrame(stream_id=5, block=enc.encode([(":method", "CONNECT"), ("Bad", "x")])),
        HeadersFrame(stream_id=7, block=_connect(enc)),
    )
    out["refused-requests"] = Plan(flags(config=3, sinks=False), MIXED, refused).encode()

    # A data sink that raises on whole frames read on their own (the direct path): the
    # first read ends right after HEADERS, so the DATA frames start the next one.
    enc = hpack.Encoder()
    head = _wire(HeadersFrame(stream_id=1, block=_connect(enc)))
    data = _wire(*(DataFrame(stream_id=1, data=bytes([i]) * 6) for i in range(4)))
    sink_fails = bytes([len(head), 0, 0, 15, 15, 15, 15, 15])
    out["sink-fails"] = Plan(flags(sinks=True), sink_fails, head + data).encode()
    return out
