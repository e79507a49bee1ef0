"""Lifecycle of the meshed pods on this node, as a pure state machine.

Inputs are facts (the control plane places a workload here, discovery found or
lost its namespace, a setup or teardown finished or failed, time passed); the
output is a list of actions for the node manager to carry out (set up capture
and listeners in a namespace, tear them down). No I/O and no clock of its own:
`now` comes with every event, so retries and backoff are testable.

States per pod (by workload uid):

    pending   -- the workload is ours but its namespace is not found yet
    capturing -- setup (capture rules + listeners) is in flight
    ready     -- captured, listeners open
    failed    -- setup failed; retried with backoff at `retry_at`
    removing  -- teardown in flight (listeners closing)
    held      -- captured, listeners closed: the pod's traffic is refused because
                 its workload record is gone or no longer matches the namespace

Fail closed: nothing here ever removes capture from a namespace that exists.
A pod whose record disappears, or whose record's addresses are not in its
namespace, goes to held: its capture stays, its listeners close, so its
connections are refused (never relayed in plaintext) until the record returns
and matches (set up again) or the pod is released explicitly (`Released`,
one of the two actions that remove capture) or its namespace is gone. The other
is `Unenrolled`: the user took the pod out of the mesh (a label), from any state. Losing a
control-plane record is an operator's mistake far more often than a real
departure, and the two cannot be told apart here.

Transitions are a table of (state, event kind) -> handler; a missing pair is a
programming error (LifecycleError), never silently ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace


class PodState(enum.Enum):
    PENDING = "pending"
    CAPTURING = "capturing"
    READY = "ready"
    FAILED = "failed"
    REMOVING = "removing"
    HELD = "held"


# Why a pod is held (shown as its last error).
NO_RECORD = "no workload record for this pod: its traffic is refused until one returns"


@dataclass(frozen=True, slots=True, kw_only=True)
class Netns:
    """A network namespace handle: a path to open and the inode that identifies it."""

    path: str
    inode: int


# Events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadPlaced:
    """The control plane says this workload runs on our node."""

    uid: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadGone:
    """The workload left our node (removed, or moved elsewhere)."""

    uid: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NetnsFound:
    """Discovery matched the workload's IPs to a namespace."""

    uid: str
    netns: Netns
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NetnsLost:
    """The namespace disappeared (pod deleted before its workload record)."""

    uid: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressMismatch:
    """The namespace's addresses were read and hold none of the workload's IPs."""

    uid: str
    reason: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Released:
    """An operator released a held pod: remove its capture and forget it."""

    uid: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Unenrolled:
    """The pod left the mesh on purpose (its namespace or pod label says so): remove its
    capture and forget it. Unlike a lost record, this is the user's decision."""

    uid: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SetupDone:
    uid: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SetupFailed:
    uid: str
    reason: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TeardownDone:
    uid: str
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TeardownFailed:
    uid: str
    reason: str
    now: float


Event = (
    WorkloadPlaced
    | WorkloadGone
    | NetnsFound
    | NetnsLost
    | AddressMismatch
    | Released
    | Unenrolled
    | SetupDone
    | SetupFailed
    | TeardownDone
    | TeardownFailed
)

# Actions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StartSetup:
    """Install capture in the namespace and open the pod's listeners."""

    uid: str
    netns: Netns
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTeardown:
    """Close the pod's listeners; with `remove_capture` (a release) also remove its
    capture, if the namespace still exists. Without it capture stays: refused, not leaked."""

    uid: str
    netns: Netns
    remove_capture: bool = False


Action = StartSetup | StartTeardown


