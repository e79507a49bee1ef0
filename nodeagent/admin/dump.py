"""Model values as `/config_dump` JSON, in ztunnel's camelCase shape (pure).

For the composition root: the state store holds model values, and the
config dump source calls these to present them the way `istioctl
ztunnel-config` and other tools read a ztunnel dump (`workloadIps`,
`protocol`, `waypoint.destination`, service `vips` as `network/ip`,
`endpoints` keyed by workload uid). Fields the tools do not read are
rendered generically: camelCase keys, enum names, empty values left out.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from nodeagent.model import policy as pm
from nodeagent.model import workload as wm


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _title(member: enum.Enum) -> str:
    return "".join(p.title() for p in member.name.split("_"))


def jsonable(value: Any) -> Any:
    """Any model value as JSON: dataclasses to camelCase dicts without empty fields."""
    if isinstance(value, enum.Enum):
        return _title(value)
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, pm.StringMatch):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v in (None, "", (), {}) or (isinstance(v, Mapping) and not v):
                continue
            out[_camel(f.name)] = jsonable(v)
        return out
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return value


def gateway_json(gateway: wm.GatewayAddress | None) -> dict[str, Any] | None:
    if gateway is None:
        return None
    dest = gateway.destination
    if isinstance(dest, wm.NamespacedHostname):
        destination = str(dest)
    else:
        destination = f"{dest.network}/{dest.address}"
    return {"destination": destination, "hboneMtlsPort": gateway.hbone_mtls_port}


def workload_json(w: wm.Workload) -> dict[str, Any]:
    out = jsonable(w)
    out.pop("addresses", None)
    out.pop("tunnelProtocol", None)
    out.update(
        {
            "uid": w.uid,
            "name": w.name,
            "namespace": w.namespace,
            "workloadIps": [str(a) for a in w.addresses],
            "protocol": "HBONE" if w.tunnel_protocol is wm.TunnelProtocol.HBONE else "TCP",
            "serviceAccount": w.service_account or "default",
            "trustDomain": w.trust_domain or "cluster.local",
            "node": w.node,
            "workloadType": w.workload_type.name.lower(),
            "status": _title(w.status),
            "services": {k: [jsonable(p) for p in v] for k, v in w.services.items()},
        }
    )
    for key, gw in (("waypoint", w.waypoint), ("networkGateway", w.network_gateway)):
        if gw is not None:
            out[key] = gateway_json(gw)
    return out


def service_json(s: wm.Service, endpoints: Iterable[wm.Endpoint] = ()) -> dict[str, Any]:
    out = jsonable(s)
    out.pop("addresses", None)
    out.update(
        {
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname,
            "vips": [f"{a.network}/{a.address}" for a in s.addresses],
            "ports": {str(p.service_port): p.target_port for p in s.ports},
            "endpoints": {
                e.workload.uid: {
                    "workloadUid": e.workload.uid,
                    "service": s.key,
                    "port": {str(p.service_port): p.target_port for p in e.ports},
                    "status": _title(e.workload.status),
                }
                for e in endpoints
            },
        }
    )
    if s.waypoint is not None:
        out["waypoint"] = gateway_json(s.waypoint)
    return out


def policy_json(p: pm.Authorization) -> dict[str, Any]:
    out = jsonable(p)
    out.update(
        {
            "name": p.name,
            "namespace": p.namespace,
            "scope": _title(p.scope),
            "action": _title(p.action),
            "rules": [jsonable(r) for r in p.rules],
            "dryRun": p.dry_run,
        }
    )
    return out
