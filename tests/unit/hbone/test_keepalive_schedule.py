"""The keep-alive schedule both HBONE ends share: when to PING, when a connection is idle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.hbone.keepalive import KeepaliveAction, KeepaliveSchedule

NOTHING, PING, CLOSE = KeepaliveAction.NOTHING, KeepaliveAction.PING, KeepaliveAction.CLOSE_IDLE


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (time, open streams) -> action; client pool: PING every 10 s, idle after 300 s
        ([(5, 0)], [NOTHING]),
        ([(10, 0)], [PING]),
        ([(10, 0), (15, 0), (20, 0)], [PING, NOTHING, PING]),
        ([(299, 0), (300, 0)], [PING, CLOSE]),
        # a stream open at 200 s keeps it in use: idle counts from then
        ([(200, 1), (499, 0), (500, 0)], [PING, PING, CLOSE]),
        # idle wins over a PING that is due at the same moment
        ([(310, 0)], [CLOSE]),
    ],
)
def test_client_schedule_pings_and_closes_when_idle(
    steps: list[tuple[float, int]], expected: list[KeepaliveAction]
) -> None:
    schedule = KeepaliveSchedule(300.0, 10.0, 0.0)
    assert [schedule.due(t, n) for t, n in steps] == expected


def test_server_schedule_never_pings_and_closes_after_idle_timeout() -> None:
    schedule = KeepaliveSchedule(600.0, None, 1000.0)
    assert schedule.wait(1000.0, 0) == 600.0
    assert schedule.due(1599.0, 0) is NOTHING
    assert schedule.due(1600.0, 0) is CLOSE


def test_touch_marks_use_and_never_goes_back() -> None:
    schedule = KeepaliveSchedule(60.0, None, 0.0)
    schedule.touch(50.0)
    schedule.touch(40.0)  # a late report of an earlier use
    assert schedule.last_used == 50.0
    assert schedule.idle_for(70.0, 0) == 20.0
    assert schedule.idle_for(70.0, 2) == 0.0
    assert schedule.due(109.0, 0) is NOTHING
    assert schedule.due(110.0, 0) is CLOSE


def test_wait_with_streams_open_looks_again_within_a_quarter_of_idle_timeout() -> None:
    schedule = KeepaliveSchedule(600.0, None, 0.0)
    assert schedule.due(100.0, 3) is NOTHING
    assert schedule.wait(100.0, 3) == 150.0
    # the next PING bounds the wait too
    assert KeepaliveSchedule(600.0, 10.0, 0.0).wait(4.0, 3) == 6.0


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        KeepaliveSchedule(0.0, None, 0.0)
    with pytest.raises(ValueError, match="ping_interval"):
        KeepaliveSchedule(1.0, 0.0, 0.0)


@given(
    idle=st.floats(0.5, 1000),
    ping=st.one_of(st.none(), st.floats(0.5, 100)),
    steps=st.lists(st.tuples(st.floats(0, 200), st.integers(0, 3)), max_size=30),
)
def test_driver_waiting_as_told_never_misses_a_deadline(
    idle: float, ping: float | None, steps: list[tuple[float, int]]
) -> None:
    """Whatever the streams do, a driver that sleeps `wait()` then asks `due()` closes an
    idle connection no later than idle_timeout after its last use, and PINGs on time."""
    schedule = KeepaliveSchedule(idle, ping, 0.0)
    now = 0.0
    for gap, streams in steps:
        action = schedule.due(now, streams)
        if action is CLOSE:
            assert schedule.idle_for(now, 0) >= idle
            return
        wait = schedule.wait(now, streams)
        assert wait >= 0
        assert schedule.last_used + idle >= now  # not overdue
        if ping is not None:
            assert schedule.next_ping <= now + ping
        now += min(wait, gap)
