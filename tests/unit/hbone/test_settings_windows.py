"""The peer's settings and window growth, as tables (the connection applies them)."""

from __future__ import annotations

import pytest

from nodeagent.hbone.frames import MAX_WINDOW, ErrorCode, ProtocolError, SettingCode
from nodeagent.hbone.settings import DEFAULT_REMOTE_SETTINGS, check_remote_setting
from nodeagent.hbone.windows import grow, update_threshold


@pytest.mark.parametrize(
    ("code", "value", "client_side", "error"),
    [
        (SettingCode.ENABLE_PUSH, 0, True, None),
        (SettingCode.ENABLE_PUSH, 1, False, None),  # a client may allow push
        (SettingCode.ENABLE_PUSH, 1, True, ErrorCode.PROTOCOL_ERROR),  # a server may not
        (SettingCode.ENABLE_PUSH, 2, False, ErrorCode.PROTOCOL_ERROR),
        (SettingCode.INITIAL_WINDOW_SIZE, MAX_WINDOW, True, None),
        (SettingCode.INITIAL_WINDOW_SIZE, MAX_WINDOW + 1, True, ErrorCode.FLOW_CONTROL_ERROR),
        (SettingCode.MAX_FRAME_SIZE, 16_384, True, None),
        (SettingCode.MAX_FRAME_SIZE, 16_383, True, ErrorCode.PROTOCOL_ERROR),
        (SettingCode.MAX_FRAME_SIZE, 1 << 24, True, ErrorCode.PROTOCOL_ERROR),
        (0x99, 12345, True, None),  # unknown: ignored by the connection, never an error
    ],
)
def test_remote_settings_are_checked_before_they_apply(
    code: int, value: int, client_side: bool, error: ErrorCode | None
) -> None:
    if error is None:
        check_remote_setting(code, value, client_side=client_side)
        return
    with pytest.raises(ProtocolError) as info:
        check_remote_setting(code, value, client_side=client_side)
    assert info.value.error_code is error and info.value.stream_id == 0


def test_remote_settings_start_at_the_rfc_defaults() -> None:
    assert DEFAULT_REMOTE_SETTINGS[SettingCode.INITIAL_WINDOW_SIZE] == 65_535
    assert DEFAULT_REMOTE_SETTINGS[SettingCode.MAX_FRAME_SIZE] == 16_384


@pytest.mark.parametrize(
    ("window", "increment", "result"),
    [(0, 1, 1), (10, -20, -10), (MAX_WINDOW - 1, 1, MAX_WINDOW), (-5, MAX_WINDOW, MAX_WINDOW - 5)],
)
def test_windows_grow_up_to_2_31_minus_1_and_may_go_negative(
    window: int, increment: int, result: int
) -> None:
    assert grow(window, increment, "w") == result


def test_a_window_past_2_31_minus_1_is_a_flow_control_error_of_its_stream() -> None:
    with pytest.raises(ProtocolError, match="stream 3 window") as info:
        grow(MAX_WINDOW, 1, "stream 3 window over 2^31-1", stream_id=3)
    assert info.value.error_code is ErrorCode.FLOW_CONTROL_ERROR and info.value.stream_id == 3


def test_credit_is_returned_after_a_quarter_of_the_window() -> None:
    assert update_threshold(4 << 20) == 1 << 20
