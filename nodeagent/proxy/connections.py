"""The registry of live proxied connections: for policy re-checks, admin and metrics.

Every connection the proxy carries is registered with what it is (workload,
direction, addresses, protocol, identities) and a way to end it (its relay, or
its task before the relay exists). Inbound connections also carry the
`ConnectionAttributes` they were authorized with.

`ConnectionRegistry.watch(store)` subscribes to the state change feed: after a
batch that changed policies (or workloads, whose selector policy lists may have
changed) every live inbound connection is authorized again with the current
policies (`PolicyChecker.recheck`), and those now denied are reset and logged
as "connection closed due to policy change: ...", as ztunnel does.

A `ConnectionObserver` (metrics and access logs, built by the composition
root) hears of every connection when it is registered and when it is removed,
and `ObservedPolicyChecker` tells it of every authorization decision, so
refused connections (which never get registered) are counted too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from nodeagent.model.identity import Identity
from nodeagent.model.policy import Authorization, ConnectionAttributes
from nodeagent.policy.checker import H, PolicyChecker, PolicyLookup, Revocation
from nodeagent.policy.engine import Decision, evaluate
from nodeagent.proxy.relay import Relay
from nodeagent.state.store import StateChange, StateStore

log = logging.getLogger(__name__)

INBOUND = "inbound"
OUTBOUND = "outbound"
HBONE = "HBONE"
TCP = "TCP"
POLICY_CHANGE = "connection closed due to policy change"


class ConnectionObserver(Protocol):
    """Told of connections as they open and close, and of authorization decisions."""

    def opened(self, conn: LiveConnection) -> None: ...

    def closed(self, conn: LiveConnection) -> None: ...

    def decided(self, attributes: ConnectionAttributes, decision: Decision) -> None: ...


@dataclass(eq=False, kw_only=True, slots=True)
class LiveConnection:
    """One proxied connection while it lives (slotted: one per live connection)."""

    id: int
    workload: str  # namespace/name of the local pod
    workload_uid: str
    direction: str  # INBOUND / OUTBOUND
    protocol: str  # HBONE / TCP: how it travels between pods
    local: str  # ip:port the client connected to (as the app saw it)
    remote: str  # ip:port of the client (inbound) or the original destination (outbound)
    target: str  # where bytes really go: app ip:port (inbound), endpoint ip:port (outbound)
    source_identity: Identity | None = None
    destination_identity: Identity | None = None
    attributes: ConnectionAttributes | None = None  # inbound: what authorization saw
    started: float = field(default_factory=time.time)
    relay: Relay | None = None
    task: asyncio.Task[object] | None = None  # ends it before the relay exists
    closed_reason: str = ""
    response_flags: str = ""  # Envoy's flags for what traffic management did (UO, URX, FI, ...)
    forwarded_host: str = ""  # inbound HBONE: the service host in the CONNECT's Forwarded

    @property
    def bytes_in(self) -> int:
        """Bytes from the client side (the relay's `a` end is the downstream)."""
        return self.relay.a.received if self.relay is not None else 0

    @property
    def bytes_out(self) -> int:
        return self.relay.b.received if self.relay is not None else 0

    @property
    def closed_by_policy(self) -> bool:
        return self.closed_reason.startswith(POLICY_CHANGE)

    def abort(self, reason: str) -> None:
        """Reset both sides now (or cancel the setup if the relay does not exist yet)."""
        self.closed_reason = reason
        if self.relay is not None:
            self.relay.abort(reason)
        elif self.task is not None:
            self.task.cancel()

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "workload": self.workload,
            "direction": self.direction,
            "protocol": self.protocol,
            "local": self.local,
            "remote": self.remote,
            "target": self.target,
            "source_identity": str(self.source_identity) if self.source_identity else "",
            "destination_identity": (
                str(self.destination_identity) if self.destination_identity else ""
            ),
            "bytes_received": self.bytes_in,
            "bytes_sent": self.bytes_out,
            "age_seconds": round(time.time() - self.started, 3),
        }


