"""Frame encoding/decoding against hand-written bytes laid out as in RFC 9113 §6."""

from __future__ import annotations

import pytest

from nodeagent.hbone.frames import (
    ContinuationFrame,
    DataFrame,
    ErrorCode,
    FrameReader,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    Priority,
    PriorityFrame,
    ProtocolError,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    UnknownFrame,
    WindowUpdateFrame,
    encode_frame,
    serialize,
)

# (frame, wire bytes): header = length(3) type(1) flags(1) R+stream id(4), then the payload.
RECORDED = [
    (DataFrame(stream_id=1, data=b"hello"), bytes.fromhex("000005 00 00 00000001") + b"hello"),
    (
        DataFrame(stream_id=3, data=b"hi", end_stream=True, pad_length=3),
        bytes.fromhex("000006 00 09 00000003 03") + b"hi" + bytes(3),
    ),
    (
        HeadersFrame(stream_id=1, block=b"\x82", end_stream=False, end_headers=True),
        bytes.fromhex("000001 01 04 00000001 82"),
    ),
    (
        HeadersFrame(
            stream_id=5,
            block=b"\x82\x84",
            end_stream=True,
            end_headers=False,
            priority=Priority(depends_on=3, weight=16, exclusive=True),
            pad_length=2,
        ),
        bytes.fromhex("00000a 01 29 00000005 02 80000003 0f 8284 0000"),
    ),
    (
        PriorityFrame(stream_id=7, priority=Priority(depends_on=1, weight=256)),
        bytes.fromhex("000005 02 00 00000007 00000001 ff"),
    ),
    (RstStreamFrame(stream_id=1, error_code=8), bytes.fromhex("000004 03 00 00000001 00000008")),
    (
        SettingsFrame(settings=((2, 0), (4, 4 * 1024 * 1024), (5, 1 << 20))),
        bytes.fromhex("000012 04 00 00000000 0002 00000000 0004 00400000 0005 00100000"),
    ),
    (SettingsFrame(ack=True), bytes.fromhex("000000 04 01 00000000")),
    (
        PushPromiseFrame(stream_id=1, promised_stream_id=2, block=b"\x82"),
        bytes.fromhex("000005 05 04 00000001 00000002 82"),
    ),
    (PingFrame(data=b"abcdefgh"), bytes.fromhex("000008 06 00 00000000") + b"abcdefgh"),
    (PingFrame(data=b"abcdefgh", ack=True), bytes.fromhex("000008 06 01 00000000") + b"abcdefgh"),
    (
        GoAwayFrame(last_stream_id=9, error_code=1, additional_data=b"bye"),
        bytes.fromhex("00000b 07 00 00000000 00000009 00000001") + b"bye",
    ),
    (
        WindowUpdateFrame(stream_id=0, increment=0xFF0001),
        bytes.fromhex("000004 08 00 00000000 00ff0001"),
    ),
    (
        ContinuationFrame(stream_id=1, block=b"\x84", end_headers=True),
        bytes.fromhex("000001 09 04 00000001 84"),
    ),
    (
        UnknownFrame(type=0xFA, flags=0x3, stream_id=2, payload=b"?"),
        bytes.fromhex("000001 fa 03 00000002 3f"),
    ),
]


def frames_of(wire: bytes, max_frame_size: int = 16_384) -> list:
    reader = FrameReader(max_frame_size=max_frame_size)
    reader.feed(wire)
    return list(reader)


def normalized(frame):
    """Frames compare by value; turn memoryview fields into bytes for a readable diff."""
    fields = {k: getattr(frame, k) for k in frame.__slots__}
    return type(frame)(
        **{k: bytes(v) if isinstance(v, memoryview) else v for k, v in fields.items()}
    )


@pytest.mark.parametrize(("frame", "wire"), RECORDED, ids=[type(f).__name__ for f, _ in RECORDED])
def test_every_frame_type_encodes_to_recorded_bytes_and_back(frame, wire):
    assert serialize(frame) == wire
    (decoded,) = frames_of(wire)
    assert normalized(decoded) == frame


def test_data_payload_is_not_copied_on_encode_or_decode():
    payload = bytearray(b"x" * 100_000)
    parts = encode_frame(DataFrame(stream_id=1, data=memoryview(payload)))
    assert len(parts) == 2 and parts[1].obj is payload  # the caller's buffer, by reference
    wire = bytes(parts[0]) + bytes(payload)
    reader = FrameReader(max_frame_size=1 << 20)
    reader.feed(wire)
    (frame,) = list(reader)
    assert isinstance(frame.data, memoryview) and frame.data.obj is wire


