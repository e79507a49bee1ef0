"""Outlier ejection with a fake clock, alone and inside endpoint selection."""

from __future__ import annotations

import ipaddress
import random

import pytest

from nodeagent.model.workload import (
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
)
from nodeagent.traffic import (
    Candidate,
    EndpointSelector,
    OutlierDetector,
    OutlierSettings,
    SourceLocation,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = OutlierSettings(consecutive_failures=3, base_ejection=10.0, max_ejection=25.0)


def _fail(detector: OutlierDetector, key: str, times: int) -> list[bool]:
    return [detector.record_failure(key) for _ in range(times)]


def test_consecutive_failures_eject_for_the_base_interval() -> None:
    clock = FakeClock()
    detector = OutlierDetector(clock, SETTINGS)
    assert _fail(detector, "a", 3) == [False, False, True]
    assert detector.is_ejected("a")
    assert detector.ejected_until("a") == 1010.0
    clock.now = 1009.9
    assert detector.is_ejected("a")
    clock.now = 1010.0
    assert not detector.is_ejected("a")
    assert detector.ejected_until("a") is None


def test_success_resets_the_failure_count() -> None:
    detector = OutlierDetector(FakeClock(), SETTINGS)
    _fail(detector, "a", 2)
    detector.record_success("a")
    assert _fail(detector, "a", 2) == [False, False]
    assert not detector.is_ejected("a")


def test_repeated_ejections_grow_up_to_the_cap() -> None:
    clock = FakeClock()
    detector = OutlierDetector(clock, SETTINGS)
    durations = []
    for _ in range(4):
        start = clock.now
        _fail(detector, "a", 3)
        until = detector.ejected_until("a")
        assert until is not None
        durations.append(until - start)
        clock.now = until  # ejection over; it fails again at once
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_failures_while_ejected_do_not_extend_it() -> None:
    clock = FakeClock()
    detector = OutlierDetector(clock, SETTINGS)
    _fail(detector, "a", 3)
    clock.now += 5
    assert _fail(detector, "a", 10) == [False] * 10
    assert detector.ejected_until("a") == 1010.0


def test_long_good_behaviour_restarts_the_multiplier() -> None:
    clock = FakeClock()
    detector = OutlierDetector(clock, SETTINGS)
    _fail(detector, "a", 3)
    clock.now = 1010.0 + 25.0  # max_ejection after the ejection ended
    _fail(detector, "a", 3)
    assert detector.ejected_until("a") == clock.now + 10.0


def test_retain_and_forget_drop_state() -> None:
    detector = OutlierDetector(FakeClock(), SETTINGS)
    _fail(detector, "a", 3)
    _fail(detector, "b", 3)
    detector.retain(["b"])
    assert not detector.is_ejected("a")
    assert detector.is_ejected("b")
    detector.forget("b")
    assert not detector.is_ejected("b")


@pytest.mark.parametrize(
    "kwargs",
    [{"consecutive_failures": 0}, {"base_ejection": 0.0}, {"base_ejection": 50.0}],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlierSettings(**{**{"max_ejection": 25.0}, **kwargs})  # type: ignore[arg-type]


# ---- inside selection --------------------------------------------------------

SOURCE = SourceLocation(Locality("us", "us-a"), node="n1")


def _ep(uid: str, last_octet: int, zone: str = "us-a") -> Candidate:
    return Candidate(
        uid, ipaddress.ip_address(f"10.0.0.{last_octet}"), 80, locality=Locality("us", zone)
    )


def test_ejected_endpoint_is_skipped_until_it_returns() -> None:
    clock = FakeClock()
    detector = OutlierDetector(clock, SETTINGS)
    selector = EndpointSelector(random.Random(0), detector)
    good, bad = _ep("good", 1), _ep("bad", 2)
    _fail(detector, bad.key, 3)
    picks = {selector.select([good, bad], SOURCE).endpoint for _ in range(50)}
    assert picks == {good}
    clock.now += 10
    picks = {selector.select([good, bad], SOURCE).endpoint for _ in range(50)}
    assert picks == {good, bad}


def test_all_ejected_falls_back_to_using_them() -> None:
    detector = OutlierDetector(FakeClock(), SETTINGS)
    only = _ep("only", 1)
    _fail(detector, only.key, 3)
    selection = EndpointSelector(random.Random(0), detector).select([only], SOURCE)
    assert selection.endpoint == only
    assert "ejected as outliers" in selection.reason


def test_ejection_makes_failover_move_to_the_next_tier() -> None:
    detector = OutlierDetector(FakeClock(), SETTINGS)
    near, far = _ep("near", 1), _ep("far", 2, zone="us-b")
    failover = LoadBalancing(
        routing_preference=(LoadBalancingScope.ZONE,), mode=LoadBalancingMode.FAILOVER
    )
    selector = EndpointSelector(random.Random(0), detector)
    assert selector.select([near, far], SOURCE, failover).endpoint == near
    _fail(detector, near.key, 3)
    assert selector.select([near, far], SOURCE, failover).endpoint == far
