"""One certificate per local workload identity: prefetch, rotation, retry, release.

`CertificatePlanner` is the decision logic with no I/O and no awaits: it takes
the time as an argument and says which identities to fetch now and when to
wake next. `CertificateManager` is the thin asyncio driver around it: it runs
the fetches (at most `max_in_flight` at once), sleeps until the next wake-up,
and lets the proxy wait for a certificate.

Rules (as ztunnel's SecretManager):

* a certificate is fetched as soon as the first local workload with its
  identity appears, and released when the last one goes;
* it is refreshed at half-life, `not_before + (not_after - not_before) / 2`,
  minus a small random jitter so many identities do not all renew at once;
* after a CA error the fetch is retried with exponential backoff (1 s, x2,
  +-20% jitter, capped at 150 s); a still-valid old certificate stays in use
  until it expires, then the identity is Unavailable with the error.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509

from nodeagent.identity.csr import WorkloadCertificate
from nodeagent.model.identity import Identity

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 8
BACKOFF_INITIAL = 1.0
BACKOFF_FACTOR = 2.0
BACKOFF_JITTER = 0.2
BACKOFF_CAP = 150.0
# Refresh up to this fraction of the lifetime before half-life.
REFRESH_JITTER = 0.05
# Never refresh sooner than this after a success, so a CA whose clock runs
# behind (half-life already past on arrival) cannot make us spin.
MIN_REFRESH_DELAY = 1.0


class CertState(enum.Enum):
    INITIALIZING = "Initializing"
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"


@dataclass(frozen=True, slots=True)
class CertInfo:
    serial: str  # hex
    not_before: float  # epoch seconds
    not_after: float

    def to_json(self) -> dict[str, str]:
        return {
            "serialNumber": self.serial,
            "validFrom": _iso(self.not_before),
            "expirationTime": _iso(self.not_after),
        }


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class CertificateStatus:
    """What /config_dump shows for one identity."""

    identity: Identity
    state: CertState
    error: str
    chain: tuple[CertInfo, ...]
    roots: tuple[CertInfo, ...]
    refs: int
    next_fetch_at: float | None

    def to_json(self) -> dict[str, object]:
        """The shape of one entry in ztunnel's /config_dump `certificates`."""
        return {
            "identity": str(self.identity),
            "state": self.state.value,
            "error": self.error,
            "certChain": [c.to_json() for c in self.chain],
            "rootCerts": [c.to_json() for c in self.roots],
            "workloads": self.refs,
            "nextFetch": _iso(self.next_fetch_at) if self.next_fetch_at is not None else None,
        }


@dataclass(slots=True)
class _Entry:
    refs: int = 0
    cert: WorkloadCertificate | None = None
    error: str = ""
    due_at: float | None = 0.0  # None while a fetch is in flight
    failures: int = 0
    in_flight: bool = False


