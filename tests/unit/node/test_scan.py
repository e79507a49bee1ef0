"""The pure scan decision: what a namespace scan means for each local pod."""

from __future__ import annotations

import math

import pytest

from nodeagent.node.lifecycle import (
    AddressMismatch,
    Netns,
    NetnsFound,
    NetnsLost,
    PodRecord,
    PodState,
)
from nodeagent.node.scan import (
    Conflict,
    Matched,
    Mismatch,
    OrphanReleased,
    ScanSchedule,
    ScanTiming,
    ScanView,
    Unreadable,
    decide,
    mismatch_reason,
)

NS1 = Netns(path="/ns/101", inode=101)
NS2 = Netns(path="/ns/202", inode=202)


def view(**kw: object) -> ScanView:
    base: dict[str, object] = {"matches": {}, "paths": {}, "conflicts": {}, "addresses": {}}
    base.update(kw)
    return ScanView(**base)  # type: ignore[arg-type]


def rec(uid: str, state: PodState, netns: Netns | None = NS1, **kw: object) -> PodRecord:
    return PodRecord(uid=uid, state=state, netns=netns, **kw)  # type: ignore[arg-type]


def test_mismatch_reason_names_both_addresses_and_ignores_loopback() -> None:
    assert mismatch_reason(["10.1.0.5"], "/ns/1", ["10.1.0.5", "127.0.0.1"]) is None
    assert mismatch_reason(["::ffff:10.1.0.5"], "/ns/1", ["::ffff:10.1.0.5"]) is None
    why = mismatch_reason(["10.1.0.99"], "/ns/1", ["127.0.0.1", "10.1.0.5"])
    assert why is not None
    assert "10.1.0.99" in why and "10.1.0.5" in why and "127.0.0.1" not in why
    assert "no address" in str(mismatch_reason(["10.1.0.99"], "/ns/1", ["127.0.0.1"]))


def test_pending_pod_matched_is_found_and_a_ready_one_in_place_is_left_alone() -> None:
    pods = {"a": rec("a", PodState.PENDING, None), "b": rec("b", PodState.READY)}
    wanted = {"a": ("10.1.0.7",), "b": ("10.1.0.5",)}
    seen = view(matches={"a": 202, "b": 101}, paths={202: "/ns/202", 101: "/ns/101"})
    out = decide(pods, wanted, seen, now=5)
    assert out.events == [NetnsFound(uid="a", netns=NS2, now=5)]
    assert out.notices == [Matched(uid="a"), Matched(uid="b")]


def test_held_pod_whose_record_matches_again_is_found_again() -> None:
    out = decide(
        {"a": rec("a", PodState.HELD)}, {"a": ("10.1.0.5",)},
        view(matches={"a": 101}, paths={101: "/ns/101"}), now=1,
    )  # fmt: skip
    assert out.events == [NetnsFound(uid="a", netns=NS1, now=1)]


def test_read_namespace_without_the_records_address_is_a_mismatch_once() -> None:
    seen = view(addresses={101: frozenset({"10.1.0.5"})}, present=frozenset({"a"}))
    out = decide({"a": rec("a", PodState.READY)}, {"a": ("10.1.0.99",)}, seen, now=2)
    [event] = out.events
    assert isinstance(event, AddressMismatch) and "10.1.0.99" in event.reason
    assert out.notices == [Mismatch(uid="a", reason=event.reason)]
    held = rec("a", PodState.HELD, hold_reason=event.reason)
    assert decide({"a": held}, {"a": ("10.1.0.99",)}, seen, now=3).events == []


def test_unreadable_namespace_keeps_the_pod_and_a_gone_one_is_lost() -> None:
    pods = {"a": rec("a", PodState.READY), "b": rec("b", PodState.READY, NS2)}
    wanted = {"a": ("10.1.0.5",), "b": ("10.1.0.6",)}
    out = decide(pods, wanted, view(present=frozenset({"a"}), absent=frozenset({"b"})), now=4)
    assert out.notices == [Unreadable(uid="a")]
    assert out.events == [NetnsLost(uid="b", now=4)]


def test_conflict_waits() -> None:
    out = decide(
        {"a": rec("a", PodState.PENDING, None)}, {"a": ("10.1.0.5",)},
        view(conflicts={"a": (101, 202)}), now=0,
    )  # fmt: skip
    assert out.events == [] and out.notices == [Conflict(uid="a", inodes=(101, 202))]


