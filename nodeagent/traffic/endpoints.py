"""Turning a service's endpoints into selection candidates for one service port.

Target port, in order of preference:

1. the endpoint's own mapping for the service port (`Workload.services[key]`),
   when it names a target port;
2. the service's mapping (`Service.ports`), when it names a target port;
3. otherwise the endpoint is left out: a target port of 0 means a named port
   the endpoint had to resolve, and guessing would send traffic to the wrong port.

The address is the endpoint's first address of the requested family (the
family of the address the client dialled), else its first address; an endpoint
without addresses (reachable only through a network gateway) is left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nodeagent.model.workload import Endpoint, IPAddress, Port, Service
from nodeagent.traffic.selection import Candidate


@dataclass(frozen=True, slots=True)
class Skipped:
    """An endpoint left out, and why (for explain output and debug logs)."""

    workload_uid: str
    reason: str


def _target(ports: Iterable[Port], service_port: int) -> int:
    for port in ports:
        if port.service_port == service_port and port.target_port:
            return port.target_port
    return 0


def _address(addresses: tuple[IPAddress, ...], family: int | None) -> IPAddress | None:
    for address in addresses:
        if family is None or address.version == family:
            return address
    return addresses[0] if addresses else None


def candidates_for(
    service: Service,
    endpoints: Iterable[Endpoint],
    service_port: int,
    dialled: IPAddress | None = None,
) -> tuple[tuple[Candidate, ...], tuple[Skipped, ...]]:
    """The candidates behind `service:service_port`, and the endpoints left out."""
    family = dialled.version if dialled is not None else None
    service_target = _target(service.ports, service_port)
    chosen: list[Candidate] = []
    skipped: list[Skipped] = []
    for endpoint in endpoints:
        workload = endpoint.workload
        target = _target(endpoint.ports, service_port) or service_target
        if not target:
            skipped.append(Skipped(workload.uid, f"no target port for service port {service_port}"))
            continue
        address = _address(workload.addresses, family)
        if address is None:
            skipped.append(Skipped(workload.uid, "workload has no address"))
            continue
        chosen.append(Candidate.from_workload(workload, address, target))
    return tuple(chosen), tuple(skipped)
