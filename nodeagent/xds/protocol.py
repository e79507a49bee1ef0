"""Sans-IO bookkeeping of one delta-ADS client (the agent side of delta xDS).

It keeps, per subscribed type URL, the versions of the resources the agent
accepted, and turns stream events into the requests to send: the initial
request of each type (node attached, `initial_resource_versions` after a
reconnect), and one ACK or NACK per response. It never does I/O; the gRPC edge
(`client.py`) turns `OutboundRequest` into protobuf and applies resources.

Usage per stream:
    requests = proto.start_stream()           # send these first
    apply = proto.receive(response)           # apply apply.upserts / apply.removals
    request = proto.complete(apply, rejected) # send this ACK/NACK

NACKed resources are not recorded, so a reconnect makes the server resend them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field


class ProtocolError(RuntimeError):
    """The edge drove the core out of order (a bug, not bad server input)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OutboundRequest:
    """One DeltaDiscoveryRequest to send, as plain values."""

    type_url: str
    include_node: bool = False
    """Attach the Node: true only on the first request of each type on a stream."""
    initial_resource_versions: Mapping[str, str] = field(default_factory=dict)
    response_nonce: str = ""
    error_message: str | None = None
    """Set for a NACK: `error_detail.message`, "<name>: <reason>; ..."."""

    @property
    def is_nack(self) -> bool:
        return self.error_message is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceivedResource:
    name: str
    version: str
    type_url: str
    """The type URL of the resource's Any; a mismatch with the response is a NACK."""
    value: bytes
    """Serialized message (Any.value)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceivedResponse:
    """One DeltaDiscoveryResponse, as plain values."""

    type_url: str
    nonce: str
    resources: Sequence[ReceivedResource] = ()
    removed: Sequence[str] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class ApplyAction:
    """What the edge must hand to its state sink before answering the response."""

    type_url: str
    nonce: str
    upserts: tuple[tuple[str, bytes], ...]
    removals: tuple[str, ...]
    versions: Mapping[str, str]
    """Version of every upserted name, recorded on success."""
    pre_rejected: Mapping[str, str]
    """Resources refused before conversion (wrong Any type, duplicate name)."""


@dataclass(slots=True)
class _TypeState:
    versions: dict[str, str] = field(default_factory=dict)
    responded: bool = False
    """A first ACK or NACK was sent for this type (readiness)."""


class DeltaAdsProtocol:
    """Per-type wildcard subscriptions, accepted versions, ACK/NACK building.

    `optional` types are subscribed like the others but readiness does not wait
    for them: a control plane that does not serve a type (ztunnel's types only,
    say) may never answer it, and the agent must not stay unready for that.
    `resource_types` maps a type URL to the type URL its resources' `Any` must
    carry when that differs from the response's (istiod wraps config kinds in
    istio.mcp.v1alpha1.Resource); by default they are equal.
    """

    def __init__(
        self,
        type_urls: Sequence[str],
        *,
        optional: Collection[str] = (),
        resource_types: Mapping[str, str] | None = None,
    ) -> None:
        if not type_urls:
            raise ValueError("at least one type URL must be subscribed")
        self._types: dict[str, _TypeState] = {t: _TypeState() for t in type_urls}
        self._optional = frozenset(optional)
        self._resource_types = dict(resource_types or {})
        self._pending: str | None = None
        self.streams_started = 0

    @property
    def type_urls(self) -> tuple[str, ...]:
        return tuple(self._types)

    @property
    def ready(self) -> bool:
        """True once a first ACK/NACK has been sent for every subscribed type
        that is not optional."""
        return all(s.responded for t, s in self._types.items() if t not in self._optional)

    def versions(self, type_url: str) -> dict[str, str]:
        """Accepted `{name: version}` of one type (a copy)."""
        return dict(self._types[type_url].versions)

    def start_stream(self) -> list[OutboundRequest]:
        """Initial requests of a new stream: wildcard, node, known versions."""
        self.streams_started += 1
        self._pending = None
        return [
            OutboundRequest(
                type_url=t,
                include_node=True,
                initial_resource_versions=dict(s.versions),
            )
            for t, s in self._types.items()
        ]

    def receive(self, response: ReceivedResponse) -> ApplyAction:
        """Sort a response into what to apply and what is refused outright."""
        if self._pending is not None:
            raise ProtocolError("previous response was not completed")
        self._pending = response.nonce
        pre_rejected: dict[str, str] = {}
        upserts: list[tuple[str, bytes]] = []
        versions: dict[str, str] = {}
        seen: set[str] = set()
        expected = self._resource_types.get(response.type_url, response.type_url)
        for r in response.resources:
            if r.name in seen:
                pre_rejected[r.name] = "duplicate resource name in one response"
                continue
            seen.add(r.name)
            if not r.name:
                pre_rejected[r.name] = "resource without a name"
            elif r.type_url != expected:
                pre_rejected[r.name] = f"resource type {r.type_url!r} does not match " + (
                    f"response type {response.type_url!r}"
                    if expected == response.type_url
                    else f"{expected!r}, the resource type of {response.type_url!r}"
                )
            else:
                upserts.append((r.name, r.value))
                versions[r.name] = r.version
        # A duplicated name is refused as a whole: apply neither copy.
        dup = {n for n, reason in pre_rejected.items() if reason.startswith("duplicate")}
        upserts = [(n, v) for n, v in upserts if n not in dup]
        for n in dup:
            versions.pop(n, None)
        return ApplyAction(
            type_url=response.type_url,
            nonce=response.nonce,
            upserts=tuple(upserts),
            removals=tuple(response.removed),
            versions=versions,
            pre_rejected=pre_rejected,
        )

    def complete(self, action: ApplyAction, rejected: Mapping[str, str]) -> OutboundRequest:
        """Record the outcome of applying `action` and build its ACK or NACK.

        `rejected` maps names the sink refused to reasons. Unknown types are ACKed
        without bookkeeping, as ztunnel does.
        """
        if self._pending != action.nonce:
            raise ProtocolError(f"completing nonce {action.nonce!r}, pending {self._pending!r}")
        self._pending = None
        errors = {**action.pre_rejected, **rejected}
        state = self._types.get(action.type_url)
        if state is None:
            return OutboundRequest(type_url=action.type_url, response_nonce=action.nonce)
        for name in action.removals:
            state.versions.pop(name, None)
        for name, version in action.versions.items():
            if name in errors:
                # Not recorded, so the server resends it after a reconnect.
                state.versions.pop(name, None)
            else:
                state.versions[name] = version
        for name in errors:
            state.versions.pop(name, None)
        state.responded = True
        message = None
        if errors:
            message = "; ".join(f"{name}: {reason}" for name, reason in sorted(errors.items()))
        return OutboundRequest(
            type_url=action.type_url, response_nonce=action.nonce, error_message=message
        )
