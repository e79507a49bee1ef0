"""Building candidates from a service's endpoints: target ports and address family."""

from __future__ import annotations

import ipaddress

from nodeagent.model.workload import Endpoint, Port, Service, Workload
from nodeagent.traffic import candidates_for
from tests.builders import workload as build_workload

ip = ipaddress.ip_address


def _workload(uid: str, *addresses: str) -> Workload:
    return build_workload(uid, *addresses)


SERVICE = Service(
    name="web",
    namespace="default",
    hostname="web.default.svc.cluster.local",
    ports=(Port(80, 8080), Port(443, 0)),
)


def test_endpoint_mapping_wins_over_service_mapping() -> None:
    own = Endpoint(_workload("a", "10.0.0.1"), (Port(80, 9000),))
    inherits = Endpoint(_workload("b", "10.0.0.2"), ())
    chosen, skipped = candidates_for(SERVICE, [own, inherits], 80)
    assert [(c.workload_uid, c.port) for c in chosen] == [("a", 9000), ("b", 8080)]
    assert skipped == ()


def test_named_port_without_endpoint_mapping_is_skipped_with_reason() -> None:
    resolved = Endpoint(_workload("a", "10.0.0.1"), (Port(443, 8443),))
    unresolved = Endpoint(_workload("b", "10.0.0.2"), ())
    chosen, skipped = candidates_for(SERVICE, [resolved, unresolved], 443)
    assert [(c.workload_uid, c.port) for c in chosen] == [("a", 8443)]
    assert [(s.workload_uid, s.reason) for s in skipped] == [
        ("b", "no target port for service port 443")
    ]


def test_address_follows_the_dialled_family() -> None:
    dual = Endpoint(_workload("a", "10.0.0.1", "fd00::1"), ())
    v6, _ = candidates_for(SERVICE, [dual], 80, dialled=ip("fd00:ffff::10"))
    v4, _ = candidates_for(SERVICE, [dual], 80, dialled=ip("10.96.0.10"))
    assert v6[0].address == ip("fd00::1")
    assert v4[0].address == ip("10.0.0.1")


def test_single_family_endpoint_is_used_for_the_other_family() -> None:
    only_v4 = Endpoint(_workload("a", "10.0.0.1"), ())
    chosen, _ = candidates_for(SERVICE, [only_v4], 80, dialled=ip("fd00:ffff::10"))
    assert chosen[0].address == ip("10.0.0.1")


def test_endpoint_without_address_is_skipped() -> None:
    chosen, skipped = candidates_for(SERVICE, [Endpoint(_workload("gw"), ())], 80)
    assert chosen == ()
    assert skipped[0].reason == "workload has no address"