@dataclass(slots=True)
class CertificatePlanner:
    """Per-identity certificate bookkeeping; every method takes `now`, none does I/O."""

    max_in_flight: int = MAX_IN_FLIGHT
    random: Callable[[], float] = random.random
    backoff_initial: float = BACKOFF_INITIAL
    backoff_cap: float = BACKOFF_CAP
    _entries: dict[Identity, _Entry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")

    # -- workload references

    def add(self, identity: Identity, now: float) -> None:
        """A local workload with `identity` appeared; fetch at once if it is new."""
        entry = self._entries.setdefault(identity, _Entry())
        entry.refs += 1
        if entry.refs == 1 and not entry.in_flight and entry.cert is None:
            entry.due_at = now

    def remove(self, identity: Identity) -> bool:
        """A workload went away; True if that released the identity's certificate."""
        entry = self._entries.get(identity)
        if entry is None or entry.refs == 0:
            return False
        entry.refs -= 1
        if entry.refs > 0:
            return False
        if entry.in_flight:
            # Forget the certificate now; the fetch result is dropped when it lands.
            entry.cert = None
        else:
            del self._entries[identity]
        return True

    # -- fetches

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self._entries.values())

    def start_due(self, now: float) -> list[Identity]:
        """Identities to fetch now (marked in flight), at most the free in-flight slots.

        Identities with no usable certificate go first, then earliest due.
        """
        free = self.max_in_flight - self.in_flight
        due = [
            (e.cert is not None and not e.cert.expired(now), e.due_at, ident)
            for ident, e in self._entries.items()
            if e.refs > 0 and not e.in_flight and e.due_at is not None and e.due_at <= now
        ]
        due.sort(key=lambda t: (t[0], t[1]))
        started = [ident for _, _, ident in due[: max(0, free)]]
        for ident in started:
            entry = self._entries[ident]
            entry.in_flight = True
            entry.due_at = None
        return started

    def fetched(self, identity: Identity, cert: WorkloadCertificate, now: float) -> None:
        """A fetch succeeded: use the new certificate, schedule its refresh."""
        entry = self._finish(identity)
        if entry is None:
            return
        entry.cert = cert
        entry.error = ""
        entry.failures = 0
        lifetime = max(0.0, cert.not_after - cert.not_before)
        entry.due_at = max(
            now + MIN_REFRESH_DELAY,
            cert.half_life - self.random() * REFRESH_JITTER * lifetime,
        )

    def failed(self, identity: Identity, error: str, now: float) -> float | None:
        """A fetch failed: keep any old certificate, retry after backoff; returns the delay."""
        entry = self._finish(identity)
        if entry is None:
            return None
        entry.error = error
        delay = self.backoff_delay(entry.failures)
        entry.failures += 1
        entry.due_at = now + delay
        return delay

    def backoff_delay(self, failures: int) -> float:
        """initial * 2^failures, +-20% jitter, capped."""
        base = min(self.backoff_cap, self.backoff_initial * BACKOFF_FACTOR**failures)
        jittered = base * (1 + BACKOFF_JITTER * (2 * self.random() - 1))
        return min(self.backoff_cap, jittered)

    def _finish(self, identity: Identity) -> _Entry | None:
        entry = self._entries.get(identity)
        if entry is None:
            return None
        entry.in_flight = False
        if entry.refs == 0:
            del self._entries[identity]
            return None
        return entry

    # -- time

    def expire(self, now: float) -> list[Identity]:
        """Drop certificates that have expired; returns whose."""
        dropped = []
        for ident, entry in self._entries.items():
            if entry.cert is not None and entry.cert.expired(now):
                entry.cert = None
                if not entry.error:
                    entry.error = "certificate expired before it could be renewed"
                dropped.append(ident)
        return dropped

    def next_wakeup(self) -> float | None:
        """The earliest time something is due (a fetch or an expiry), or None."""
        times = []
        for entry in self._entries.values():
            if entry.refs > 0 and not entry.in_flight and entry.due_at is not None:
                times.append(entry.due_at)
            if entry.cert is not None:
                times.append(entry.cert.not_after)
        return min(times, default=None)

    # -- reading

    def certificate(self, identity: Identity, now: float) -> WorkloadCertificate | None:
        """The identity's certificate if it holds a valid one at `now`."""
        entry = self._entries.get(identity)
        if entry is None or entry.refs == 0 or entry.cert is None or entry.cert.expired(now):
            return None
        return entry.cert

    def error(self, identity: Identity) -> str:
        entry = self._entries.get(identity)
        return entry.error if entry is not None else ""

    def identities(self) -> list[Identity]:
        return sorted(i for i, e in self._entries.items() if e.refs > 0)

    def status(self, now: float) -> list[CertificateStatus]:
        out = []
        for ident in self.identities():
            entry = self._entries[ident]
            cert = self.certificate(ident, now)
            if cert is not None:
                state = CertState.AVAILABLE
            elif entry.error:
                state = CertState.UNAVAILABLE
            else:
                state = CertState.INITIALIZING
            out.append(
                CertificateStatus(
                    identity=ident,
                    state=state,
                    error=entry.error,
                    chain=tuple(_info(c) for c in cert.chain) if cert else (),
                    roots=tuple(_info(c) for c in cert.roots) if cert else (),
                    refs=entry.refs,
                    next_fetch_at=entry.due_at,
                )
            )
        return out


