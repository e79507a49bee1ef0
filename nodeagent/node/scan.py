"""What one namespace scan means for the local pods, as a pure decision.

The node manager scans the node's network namespaces (discovery matches the local
workloads' IPs to them), checks whether the namespaces of the pods it did not
match still exist, and hands the result here with the lifecycle's records. Out
come the lifecycle events to dispatch and the notices to log: no I/O, no clock.

Fail closed is decided here: a pod whose namespace is there and was read, but
holds none of its record's addresses, is held (`AddressMismatch`), never torn
down; one whose namespace could not be read is left as it is; only a namespace
that is gone is `NetnsLost`.

When to scan is decided here too (`ScanSchedule`): at once after a state change,
a few milliseconds after a namespace appears or goes (events coalesced), then a
few follow-ups while a local workload is still unmatched (a fresh namespace gets
its interface and address from the CNI plugins after it appears), and every
`interval` seconds whatever happens, the safety net for anything no event tells.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nodeagent.node.lifecycle import (
    AddressMismatch,
    Event,
    Netns,
    NetnsFound,
    NetnsLost,
    PodRecord,
    PodState,
)

_LOOPBACK = frozenset({"127.0.0.1", "::1"})


def mismatch_reason(wanted: Iterable[str], path: str, addresses: Iterable[str]) -> str | None:
    """Why the namespace at `path` is not the workload's (None when it holds one of
    the `wanted` addresses): its listeners are only ever bound where it is."""
    held = {str(ipaddress.ip_address(a)) for a in addresses if a}
    wanted = [str(ipaddress.ip_address(a)) for a in wanted]
    if any(a in held for a in wanted):
        return None
    has = ", ".join(sorted(held - _LOOPBACK)) or "no address"
    return (
        f"workload address {', '.join(wanted) or '(none)'} is not in its namespace {path}"
        f" (which has {has}); its traffic is refused"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanView:
    """What one scan saw."""

    matches: Mapping[str, int]  # workload uid -> namespace inode
    paths: Mapping[int, str]  # matched inode -> a path to it
    conflicts: Mapping[str, tuple[int, ...]]  # uid -> every namespace holding one of its IPs
    addresses: Mapping[int, frozenset[str]]  # every namespace whose addresses were read
    present: frozenset[str] = frozenset()  # unmatched pods whose namespace still exists
    absent: frozenset[str] = frozenset()  # unmatched pods whose namespace is gone


@dataclass(frozen=True, slots=True, kw_only=True)
class Conflict:
    """The pod's IPs are in several namespaces: waiting rather than guessing."""

    uid: str
    inodes: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Unreadable:
    """The pod's namespace exists but its addresses could not be read: capture stays."""

    uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Mismatch:
    uid: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrphanReleased:
    """A held pod without a record is forgotten: `claimed` by a workload again, or gone."""

    uid: str
    path: str
    claimed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Matched:
    """The pod's namespace was found: any earlier notice about it no longer holds."""

    uid: str


Notice = Conflict | Unreadable | Mismatch | OrphanReleased | Matched


@dataclass(slots=True)
class ScanDecision:
    events: list[Event] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)


def decide(
    pods: Mapping[str, PodRecord],
    workloads: Mapping[str, tuple[str, ...]],
    view: ScanView,
    now: float,
) -> ScanDecision:
    """The events for `pods` (the lifecycle's records) given the local `workloads`
    (uid -> addresses) and what the scan saw."""
    out = ScanDecision()
    for uid, wanted in workloads.items():
        rec = pods.get(uid)
        if rec is not None:
            _decide_placed(out, rec, wanted, view, now)
    owned = set(view.matches.values())
    for key, rec in pods.items():
        if key in workloads or rec.state is not PodState.HELD or rec.netns is None:
            continue
        claimed = rec.netns.inode in owned
        if claimed or key in view.absent:
            out.notices.append(OrphanReleased(uid=key, path=rec.netns.path, claimed=claimed))
            out.events.append(NetnsLost(uid=key, now=now))
    return out