def test_capturing_pod_already_leaving_is_not_lost_twice() -> None:
    leaving = rec("a", PodState.CAPTURING, remove_after=True)
    assert decide({"a": leaving}, {"a": ("10.1.0.5",)}, view(), now=0).events == []


def test_orphan_held_pod_is_forgotten_when_gone_or_claimed_and_kept_otherwise() -> None:
    pods = {
        "gone": rec("gone", PodState.HELD, NS1),
        "claimed": rec("claimed", PodState.HELD, NS2),
        "kept": rec("kept", PodState.HELD, Netns(path="/ns/303", inode=303)),
        "w": rec("w", PodState.READY, NS2),
    }
    seen = view(matches={"w": 202}, paths={202: "/ns/202"}, absent=frozenset({"gone"}))
    out = decide(pods, {"w": ("10.1.0.6",)}, seen, now=9)
    assert out.events == [NetnsLost(uid="gone", now=9), NetnsLost(uid="claimed", now=9)]
    assert OrphanReleased(uid="claimed", path="/ns/202", claimed=True) in out.notices
    assert OrphanReleased(uid="gone", path="/ns/101", claimed=False) in out.notices


# -- when to scan: ScanSchedule, as a table -------------------------------------------

# Binary fractions, so sums are exact.
TIMING = ScanTiming(interval=1.0, debounce=0.125, follow_ups=(0.25, 0.5))
INF = math.inf


def run_schedule(steps: str) -> ScanSchedule:
    """Steps, by letter and time: `r` a request, `e` a namespace event, `b` a scan begins,
    `d` it is done (`d+`: a workload still unmatched), `s` both (`s10+`)."""
    schedule = ScanSchedule(TIMING)
    for step in steps.split():
        kind, arg = step[0], step[1:]
        waiting = arg.endswith("+")
        at = float(arg.rstrip("+") or 0)
        if kind == "r":
            schedule.request(at)
        elif kind == "e":
            schedule.namespace_changed(at)
        elif kind in "bs":
            schedule.scan_started(at)
        if kind in "ds":
            schedule.scan_done(waiting=waiting)
    return schedule


@pytest.mark.parametrize(
    ("steps", "next_at"),
    [
        pytest.param("", 0.0, id="the first scan is at once"),
        pytest.param("s10", 11.0, id="then periodic"),
        pytest.param("s10 r10.5", 10.5, id="a state change scans at once"),
        pytest.param("s10 e10.5", 10.625, id="a namespace event: debounced"),
        pytest.param("s10 e10.5 e10.5625", 10.625, id="events coalesced, never postponing"),
        pytest.param("s10 e10.5 r10.5625", 10.5625, id="a request is sooner"),
        pytest.param("s10 e10.5 s10.625+", 10.75, id="a workload still unmatched: follow-up"),
        pytest.param("s10 e10.5 s10.625+ s10.75+", 11.0, id="then the next"),
        pytest.param("e10.5 s10.625+ s10.75+ s11+", 12.0, id="follow-ups bounded: periodic"),
        pytest.param("s10 e10.5 s10.625", 11.625, id="nothing unmatched: no follow-ups"),
        pytest.param("e10.5 s10.625 r10.6875 s10.6875+", 10.75, id="record after the event"),
        pytest.param("e10.5 b10.625 r10.6875 d", 10.6875, id="a request during a scan stays"),
        pytest.param("s10 b10.5 e10.75 d", 10.875, id="an event during a scan stays"),
        pytest.param("s10 r10.25 s10.25+", 11.25, id="unmatched, no event: periodic"),
    ],
)
def test_scan_schedule(steps: str, next_at: float) -> None:
    schedule = run_schedule(steps)
    assert schedule.next_at() == pytest.approx(next_at)
    assert schedule.due(next_at)
    assert next_at == 0 or not schedule.due(next_at - 0.001)


def test_scan_schedule_with_no_periodic_scan_yet_done_waits_for_nothing() -> None:
    schedule = ScanSchedule(ScanTiming(interval=INF, follow_ups=()))
    schedule.scan_started(1.0)
    schedule.scan_done(waiting=True)
    assert schedule.next_at() == INF and not schedule.due(1e9)