def _info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        serial=f"{cert.serial_number:x}",
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


class CertificateFetcher(Protocol):
    async def fetch(self, identity: Identity) -> WorkloadCertificate: ...


class CertificateUnavailable(Exception):
    """No valid certificate for an identity (still initializing, or the CA is failing)."""


class CertificateManager:
    """Drives a CertificatePlanner: runs fetches, sleeps until the next due time."""

    def __init__(
        self,
        fetcher: CertificateFetcher,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._fetcher = fetcher
        self._clock = clock
        self._sleep = sleep
        self.planner = CertificatePlanner(max_in_flight=max_in_flight, random=rand)
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._fetches: set[asyncio.Task[None]] = set()

    # -- workload references (called by the node lifecycle)

    def add_workload_identity(self, identity: Identity) -> None:
        self.planner.add(identity, self._clock())
        self._wake.set()

    def remove_workload_identity(self, identity: Identity) -> None:
        if self.planner.remove(identity):
            log.info("released certificate for %s", identity)
        self._wake.set()

    # -- reading (called by the proxy and admin)

    def certificate(self, identity: Identity) -> WorkloadCertificate | None:
        return self.planner.certificate(identity, self._clock())

    async def wait_for(self, identity: Identity) -> WorkloadCertificate:
        """The identity's certificate, waiting for the first fetch to finish.

        Raises CertificateUnavailable if there is none and the last fetch failed.
        Callers bound the wait with `asyncio.timeout`.
        """

        def ready() -> bool:
            return self.certificate(identity) is not None or bool(self.planner.error(identity))

        async with self._changed:
            await self._changed.wait_for(ready)
        cert = self.certificate(identity)
        if cert is None:
            raise CertificateUnavailable(
                f"no certificate for {identity}: {self.planner.error(identity)}"
            )
        return cert

    def status(self) -> list[CertificateStatus]:
        return self.planner.status(self._clock())

    def expiries(self) -> dict[str, float]:
        """notAfter (unix seconds) of the leaf held for each identity that has one, for
        the expiry gauge; identities still waiting for their first certificate are absent."""
        return {str(s.identity): s.chain[0].not_after for s in self.status() if s.chain}

    # -- driver

    async def run(self) -> None:
        """Fetch and rotate until cancelled; cancels fetches in flight on the way out."""
        try:
            while True:
                self._wake.clear()
                now = self._clock()
                if self.planner.expire(now):
                    await self._notify()
                for identity in self.planner.start_due(now):
                    task = asyncio.create_task(self._fetch(identity), name=f"cert-{identity}")
                    self._fetches.add(task)
                    task.add_done_callback(self._fetches.discard)
                await self._idle(self.planner.next_wakeup())
        finally:
            for task in list(self._fetches):
                task.cancel()
            await asyncio.gather(*self._fetches, return_exceptions=True)

    async def _idle(self, until: float | None) -> None:
        waiter = asyncio.create_task(self._wake.wait())
        tasks: set[asyncio.Task[Any]] = {waiter}
        if until is not None:
            delay = max(0.0, until - self._clock())
            tasks.add(asyncio.create_task(self._sleep_for(delay)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sleep_for(self, delay: float) -> None:
        await self._sleep(delay)

    async def _fetch(self, identity: Identity) -> None:
        try:
            cert = await self._fetcher.fetch(identity)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            delay = self.planner.failed(identity, str(e), self._clock())
            log.warning(
                "certificate fetch for %s failed (retry in %.1fs): %s", identity, delay or 0, e
            )
        else:
            self.planner.fetched(identity, cert, self._clock())
            log.info("certificate for %s issued, serial %x", identity, cert.serial)
        self._wake.set()
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
