"""Stream state of the sans-IO HTTP/2 core: RFC 9113 §5.1 as a table, and the per-stream record.

The state machine is a table of (state, input) -> next state, without the push-only
reserved states; a pair that is not in it is a protocol error (or, for a local action, an
`InvalidActionError`), which the connection raises. `StreamRecord` is what the
connection keeps per open stream: state, both windows and the DATA waiting for window.
"""

from __future__ import annotations

import enum
from array import array
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass


class StreamState(enum.Enum):
    IDLE = "idle"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class StreamInput(enum.Enum):
    SEND_HEADERS = "send HEADERS"
    RECV_HEADERS = "recv HEADERS"
    SEND_DATA = "send DATA"
    RECV_DATA = "recv DATA"
    SEND_END_STREAM = "send END_STREAM"
    RECV_END_STREAM = "recv END_STREAM"
    SEND_RST = "send RST_STREAM"
    RECV_RST = "recv RST_STREAM"
    RECV_WINDOW_UPDATE = "recv WINDOW_UPDATE"


_S = StreamState
_I = StreamInput
TRANSITIONS: Mapping[tuple[StreamState, StreamInput], StreamState] = {
    (_S.IDLE, _I.SEND_HEADERS): _S.OPEN,
    (_S.IDLE, _I.RECV_HEADERS): _S.OPEN,
    (_S.OPEN, _I.SEND_HEADERS): _S.OPEN,
    (_S.OPEN, _I.RECV_HEADERS): _S.OPEN,
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_END_STREAM): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_END_STREAM): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.SEND_RST): _S.CLOSED,
    (_S.OPEN, _I.RECV_RST): _S.CLOSED,
    (_S.OPEN, _I.RECV_WINDOW_UPDATE): _S.OPEN,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_HEADERS): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_END_STREAM): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.SEND_RST): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_RST): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_WINDOW_UPDATE): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_HEADERS): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_END_STREAM): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_RST): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_RST): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_WINDOW_UPDATE): _S.HALF_CLOSED_REMOTE,
    # Frames racing a close (§5.1 "closed"): a late WINDOW_UPDATE or RST_STREAM is ignored.
    (_S.CLOSED, _I.RECV_WINDOW_UPDATE): _S.CLOSED,
    (_S.CLOSED, _I.RECV_RST): _S.CLOSED,
}


def next_state(state: StreamState, event: StreamInput) -> StreamState | None:
    """The state after `event`, or None when the pair is not allowed."""
    return TRANSITIONS.get((state, event))


class StreamClosedBy(enum.Enum):
    """How a closed stream ended: tells a late frame's right answer (§5.1 "closed")."""

    RESET_SENT = "reset sent"
    RESET_RECEIVED = "reset received"
    ENDED = "ended"


_CLOSED_BY = tuple(StreamClosedBy)
_CLOSED_CODE = {how: code for code, how in enumerate(_CLOSED_BY)}


class ClosedStreams:
    """How each of the last `capacity` closed streams ended, oldest forgotten first.

    Stored as C integers in two rings, not as a dict of Python ints: a pooled connection
    that has carried thousands of streams would otherwise keep 1024 int objects and dict
    entries (168 KiB against these rings' 9, by tracemalloc), made at any time, each holding
    the allocator pool it sits in long after a burst of connections has closed (issue 21).
    Lookups, only for frames on streams we no longer track, scan the ring in C."""

    __slots__ = ("_how", "_ids", "_next", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, not {capacity}")
        self.capacity = capacity
        self._ids = array("L")  # stream ids are 31 bits; 0 is never a stream's
        self._how = array("B")
        self._next = 0  # the slot the next new id takes once the rings are full

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, stream_id: int, how: StreamClosedBy) -> None:
        """A stream that has just closed (a stream closes once; `update` changes how)."""
        code = _CLOSED_CODE[how]
        ids = self._ids
        if len(ids) < self.capacity:
            ids.append(stream_id)
            self._how.append(code)
        else:
            slot = self._next
            ids[slot] = stream_id
            self._how[slot] = code
            self._next = (slot + 1) % self.capacity

    def update(self, stream_id: int, how: StreamClosedBy) -> None:
        """Set how a stream ended, in place if it is remembered (keeping its age)."""
        try:
            self._how[self._ids.index(stream_id)] = _CLOSED_CODE[how]
        except ValueError:
            self.add(stream_id, how)

    def get(self, stream_id: int) -> StreamClosedBy | None:
        try:
            return _CLOSED_BY[self._how[self._ids.index(stream_id)]]
        except ValueError:
            return None


@dataclass(eq=False, slots=True)
class StreamRecord:
    """One open stream, as the connection tracks it. Slotted, and its DATA queue exists only
    while DATA waits for window (None otherwise): most streams of a busy pool are idle."""

    stream_id: int
    outbound_window: int
    inbound_window: int
    state: StreamState = StreamState.IDLE
    unacked: int = 0  # consumed by the application, not yet returned in a WINDOW_UPDATE
    pending: deque[memoryview] | None = None  # DATA waiting for window
    pending_bytes: int = 0
    pending_end: bool = False
    headers_sent: bool = False
    headers_received: bool = False
    # Takes whole DATA frames directly while the connection lists the stream among its sinks
    # (`TunnelConnection.set_data_sink`); True: the bytes may be acked now.
    sink: Callable[[memoryview], bool] | None = None
