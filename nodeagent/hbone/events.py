"""Events of the sans-IO HTTP/2 core: what `TunnelConnection.receive_data` returns.

Keyword-only frozen dataclasses (h2's shape), one per thing the peer did. `Event` is
their union; the asyncio adapter dispatches on the exact type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

Headers: TypeAlias = tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestReceived:
    """A peer opened a stream. For CONNECT, `authority` is the tunnel target `host:port`."""

    stream_id: int
    method: str
    authority: str
    headers: Headers  # regular (non-pseudo) headers in arrival order


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseReceived:
    stream_id: int
    status: int
    headers: Headers


@dataclass(frozen=True, kw_only=True, slots=True)
class TrailersReceived:
    stream_id: int
    headers: Headers


@dataclass(frozen=True, kw_only=True, slots=True)
class DataReceived:
    """Tunnel bytes. `data` may be a view of the received buffer; acknowledge
    `flow_controlled_length` (payload plus padding) once consumed."""

    stream_id: int
    data: memoryview
    flow_controlled_length: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSinkFailed:
    """A stream's data sink (see `TunnelConnection.set_data_sink`) raised: its bytes were dropped
    and their window returned; the application should reset the stream."""

    stream_id: int
    error: Exception


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): a FIN in the peer-to-us direction."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int
    remote_reset: bool = True  # False: we reset it because the peer broke the protocol


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowUpdated:
    stream_id: int  # 0 = the connection window
    delta: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SettingsAcked:
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoteSettingsChanged:
    changed: Mapping[int, int]


@dataclass(frozen=True, kw_only=True, slots=True)
class PingReceived:
    data: bytes  # already answered with PING ACK


@dataclass(frozen=True, kw_only=True, slots=True)
class PingAckReceived:
    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY: streams above `last_stream_id` were not processed."""

    error_code: int
    last_stream_id: int
    additional_data: bytes


Event: TypeAlias = (
    RequestReceived
    | ResponseReceived
    | TrailersReceived
    | DataReceived
    | DataSinkFailed
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | SettingsAcked
    | RemoteSettingsChanged
    | PingReceived
    | PingAckReceived
    | ConnectionTerminated
)
