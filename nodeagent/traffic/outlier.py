"""Outlier ejection: endpoints that keep failing to connect are left out for a while.

After `consecutive_failures` connect failures in a row an endpoint is ejected for
`base_ejection * n` seconds, where n counts its ejections (so a flapping endpoint
stays out longer), capped at `max_ejection`. A success resets the failure count;
an endpoint that stays out of trouble for `max_ejection` after its last ejection
starts again from n = 1. The clock is injected (monotonic seconds).

A DestinationRule's `outlierDetection` gives a cluster its own settings, passed
per call, with `max_ejection_percent`: as Envoy's outlier detector, an endpoint
is ejected only while the share of the cluster's endpoints already ejected is
below it (envoy docs/root/intro/arch_overview/outlier.rst, "Ejection algorithm"),
so the first ejection of a small cluster is always allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_failures: int = 5  # failures in a row that eject (Envoy's default)
    base_ejection: float = 30.0  # seconds, multiplied by the ejection count
    max_ejection: float = 300.0  # seconds, cap on one ejection (Envoy's max_ejection_time)
    max_ejection_percent: int = 100  # share of a cluster's endpoints that may be out at once

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures}")
        if not 0 < self.base_ejection <= self.max_ejection:
            raise ValueError(
                "need 0 < base_ejection <= max_ejection, got "
                f"{self.base_ejection} and {self.max_ejection}"
            )


@dataclass(slots=True)
class _EndpointRecord:
    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0


class OutlierDetector:
    """Tracks connect outcomes per endpoint key and says which are ejected now."""

    def __init__(self, clock: Clock, settings: OutlierSettings | None = None) -> None:
        self._clock = clock
        self._settings = settings or OutlierSettings()
        self._records: dict[Hashable, _EndpointRecord] = {}

    def record_success(self, key: Hashable) -> None:
        record = self._records.get(key)
        if record is not None:
            record.failures = 0

    def record_failure(
        self,
        key: Hashable,
        settings: OutlierSettings | None = None,
        cluster: Collection[Hashable] = (),
    ) -> bool:
        """Count a connect failure; True when this failure ejects the endpoint.

        `settings` override the detector's own for this endpoint's cluster, whose
        endpoint keys `cluster` lists (for `max_ejection_percent`)."""
        rules = settings or self._settings
        now = self._clock()
        record = self._records.setdefault(key, _EndpointRecord())
        if now < record.ejected_until:
            return False  # already out; failures of in-flight attempts do not extend it
        record.failures += 1
        if record.failures < rules.consecutive_failures:
            return False
        if cluster and rules.max_ejection_percent < 100:
            out = sum(1 for k in cluster if k != key and self.is_ejected(k))
            if out * 100 >= rules.max_ejection_percent * len(cluster):
                return False  # enough of the cluster is out already; keep counting
        if record.ejections and now - record.ejected_until >= rules.max_ejection:
            record.ejections = 0  # well-behaved for a long time: start over
        record.ejections += 1
        record.failures = 0
        record.ejected_until = now + min(rules.base_ejection * record.ejections, rules.max_ejection)
        return True

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