def _decide_placed(
    out: ScanDecision, rec: PodRecord, wanted: tuple[str, ...], view: ScanView, now: float
) -> None:
    uid = rec.uid
    inode = view.matches.get(uid)
    current = rec.next_netns or rec.netns
    if inode is not None:
        out.notices.append(Matched(uid=uid))
        # Compare inodes, not paths: one namespace can be seen under several paths
        # (a bind mount, any of its processes). A held pod whose record matches
        # again is served again.
        if (
            rec.state in (PodState.PENDING, PodState.HELD)
            or current is None
            or current.inode != inode
        ):
            netns = Netns(path=view.paths[inode], inode=inode)
            out.events.append(NetnsFound(uid=uid, netns=netns, now=now))
    elif uid in view.conflicts:
        out.notices.append(Conflict(uid=uid, inodes=view.conflicts[uid]))
    elif uid in view.present and current is not None and current.inode in view.addresses:
        # The namespace is there and was read, and holds none of the record's
        # addresses: the record is wrong (or moved). Refuse, never relay.
        reason = mismatch_reason(wanted, current.path, view.addresses[current.inode])
        if reason is not None and rec.hold_reason != reason:
            out.notices.append(Mismatch(uid=uid, reason=reason))
            out.events.append(AddressMismatch(uid=uid, reason=reason, now=now))
    elif uid in view.present:
        # Its namespace is still there: the scan could not read its addresses this
        # time. Tearing down would uncapture a live pod (fail open); wait a scan.
        out.notices.append(Unreadable(uid=uid))
    elif rec.state in (PodState.READY, PodState.FAILED, PodState.HELD) or (
        rec.state is PodState.CAPTURING and not rec.remove_after
    ):
        out.events.append(NetnsLost(uid=uid, now=now))


# -- when to scan ------------------------------------------------------------------


SCAN_DEBOUNCE = 0.005
SCAN_FOLLOW_UPS = (0.01, 0.03, 0.06, 0.1, 0.2, 0.3, 0.5)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanTiming:
    interval: float = 1.0
    """Seconds between scans whatever happens: the safety net."""
    debounce: float = SCAN_DEBOUNCE
    """Seconds a namespace event waits for the ones that come with it (a pod's
    namespace file appears, then is mounted; many pods start at once)."""
    follow_ups: tuple[float, ...] = SCAN_FOLLOW_UPS
    """Seconds after a namespace event at which to scan again while a local
    workload is unmatched: the namespace appears before the CNI plugins give it an
    interface and an address (ms in the sandbox, tens to hundreds in a cluster)."""


class ScanSchedule:
    """When the next namespace scan is due. Times are given, never read."""

    def __init__(self, timing: ScanTiming) -> None:
        self._timing = timing
        self._due = 0.0  # an asked-for scan (the first one at once)
        self._periodic_at = 0.0
        self._follow_ups: list[float] = []  # after the latest namespace event
        self._waiting = False  # the latest scan left a local workload unmatched

    def request(self, now: float) -> None:
        """Scan now (a state change, a CNI ADD or DEL)."""
        self._due = min(self._due, now)

    def namespace_changed(self, now: float) -> None:
        """A namespace appeared or went: scan shortly, then follow up."""
        self._due = min(self._due, now + self._timing.debounce)
        self._follow_ups = [now + delay for delay in self._timing.follow_ups]

    def next_at(self) -> float:
        follow_up = self._follow_ups[0] if self._waiting and self._follow_ups else math.inf
        return min(self._due, self._periodic_at, follow_up)

    def due(self, now: float) -> bool:
        return now >= self.next_at()

    def scan_started(self, now: float) -> None:
        """A scan begins: what it answers is no longer due. What is asked for from
        now on is, even before this scan ends (it may have listed too early)."""
        if self._due <= now:
            self._due = math.inf
        self._periodic_at = now + self._timing.interval
        self._follow_ups = [t for t in self._follow_ups if t > now]

    def scan_done(self, *, waiting: bool) -> None:
        """`waiting`: the scan left a local workload unmatched (follow-ups apply)."""
        self._waiting = waiting
