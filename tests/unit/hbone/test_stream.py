"""The closed-stream memory: how each remembered stream ended, oldest forgotten first."""

from __future__ import annotations

import sys

import pytest

from nodeagent.hbone.stream import ClosedStreams, StreamClosedBy

ENDED, RESET_SENT, RESET_RECEIVED = (
    StreamClosedBy.ENDED,
    StreamClosedBy.RESET_SENT,
    StreamClosedBy.RESET_RECEIVED,
)


def test_remembers_how_each_stream_ended_and_not_others() -> None:
    closed = ClosedStreams(4)
    closed.add(1, ENDED)
    closed.add(3, RESET_RECEIVED)
    closed.add(5, RESET_SENT)
    assert [closed.get(sid) for sid in (1, 3, 5, 7)] == [ENDED, RESET_RECEIVED, RESET_SENT, None]
    assert len(closed) == 3


def test_forgets_the_oldest_first_once_full() -> None:
    closed = ClosedStreams(3)
    for sid in range(1, 16, 2):  # 1, 3, ..., 15
        closed.add(sid, ENDED)
    assert len(closed) == 3
    assert [sid for sid in range(1, 16, 2) if closed.get(sid) is not None] == [11, 13, 15]


def test_update_changes_a_remembered_stream_in_place_keeping_its_age() -> None:
    closed = ClosedStreams(2)
    closed.add(1, ENDED)
    closed.add(3, ENDED)
    closed.update(1, RESET_SENT)  # a late frame made us reset a stream that had ended
    assert closed.get(1) is RESET_SENT
    closed.add(5, ENDED)  # 1 is still the oldest, so it goes first
    assert (closed.get(1), closed.get(3), closed.get(5)) == (None, ENDED, ENDED)


def test_update_adds_a_stream_it_does_not_remember() -> None:
    closed = ClosedStreams(2)
    closed.update(7, RESET_SENT)
    assert closed.get(7) is RESET_SENT and len(closed) == 1


def test_the_largest_stream_id_fits() -> None:
    closed = ClosedStreams(2)
    closed.add(2**31 - 1, ENDED)
    assert closed.get(2**31 - 1) is ENDED


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be positive, not 0"):
        ClosedStreams(0)


def test_keeps_no_python_int_per_stream() -> None:
    """The point of the class (issue 21): a full memory holds C integers, not an object per
    stream that would pin the allocator pool it was made in after a burst has closed."""
    closed = ClosedStreams(1024)
    ids = [2**20 + 2 * n + 1 for n in range(1024)]  # ints above the small-int cache
    for sid in ids:
        closed.add(sid, ENDED)
    referrers = {sys.getrefcount(sid) for sid in ids}
    del closed
    assert {sys.getrefcount(sid) for sid in ids} == referrers  # no references were held


@pytest.mark.parametrize("capacity", [1, 2, 8])
def test_how_a_remembered_stream_ended_can_be_changed_in_place(capacity: int) -> None:
    closed = ClosedStreams(capacity)
    for sid in range(1, 2 * capacity + 2, 2):  # fill it, and wrap
        closed.add(sid, ENDED)
    last = 2 * capacity + 1
    closed.update(last, RESET_SENT)  # we reset it after it had ended
    assert closed.get(last) is RESET_SENT
    assert len(closed) == capacity
    assert closed.get(1) is None  # the oldest went when it wrapped
