"""HTTP/2 frames (RFC 9113 §4 and §6): typed frame values, encoding and incremental decoding.

Pure: no I/O. Only what an HBONE CONNECT tunnel meets on the wire is modelled; any other
frame type decodes to `UnknownFrame` (which the connection ignores, as §5.5 requires).

Zero-copy on both paths: `encode_frame` returns the 9-byte header and the caller's payload
buffer as separate items (for `transport.writelines`/`sendmsg`), and `FrameReader` hands out
payloads as memoryview slices of the received chunk whenever a frame lies inside one chunk.
A frame split across reads is joined once, when it is complete.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_SIZE = 9
DEFAULT_MAX_FRAME_SIZE = 16_384  # the size every peer must accept before SETTINGS (§4.2)
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65_535
# Pseudo frame type from FrameReader(stream_data=True): more payload of the DATA frame in progress.
DATA_FRAGMENT = -1

_HEADER = struct.Struct(">HBBBL")  # 24-bit length split as 16 + 8 bits, type, flags, stream id
# (length >> 8, length & 0xFF, type, flags, stream id with its reserved bit) of the frame header
# at an offset, and its inverse: C calls, for hot paths that cannot afford a Python one.
unpack_header = _HEADER.unpack_from
pack_header = _HEADER.pack
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")
_PRIORITY = struct.Struct(">LB")
_STREAM_MASK = 0x7FFF_FFFF

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20


class FrameType(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class SettingCode(IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


class ProtocolError(Exception):
    """A violation of RFC 9113 by the peer (or a misuse by the local application).

    `error_code` is the HTTP/2 code to send. `stream_id` 0 means a connection error
    (answered with GOAWAY); a non-zero id means a stream error (answered with RST_STREAM).
    """

    def __init__(
        self, message: str, *, error_code: ErrorCode = ErrorCode.PROTOCOL_ERROR, stream_id: int = 0
    ) -> None:
        super().__init__(f"{message} ({error_code.name})")
        self.error_code = error_code
        self.stream_id = stream_id
        # Events parsed from the same input before the error (set by the connection).
        self.events: Sequence[object] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class DataFrame:
    stream_id: int
    data: Buffer
    end_stream: bool = False
    pad_length: int | None = None  # None: no PADDED flag

    @property
    def flow_controlled_length(self) -> int:
        """Bytes this frame takes from the flow-control windows: payload plus padding (§6.9.1)."""
        pad = 0 if self.pad_length is None else self.pad_length + 1
        return len(self.data) + pad


@dataclass(frozen=True, kw_only=True, slots=True)
class Priority:
    depends_on: int
    weight: int  # 1..256 (the wire carries weight - 1)
    exclusive: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class HeadersFrame:
    stream_id: int
    block: Buffer  # an HPACK header block fragment
    end_stream: bool = False
    end_headers: bool = True
    priority: Priority | None = None
    pad_length: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PriorityFrame:
    stream_id: int
    priority: Priority


@dataclass(frozen=True, kw_only=True, slots=True)
class RstStreamFrame:
    stream_id: int
    error_code: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SettingsFrame:
    settings: tuple[tuple[int, int], ...] = ()
    ack: bool = False
    stream_id: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class PushPromiseFrame:
    stream_id: int
    promised_stream_id: int
    block: Buffer
    end_headers: bool = True
    pad_length: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PingFrame:
    data: bytes
    ack: bool = False
    stream_id: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class GoAwayFrame:
    last_stream_id: int
    error_code: int
    additional_data: bytes = b""
    stream_id: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowUpdateFrame:
    stream_id: int
    increment: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ContinuationFrame:
    stream_id: int
    block: Buffer
    end_headers: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class UnknownFrame:
    type: int
    flags: int
    stream_id: int
    payload: Buffer


Frame: TypeAlias = (
    DataFrame
    | HeadersFrame
    | PriorityFrame
    | RstStreamFrame
    | SettingsFrame
    | PushPromiseFrame
    | PingFrame
    | GoAwayFrame
    | WindowUpdateFrame
    | ContinuationFrame
    | UnknownFrame
)


# --- encoding ---------------------------------------------------------------------------------


def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte frame header (§4.1)."""
    if not 0 <= length <= MAX_FRAME_SIZE_LIMIT:
        raise ValueError(f"frame length {length} is outside 0..{MAX_FRAME_SIZE_LIMIT}")
    return _HEADER.pack(length >> 8, length & 0xFF, frame_type, flags, stream_id & _STREAM_MASK)


