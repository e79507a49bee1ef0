"""Outlier ejection: endpoints that keep failing to connect are left out for a while.

After `consecutive_failures` connect failures in a row an endpoint is ejected for
`base_ejection * n` seconds, where n counts its ejections (so a flapping endpoint
stays out longer), capped at `max_ejection`. A success resets the failure count;
an endpoint that stays out of trouble for `max_ejection` after its last ejection
starts again from n = 1. The clock is injected (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_failures: int = 5  # failures in a row that eject (Envoy's default)
    base_ejection: float = 30.0  # seconds, multiplied by the ejection count
    max_ejection: float = 300.0  # seconds, cap on one ejection

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

    def record_failure(self, key: Hashable) -> bool:
        """Count a connect failure; True when this failure ejects the endpoint."""
        now = self._clock()
        record = self._records.setdefault(key, _EndpointRecord())
        if now < record.ejected_until:
            return False  # already out; failures of in-flight attempts do not extend it
        record.failures += 1
        if record.failures < self._settings.consecutive_failures:
            return False
        if record.ejections and now - record.ejected_until >= self._settings.max_ejection:
            record.ejections = 0  # well-behaved for a long time: start over
        record.ejections += 1
        record.failures = 0
        duration = min(self._settings.base_ejection * record.ejections, self._settings.max_ejection)
        record.ejected_until = now + duration
        return True

    def is_ejected(self, key: Hashable) -> bool:
        record = self._records.get(key)
        return record is not None and self._clock() < record.ejected_until

    def ejected_until(self, key: Hashable) -> float | None:
        """Clock time the ejection ends, or None when not ejected."""
        record = self._records.get(key)
        if record is None or self._clock() >= record.ejected_until:
            return None
        return record.ejected_until

    def forget(self, key: Hashable) -> None:
        """Drop an endpoint that no longer exists."""
        self._records.pop(key, None)

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Forget every endpoint not in `keys` (call after an endpoint set update)."""
        keep = set(keys)
        for key in [k for k in self._records if k not in keep]:
            del self._records[key]