class ConnectionRegistry:
    """Live connections by id; re-checks inbound ones when policies change."""

    def __init__(
        self, checker: PolicyChecker | None = None, observer: ConnectionObserver | None = None
    ) -> None:
        self._checker = checker
        self.observer = observer
        self._live: dict[int, LiveConnection] = {}
        self._ids = itertools.count(1)
        self.revoked = 0  # connections closed by a policy change, since start
        self.opened = 0

    def register(self, **fields: object) -> LiveConnection:
        """Add a connection (fields of LiveConnection except id); remove it with `remove`."""
        conn = LiveConnection(id=next(self._ids), **fields)  # type: ignore[arg-type]
        self._live[conn.id] = conn
        self.opened += 1
        if self.observer is not None:
            self._observe(self.observer.opened, conn)
        return conn

    def remove(self, conn: LiveConnection) -> None:
        """Forget a connection; the observer hears of it once, however often it is removed.
        A relay still running then lost its holder (a task cancelled while it held the relay:
        proxy.sockets.hold): it is reset, never left to outlive its connection."""
        relay = conn.relay
        if relay is not None and (relay.done.cancelled() or not relay.done.done()):
            relay.abort("listener closed")
        if self._live.pop(conn.id, None) is not None:
            if not self._live:
                self._live = {}  # a dict keeps its size: let a burst's table go
            if self.observer is not None:
                self._observe(self.observer.closed, conn)

    @staticmethod
    def _observe(hook: Callable[[LiveConnection], None], conn: LiveConnection) -> None:
        try:
            hook(conn)
        except Exception:  # telemetry must never break the connection path
            log.exception("connection observer failed on connection %d", conn.id)

    def __iter__(self) -> Iterator[LiveConnection]:
        return iter(list(self._live.values()))

    def __len__(self) -> int:
        return len(self._live)

    def of_workload(self, uid: str) -> list[LiveConnection]:
        return [c for c in self._live.values() if c.workload_uid == uid]

    def snapshot(self) -> list[dict[str, object]]:
        """Rows for the admin /connections page, oldest first."""
        return [c.to_json() for c in sorted(self._live.values(), key=lambda c: c.id)]

    # --- policy re-check ----------------------------------------------------------------------

    def recheck(
        self, workload_uids: Iterable[str] | None = None
    ) -> list[Revocation[LiveConnection]]:
        """Authorize live inbound connections again (of some workloads, or all); reset the
        ones now denied and return them."""
        if self._checker is None:
            return []
        wanted = set(workload_uids) if workload_uids is not None else None
        live = [
            (c, c.attributes)
            for c in self._live.values()
            if c.direction == INBOUND
            and c.attributes is not None
            and (wanted is None or c.workload_uid in wanted)
        ]
        revoked = self._checker.recheck(live)
        for revocation in revoked:
            conn = revocation.handle
            log.info(
                "%s: %s %s -> %s: %s",
                conn.workload,
                conn.protocol,
                conn.remote,
                conn.target,
                revocation.message,
            )
            conn.abort(revocation.message)
            self.remove(conn)
        self.revoked += len(revoked)
        return revoked

    def on_state_change(self, change: StateChange) -> None:
        if change.policies or change.workloads:
            self.recheck()

    def watch(self, store: StateStore) -> Callable[[], None]:
        """Re-check on every state batch that touched policies or workloads; returns unsubscribe."""
        return store.subscribe(self.on_state_change)


class ObservedPolicyChecker(PolicyChecker):
    """A PolicyChecker that reports each new decision (not re-checks) to an observer."""

    def __init__(self, lookup: PolicyLookup, observer: ConnectionObserver) -> None:
        super().__init__(lookup)
        self._observer = observer

    def check(self, conn: ConnectionAttributes) -> Decision:
        decision = super().check(conn)
        try:
            self._observer.decided(conn, decision)
        except Exception:
            log.exception("connection observer failed on a policy decision")
        return decision

    def recheck(self, live: Iterable[tuple[H, ConnectionAttributes]]) -> list[Revocation[H]]:
        # Re-checks of live connections are not new connections: evaluate without reporting.
        revoked: list[Revocation[H]] = []
        for handle, conn in live:
            decision = evaluate(self._lookup(conn), conn)
            if not decision.allowed:
                revoked.append(Revocation(handle, conn, decision))
        return revoked


def store_policy_lookup(
    store: StateStore,
) -> Callable[[ConnectionAttributes], Iterable[Authorization]]:
    """The policies that apply to a connection's destination workload, from the store.

    By uid when the connection knows it (host-network pods share an address), else by address.
    """

    def lookup(conn: ConnectionAttributes) -> Iterable[Authorization]:
        workload = store.workload(conn.destination_uid) if conn.destination_uid else None
        if workload is None:
            for candidate in store.workloads_by_address("", conn.destination_ip):
                workload = candidate
        if workload is None:
            return ()
        return store.policies_for(workload)

    return lookup
