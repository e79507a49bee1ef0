"""Flow-control windows of the sans-IO HTTP/2 core (RFC 9113 §5.2, §6.9).

Every window is a plain int on the connection or its `StreamRecord`: the DATA path
charges and refunds them inline, since a call per DATA frame would cost more than the
bookkeeping. What is decided here is how windows grow and when credit goes back:

* a WINDOW_UPDATE or a SETTINGS_INITIAL_WINDOW_SIZE change may not push a window past
  2^31-1 (a FLOW_CONTROL_ERROR), though a SETTINGS change may make one negative;
* consumed bytes are returned in one WINDOW_UPDATE once they reach a fraction of the
  window (`update_threshold`), not per DATA frame.
"""

from __future__ import annotations

from nodeagent.hbone.frames import MAX_WINDOW, ErrorCode, ProtocolError

# A WINDOW_UPDATE goes out once the application has consumed this fraction of a window:
# often enough that a 1 MiB-frame sender never stalls, rarely enough to cost nothing.
UPDATE_DIVISOR = 4


def update_threshold(window_size: int) -> int:
    """Consumed bytes worth a WINDOW_UPDATE for a window of `window_size`."""
    return window_size // UPDATE_DIVISOR


def grow(window: int, increment: int, what: str, *, stream_id: int = 0) -> int:
    """`window` plus `increment` (which may be negative); ProtocolError(FLOW_CONTROL_ERROR)
    saying `what` if that passes 2^31-1. A non-zero `stream_id` makes it a stream error."""
    window += increment
    if window > MAX_WINDOW:
        raise ProtocolError(what, error_code=ErrorCode.FLOW_CONTROL_ERROR, stream_id=stream_id)
    return window
