"""Fuzz target: a VirtualService or DestinationRule resource from xDS, as istiod sends it.

Arbitrary bytes are converted as the agent converts `Any.value` under the config type URLs
(an `istio.mcp.v1alpha1.Resource` whose body is the networking message); `ConversionError`
is the documented refusal (it becomes the NACK). A value that converts must then behave:
served again the way the control plane serves it (`to_wire`, the envelope) it converts to
the same routing, and the state store takes it and lets it go again, leaving nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable

from nodeagent.model import routing as rm
from nodeagent.model.constants import TYPE_URL_DESTINATION_RULE, TYPE_URL_VIRTUAL_SERVICE
from nodeagent.pb.istio.mcp.v1alpha1 import resource_pb2 as mcp_pb
from nodeagent.pb.istio.networking.v1alpha3 import destination_rule_pb2 as dr_pb
from nodeagent.pb.istio.networking.v1alpha3 import virtual_service_pb2 as vs_pb
from nodeagent.state import mcp
from nodeagent.state.convert import (
    ConversionError,
    destination_rule_from_bytes,
    virtual_service_from_bytes,
)
from nodeagent.state.store import StateBatch, StateStore

INSTRUMENT = ("nodeagent",)
MAX_LEN = 4096

Routing = rm.VirtualService | rm.DestinationRule
KINDS: tuple[tuple[str, Callable[[str, bytes], Routing]], ...] = (
    (TYPE_URL_VIRTUAL_SERVICE, virtual_service_from_bytes),
    (TYPE_URL_DESTINATION_RULE, destination_rule_from_bytes),
)
# What the agent applies; the raw spec and annotations may be spelled differently on the wire.
SAME = {
    TYPE_URL_VIRTUAL_SERVICE: ("namespace", "name", "hosts", "tcp", "gateways", "needs_waypoint"),
    TYPE_URL_DESTINATION_RULE: (
        "namespace",
        "name",
        "host",
        "traffic_policy",
        "subsets",
        "needs_waypoint",
    ),
}


def fuzz_one(data: bytes) -> None:
    for type_url, convert in KINDS:
        try:
            value = convert("", data)
        except ConversionError:
            continue
        spec, annotations = rm.to_wire(value)
        served = mcp.encode(
            type_url, mcp.ConfigEnvelope(value.namespace, value.name, spec, annotations)
        )
        again = convert(value.key, served)
        for field in SAME[type_url]:
            assert getattr(again, field) == getattr(value, field), (
                f"{value.key}: {field} changed on the way back:\n{value!r}\n{again!r}"
            )
        _store_round_trip(value)


def _store_round_trip(value: Routing) -> None:
    store = StateStore()
    if isinstance(value, rm.VirtualService):
        store.apply(StateBatch(virtual_services=(value,)))
        assert store.virtual_service(value.key) == value
        change = store.apply(StateBatch(removed_virtual_services=(value.key,)))
    else:
        store.apply(StateBatch(destination_rules=(value,)))
        assert store.destination_rule(value.key) == value
        change = store.apply(StateBatch(removed_destination_rules=(value.key,)))
    assert change.routing, f"{value.key}: removal reported no routing change"
    assert not any(store.counts().values()), f"{value.key} left state behind after its removal"


def _resource(
    key: str, spec: vs_pb.VirtualService | dr_pb.DestinationRule, **annotations: str
) -> bytes:
    out = mcp_pb.Resource()
    out.metadata.name = key
    out.metadata.version = "1"
    out.metadata.annotations.update(annotations)
    out.body.Pack(spec)
    return out.SerializeToString(deterministic=True)


def seeds() -> dict[str, bytes]:
    """A canary split, an every-field VirtualService (tcp extensions as annotations, http/tls
    kept as needing a waypoint), DestinationRules plain and with every policy level."""
    canary = vs_pb.VirtualService(hosts=["backend"])
    route = canary.tcp.add()
    route.match.add(port=9000, source_labels={"app": "frontend"})
    route.route.add(destination=vs_pb.Destination(host="backend", subset="v1"), weight=90)
    route.route.add(destination=vs_pb.Destination(host="backend", subset="v2"), weight=10)
    everything = vs_pb.VirtualService(
        hosts=["api", "api.prod.svc.cluster.local"], gateways=["mesh"], export_to=["*"]
    )
    tcp = everything.tcp.add()
    tcp.match.add(port=80, source_namespace="prod", destination_subnets=["10.96.0.0/16"])
    tcp.route.add(
        destination=vs_pb.Destination(host="api", subset="v1", port=vs_pb.PortSelector(number=80))
    )
    http = everything.http.add(name="h")
    http.match.add(uri=vs_pb.StringMatch(prefix="/v1"))
    http.route.add(destination=vs_pb.Destination(host="api"), weight=100)
    http.retries.attempts = 3
    http.retries.per_try_timeout.FromMilliseconds(1500)
    http.fault.abort.http_status = 503
    http.fault.abort.percentage.value = 0.5
    tls = everything.tls.add()
    tls.match.add(sni_hosts=["api.example.com"], port=443)
    tls.route.add(destination=vs_pb.Destination(host="api"))
    extensions = {
        rm.FAULT_ANNOTATION: '{"0":{"delay":{"fixedDelay":"1s","percentage":{"value":10}}}}',
        rm.MIRROR_ANNOTATION: '{"0":{"mirror":{"host":"api","subset":"v2"},'
        '"mirrorPercentage":{"value":5}}}',
        rm.CONNECT_ATTEMPTS_ANNOTATION: '{"0":2}',
    }
    rule = dr_pb.DestinationRule(host="backend")
    rule.subsets.add(name="v1", labels={"version": "v1"})
    rule.subsets.add(name="v2", labels={"version": "v2"})
    policies = dr_pb.DestinationRule(host="api")
    top = policies.traffic_policy
    top.load_balancer.simple = dr_pb.LoadBalancerSettings.LEAST_REQUEST
    top.connection_pool.tcp.max_connections = 10
    top.connection_pool.tcp.connect_timeout.FromMilliseconds(250)
    top.connection_pool.tcp.idle_timeout.FromSeconds(3600)
    top.outlier_detection.consecutive_5xx_errors.value = 3
    top.outlier_detection.consecutive_gateway_errors.value = 1
    top.outlier_detection.interval.FromSeconds(5)
    top.outlier_detection.base_ejection_time.FromSeconds(30)
    top.outlier_detection.max_ejection_percent = 50
    port = top.port_level_settings.add()
    port.port.number = 80
    port.load_balancer.consistent_hash.use_source_ip = True
    sub = policies.subsets.add(name="v1", labels={"version": "v1"})
    sub.traffic_policy.load_balancer.simple = dr_pb.LoadBalancerSettings.RANDOM
    return {
        "vs-canary": _resource("shop/canary", canary),
        "vs-every-field": _resource("prod/api", everything, **extensions),
        "dr-subsets": _resource("shop/backend", rule),
        "dr-every-policy": _resource("prod/api", policies),
        # Refused on purpose: weights that do not sum to 100, a name that is not namespace/name.
        "vs-bad-weights": _resource(
            "shop/bad",
            vs_pb.VirtualService(
                hosts=["b"],
                tcp=[vs_pb.TCPRoute(route=[vs_pb.RouteDestination(weight=70)] * 1)],
            ),
        ),
        "dr-bad-name": _resource("no-namespace", rule),
    }
