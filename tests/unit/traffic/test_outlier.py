"""Outlier ejection with a fake clock, alone and inside endpoint selection."""

from __future__ import annotations

import ipaddress
import random

import pytest

from nodeagent.model.routing import OutlierDetection
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
from nodeagent.traffic.outlier import Outcome, OutlierRules


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


# ---- Envoy's consecutive-error counters (HTTP outcomes) ---------------------

L = Outcome.connect_failure()  # local origin: connect failure, reset, timeout
C = Outcome.connected()  # a connect, the response still to come
F = Outcome.connected(final=True)  # a connect that is all the caller learns (L4)


def _rules(**kwargs: object) -> OutlierRules:
    base: dict[str, object] = {
        "consecutive_5xx": 0,
        "consecutive_gateway": 0,
        "consecutive_local_origin": 0,
        "base_ejection": 10.0,
        "max_ejection": 25.0,
    }
    return OutlierRules(**{**base, **kwargs})  # type: ignore[arg-type]


def _outcome(step: Outcome | int) -> Outcome:
    return step if isinstance(step, Outcome) else Outcome.response(step)


@pytest.mark.parametrize(
    ("rules", "steps", "ejects_at"),
    [
        # not split: every 5xx counts; a local-origin failure is a 503
        (_rules(consecutive_5xx=3), [500, 500, 500], 2),
        (_rules(consecutive_5xx=3), [L, L, L], 2),
        (_rules(consecutive_5xx=3), [L, 500, 503], 2),
        (_rules(consecutive_5xx=3), [500, 200, 500, 500], None),
        (_rules(consecutive_5xx=3), [500, 404, 500, 500], None),
        (_rules(consecutive_5xx=3), [500, C, 500, 500], 3),  # a connect alone resets nothing
        (_rules(consecutive_5xx=3), [500, F, 500, 500], None),  # a final connect is a 200
        # gateway errors: 502/503/504 and local-origin failures; another 5xx resets
        (_rules(consecutive_gateway=2), [502, 504], 1),
        (_rules(consecutive_gateway=2), [L, 503], 1),
        (_rules(consecutive_gateway=2), [502, 500, 503], None),
        (_rules(consecutive_gateway=2), [500, 500, 500, 500], None),
        (_rules(consecutive_gateway=2), [503, 200, 503], None),
        # both counters: whichever reaches its threshold first ejects
        (_rules(consecutive_5xx=5, consecutive_gateway=2), [500, 502, 502], 2),
        (_rules(consecutive_5xx=2, consecutive_gateway=5), [502, 502], 1),
        # 0 disables a counter; unsplit, the local-origin threshold is not used
        (_rules(), [L] * 10 + [500] * 10, None),
        (_rules(consecutive_local_origin=1), [L] * 10, None),
        # split: local-origin failures count only on their own counter
        (_rules(split=True, consecutive_local_origin=2), [L, L], 1),
        (_rules(split=True, consecutive_local_origin=2), [L, C, L], None),
        (_rules(split=True, consecutive_local_origin=2), [L, 500, L], None),
        (_rules(split=True, consecutive_local_origin=2, consecutive_5xx=3), [500, 500, L], None),
        (_rules(split=True, consecutive_local_origin=9, consecutive_5xx=3), [500, 500, L, 500], 3),
        (_rules(split=True, consecutive_5xx=1, consecutive_gateway=1), [L] * 10, None),
        (_rules(split=True, consecutive_gateway=2), [L, 502, L, 503], 3),
        (_rules(split=True), [L] * 10 + [503] * 10, None),
    ],
)
def test_consecutive_error_counters(
    rules: OutlierRules, steps: list[Outcome | int], ejects_at: int | None
) -> None:
    detector = OutlierDetector(FakeClock())
    ejected = [detector.record("a", _outcome(s), rules) for s in steps]
    expected = [i == ejects_at for i in range(len(steps))]
    assert ejected == expected


@pytest.mark.parametrize(
    ("base", "durations"),
    [
        (30.0, [30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0, 300.0]),
        (200.0, [200.0, 300.0, 300.0]),
        (400.0, [400.0, 400.0]),  # a base above Envoy's 300 s cap is the cap
    ],
)
def test_ejection_time_grows_to_the_cap_of_a_destination_rule(
    base: float, durations: list[float]
) -> None:
    clock = FakeClock()
    detector = OutlierDetector(clock)
    rules = OutlierRules.of(OutlierDetection(consecutive_5xx_errors=1, base_ejection_time=base))
    seen = []
    for _ in durations:
        assert detector.record("a", Outcome.response(503), rules)
        until = detector.ejected_until("a")
        assert until is not None
        seen.append(until - clock.now)
        clock.now = until
    assert seen == durations


@pytest.mark.parametrize(
    ("percent", "size", "most"),
    [
        (10, 2, 1),  # one endpoint may always be out
        (0, 3, 1),
        (34, 3, 1),
        (67, 3, 2),
        (50, 4, 2),
        (60, 4, 2),  # 3 of 4 would be 75%
        (75, 4, 3),
        (100, 3, 3),
    ],
)
def test_max_ejection_percent_bounds_the_ejected_share(percent: int, size: int, most: int) -> None:
    detector = OutlierDetector(FakeClock())
    rules = _rules(consecutive_5xx=1, max_ejection_percent=percent)
    keys = [f"e{i}" for i in range(size)]
    ejected = [detector.record(k, Outcome.response(500), rules, keys) for k in keys]
    assert ejected == [i < most for i in range(size)]
    assert sum(detector.is_ejected(k) for k in keys) == most


def test_a_refused_ejection_needs_a_fresh_run_of_errors() -> None:
    detector = OutlierDetector(FakeClock())
    rules = _rules(consecutive_5xx=2, max_ejection_percent=10)
    keys = ["a", "b"]
    assert [detector.record("a", Outcome.response(500), rules, keys) for _ in range(2)] == [
        False,
        True,
    ]
    # b reaches the threshold while a is out: refused, and its counter starts again (Envoy).
    assert [detector.record("b", Outcome.response(500), rules, keys) for _ in range(4)] == [
        False
    ] * 4
    assert not detector.is_ejected("b")


def test_l4_settings_count_connect_failures_through_the_same_counters() -> None:
    detector = OutlierDetector(FakeClock(), SETTINGS)
    assert SETTINGS.rules.split and SETTINGS.rules.consecutive_local_origin == 3
    detector.record("a", Outcome.response(503))  # a response is no connect failure here
    assert _fail(detector, "a", 3) == [False, False, True]


@pytest.mark.parametrize(
    "kwargs",
    [{"status": 99}, {"status": 600}, {"status": 500, "local_origin": True}],
)
def test_bad_outcomes_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Outcome(**kwargs)  # type: ignore[arg-type]


def test_rules_of_a_destination_rule() -> None:
    od = OutlierDetection(
        consecutive_5xx_errors=7,
        consecutive_gateway_errors=3,
        consecutive_local_origin_failures=2,
        split_external_local_origin_errors=True,
        base_ejection_time=12.0,
        max_ejection_percent=40,
    )
    assert OutlierRules.of(od) == OutlierRules(7, 3, 2, True, 12.0, 300.0, 40)
    assert not OutlierRules.of(OutlierDetection(consecutive_5xx_errors=0)).enabled
    assert OutlierRules.of(
        OutlierDetection(consecutive_5xx_errors=0, consecutive_gateway_errors=1)
    ).enabled
