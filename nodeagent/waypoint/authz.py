"""The waypoint's L7 authorization: the AuthorizationPolicies attached to this waypoint,
evaluated per request (`nodeagent.policy.http`), as Envoy's RBAC filter does in an
Istio waypoint.

Which policies apply is decided per request from the state store: those whose
`targetRefs` name this waypoint (kind Gateway, group gateway.networking.k8s.io, same
namespace) or the request's service (kind Service), and those whose selector names
this waypoint's pods by `gateway.networking.k8s.io/gateway-name` (see
`HttpAuthorization.attaches_to`). The source is the tunnel's TLS peer: the client's
agent opens it with the client workload's own certificate (as ztunnel does), so
`principals` and `namespaces` see the original client, and `ipBlocks` its address
from `forwarded`.
"""

from __future__ import annotations

import ipaddress
import logging

from nodeagent.model.policy import HttpAuthorization
from nodeagent.model.workload import Service
from nodeagent.policy.http import HttpAttributes, authorize
from nodeagent.state.store import StateStore
from nodeagent.traffic.http import HttpRequest
from nodeagent.waypoint.router import TunnelCaller

log = logging.getLogger(__name__)


class WaypointAuthorizer:
    """`router.HttpAuthorizer` over the store's waypoint policies."""

    def __init__(self, store: StateStore, name: str, namespace: str) -> None:
        self._store = store
        self.name = name
        self.namespace = namespace

    def policies_for(self, service: Service | None) -> tuple[HttpAuthorization, ...]:
        target = (service.name, service.namespace) if service is not None else None
        return tuple(
            p
            for p in self._store.http_policies()
            if p.attaches_to(self.name, self.namespace, target)
        )

    def check(
        self, caller: TunnelCaller, service: Service | None, port: int, request: HttpRequest
    ) -> str | None:
        policies = self.policies_for(service)
        if not policies:
            return None  # nothing attached: allowed, as Envoy without an RBAC filter
        try:
            source_ip = ipaddress.ip_address(caller.address[0])
        except ValueError:
            return f"caller address {caller.address[0]!r} is not an IP address"
        attributes = HttpAttributes(
            source_identity=caller.identity,
            source_ip=source_ip,
            destination_port=port,
            method=request.method,
            path=request.path,
            host=request.authority,
            headers=request.headers,
            destination_ip=(
                service.addresses[0].address if service is not None and service.addresses else None
            ),
        )
        decision = authorize(policies, attributes)
        return None if decision.allowed else decision.reason
