"""Outlier detection against a small reference model of Envoy's consecutive-error rules.

Hypothesis drives random outcomes and clock advances over a few endpoints of one
cluster; after every step the detector must agree with the model on which
endpoints are ejected, and never eject for longer than the cap or more of the
cluster than max_ejection_percent allows (one endpoint may always be out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from nodeagent.traffic.outlier import Outcome, OutlierDetector, OutlierRules

pytestmark = pytest.mark.unit

# What each outcome does to the three counters: (incremented, reset), unsplit and split.
LOCAL, CONNECT, FINAL = "local", "connect", "final"
_GATEWAY = {502, 503, 504}


def _effects(kind: str | int, split: bool) -> tuple[set[str], set[str]]:
    if kind == LOCAL:
        return ({"local"}, set()) if split else ({"5xx", "gateway"}, set())
    if kind == CONNECT:
        return set(), {"local"}
    status = 200 if kind == FINAL else int(kind)
    if status < 500:
        return set(), {"5xx", "gateway", "local"}
    if status in _GATEWAY:
        return {"5xx", "gateway"}, {"local"}
    return {"5xx"}, {"gateway", "local"}


def _outcome(kind: str | int) -> Outcome:
    if kind == LOCAL:
        return Outcome.connect_failure()
    if kind == CONNECT:
        return Outcome.connected()
    if kind == FINAL:
        return Outcome.connected(final=True)
    return Outcome.response(int(kind))


@dataclass
class _Endpoint:
    counts: dict[str, int] = field(default_factory=lambda: {"5xx": 0, "gateway": 0, "local": 0})
    times: int = 0  # ejections in a row
    until: float = 0.0


@dataclass
class Reference:
    rules: OutlierRules
    size: int
    endpoints: dict[int, _Endpoint] = field(default_factory=dict)

    def out(self, i: int, now: float) -> bool:
        return i in self.endpoints and now < self.endpoints[i].until

    def apply(self, i: int, kind: str | int, now: float) -> bool:
        ep = self.endpoints.setdefault(i, _Endpoint())
        incs, resets = _effects(kind, self.rules.split)
        if incs and self.out(i, now):
            return False  # ejected: failures are not counted
        for name in resets:
            ep.counts[name] = 0
        for name in incs:
            ep.counts[name] += 1
        limits = {
            "5xx": self.rules.consecutive_5xx,
            "gateway": self.rules.consecutive_gateway,
            "local": self.rules.consecutive_local_origin if self.rules.split else 0,
        }
        reached = [n for n, limit in limits.items() if limit and ep.counts[n] >= limit]
        for name in reached:
            ep.counts[name] = 0
        if not reached:
            return False
        others = sum(self.out(j, now) for j in range(self.size) if j != i)
        if others and (others + 1) * 100 > self.rules.max_ejection_percent * self.size:
            return False
        if ep.times and now - ep.until >= self.rules.max_ejection:
            ep.times = 0
        ep.times += 1
        ep.until = now + min(self.rules.base_ejection * ep.times, self.rules.max_ejection)
        return True


TICK = "tick"  # a step (_, TICK, seconds) moves the clock; (endpoint, kind, _) is an outcome
KINDS = [LOCAL, CONNECT, FINAL, 200, 404, 500, 502, 503, 504]
STEP = st.tuples(st.integers(0, 2), st.sampled_from([*KINDS, TICK]), st.integers(1, 40))


@st.composite
def rules(draw: st.DrawFn) -> OutlierRules:
    base = draw(st.sampled_from([1.0, 5.0, 10.0]))
    return OutlierRules(
        consecutive_5xx=draw(st.integers(0, 3)),
        consecutive_gateway=draw(st.integers(0, 3)),
        consecutive_local_origin=draw(st.integers(0, 3)),
        split=draw(st.booleans()),
        base_ejection=base,
        max_ejection=base * draw(st.integers(1, 4)),
        max_ejection_percent=draw(st.integers(0, 100)),
    )


@settings(max_examples=500, deadline=None)
@given(rules=rules(), size=st.integers(1, 3), steps=st.lists(STEP, min_size=4, max_size=50))
def test_detector_agrees_with_the_reference_model(
    rules: OutlierRules, size: int, steps: list[tuple[int, str | int, int]]
) -> None:
    now = [1000.0]
    detector = OutlierDetector(lambda: now[0])
    model = Reference(rules, size)
    keys = list(range(size))
    most = max(1, rules.max_ejection_percent * size // 100)
    ejections = 0
    for endpoint, kind, seconds in steps:
        if kind == TICK:
            now[0] += float(seconds)
        else:
            i = endpoint % size
            expected = model.apply(i, kind, now[0])
            assert detector.record(i, _outcome(kind), rules, keys) == expected
            ejections += expected
        for k in keys:
            assert detector.is_ejected(k) == model.out(k, now[0])
            left = detector.time_left(k)
            assert left is None or 0 < left <= rules.max_ejection
        assert sum(detector.is_ejected(k) for k in keys) <= most
    # How often the rules really ejected (pytest --hypothesis-show-statistics).
    event(f"ejections: {ejections if ejections < 3 else '3 or more'}")
    for k in keys:
        assert detector.ejections(k) == model.endpoints.get(k, _Endpoint()).times
