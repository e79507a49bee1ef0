"""The workload model: identity defaults, keys, immutability."""

from __future__ import annotations

import pytest

from nodeagent.model import workload as wm
from nodeagent.model.identity import Identity
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb


def test_identity_takes_istio_defaults_for_empty_fields() -> None:
    w = wm.Workload(uid="u", name="p", namespace="shop")
    assert w.identity() == Identity("cluster.local", "shop", "default")
    assert str(w.identity()) == "spiffe://cluster.local/ns/shop/sa/default"


def test_identity_uses_trust_domain_and_service_account_when_set() -> None:
    w = wm.Workload(uid="u", name="p", namespace="shop", trust_domain="td", service_account="cart")
    assert w.identity().principal == "td/ns/shop/sa/cart"


def test_service_key_and_workload_label() -> None:
    s = wm.Service(name="cart", namespace="shop", hostname="cart.shop.svc.cluster.local")
    assert s.key == "shop/cart.shop.svc.cluster.local"
    assert wm.Workload(uid="u1", name="p", namespace="shop").label == "shop/p"
    assert wm.Workload(uid="u1", name="", namespace="shop").label == "u1"
    assert str(wm.NamespacedHostname("ns", "h")) == "ns/h"


def test_services_map_is_read_only_and_workloads_are_hashable() -> None:
    ports = {"shop/cart": (wm.Port(80, 8080),)}
    w = wm.Workload(uid="u", name="p", namespace="shop", services=ports)
    ports["shop/other"] = ()  # the caller's dict is copied
    assert list(w.services) == ["shop/cart"]
    with pytest.raises(TypeError):
        w.services["x"] = ()  # type: ignore[index]
    same = wm.Workload(
        uid="u", name="p", namespace="shop", services={"shop/cart": (wm.Port(80, 8080),)}
    )
    assert w == same and hash(w) == hash(same)
    assert {w, same} == {w}


@pytest.mark.parametrize(
    ("model_enum", "pb_enum"),
    [
        (wm.TunnelProtocol, workload_pb.TunnelProtocol),
        (wm.WorkloadType, workload_pb.WorkloadType),
        (wm.WorkloadStatus, workload_pb.WorkloadStatus),
        (wm.NetworkMode, workload_pb.NetworkMode),
        (wm.IPFamilies, workload_pb.IPFamilies),
        (wm.AppProtocol, workload_pb.AppProtocol),
        (wm.ApplicationTunnelProtocol, workload_pb.ApplicationTunnel.Protocol),
        (wm.ServiceVisibility, workload_pb.Service.Visibility),
        (wm.LoadBalancingScope, workload_pb.LoadBalancing.Scope),
        (wm.LoadBalancingMode, workload_pb.LoadBalancing.Mode),
        (wm.HealthPolicy, workload_pb.LoadBalancing.HealthPolicy),
    ],
)
def test_model_enums_match_the_protobuf_names_and_numbers(
    model_enum: type, pb_enum: object
) -> None:
    assert {m.name: m.value for m in model_enum} == dict(pb_enum.items())  # type: ignore[attr-defined]
