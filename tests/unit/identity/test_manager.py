"""CertificateManager and its planner with an injected clock: prefetch, half-life
refresh, backoff, keeping the old certificate until expiry, release, in-flight bound."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.identity import csr
from nodeagent.identity.manager import (
    BACKOFF_CAP,
    CertificateManager,
    CertificatePlanner,
    CertificateUnavailable,
    CertState,
)
from nodeagent.model.identity import Identity

T0 = 1_800_000_000.0
ALICE = Identity("cluster.local", "ns1", "alice")
BOB = Identity("cluster.local", "ns1", "bob")


class FakeTime:
    """A clock and a sleep the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + delay, fut)
        self._sleepers.append(entry)
        try:
            await fut
        finally:
            self._sleepers.remove(entry)

    async def advance(self, seconds: float) -> None:
        await settle()
        self.now += seconds
        for at, fut in list(self._sleepers):
            if at <= self.now and not fut.done():
                fut.set_result(None)
        await settle()


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


class FakeCa:
    """Issues real certificates from a real CA at the fake time; can fail or hold."""

    def __init__(self, clock: FakeTime, ttl: float = 100.0) -> None:
        # No skew: these scenarios check refresh and expiry to the second of the fake clock.
        self.ca = CertificateAuthority.create("cluster.local", clock=clock, not_before_skew=0)
        self.clock = clock
        self.ttl = ttl
        self.fail: str = ""
        self.gate: asyncio.Event | None = None
        self.calls: list[tuple[float, Identity]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def fetch(self, identity: Identity) -> csr.WorkloadCertificate:
        self.calls.append((self.clock.now, identity))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail:
                raise RuntimeError(self.fail)
            return issue(self.ca, identity, self.ttl, self.clock.now)
        finally:
            self.in_flight -= 1


def issue(ca: CertificateAuthority, identity: Identity, ttl: float, now: float):
    key = csr.generate_key()
    return csr.check_chain(ca.sign(csr.build_csr(key, identity), ttl), identity, key, now)


@contextlib.asynccontextmanager
async def running(manager: CertificateManager):
    task = asyncio.create_task(manager.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make(time: FakeTime, ca: FakeCa, **kw) -> CertificateManager:
    # rand=0.5: backoff delays carry no jitter; refreshes come 2.5% of the lifetime
    # before half-life. Tests that need exact half-life pass rand=0.
    kw.setdefault("rand", lambda: 0.5)
    return CertificateManager(ca, clock=time, sleep=time.sleep, **kw)


async def test_certificate_is_fetched_when_first_workload_appears() -> None:
    time = FakeTime()
    ca = FakeCa(time)
    manager = make(time, ca)
    async with running(manager):
        assert manager.status() == []
        manager.add_workload_identity(ALICE)
        assert manager.expiries() == {}  # no certificate yet: no expiry to report
        cert = await asyncio.wait_for(manager.wait_for(ALICE), 5)
        assert cert.identity == ALICE
        assert csr.uri_sans(cert.leaf) == [str(ALICE)]
        [status] = manager.status()
        assert status.state is CertState.AVAILABLE
        assert status.chain[0].serial == f"{cert.serial:x}"
        assert manager.expiries() == {str(ALICE): status.chain[0].not_after}
        assert status.roots[0].serial == f"{ca.ca.root_cert.serial_number:x}"
        assert len(ca.calls) == 1
        dump = status.to_json()
        assert dump["identity"] == "spiffe://cluster.local/ns/ns1/sa/alice"
        assert dump["state"] == "Available"
        assert dump["certChain"][0]["validFrom"] == "2027-01-15T08:00:00Z"


async def test_refresh_happens_at_half_life() -> None:
    time = FakeTime()
    ca = FakeCa(time, ttl=100)
    manager = make(time, ca, rand=lambda: 0.0)
    async with running(manager):
        manager.add_workload_identity(ALICE)
        await settle()
        first = manager.certificate(ALICE)
        assert first is not None and first.half_life == T0 + 50
        await time.advance(49.5)
        assert len(ca.calls) == 1
        await time.advance(0.5)
        assert [t for t, _ in ca.calls] == [T0, T0 + 50]
        second = manager.certificate(ALICE)
        assert second is not None and second.serial != first.serial


def test_refresh_jitter_only_moves_refresh_earlier_by_a_little() -> None:
    time = FakeTime()
    ca = FakeCa(time)
    planner = CertificatePlanner(random=lambda: 1.0)
    planner.add(ALICE, T0)
    assert planner.start_due(T0) == [ALICE]
    cert = issue(ca.ca, ALICE, 100, T0)
    planner.fetched(ALICE, cert, T0)
    assert planner.next_wakeup() == pytest.approx(T0 + 50 - 5)


async def test_ca_errors_are_retried_with_exponential_backoff() -> None:
    time = FakeTime()
    ca = FakeCa(time)
    ca.fail = "CA down"
    manager = make(time, ca)
    async with running(manager):
        manager.add_workload_identity(ALICE)
        await settle()
        [status] = manager.status()
        assert status.state is CertState.UNAVAILABLE and "CA down" in status.error
        with pytest.raises(CertificateUnavailable, match="CA down"):
            await manager.wait_for(ALICE)
        for _ in range(40):
            await time.advance(0.25)
        # 1 s, then 2 s, then 4 s, then 8 s (rand=0.5: no jitter).
        assert [t - T0 for t, _ in ca.calls] == [0, 1, 3, 7]
        ca.fail = ""
        await time.advance(8)
        assert manager.certificate(ALICE) is not None
        assert manager.status()[0].error == ""


def test_backoff_is_jittered_and_capped() -> None:
    low = CertificatePlanner(random=lambda: 0.0)
    high = CertificatePlanner(random=lambda: 1.0)
    assert low.backoff_delay(0) == pytest.approx(0.8)
    assert high.backoff_delay(0) == pytest.approx(1.2)
    assert high.backoff_delay(3) == pytest.approx(9.6)
    assert high.backoff_delay(30) == BACKOFF_CAP
    assert low.backoff_delay(30) == pytest.approx(BACKOFF_CAP * 0.8)


async def test_old_certificate_is_kept_until_it_expires_then_dropped() -> None:
    time = FakeTime()
    ca = FakeCa(time, ttl=100)
    manager = make(time, ca)
    async with running(manager):
        manager.add_workload_identity(ALICE)
        await settle()
        old = manager.certificate(ALICE)
        assert old is not None
        ca.fail = "CA unreachable"
        await time.advance(50)  # refresh due, fails
        assert len(ca.calls) == 2
        await time.advance(49.9)
        assert manager.certificate(ALICE) is old
        [status] = manager.status()
        assert status.state is CertState.AVAILABLE and "CA unreachable" in status.error
        await time.advance(0.2)
        assert manager.certificate(ALICE) is None
        [status] = manager.status()
        assert status.state is CertState.UNAVAILABLE
        assert status.chain == ()
        assert "CA unreachable" in status.error


async def test_certificate_is_released_when_no_workload_uses_it() -> None:
    time = FakeTime()
    ca = FakeCa(time, ttl=100)
    manager = make(time, ca)
    async with running(manager):
        manager.add_workload_identity(ALICE)
        manager.add_workload_identity(ALICE)
        await settle()
        assert len(ca.calls) == 1  # one certificate per identity, not per pod
        manager.remove_workload_identity(ALICE)
        await settle()
        assert manager.certificate(ALICE) is not None
        manager.remove_workload_identity(ALICE)
        await settle()
        assert manager.certificate(ALICE) is None
        assert manager.status() == []
        await time.advance(200)
        assert len(ca.calls) == 1  # no refresh for a released identity


async def test_release_during_fetch_drops_the_result() -> None:
    time = FakeTime()
    ca = FakeCa(time)
    ca.gate = asyncio.Event()
    manager = make(time, ca)
    async with running(manager):
        manager.add_workload_identity(ALICE)
        await settle()
        manager.remove_workload_identity(ALICE)
        ca.gate.set()
        await settle()
        assert manager.certificate(ALICE) is None
        assert manager.status() == []


async def test_requests_in_flight_are_bounded() -> None:
    time = FakeTime()
    ca = FakeCa(time)
    ca.gate = asyncio.Event()
    manager = make(time, ca, max_in_flight=2)
    idents = [Identity("cluster.local", "ns", f"sa{i}") for i in range(5)]
    async with running(manager):
        for ident in idents:
            manager.add_workload_identity(ident)
        await settle()
        assert ca.in_flight == 2
        assert manager.planner.in_flight == 2
        ca.gate.set()
        for _ in range(5):
            await settle()
        assert ca.max_in_flight == 2
        assert len(ca.calls) == 5
        assert all(manager.certificate(i) is not None for i in idents)


def test_identities_without_a_certificate_are_fetched_first() -> None:
    time = FakeTime()
    ca = FakeCa(time)
    planner = CertificatePlanner(max_in_flight=1, random=lambda: 0.0)
    planner.add(ALICE, T0)
    assert planner.start_due(T0) == [ALICE]
    planner.fetched(ALICE, issue(ca.ca, ALICE, 10, T0), T0)
    planner.add(BOB, T0 + 6)
    # Both due at T0+6 (ALICE's refresh at T0+5), but BOB has nothing yet.
    assert planner.start_due(T0 + 6) == [BOB]
    assert planner.start_due(T0 + 6) == []
    planner.failed(BOB, "x", T0 + 6)
    assert planner.start_due(T0 + 6) == [ALICE]


def test_planner_refuses_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        CertificatePlanner(max_in_flight=0)


def test_a_certificate_already_past_half_life_is_not_refetched_at_once() -> None:
    time = FakeTime()
    ca = FakeCa(time)
    planner = CertificatePlanner(random=lambda: 0.0)
    planner.add(ALICE, T0 + 80)
    assert planner.start_due(T0 + 80) == [ALICE]
    # Issued at T0 for 100 s (a CA clock 80 s behind): half-life is already past.
    planner.fetched(ALICE, issue(ca.ca, ALICE, 100, T0), T0 + 80)
    assert planner.next_wakeup() == T0 + 81
