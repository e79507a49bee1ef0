"""Sans-IO logic of one delta-ADS stream on the server side.

A `DeltaStreamCore` knows which types the client subscribed (by wildcard) and
which `{name: version}` it holds, and turns client requests and new snapshots
into responses carrying only what changed: upserts whose version differs and
`removed_resources` for names the client holds that are gone. A client's
`initial_resource_versions` seed what it holds, so a reconnect only gets the
difference. A new snapshot may come with the names that changed in it (an edit
of one workload among 10,000): then only those are compared, not every resource.
The gRPC edge (`server.py`) reads, writes and logs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from nodeagent.controlplane.resources import Changes, Snapshot


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamRequest:
    """A DeltaDiscoveryRequest, as plain values."""

    type_url: str
    response_nonce: str = ""
    error_message: str | None = None
    initial_resource_versions: Mapping[str, str] = field(default_factory=dict)
    subscribe: Sequence[str] = ()
    unsubscribe: Sequence[str] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamResponse:
    """A DeltaDiscoveryResponse to send."""

    type_url: str
    nonce: str
    resources: tuple[tuple[str, str, bytes], ...]
    """(name, version, serialized message)."""
    removed: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack:
    type_url: str
    nonce: str
    error_message: str | None
    """Set for a NACK: the client's reasons, by resource name."""


class DeltaStreamCore:
    """One client stream: wildcard subscriptions, what the client holds, nonces."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._held: dict[str, dict[str, str]] = {}
        self._nonce = 0
        self.acks: list[Ack] = []
        """ACKs/NACKs seen, newest last (the edge drains and logs them)."""

    @property
    def subscribed(self) -> tuple[str, ...]:
        return tuple(self._held)

    def on_request(self, req: StreamRequest) -> list[StreamResponse]:
        if req.response_nonce:
            self.acks.append(
                Ack(
                    type_url=req.type_url, nonce=req.response_nonce, error_message=req.error_message
                )
            )
            return []
        if req.type_url in self._held:
            # A re-subscription on a wildcard stream changes nothing.
            return []
        self._held[req.type_url] = dict(req.initial_resource_versions)
        # Always answer the first request, even with nothing, so the client can
        # ACK it and count itself ready.
        first = self._diff(req.type_url, always=True)
        return [first] if first is not None else []

    def on_snapshot(
        self, snapshot: Snapshot, changes: Changes | None = None
    ) -> list[StreamResponse]:
        """Responses for what differs from what the client holds; `changes` (names that
        may differ, by type; a type absent is unchanged) narrows the comparison."""
        self._snapshot = snapshot
        out = []
        for type_url in self._held:
            names = None if changes is None else changes.get(type_url, frozenset())
            resp = self._diff(type_url, always=False, names=names)
            if resp is not None:
                out.append(resp)
        return out

    def _diff(
        self, type_url: str, *, always: bool, names: Collection[str] | None = None
    ) -> StreamResponse | None:
        held = self._held[type_url]
        current = self._snapshot.get(type_url, {})
        if names is None:
            upserts = tuple(
                (name, r.version, r.value)
                for name, r in current.items()
                if held.get(name) != r.version
            )
            removed = tuple(sorted(n for n in held if n not in current))
        else:
            upserts = tuple(
                (name, r.version, r.value)
                for name in sorted(names)
                if (r := current.get(name)) is not None and held.get(name) != r.version
            )
            removed = tuple(sorted(n for n in names if n in held and n not in current))
        if not upserts and not removed and not always:
            return None
        # What was sent counts as held: a NACKed resource is resent only when it
        # changes or the client reconnects without it in its versions.
        for name, version, _ in upserts:
            held[name] = version
        for name in removed:
            del held[name]
        self._nonce += 1
        return StreamResponse(
            type_url=type_url, nonce=str(self._nonce), resources=upserts, removed=removed
        )