def _padded(
    frame_type: int, flags: int, stream_id: int, prefix: bytes, body: Buffer, pad: int | None
) -> list[Buffer]:
    if pad is None:
        head = frame_header(len(prefix) + len(body), frame_type, flags, stream_id)
        return [head + prefix, body] if len(body) else [head + prefix]
    if not 0 <= pad <= 255:
        raise ValueError(f"pad length {pad} is outside 0..255")
    length = 1 + len(prefix) + len(body) + pad
    head = frame_header(length, frame_type, flags | FLAG_PADDED, stream_id)
    return [head + bytes([pad]) + prefix, body, bytes(pad)]


def _priority_bytes(p: Priority) -> bytes:
    if not 1 <= p.weight <= 256:
        raise ValueError(f"priority weight {p.weight} is outside 1..256")
    dep = (p.depends_on & _STREAM_MASK) | (0x8000_0000 if p.exclusive else 0)
    return _PRIORITY.pack(dep, p.weight - 1)


def encode_frame(frame: Frame) -> list[Buffer]:
    """Serialise one frame as buffers to write in order; payload buffers are not copied."""
    if isinstance(frame, DataFrame):
        flags = FLAG_END_STREAM if frame.end_stream else 0
        return _padded(FrameType.DATA, flags, frame.stream_id, b"", frame.data, frame.pad_length)
    if isinstance(frame, HeadersFrame):
        flags = (FLAG_END_STREAM if frame.end_stream else 0) | (
            FLAG_END_HEADERS if frame.end_headers else 0
        )
        prefix = b""
        if frame.priority is not None:
            flags |= FLAG_PRIORITY
            prefix = _priority_bytes(frame.priority)
        return _padded(
            FrameType.HEADERS, flags, frame.stream_id, prefix, frame.block, frame.pad_length
        )
    if isinstance(frame, PriorityFrame):
        body = _priority_bytes(frame.priority)
        return [frame_header(5, FrameType.PRIORITY, 0, frame.stream_id) + body]
    if isinstance(frame, RstStreamFrame):
        return [
            frame_header(4, FrameType.RST_STREAM, 0, frame.stream_id) + _U32.pack(frame.error_code)
        ]
    if isinstance(frame, SettingsFrame):
        body = b"".join(_SETTING.pack(code, value) for code, value in frame.settings)
        flags = FLAG_ACK if frame.ack else 0
        return [frame_header(len(body), FrameType.SETTINGS, flags, frame.stream_id) + body]
    if isinstance(frame, PushPromiseFrame):
        flags = FLAG_END_HEADERS if frame.end_headers else 0
        prefix = _U32.pack(frame.promised_stream_id & _STREAM_MASK)
        return _padded(
            FrameType.PUSH_PROMISE, flags, frame.stream_id, prefix, frame.block, frame.pad_length
        )
    if isinstance(frame, PingFrame):
        if len(frame.data) != 8:
            raise ValueError(f"PING data must be 8 bytes, got {len(frame.data)}")
        flags = FLAG_ACK if frame.ack else 0
        return [frame_header(8, FrameType.PING, flags, frame.stream_id) + frame.data]
    if isinstance(frame, GoAwayFrame):
        body = _GOAWAY.pack(frame.last_stream_id & _STREAM_MASK, frame.error_code)
        body += frame.additional_data
        return [frame_header(len(body), FrameType.GOAWAY, 0, frame.stream_id) + body]
    if isinstance(frame, WindowUpdateFrame):
        body = _U32.pack(frame.increment & _STREAM_MASK)
        return [frame_header(4, FrameType.WINDOW_UPDATE, 0, frame.stream_id) + body]
    if isinstance(frame, ContinuationFrame):
        flags = FLAG_END_HEADERS if frame.end_headers else 0
        head = frame_header(len(frame.block), FrameType.CONTINUATION, flags, frame.stream_id)
        return [head, frame.block]
    head = frame_header(len(frame.payload), frame.type, frame.flags, frame.stream_id)
    return [head, frame.payload]