class LifecycleError(RuntimeError):
    """An event arrived that the pod's state has no transition for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRecord:
    uid: str
    state: PodState
    netns: Netns | None = None
    attempts: int = 0
    last_error: str = ""
    retry_at: float | None = None
    since: float = 0.0
    # Work that must follow the operation in flight: forget the pod (its
    # namespace is gone, or it was released), hold it (why), or set it up again
    # in the namespace that now holds its IPs.
    remove_after: bool = False
    hold_reason: str = ""
    next_netns: Netns | None = None
    release_after: bool = False  # unenrolled meanwhile: the next teardown removes capture


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays: initial * factor**(attempt-1), capped."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        return float(min(self.cap, self.initial * self.factor ** max(0, attempt - 1)))


Handler = Callable[["PodLifecycle", PodRecord, Event], list[Action]]


@dataclass
class PodLifecycle:
    """All local pods' states; `handle` applies one event and returns the actions."""

    backoff: Backoff = field(default_factory=Backoff)
    pods: dict[str, PodRecord] = field(default_factory=dict)

    def handle(self, event: Event) -> list[Action]:
        record = self.pods.get(event.uid)
        if record is None:
            return self._on_unknown(event)
        handler = _TABLE.get((record.state, type(event)))
        if handler is None:
            raise LifecycleError(
                f"pod {event.uid}: no transition from {record.state.value} "
                f"on {type(event).__name__}"
            )
        return handler(self, record, event)

    def due_retries(self, now: float) -> list[Action]:
        """Restart setup for failed pods whose backoff has elapsed."""
        actions: list[Action] = []
        for rec in list(self.pods.values()):
            if rec.state is PodState.FAILED and rec.retry_at is not None and rec.retry_at <= now:
                actions.extend(self._start_setup(rec, now))
        return actions

    def next_retry_at(self) -> float | None:
        times = [r.retry_at for r in self.pods.values() if r.retry_at is not None]
        return min(times) if times else None

    def note_error(self, uid: str, text: str) -> None:
        """Show (or with "", clear) a problem of a ready pod that needs no transition,
        such as capture that drifted and was repaired."""
        rec = self.pods.get(uid)
        if rec is not None and rec.state is PodState.READY:
            self._set(rec, last_error=text)

    def hold_orphan(self, key: str, netns: Netns, reason: str, now: float) -> None:
        """Hold a namespace found captured that no workload record claims (a previous
        agent's pod whose record is gone): refused until released, gone or claimed."""
        if key not in self.pods:
            self.pods[key] = PodRecord(
                uid=key,
                state=PodState.HELD,
                netns=netns,
                last_error=reason,
                hold_reason=reason,
                since=now,
            )

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in PodState}
        for rec in self.pods.values():
            out[rec.state.value] += 1
        return out

    def all_settled(self) -> bool:
        """True when every pod is ready, held or has reported a failure (readiness)."""
        return all(
            r.state in (PodState.READY, PodState.FAILED, PodState.HELD) for r in self.pods.values()
        )

    # -- helpers ---------------------------------------------------------

    def _set(self, rec: PodRecord, **changes: object) -> PodRecord:
        new = replace(rec, **changes)  # type: ignore[arg-type]
        self.pods[rec.uid] = new
        return new

    def _start_setup(self, rec: PodRecord, now: float) -> list[Action]:
        assert rec.netns is not None
        rec = self._set(
            rec,
            state=PodState.CAPTURING,
            attempts=rec.attempts + 1,
            retry_at=None,
            since=now,
            hold_reason="",
        )
        return [StartSetup(uid=rec.uid, netns=rec.netns, attempt=rec.attempts)]  # type: ignore[arg-type]

    def _start_teardown(
        self,
        rec: PodRecord,
        now: float,
        *,
        next_netns: Netns | None = None,
        remove_after: bool = False,
        hold_reason: str = "",
        remove_capture: bool = False,
    ) -> list[Action]:
        assert rec.netns is not None
        self._set(
            rec,
            state=PodState.REMOVING,
            retry_at=None,
            since=now,
            next_netns=next_netns,
            remove_after=remove_after,
            hold_reason=hold_reason,
        )
        return [StartTeardown(uid=rec.uid, netns=rec.netns, remove_capture=remove_capture)]

    def _hold(self, rec: PodRecord, now: float, reason: str) -> None:
        """Listeners are closed (or never opened): the pod sits captured and refused."""
        self._set(
            rec,
            state=PodState.HELD,
            last_error=reason,
            hold_reason=reason,
            retry_at=None,
            since=now,
            next_netns=None,
            remove_after=False,
        )

    def _detach(self, rec: PodRecord, now: float) -> None:
        """Keep holding the namespace the pod leaves, under a key of its own: the
        workload's record now points elsewhere, but this namespace may still hold a
        live pod whose traffic must stay refused."""
        assert rec.netns is not None
        key = f"{rec.uid}@{rec.netns.inode}"
        reason = (
            f"workload {rec.uid} now matches another namespace; this one stays captured,"
            " its traffic refused, until it is released or gone"
        )
        self.hold_orphan(key, rec.netns, reason, now)

    def _on_unknown(self, event: Event) -> list[Action]:
        if isinstance(event, WorkloadPlaced):
            self.pods[event.uid] = PodRecord(uid=event.uid, state=PodState.PENDING, since=event.now)
            return []
        if isinstance(event, NetnsFound | AddressMismatch | Released):
            # Discovery can see a namespace before the workload record; it is
            # only acted on once the workload is placed here.
            return []
        if isinstance(event, WorkloadGone | NetnsLost | TeardownDone | TeardownFailed | Unenrolled):
            return []  # already gone: removal is idempotent
        raise LifecycleError(f"pod {event.uid}: {type(event).__name__} for an unknown pod")


