"""Fuzz target: the HBONE core in the client role (what a remote 15008 can answer us).

The driver opens CONNECT tunnels (some before any byte arrives, more later), sends and
echoes data and acknowledges what the fuzzed server sends (see `fuzz.hbone_driver`).
Only `ProtocolError` from `receive_data` is expected.
"""

from __future__ import annotations

import hpack

from fuzz.hbone_driver import Plan, flags, run
from nodeagent.hbone.frames import (
    DEFAULT_WINDOW,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingCode,
    SettingsFrame,
    WindowUpdateFrame,
    serialize,
)

INSTRUMENT = ("nodeagent", "hpack")
MAX_LEN = 16384


def fuzz_one(data: bytes) -> None:
    run(data, client_side=True)


def _wire(*frames: Frame) -> bytes:
    return b"".join(serialize(f) for f in frames)


def _status(enc: hpack.Encoder, status: int) -> bytes:
    return enc.encode([(":status", str(status)), ("server", "fuzz")])


WHOLE = bytes([0])
BYTEWISE = bytes([1])
MIXED = bytes([7, 0x81, 2, 1, 9, 0x82, 3, 200, 0x13, 5, 4, 1, 0x86, 6, 0, 0x21, 0x44])


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}

    enc = hpack.Encoder()
    accepted = _wire(
        HeadersFrame(stream_id=1, block=_status(enc, 200)),
        DataFrame(stream_id=1, data=b"HTTP/1.1 200 OK\r\n\r\n"),
        DataFrame(stream_id=1, data=b"", end_stream=True),
    )
    out["accepted-data-end"] = Plan(flags(tunnels=1, sinks=False), WHOLE, accepted).encode()
    out["accepted-data-end-bytewise"] = Plan(
        flags(tunnels=1, sinks=False), BYTEWISE, accepted
    ).encode()
    out["accepted-data-end-sinks"] = Plan(flags(tunnels=1, sinks=True), MIXED, accepted).encode()

    # Three tunnels: interim then final, a refusal, trailers; the server resets one, then
    # says GOAWAY for streams above 3.
    enc = hpack.Encoder()
    mixed = _wire(
        SettingsFrame(
            settings=(
                (SettingCode.MAX_CONCURRENT_STREAMS, 3),
                (SettingCode.INITIAL_WINDOW_SIZE, 1 << 16),
                (SettingCode.MAX_FRAME_SIZE, 1 << 15),
            )
        ),
        HeadersFrame(stream_id=1, block=_status(enc, 100)),
        HeadersFrame(stream_id=1, block=_status(enc, 200)),
        HeadersFrame(stream_id=3, block=_status(enc, 503), end_stream=True),
        HeadersFrame(stream_id=5, block=_status(enc, 200)),
        DataFrame(stream_id=5, data=b"five", pad_length=4),
        HeadersFrame(stream_id=5, block=enc.encode([("grpc-status", "0")]), end_stream=True),
        RstStreamFrame(stream_id=1, error_code=8),
        PingFrame(data=b"pingpong"),
        GoAwayFrame(last_stream_id=3, error_code=0),
    )
    out["three-tunnels"] = Plan(flags(tunnels=3, sinks=False), MIXED, mixed).encode()
    out["three-tunnels-small-config"] = Plan(
        flags(config=1, tunnels=3, sinks=True), MIXED, mixed
    ).encode()

    # Windows opened wide, so the client's large writes flow; then flow-control edges.
    enc = hpack.Encoder()
    windows = _wire(
        HeadersFrame(stream_id=1, block=_status(enc, 200)),
        WindowUpdateFrame(stream_id=0, increment=1 << 20),
        WindowUpdateFrame(stream_id=1, increment=1 << 20),
        SettingsFrame(settings=((SettingCode.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW * 2),)),
        DataFrame(stream_id=1, data=bytes(range(256)) * 8),
        WindowUpdateFrame(stream_id=1, increment=(1 << 31) - 1),
    )
    sends = bytes([0, 0x02, 1, 250, 0x82, 1, 249, 0x03, 1])
    out["windows"] = Plan(flags(tunnels=1, sinks=False), sends, windows).encode()
    out["windows-tiny-config"] = Plan(
        flags(config=2, tunnels=2, sinks=True), MIXED, windows
    ).encode()

    # Server push is refused: a connection error.
    enc = hpack.Encoder()
    push = _wire(
        HeadersFrame(stream_id=1, block=_status(enc, 200)),
        PushPromiseFrame(stream_id=1, promised_stream_id=2, block=_status(enc, 200)),
    )
    out["push-promise"] = Plan(flags(tunnels=1, sinks=False), WHOLE, push).encode()
    return out
