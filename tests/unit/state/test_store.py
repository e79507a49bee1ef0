"""StateStore and StateUpdater: indexes after add/update/remove, endpoints, policies, feed."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace

import pytest

from nodeagent.model import policy as pm
from nodeagent.model import workload as wm
from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb
from nodeagent.state.encode import address_to_pb, authorization_to_pb
from nodeagent.state.store import KindChange, StateChange, StateStore
from nodeagent.state.updater import StateUpdater
from tests.builders import service as build_service
from tests.builders import workload as build_workload

ip = ipaddress.ip_address
SVC = "default/svc-a.default.svc.cluster.local"


def workload(
    name: str,
    addr: str = "10.1.0.1",
    *,
    namespace: str = "default",
    network: str = "",
    services: dict[str, tuple[wm.Port, ...]] | None = None,
    policies: tuple[str, ...] = (),
) -> wm.Workload:
    return build_workload(
        name,
        addr,
        uid=f"cluster//Pod/{namespace}/{name}",
        namespace=namespace,
        network=network,
        services=services or {},
        authorization_policies=policies,
    )


def service(host: str = "svc-a", vip: str = "10.96.0.1", namespace: str = "default") -> wm.Service:
    return build_service(host, vip, namespace=namespace, ports=(wm.Port(80, 8080),))


def policy(
    name: str, namespace: str = "default", scope: pm.Scope = pm.Scope.WORKLOAD_SELECTOR
) -> pm.Authorization:
    return pm.Authorization(name=name, namespace=namespace, scope=scope)


def upsert(value: wm.Workload | wm.Service) -> tuple[str, bytes]:
    name = value.uid if isinstance(value, wm.Workload) else value.key
    return name, address_to_pb(value).SerializeToString()


def upsert_policy(value: pm.Authorization) -> tuple[str, bytes]:
    return value.key, authorization_to_pb(value).SerializeToString()


@pytest.fixture
def updater() -> StateUpdater:
    return StateUpdater(StateStore())


def test_snapshot_indexes_workloads_and_services(updater: StateUpdater) -> None:
    a = workload("a", "10.1.0.1", services={SVC: (wm.Port(80, 8080),)})
    b = workload("b", "10.1.0.2", network="net2")
    s = service()
    assert updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a), upsert(b), upsert(s)], []) == {}
    store = updater.store
    assert store.workload(a.uid) == a
    assert store.workload_by_address("", ip("10.1.0.1")) == a
    assert store.workload_by_address("net2", ip("10.1.0.2")) == b
    assert store.workload_by_address("", ip("10.1.0.2")) is None  # other network
    assert store.service(SVC) == s
    assert store.service_by_vip("", ip("10.96.0.1")) == s
    assert store.service_by_vip("", ip("10.96.0.2")) is None
    assert store.counts() == {
        "workloads": 2,
        "services": 1,
        "policies": 0,
        "virtual_services": 0,
        "destination_rules": 0,
    }


def test_update_that_changes_ip_drops_the_old_index_entry(updater: StateUpdater) -> None:
    a = workload("a", "10.1.0.1")
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a)], [])
    moved = replace(a, addresses=(ip("10.1.0.9"),))
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(moved)], [])
    assert updater.store.workload_by_address("", ip("10.1.0.1")) is None
    assert updater.store.workload_by_address("", ip("10.1.0.9")) == moved


def test_update_that_changes_vip_drops_the_old_index_entry(updater: StateUpdater) -> None:
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(service(vip="10.96.0.1"))], [])
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(service(vip="10.96.0.7"))], [])
    assert updater.store.service_by_vip("", ip("10.96.0.1")) is None
    assert updater.store.service_by_vip("", ip("10.96.0.7")) is not None


def test_removal_by_uid_and_by_namespace_hostname(updater: StateUpdater) -> None:
    a = workload("a", services={SVC: (wm.Port(80, 8080),)})
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a), upsert(service())], [])
    assert updater.apply_delta(TYPE_URL_ADDRESS, [], [a.uid, SVC, "unknown/name"]) == {}
    store = updater.store
    assert store.workload(a.uid) is None
    assert store.workload_by_address("", ip("10.1.0.1")) is None
    assert store.service(SVC) is None
    assert store.service_by_vip("", ip("10.96.0.1")) is None
    assert store.endpoints(SVC) == ()


def test_workloads_on_node_follow_moves_and_removals(updater: StateUpdater) -> None:
    a = replace(workload("a", "10.1.0.1"), node="node-1")
    b = replace(workload("b", "10.1.0.2"), node="node-1")
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a), upsert(b)], [])
    assert updater.store.workloads_on_node("node-1") == (a, b)
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(replace(a, node="node-2"))], [b.uid])
    assert updater.store.workloads_on_node("node-1") == ()
    assert [w.name for w in updater.store.workloads_on_node("node-2")] == ["a"]


def test_host_network_workloads_share_an_address(updater: StateUpdater) -> None:
    a, b = workload("a", "192.0.2.10"), workload("b", "192.0.2.10")
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a), upsert(b)], [])
    assert updater.store.workloads_by_address("", ip("192.0.2.10")) == (a, b)
    updater.apply_delta(TYPE_URL_ADDRESS, [], [b.uid])
    assert updater.store.workload_by_address("", ip("192.0.2.10")) == a


def test_endpoints_of_a_service_follow_workload_changes(updater: StateUpdater) -> None:
    a = workload("a", "10.1.0.1", services={SVC: (wm.Port(80, 8080),)})
    b = workload("b", "10.1.0.2", services={SVC: (wm.Port(80, 9090),), "x/other": ()})
    c = workload("c", "10.1.0.3")
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a), upsert(b), upsert(c), upsert(service())], [])
    store = updater.store
    assert store.endpoints(SVC) == (
        wm.Endpoint(a, (wm.Port(80, 8080),)),
        wm.Endpoint(b, (wm.Port(80, 9090),)),
    )
    # b leaves the service; c joins it.
    b2 = replace(b, services={"x/other": ()})
    c2 = replace(c, services={SVC: (wm.Port(80, 7070),)})
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(b2), upsert(c2)], [])
    assert [(e.workload.name, e.ports) for e in store.endpoints(SVC)] == [
        ("a", (wm.Port(80, 8080),)),
        ("c", (wm.Port(80, 7070),)),
    ]
    assert [e.workload.name for e in store.endpoints("x/other")] == ["b"]


def test_endpoints_are_known_before_their_service_arrives(updater: StateUpdater) -> None:
    a = workload("a", services={SVC: (wm.Port(80, 8080),)})
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a)], [])
    assert updater.store.service(SVC) is None
    assert [e.workload for e in updater.store.endpoints(SVC)] == [a]


def test_policies_for_a_workload(updater: StateUpdater) -> None:
    policies = [
        policy("mesh-wide", "istio-system", pm.Scope.GLOBAL),
        policy("ns-default", "default", pm.Scope.NAMESPACE),
        policy("ns-other", "other", pm.Scope.NAMESPACE),
        policy("selected", "default"),
        policy("not-selected", "default"),
    ]
    assert (
        updater.apply_delta(TYPE_URL_AUTHORIZATION, [upsert_policy(p) for p in policies], []) == {}
    )
    a = workload("a", policies=("default/selected", "default/missing"))
    store = updater.store
    assert [p.key for p in store.policies_for(a)] == [
        "default/ns-default",
        "default/selected",
        "istio-system/mesh-wide",
    ]
    assert store.policy("default/not-selected") == policies[4]
    other = workload("o", namespace="other")
    assert [p.key for p in store.policies_for(other)] == [
        "istio-system/mesh-wide",
        "other/ns-other",
    ]
    # Removal by namespace/name, and a scope change on update, both reach the indexes.
    updater.apply_delta(
        TYPE_URL_AUTHORIZATION,
        [upsert_policy(policy("ns-default", "default", pm.Scope.WORKLOAD_SELECTOR))],
        ["istio-system/mesh-wide"],
    )
    assert [p.key for p in store.policies_for(a)] == ["default/selected"]
    assert store.policy("istio-system/mesh-wide") is None


def test_malformed_resources_are_rejected_by_name_while_others_apply(
    updater: StateUpdater, caplog: pytest.LogCaptureFixture
) -> None:
    good = workload("good", "10.1.0.1")
    bad_addr = workload_pb.Address(
        workload=workload_pb.Workload(
            uid="u-bad", name="pod-bad", namespace="default", addresses=[b"\x01\x02\x03\x04\x05"]
        )
    )
    bad_service = workload_pb.Address(service=workload_pb.Service(name="s", namespace="default"))
    caplog.set_level(logging.WARNING)
    rejected = updater.apply_delta(
        TYPE_URL_ADDRESS,
        [
            upsert(good),
            ("u-bad", bad_addr.SerializeToString()),
            ("default/", bad_service.SerializeToString()),
            ("garbage", b"\xff\xff"),
            upsert(service()),
        ],
        [],
    )
    assert rejected == {
        "u-bad": "workload default/pod-bad: address 0: 5 bytes, expected 4 or 16",
        "default/": "service default/s: hostname is empty",
        "garbage": rejected["garbage"],
    }
    assert rejected["garbage"].startswith("does not decode as istio.workload.Address")
    assert updater.store.workload(good.uid) == good
    assert updater.store.service(SVC) is not None
    assert updater.store.workload("u-bad") is None
    assert "u-bad" in caplog.text


def test_rejected_update_keeps_the_previous_version(updater: StateUpdater) -> None:
    a = workload("a")
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a)], [])
    broken = address_to_pb(a)
    broken.workload.addresses[0] = b"\x00" * 3
    rejected = updater.apply_delta(TYPE_URL_ADDRESS, [(a.uid, broken.SerializeToString())], [])
    assert list(rejected) == [a.uid]
    assert updater.store.workload(a.uid) == a


def test_malformed_policy_is_rejected_while_removals_apply(updater: StateUpdater) -> None:
    updater.apply_delta(TYPE_URL_AUTHORIZATION, [upsert_policy(policy("old"))], [])
    rejected = updater.apply_delta(
        TYPE_URL_AUTHORIZATION,
        [("default/x", b"\x0a\x05ab"), upsert_policy(policy("new"))],
        ["default/old"],
    )
    assert list(rejected) == ["default/x"]
    assert updater.store.policy("default/old") is None
    assert updater.store.policy("default/new") is not None


def test_unknown_type_url_is_acked_and_ignored(
    updater: StateUpdater, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    feed: list[StateChange] = []
    updater.store.subscribe(feed.append)
    assert (
        updater.apply_delta("type.googleapis.com/istio.workload.Workload", [("x", b"\xff")], ["y"])
        == {}
    )
    assert feed == []
    assert "istio.workload.Workload" in caplog.text


def test_change_feed_reports_added_updated_removed_by_kind(updater: StateUpdater) -> None:
    feed: list[StateChange] = []
    unsubscribe = updater.store.subscribe(feed.append)
    a, b = workload("a", "10.1.0.1"), workload("b", "10.1.0.2")
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a), upsert(b), upsert(service())], [])
    assert feed[-1] == StateChange(
        workloads=KindChange(added=frozenset({a.uid, b.uid})),
        services=KindChange(added=frozenset({SVC})),
    )
    a2 = replace(a, node="node-2")
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a2), upsert(b)], [b.uid, SVC])
    # b was removed and re-added in one batch: it was there before and after, an update.
    assert feed[-1] == StateChange(
        workloads=KindChange(updated=frozenset({a.uid, b.uid})),
        services=KindChange(removed=frozenset({SVC})),
    )
    updater.apply_delta(TYPE_URL_AUTHORIZATION, [upsert_policy(policy("p"))], [])
    assert feed[-1] == StateChange(policies=KindChange(added=frozenset({"default/p"})))
    count = len(feed)
    # An identical resend (e.g. after a reconnect) changes nothing and is not announced.
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a2)], ["not/there"])
    assert len(feed) == count
    unsubscribe()
    updater.apply_delta(TYPE_URL_ADDRESS, [], [a.uid])
    assert len(feed) == count
    assert updater.store.workload(a.uid) is None


def test_subscriber_sees_the_whole_batch_applied(updater: StateUpdater) -> None:
    seen: list[tuple[bool, bool]] = []
    store = updater.store
    a = workload("a", services={SVC: (wm.Port(80, 8080),)})
    store.subscribe(
        lambda _: seen.append((store.workload(a.uid) is not None, store.service(SVC) is not None))
    )
    updater.apply_delta(TYPE_URL_ADDRESS, [upsert(a), upsert(service())], [])
    assert seen == [(True, True)]


def test_a_failing_subscriber_does_not_stop_the_others(
    updater: StateUpdater, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: StateChange) -> None:
        raise RuntimeError("boom")

    seen: list[StateChange] = []
    updater.store.subscribe(broken)
    updater.store.subscribe(seen.append)
    assert updater.apply_delta(TYPE_URL_ADDRESS, [upsert(workload("a"))], []) == {}
    assert len(seen) == 1
    assert "boom" in caplog.text


def test_converter_bug_rejects_only_that_resource(
    updater: StateUpdater, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nodeagent.state.updater as updater_module

    real = updater_module.address_from_bytes

    def flaky(name: str, data: bytes) -> wm.Workload | wm.Service:
        if name == "boom":
            raise KeyError("bug")
        return real(name, data)

    monkeypatch.setattr(updater_module, "address_from_bytes", flaky)
    good = workload("good")
    rejected = updater.apply_delta(TYPE_URL_ADDRESS, [("boom", b""), upsert(good)], [])
    assert list(rejected) == ["boom"] and "internal error" in rejected["boom"]
    assert updater.store.workload(good.uid) == good


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_removed_workload_is_remembered_by_address_for_the_grace_only():
    from nodeagent.state.store import StateBatch

    clock = _Clock()
    store = StateStore(clock=clock, departed_grace=15.0)
    gone = workload("gone", "10.1.0.9")
    store.apply(StateBatch(workloads=(gone,)))
    assert store.departed_by_address("", ip("10.1.0.9")) is None  # still live
    store.apply(StateBatch(removed_addresses=(gone.uid,)))
    assert store.workload_by_address("", ip("10.1.0.9")) is None
    clock.now += 14.9
    assert store.departed_by_address("", ip("10.1.0.9")) == gone
    assert store.departed_by_address("other-net", ip("10.1.0.9")) is None
    clock.now += 0.2
    assert store.departed_by_address("", ip("10.1.0.9")) is None


def test_a_departed_address_given_to_a_new_workload_is_the_new_one_s():
    from nodeagent.state.store import StateBatch

    clock = _Clock()
    store = StateStore(clock=clock)
    gone = workload("gone", "10.1.0.9")
    store.apply(StateBatch(workloads=(gone,)))
    store.apply(StateBatch(removed_addresses=(gone.uid,)))
    store.apply(StateBatch(workloads=(workload("new", "10.1.0.9"),)))
    assert store.departed_by_address("", ip("10.1.0.9")) is None


def test_an_updated_workload_does_not_leave_a_departed_entry():
    from nodeagent.state.store import StateBatch

    store = StateStore(clock=_Clock())
    store.apply(StateBatch(workloads=(workload("w", "10.1.0.9"),)))
    store.apply(StateBatch(workloads=(workload("w", "10.1.0.10"),)))
    assert store.departed_by_address("", ip("10.1.0.9")) is None


def test_departed_memory_is_bounded(monkeypatch):
    from nodeagent.state import store as store_module
    from nodeagent.state.store import StateBatch

    monkeypatch.setattr(store_module, "DEPARTED_LIMIT", 3)
    store = StateStore(clock=_Clock())
    many = [workload(f"w{i}", f"10.1.1.{i}") for i in range(5)]
    store.apply(StateBatch(workloads=tuple(many)))
    store.apply(StateBatch(removed_addresses=tuple(w.uid for w in many)))
    kept = [w for w in many if store.departed_by_address("", ip(w.addresses[0]))]
    assert [w.name for w in kept] == ["w2", "w3", "w4"]