# Transition handlers ----------------------------------------------------------


def _pending_found(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    assert isinstance(ev, NetnsFound)
    rec = lc._set(rec, netns=ev.netns, attempts=0)
    return lc._start_setup(rec, ev.now)


def _drop(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    del lc.pods[rec.uid]
    return []


def _ignore(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    return []


def _why(ev: Event) -> str:
    return ev.reason if isinstance(ev, AddressMismatch) else NO_RECORD


def _setup_done(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    if rec.release_after:
        return _release(lc, rec, ev)
    if rec.remove_after or rec.next_netns is not None or rec.hold_reason:
        return lc._start_teardown(
            rec,
            ev.now,
            next_netns=rec.next_netns,
            remove_after=rec.remove_after,
            hold_reason=rec.hold_reason,
        )
    lc._set(rec, state=PodState.READY, last_error="", since=ev.now)
    return []


def _setup_failed(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    assert isinstance(ev, SetupFailed)
    if rec.release_after:
        return _release(lc, rec, ev)
    if rec.remove_after or rec.next_netns is not None:
        # The adapter removes what it half-applied; teardown is idempotent anyway.
        return lc._start_teardown(
            rec, ev.now, next_netns=rec.next_netns, remove_after=rec.remove_after
        )
    if rec.hold_reason:
        lc._hold(rec, ev.now, rec.hold_reason)  # nothing is listening: held already
        return []
    lc._set(
        rec,
        state=PodState.FAILED,
        last_error=ev.reason,
        retry_at=ev.now + lc.backoff.delay(rec.attempts),
        since=ev.now,
    )
    return []


def _remove_when_done(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    lc._set(rec, remove_after=True)
    return []


def _hold_when_done(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    lc._set(rec, hold_reason=_why(ev))
    return []


def _hold_now(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    """A failed pod has no listeners open: it is held as soon as it is told."""
    lc._hold(rec, ev.now, _why(ev))
    return []


def _ready_hold(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    return lc._start_teardown(rec, ev.now, hold_reason=_why(ev))


def _ready_lost(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    return lc._start_teardown(rec, ev.now, remove_after=True)


def _capturing_found(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    assert isinstance(ev, NetnsFound)
    if rec.netns != ev.netns:
        # A new namespace now holds the pod's IPs (the pod was recreated): once
        # the current attempt finishes, tear it down and set up in the new one.
        lc._set(rec, next_netns=ev.netns)
    return []


def _ready_found(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    assert isinstance(ev, NetnsFound)
    if rec.netns == ev.netns:
        return []
    return lc._start_teardown(rec, ev.now, next_netns=ev.netns)


def _failed_found(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    assert isinstance(ev, NetnsFound)
    rec = lc._set(rec, netns=ev.netns, attempts=0)
    return lc._start_setup(rec, ev.now)


def _failed_lost(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    lc._set(rec, state=PodState.PENDING, netns=None, retry_at=None, since=ev.now)
    return []


def _teardown_finished(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    if isinstance(ev, TeardownFailed):
        rec = lc._set(rec, last_error=ev.reason)
    if rec.release_after:
        # Unenrolled while a teardown that kept capture ran: remove it now (idempotent).
        return _release(lc, rec, ev)
    if rec.remove_after:
        del lc.pods[rec.uid]
        return []
    if rec.next_netns is not None:
        assert rec.netns is not None
        if rec.next_netns.inode != rec.netns.inode:
            lc._detach(rec, ev.now)
        rec = lc._set(rec, netns=rec.next_netns, next_netns=None, attempts=0)
        return lc._start_setup(rec, ev.now)
    lc._hold(rec, ev.now, rec.hold_reason or NO_RECORD)
    return []


def _removing_gone(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    if not rec.remove_after:
        # A move is called off: the namespace being left is held, not released.
        lc._set(rec, next_netns=None, hold_reason=NO_RECORD)
    return []


def _removing_found(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    assert isinstance(ev, NetnsFound)
    if not rec.remove_after and (rec.netns != ev.netns or rec.hold_reason):
        lc._set(rec, next_netns=ev.netns)
    return []


def _removing_mismatch(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    assert isinstance(ev, AddressMismatch)
    if rec.hold_reason:
        lc._set(rec, hold_reason=ev.reason)
    return []


def _held_gone(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    lc._set(rec, last_error=_why(ev), hold_reason=_why(ev))
    return []


def _held_found(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    """The record is back and matches a namespace: serve the pod again."""
    assert isinstance(ev, NetnsFound) and rec.netns is not None
    if rec.netns.inode != ev.netns.inode:
        lc._detach(rec, ev.now)
    rec = lc._set(rec, netns=ev.netns, attempts=0, last_error="")
    return lc._start_setup(rec, ev.now)


def _held_released(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    return lc._start_teardown(rec, ev.now, remove_after=True, remove_capture=True)


def _release(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    """Remove capture and forget the pod (unenrolled); with no namespace, just forget."""
    if rec.netns is None:
        del lc.pods[rec.uid]
        return []
    rec = lc._set(rec, release_after=False)
    return lc._start_teardown(rec, ev.now, remove_after=True, remove_capture=True)


def _release_when_done(lc: PodLifecycle, rec: PodRecord, ev: Event) -> list[Action]:
    lc._set(rec, release_after=True, next_netns=None)
    return []


S = PodState
_TABLE: dict[tuple[PodState, type], Handler] = {
    (S.PENDING, WorkloadPlaced): _ignore,
    (S.PENDING, NetnsFound): _pending_found,
    (S.PENDING, NetnsLost): _ignore,
    (S.PENDING, WorkloadGone): _drop,
    (S.PENDING, AddressMismatch): _ignore,
    (S.PENDING, Released): _ignore,
    (S.CAPTURING, WorkloadPlaced): _ignore,
    (S.CAPTURING, NetnsFound): _capturing_found,
    (S.CAPTURING, NetnsLost): _remove_when_done,
    (S.CAPTURING, WorkloadGone): _hold_when_done,
    (S.CAPTURING, AddressMismatch): _hold_when_done,
    (S.CAPTURING, Released): _ignore,
    (S.CAPTURING, SetupDone): _setup_done,
    (S.CAPTURING, SetupFailed): _setup_failed,
    (S.READY, WorkloadPlaced): _ignore,
    (S.READY, NetnsFound): _ready_found,
    (S.READY, NetnsLost): _ready_lost,
    (S.READY, WorkloadGone): _ready_hold,
    (S.READY, AddressMismatch): _ready_hold,
    (S.READY, Released): _ignore,
    (S.FAILED, WorkloadPlaced): _ignore,
    (S.FAILED, NetnsFound): _failed_found,
    (S.FAILED, NetnsLost): _failed_lost,
    (S.FAILED, WorkloadGone): _hold_now,
    (S.FAILED, AddressMismatch): _hold_now,
    (S.FAILED, Released): _ignore,
    (S.REMOVING, WorkloadPlaced): _ignore,
    (S.REMOVING, WorkloadGone): _removing_gone,
    (S.REMOVING, NetnsFound): _removing_found,
    (S.REMOVING, NetnsLost): _remove_when_done,
    (S.REMOVING, AddressMismatch): _removing_mismatch,
    (S.REMOVING, Released): _ignore,
    (S.REMOVING, TeardownDone): _teardown_finished,
    (S.REMOVING, TeardownFailed): _teardown_finished,
    (S.HELD, WorkloadPlaced): _ignore,
    (S.HELD, WorkloadGone): _held_gone,
    (S.HELD, AddressMismatch): _held_gone,
    (S.HELD, NetnsFound): _held_found,
    (S.HELD, NetnsLost): _drop,
    (S.HELD, Released): _held_released,
    (S.PENDING, Unenrolled): _drop,
    (S.CAPTURING, Unenrolled): _release_when_done,
    (S.READY, Unenrolled): _release,
    (S.FAILED, Unenrolled): _release,
    (S.REMOVING, Unenrolled): _release_when_done,
    (S.HELD, Unenrolled): _release,
}


def replay(lifecycle: PodLifecycle, events: Iterable[Event]) -> list[Action]:
    """Apply events in order and collect every action (for tests and tools)."""
    out: list[Action] = []
    for ev in events:
        out.extend(lifecycle.handle(ev))
    return out