def serialize(frame: Frame) -> bytes:
    """One frame as a single bytes object (tests and control frames; copies the payload)."""
    return b"".join(encode_frame(frame))


# --- decoding ---------------------------------------------------------------------------------


def _strip_padding(
    payload: memoryview, flags: int, frame_name: str
) -> tuple[memoryview, int | None]:
    if not flags & FLAG_PADDED:
        return payload, None
    if len(payload) < 1:
        raise ProtocolError(
            f"padded {frame_name} frame has no pad length", error_code=ErrorCode.FRAME_SIZE_ERROR
        )
    pad = payload[0]
    if pad >= len(payload):
        # §6.1: padding that is as long as the remaining payload is a PROTOCOL_ERROR.
        raise ProtocolError(f"{frame_name} padding {pad} exceeds the frame payload")
    return payload[1 : len(payload) - pad], pad


def _priority(raw: memoryview) -> Priority:
    dep, weight = _PRIORITY.unpack_from(raw)
    return Priority(depends_on=dep & _STREAM_MASK, weight=weight + 1, exclusive=bool(dep >> 31))


def decode_frame(frame_type: int, flags: int, stream_id: int, payload: memoryview) -> Frame:
    """Turn one raw frame into its typed value, checking the layout rules of RFC 9113 §6.

    Raises ProtocolError: stream_id 0 on the error means a connection error.
    """
    n = len(payload)
    if frame_type == FrameType.DATA:
        if stream_id == 0:
            raise ProtocolError("DATA frame on stream 0")
        data, pad = _strip_padding(payload, flags, "DATA")
        return DataFrame(
            stream_id=stream_id, data=data, end_stream=bool(flags & FLAG_END_STREAM), pad_length=pad
        )
    if frame_type == FrameType.HEADERS:
        if stream_id == 0:
            raise ProtocolError("HEADERS frame on stream 0")
        block, pad = _strip_padding(payload, flags, "HEADERS")
        priority = None
        if flags & FLAG_PRIORITY:
            if len(block) < 5:
                raise ProtocolError(
                    "HEADERS priority fields truncated", error_code=ErrorCode.FRAME_SIZE_ERROR
                )
            priority = _priority(block)
            block = block[5:]
        return HeadersFrame(
            stream_id=stream_id,
            block=block,
            end_stream=bool(flags & FLAG_END_STREAM),
            end_headers=bool(flags & FLAG_END_HEADERS),
            priority=priority,
            pad_length=pad,
        )
    if frame_type == FrameType.PRIORITY:
        if stream_id == 0:
            raise ProtocolError("PRIORITY frame on stream 0")
        if n != 5:
            raise ProtocolError(
                f"PRIORITY frame of {n} bytes, not 5",
                error_code=ErrorCode.FRAME_SIZE_ERROR,
                stream_id=stream_id,
            )
        return PriorityFrame(stream_id=stream_id, priority=_priority(payload))
    if frame_type == FrameType.RST_STREAM:
        if stream_id == 0:
            raise ProtocolError("RST_STREAM frame on stream 0")
        if n != 4:
            raise ProtocolError(
                f"RST_STREAM frame of {n} bytes, not 4", error_code=ErrorCode.FRAME_SIZE_ERROR
            )
        return RstStreamFrame(stream_id=stream_id, error_code=_U32.unpack_from(payload)[0])
    if frame_type == FrameType.SETTINGS:
        if stream_id != 0:
            raise ProtocolError(f"SETTINGS frame on stream {stream_id}")
        if flags & FLAG_ACK:
            if n:
                raise ProtocolError(
                    "SETTINGS ACK with a payload", error_code=ErrorCode.FRAME_SIZE_ERROR
                )
            return SettingsFrame(ack=True)
        if n % 6:
            raise ProtocolError(
                f"SETTINGS payload of {n} bytes is not a multiple of 6",
                error_code=ErrorCode.FRAME_SIZE_ERROR,
            )
        settings = tuple(_SETTING.unpack_from(payload, off) for off in range(0, n, 6))
        return SettingsFrame(settings=settings)
    if frame_type == FrameType.PUSH_PROMISE:
        if stream_id == 0:
            raise ProtocolError("PUSH_PROMISE frame on stream 0")
        body, pad = _strip_padding(payload, flags, "PUSH_PROMISE")
        if len(body) < 4:
            raise ProtocolError("PUSH_PROMISE truncated", error_code=ErrorCode.FRAME_SIZE_ERROR)
        return PushPromiseFrame(
            stream_id=stream_id,
            promised_stream_id=_U32.unpack_from(body)[0] & _STREAM_MASK,
            block=body[4:],
            end_headers=bool(flags & FLAG_END_HEADERS),
            pad_length=pad,
        )
    if frame_type == FrameType.PING:
        if stream_id != 0:
            raise ProtocolError(f"PING frame on stream {stream_id}")
        if n != 8:
            raise ProtocolError(
                f"PING frame of {n} bytes, not 8", error_code=ErrorCode.FRAME_SIZE_ERROR
            )
        return PingFrame(data=bytes(payload), ack=bool(flags & FLAG_ACK))
    if frame_type == FrameType.GOAWAY:
        if stream_id != 0:
            raise ProtocolError(f"GOAWAY frame on stream {stream_id}")
        if n < 8:
            raise ProtocolError(
                f"GOAWAY frame of {n} bytes, under 8", error_code=ErrorCode.FRAME_SIZE_ERROR
            )
        last, code = _GOAWAY.unpack_from(payload)
        return GoAwayFrame(
            last_stream_id=last & _STREAM_MASK, error_code=code, additional_data=bytes(payload[8:])
        )
    if frame_type == FrameType.WINDOW_UPDATE:
        if n != 4:
            raise ProtocolError(
                f"WINDOW_UPDATE frame of {n} bytes, not 4", error_code=ErrorCode.FRAME_SIZE_ERROR
            )
        increment = _U32.unpack_from(payload)[0] & _STREAM_MASK
        if increment == 0:
            # §6.9: a zero increment is a stream error on a stream, a connection error on 0.
            raise ProtocolError("WINDOW_UPDATE with increment 0", stream_id=stream_id)
        return WindowUpdateFrame(stream_id=stream_id, increment=increment)
    if frame_type == FrameType.CONTINUATION:
        if stream_id == 0:
            raise ProtocolError("CONTINUATION frame on stream 0")
        return ContinuationFrame(
            stream_id=stream_id, block=payload, end_headers=bool(flags & FLAG_END_HEADERS)
        )
    return UnknownFrame(type=frame_type, flags=flags, stream_id=stream_id, payload=payload)


