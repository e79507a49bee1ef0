"""Settings of the sans-IO HTTP/2 core: ours (`ConnectionConfig`) and the peer's.

Our side's settings are a frozen dataclass validated at construction; the peer's start
at RFC 9113's defaults (`DEFAULT_REMOTE_SETTINGS`) and each value it sends is checked by
`check_remote_setting` before the connection applies it (the window and header-table
consequences of a change are the connection's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nodeagent.hbone.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
    MAX_FRAME_SIZE_LIMIT,
    MAX_WINDOW,
    ErrorCode,
    ProtocolError,
    SettingCode,
)

MIB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class ConnectionConfig:
    """Our side's HTTP/2 settings; defaults are ztunnel's (istio-ambient.md §2)."""

    client_side: bool
    initial_window_size: int = 4 * MIB  # per stream, advertised in SETTINGS
    connection_window_size: int = 16 * MIB  # 4x the stream window so streams can't starve it
    max_frame_size: int = 1 * MIB  # the largest frame we accept
    max_concurrent_streams: int | None = None  # inbound limit; None: 100 client / 200 server
    max_header_list_size: int | None = None  # None: 16 KiB client / 64 KiB server
    header_table_size: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.initial_window_size <= MAX_WINDOW:
            raise ValueError(
                f"initial_window_size {self.initial_window_size} outside 1..{MAX_WINDOW}"
            )
        if not DEFAULT_WINDOW <= self.connection_window_size <= MAX_WINDOW:
            raise ValueError(
                f"connection_window_size {self.connection_window_size}"
                f" outside {DEFAULT_WINDOW}..{MAX_WINDOW}"
            )
        if not DEFAULT_MAX_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError(
                f"max_frame_size {self.max_frame_size}"
                f" outside {DEFAULT_MAX_FRAME_SIZE}..{MAX_FRAME_SIZE_LIMIT}"
            )

    @property
    def inbound_stream_limit(self) -> int:
        if self.max_concurrent_streams is not None:
            return self.max_concurrent_streams
        return 100 if self.client_side else 200

    @property
    def header_list_limit(self) -> int:
        if self.max_header_list_size is not None:
            return self.max_header_list_size
        return 16 * 1024 if self.client_side else 64 * 1024


# The peer's settings until its first SETTINGS frame says otherwise (RFC 9113 §6.5.2).
DEFAULT_REMOTE_SETTINGS: Mapping[int, int] = {
    SettingCode.HEADER_TABLE_SIZE: 4096,
    SettingCode.ENABLE_PUSH: 1,
    SettingCode.MAX_CONCURRENT_STREAMS: MAX_WINDOW,  # "unlimited" until the peer says
    SettingCode.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW,
    SettingCode.MAX_FRAME_SIZE: DEFAULT_MAX_FRAME_SIZE,
    SettingCode.MAX_HEADER_LIST_SIZE: MAX_WINDOW,
}


def check_remote_setting(code: int, value: int, *, client_side: bool) -> None:
    """Raise ProtocolError (a connection error) if the peer may not send `code` = `value`."""
    if code == SettingCode.ENABLE_PUSH and (value > 1 or (value == 1 and client_side)):
        raise ProtocolError(f"SETTINGS_ENABLE_PUSH {value} not allowed")
    if code == SettingCode.INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
        raise ProtocolError(
            f"SETTINGS_INITIAL_WINDOW_SIZE {value} over 2^31-1",
            error_code=ErrorCode.FLOW_CONTROL_ERROR,
        )
    if (
        code == SettingCode.MAX_FRAME_SIZE
        and not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT
    ):
        raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE {value} outside 2^14..2^24-1")