def test_frames_split_across_reads_are_reassembled():
    wire = b"".join(w for _, w in RECORDED)
    reader = FrameReader()
    out = []
    for i in range(len(wire)):
        reader.feed(wire[i : i + 1])
        out.extend(normalized(f) for f in reader)
    assert out == [f for f, _ in RECORDED]
    assert reader.buffered == 0


def test_frame_over_max_frame_size_is_frame_size_error():
    reader = FrameReader(max_frame_size=16_384)
    reader.feed(bytes.fromhex("004001 00 00 00000001"))  # 16385 bytes announced
    with pytest.raises(ProtocolError) as err:
        reader.next_raw()
    assert err.value.error_code == ErrorCode.FRAME_SIZE_ERROR and err.value.stream_id == 0
    reader = FrameReader(max_frame_size=16_384)
    reader.feed(bytes.fromhex("004000 00 00 00000001") + bytes(16_384))  # exactly the limit
    assert len(next(reader).data) == 16_384


@pytest.mark.parametrize(
    ("wire", "code", "stream_error"),
    [
        (bytes.fromhex("000001 00 00 00000000 00"), ErrorCode.PROTOCOL_ERROR, False),  # DATA on 0
        (
            bytes.fromhex("000002 00 08 00000001 02 00"),
            ErrorCode.PROTOCOL_ERROR,
            False,
        ),  # pad too long
        (bytes.fromhex("000000 00 08 00000001"), ErrorCode.FRAME_SIZE_ERROR, False),  # no pad byte
        (
            bytes.fromhex("000001 01 04 00000000 82"),
            ErrorCode.PROTOCOL_ERROR,
            False,
        ),  # HEADERS on 0
        (
            bytes.fromhex("000004 02 00 00000001 00000000"),
            ErrorCode.FRAME_SIZE_ERROR,
            True,
        ),  # PRIORITY
        (
            bytes.fromhex("000003 03 00 00000001 000000"),
            ErrorCode.FRAME_SIZE_ERROR,
            False,
        ),  # RST size
        (
            bytes.fromhex("000004 03 00 00000000 00000000"),
            ErrorCode.PROTOCOL_ERROR,
            False,
        ),  # RST on 0
        (bytes.fromhex("000005 04 00 00000000 0000000000"), ErrorCode.FRAME_SIZE_ERROR, False),
        (bytes.fromhex("000006 04 01 00000000 000000000000"), ErrorCode.FRAME_SIZE_ERROR, False),
        (bytes.fromhex("000000 04 00 00000001"), ErrorCode.PROTOCOL_ERROR, False),  # SETTINGS on 1
        (bytes.fromhex("000007 06 00 00000000 00000000000000"), ErrorCode.FRAME_SIZE_ERROR, False),
        (bytes.fromhex("000008 06 00 00000001 0000000000000000"), ErrorCode.PROTOCOL_ERROR, False),
        (bytes.fromhex("000007 07 00 00000000 00000000000000"), ErrorCode.FRAME_SIZE_ERROR, False),
        (bytes.fromhex("000008 07 00 00000003 0000000000000000"), ErrorCode.PROTOCOL_ERROR, False),
        (bytes.fromhex("000003 08 00 00000000 000001"), ErrorCode.FRAME_SIZE_ERROR, False),
        (
            bytes.fromhex("000004 08 00 00000000 00000000"),
            ErrorCode.PROTOCOL_ERROR,
            False,
        ),  # +0 on 0
        (
            bytes.fromhex("000004 08 00 00000001 00000000"),
            ErrorCode.PROTOCOL_ERROR,
            True,
        ),  # +0 on 1
        (bytes.fromhex("000001 09 04 00000000 82"), ErrorCode.PROTOCOL_ERROR, False),  # CONT on 0
        (bytes.fromhex("000003 05 04 00000001 000000"), ErrorCode.FRAME_SIZE_ERROR, False),
    ],
)
def test_malformed_frames_raise_protocol_error_with_rfc_code(wire, code, stream_error):
    with pytest.raises(ProtocolError) as err:
        frames_of(wire)
    assert err.value.error_code == code
    assert bool(err.value.stream_id) is stream_error


def test_encoding_rejects_bad_arguments():
    with pytest.raises(ValueError, match="PING data"):
        serialize(PingFrame(data=b"short"))
    with pytest.raises(ValueError, match="pad length"):
        serialize(DataFrame(stream_id=1, data=b"", pad_length=256))
    with pytest.raises(ValueError, match="weight"):
        serialize(PriorityFrame(stream_id=1, priority=Priority(depends_on=0, weight=0)))
