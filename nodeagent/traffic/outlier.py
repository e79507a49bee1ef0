"""Outlier ejection: endpoints that keep failing are left out for a while.

Counting follows Envoy's consecutive-error detectors (envoy
source/common/upstream/outlier_detection_impl.cc; docs
docs/root/intro/arch_overview/upstream/outlier.rst). Each use of an endpoint
ends in an `Outcome`: a connect (or later local) failure, a connect that
worked, or an HTTP response. Three counters per endpoint:

* consecutive 5xx: every 5xx response; unsplit, a local-origin failure too
  (it counts as a 503);
* consecutive gateway errors: 502, 503 and 504 (unsplit, local-origin
  failures too); another 5xx resets it, as Envoy's does;
* consecutive local-origin failures: only when `split`.

A response below 500 resets the 5xx and gateway counters; a connect that
worked resets only the local-origin one (unsplit it resets nothing: the
response that follows decides). A counter whose threshold is 0 never ejects.
A counter that reaches its threshold starts again from 0 whether or not the
endpoint could be ejected, so a refused ejection needs a fresh run of errors.

An ejection lasts `base_ejection * n`, n counting the endpoint's ejections (a
flapping endpoint stays out longer), capped at `max_ejection`; an endpoint
that stays out of trouble for `max_ejection` after its last ejection starts
again from n = 1. Failures while ejected (attempts already in flight) are not
counted. An endpoint is ejected only when, with it, at most
`max_ejection_percent` of its cluster would be out, except that one endpoint
may always be out (so a small cluster can eject its one bad endpoint).

The agent's L4 path counts connect failures with `OutlierSettings`
(`record_failure`/`record_success`); the waypoint counts HTTP outcomes with a
DestinationRule's rules (`record`). Both go through the same counting. The
clock is injected (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass

from nodeagent.model.routing import OutlierDetection

Clock = Callable[[], float]

MAX_EJECTION_TIME = 300.0  # seconds, Envoy's max_ejection_time default
GATEWAY_ERRORS = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one use of an endpoint says about it."""

    status: int = 0  # HTTP status of the endpoint's response, 0 when none
    local_origin: bool = False  # our side failed: connect failure, reset before response, timeout

    def __post_init__(self) -> None:
        if self.status and not 100 <= self.status <= 599:
            raise ValueError(f"status must be 0 or 100-599, got {self.status}")
        if self.local_origin and self.status:
            raise ValueError("a local-origin failure has no response status")

    @classmethod
    def connect_failure(cls) -> Outcome:
        """The connect (or the exchange before any response) failed on our side."""
        return cls(local_origin=True)

    @classmethod
    def connected(cls, *, final: bool = False) -> Outcome:
        """The connect worked. `final`: nothing more will be learnt (a TCP proxy); Envoy
        counts that as a 200 (its LocalOriginConnectSuccessFinal), so it resets every counter."""
        return cls(status=200) if final else cls()

    @classmethod
    def response(cls, status: int) -> Outcome:
        """The endpoint answered with this HTTP status."""
        return cls(status=status)

    @property
    def failed(self) -> bool:
        return self.local_origin or self.status >= 500


@dataclass(frozen=True, slots=True)
class OutlierRules:
    """One cluster's consecutive-error detection (Envoy's names; a threshold of 0 disables)."""

    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    consecutive_local_origin: int = 5  # used only when split
    split: bool = False  # split_external_local_origin_errors
    base_ejection: float = 30.0  # seconds, multiplied by the ejection count
    max_ejection: float = MAX_EJECTION_TIME  # seconds, cap on one ejection
    max_ejection_percent: int = 100  # share of a cluster's endpoints that may be out at once

    def __post_init__(self) -> None:
        counters = (self.consecutive_5xx, self.consecutive_gateway, self.consecutive_local_origin)
        if min(counters) < 0:
            raise ValueError(f"thresholds must be >= 0, got {counters}")
        if not 0 < self.base_ejection <= self.max_ejection:
            raise ValueError(
                "need 0 < base_ejection <= max_ejection, got "
                f"{self.base_ejection} and {self.max_ejection}"
            )
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent must be 0-100, got {self.max_ejection_percent}")

    @classmethod
    def of(cls, detection: OutlierDetection) -> OutlierRules:
        """A DestinationRule's outlierDetection as Istio gives it to Envoy (max_ejection_time is
        not an Istio field: Envoy's default, or the base time when that is longer)."""
        return cls(
            consecutive_5xx=detection.consecutive_5xx_errors,
            consecutive_gateway=detection.consecutive_gateway_errors,
            consecutive_local_origin=detection.consecutive_local_origin_failures,
            split=detection.split_external_local_origin_errors,
            base_ejection=detection.base_ejection_time,
            max_ejection=max(MAX_EJECTION_TIME, detection.base_ejection_time),
            max_ejection_percent=detection.max_ejection_percent,
        )

    @property
    def enabled(self) -> bool:
        """False when no counter can eject (every threshold that counts is 0)."""
        local = self.consecutive_local_origin if self.split else 0
        return bool(self.consecutive_5xx or self.consecutive_gateway or local)


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    """The agent's L4 detection: connect failures only, one threshold."""

    consecutive_failures: int = 5  # failures in a row that eject (Envoy's default)
    base_ejection: float = 30.0  # seconds, multiplied by the ejection count
    max_ejection: float = MAX_EJECTION_TIME  # seconds, cap on one ejection
    max_ejection_percent: int = 100  # share of a cluster's endpoints that may be out at once

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures}")
        _ = self.rules  # the times and the percent are checked there

    @property
    def rules(self) -> OutlierRules:
        # Split, so connect failures count on their own counter and nothing else can eject.
        return OutlierRules(
            consecutive_5xx=0,
            consecutive_gateway=0,
            consecutive_local_origin=self.consecutive_failures,
            split=True,
            base_ejection=self.base_ejection,
            max_ejection=self.max_ejection,
            max_ejection_percent=self.max_ejection_percent,
        )