class FrameReader:
    """Incremental frame parser: `feed()` received bytes, then iterate complete frames.

    `max_frame_size` is the largest payload we accept (our SETTINGS_MAX_FRAME_SIZE); a larger
    frame is a connection FRAME_SIZE_ERROR (§4.2). After an error the reader is unusable.

    With `stream_data`, an unpadded DATA frame that is not yet complete is handed out in pieces
    as its bytes arrive (views of the received chunks, never joined): first as a DATA frame
    without END_STREAM, then as `DATA_FRAGMENT` pseudo-frames, the last one carrying the
    frame's END_STREAM. `last_frame_length` is the whole frame's payload length.
    """

    def __init__(
        self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, stream_data: bool = False
    ) -> None:
        self.max_frame_size = max_frame_size
        self.stream_data = stream_data
        self.last_frame_length = 0
        self._chunks: deque[memoryview] = deque()
        self.buffered = 0  # bytes fed and not yet handed out (read-only for callers)
        # A DATA frame being handed out in pieces: (flags, stream id, bytes left); read-only.
        self.streaming: tuple[int, int, int] | None = None

    def feed(self, data: Buffer) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes:
            # Held by reference, not copied: callers must not mutate a buffer once fed.
            self._chunks.append(view)
            self.buffered += view.nbytes

    def _take(self, size: int) -> memoryview:
        """Remove `size` buffered bytes: a slice of the first chunk if it holds all, else a join."""
        first = self._chunks[0]
        self.buffered -= size
        if len(first) >= size:
            if len(first) == size:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[size:]
            return first[:size]
        parts: list[memoryview] = []
        need = size
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                parts.append(chunk)
                need -= len(chunk)
                self._chunks.popleft()
            else:
                parts.append(chunk[:need])
                self._chunks[0] = chunk[need:]
                need = 0
        return memoryview(b"".join(parts))

    def _peek_header(self) -> tuple[int, int, int, int]:
        first = self._chunks[0]
        if len(first) >= FRAME_HEADER_SIZE:
            raw: Buffer = first
        else:
            raw = bytearray()
            for chunk in self._chunks:
                raw += chunk[: FRAME_HEADER_SIZE - len(raw)]
                if len(raw) == FRAME_HEADER_SIZE:
                    break
        hi, lo, frame_type, flags, stream_id = _HEADER.unpack_from(raw)
        return (hi << 8) | lo, frame_type, flags, stream_id & _STREAM_MASK

    def next_raw(self) -> tuple[int, int, int, memoryview] | None:
        """The next frame as (type, flags, stream id, payload), or None if incomplete."""
        chunks = self._chunks
        if self.streaming is None and chunks:
            # The common case, inlined: the first chunk holds a whole frame of an allowed size.
            first = chunks[0]
            have = len(first)
            if have >= FRAME_HEADER_SIZE:
                hi, lo, frame_type, flags, stream_id = _HEADER.unpack_from(first)
                length = (hi << 8) | lo
                end = FRAME_HEADER_SIZE + length
                if end <= have and length <= self.max_frame_size:
                    if end == have:
                        chunks.popleft()
                    else:
                        chunks[0] = first[end:]
                    self.buffered -= end
                    self.last_frame_length = length
                    return frame_type, flags, stream_id & _STREAM_MASK, first[FRAME_HEADER_SIZE:end]
        if self.streaming is not None:
            if not self.buffered:
                return None
            flags, stream_id, left = self.streaming
            piece = self._take(min(left, len(self._chunks[0])))
            left -= len(piece)
            if left:
                self.streaming = (flags, stream_id, left)
                return DATA_FRAGMENT, flags & ~FLAG_END_STREAM, stream_id, piece
            self.streaming = None
            return DATA_FRAGMENT, flags, stream_id, piece
        if self.buffered < FRAME_HEADER_SIZE:
            return None
        length, frame_type, flags, stream_id = self._peek_header()
        if length > self.max_frame_size:
            raise ProtocolError(
                f"frame of {length} bytes exceeds our max frame size {self.max_frame_size}",
                error_code=ErrorCode.FRAME_SIZE_ERROR,
            )
        if self.buffered < FRAME_HEADER_SIZE + length:
            if not (self.stream_data and frame_type == FrameType.DATA and not flags & FLAG_PADDED):
                return None
            if self.buffered == FRAME_HEADER_SIZE:
                return None  # wait for at least one payload byte
            self._take(FRAME_HEADER_SIZE)
            piece = self._take(min(length, len(self._chunks[0])))
            self.last_frame_length = length
            self.streaming = (flags, stream_id, length - len(piece))
            return frame_type, flags & ~FLAG_END_STREAM, stream_id, piece
        frame = self._take(FRAME_HEADER_SIZE + length)
        self.last_frame_length = length
        return frame_type, flags, stream_id, frame[FRAME_HEADER_SIZE:]

    def __iter__(self) -> FrameReader:
        return self

    def __next__(self) -> Frame:
        raw = self.next_raw()
        if raw is None:
            raise StopIteration
        return decode_frame(*raw)