@dataclass(slots=True)
class _EndpointRecord:
    errors_5xx: int = 0
    gateway_errors: int = 0
    local_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    def count(self, outcome: Outcome, rules: OutlierRules) -> bool:
        """Apply one outcome to the counters; True when a counter reached its threshold (that
        counter starts again from 0)."""
        if outcome.local_origin:
            if rules.split:
                self.local_failures += 1
            else:
                self.errors_5xx += 1  # a local-origin failure is a 503 here
                self.gateway_errors += 1
        else:
            self.local_failures = 0  # the connect worked
            if outcome.status >= 500:
                self.errors_5xx += 1
                if outcome.status in GATEWAY_ERRORS:
                    self.gateway_errors += 1
                else:
                    self.gateway_errors = 0
            elif outcome.status:
                self.errors_5xx = self.gateway_errors = 0
        tripped = False
        if rules.consecutive_5xx and self.errors_5xx >= rules.consecutive_5xx:
            self.errors_5xx, tripped = 0, True
        if rules.consecutive_gateway and self.gateway_errors >= rules.consecutive_gateway:
            self.gateway_errors, tripped = 0, True
        local = rules.consecutive_local_origin
        if rules.split and local and self.local_failures >= local:
            self.local_failures, tripped = 0, True
        return tripped


def ejection_allowed(ejected_others: int, size: int, max_percent: int) -> bool:
    """Envoy's max_ejection_percent: with this endpoint out, at most `max_percent` of the
    cluster is out; one endpoint may always be out."""
    if ejected_others == 0:
        return True
    return (ejected_others + 1) * 100 <= max_percent * size


class OutlierDetector:
    """Tracks outcomes per endpoint key and says which are ejected now."""

    def __init__(self, clock: Clock, settings: OutlierSettings | None = None) -> None:
        self._clock = clock
        self._settings = settings or OutlierSettings()
        self._rules = self._settings.rules
        self._records: dict[Hashable, _EndpointRecord] = {}

    def record(
        self,
        key: Hashable,
        outcome: Outcome,
        rules: OutlierRules | None = None,
        cluster: Collection[Hashable] = (),
    ) -> bool:
        """Count one outcome; True when it ejects the endpoint.

        `rules` are the endpoint's cluster's (default: the detector's settings); `cluster`
        lists that cluster's endpoint keys (for `max_ejection_percent`)."""
        rules = rules or self._rules
        now = self._clock()
        record = self._records.get(key)
        if record is None:
            if not outcome.failed:
                return False  # nothing to reset: keep no state for healthy endpoints
            record = self._records.setdefault(key, _EndpointRecord())
        if outcome.failed and now < record.ejected_until:
            return False  # already out; failures of in-flight attempts do not extend it
        if not record.count(outcome, rules):
            return False
        if cluster and rules.max_ejection_percent < 100:
            out = sum(1 for k in cluster if k != key and self.is_ejected(k))
            if not ejection_allowed(out, len(cluster), rules.max_ejection_percent):
                return False  # enough of the cluster is out already
        if record.ejections and now - record.ejected_until >= rules.max_ejection:
            record.ejections = 0  # well-behaved for a long time: start over
        record.ejections += 1
        record.ejected_until = now + min(rules.base_ejection * record.ejections, rules.max_ejection)
        return True

    def record_success(self, key: Hashable) -> None:
        """A connect that worked, and all the L4 path learns (every counter starts again)."""
        self.record(key, Outcome.connected(final=True))

    def record_failure(
        self,
        key: Hashable,
        settings: OutlierSettings | None = None,
        cluster: Collection[Hashable] = (),
    ) -> bool:
        """Count a connect failure; True when this failure ejects the endpoint.

        `settings` override the detector's own for this endpoint's cluster, whose
        endpoint keys `cluster` lists (for `max_ejection_percent`)."""
        rules = settings.rules if settings is not None else self._rules
        return self.record(key, Outcome.connect_failure(), rules, cluster)

    def ejections(self, key: Hashable) -> int:
        """How many times the endpoint has been ejected (the multiplier of its next one)."""
        record = self._records.get(key)
        return record.ejections if record is not None else 0

    def is_ejected(self, key: Hashable) -> bool:
        record = self._records.get(key)
        return record is not None and self._clock() < record.ejected_until

    def ejected_until(self, key: Hashable) -> float | None:
        """Clock time the ejection ends, or None when not ejected."""
        record = self._records.get(key)
        if record is None or self._clock() >= record.ejected_until:
            return None
        return record.ejected_until

    def time_left(self, key: Hashable) -> float | None:
        """Seconds until the ejection ends, or None when not ejected."""
        until = self.ejected_until(key)
        return None if until is None else until - self._clock()

    def forget(self, key: Hashable) -> None:
        """Drop an endpoint that no longer exists."""
        self._records.pop(key, None)

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Forget every endpoint not in `keys` (call after an endpoint set update)."""
        keep = set(keys)
        for key in [k for k in self._records if k not in keep]:
            del self._records[key]
