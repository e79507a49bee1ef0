"""The sans-IO delta-ADS core: initial requests, ACK/NACK, versions across reconnects."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.model.constants import TYPE_URL_ADDRESS as ADDR
from nodeagent.model.constants import TYPE_URL_AUTHORIZATION as AUTHZ
from nodeagent.model.constants import TYPE_URL_DESTINATION_RULE as DR
from nodeagent.model.constants import TYPE_URL_MCP_RESOURCE as MCP
from nodeagent.model.constants import TYPE_URL_VIRTUAL_SERVICE as VS
from nodeagent.xds.protocol import (
    DeltaAdsProtocol,
    ProtocolError,
    ReceivedResource,
    ReceivedResponse,
)


def res(name: str, version: str = "v1", type_url: str = ADDR) -> ReceivedResource:
    return ReceivedResource(name=name, version=version, type_url=type_url, value=name.encode())


def response(
    nonce: str, *resources: ReceivedResource, removed: tuple[str, ...] = (), type_url: str = ADDR
) -> ReceivedResponse:
    return ReceivedResponse(type_url=type_url, nonce=nonce, resources=resources, removed=removed)


def test_first_stream_sends_wildcard_request_per_type_with_node_and_no_versions() -> None:
    proto = DeltaAdsProtocol([ADDR, AUTHZ])
    reqs = proto.start_stream()
    assert [r.type_url for r in reqs] == [ADDR, AUTHZ]
    assert all(r.include_node for r in reqs)
    assert all(r.initial_resource_versions == {} and r.response_nonce == "" for r in reqs)
    assert not proto.ready


def test_ack_carries_nonce_without_node_and_records_versions() -> None:
    proto = DeltaAdsProtocol([ADDR])
    proto.start_stream()
    action = proto.receive(response("n1", res("a", "1"), res("b", "2")))
    assert action.upserts == (("a", b"a"), ("b", b"b"))
    ack = proto.complete(action, {})
    assert ack.response_nonce == "n1" and not ack.is_nack and not ack.include_node
    assert proto.versions(ADDR) == {"a": "1", "b": "2"}


def test_nack_names_each_bad_resource_and_does_not_record_them() -> None:
    proto = DeltaAdsProtocol([ADDR])
    proto.start_stream()
    action = proto.receive(response("n1", res("a"), res("bad1"), res("bad2")))
    nack = proto.complete(action, {"bad2": "address 0: 5 bytes", "bad1": "no uid"})
    assert nack.is_nack
    assert nack.error_message == "bad1: no uid; bad2: address 0: 5 bytes"
    assert proto.versions(ADDR) == {"a": "v1"}


def test_resource_of_wrong_any_type_is_refused_before_apply() -> None:
    proto = DeltaAdsProtocol([ADDR])
    proto.start_stream()
    action = proto.receive(response("n1", res("a"), res("p", type_url=AUTHZ)))
    assert [n for n, _ in action.upserts] == ["a"]
    nack = proto.complete(action, {})
    assert nack.error_message is not None and nack.error_message.startswith("p: resource type")


def test_duplicate_name_in_one_response_is_refused_whole() -> None:
    proto = DeltaAdsProtocol([ADDR])
    proto.start_stream()
    action = proto.receive(response("n1", res("a", "1"), res("a", "2"), res("b")))
    assert [n for n, _ in action.upserts] == ["b"]
    nack = proto.complete(action, {})
    assert nack.error_message == "a: duplicate resource name in one response"
    assert proto.versions(ADDR) == {"b": "v1"}


def test_removal_forgets_version_and_previously_good_resource_nacked_is_forgotten() -> None:
    proto = DeltaAdsProtocol([ADDR])
    proto.start_stream()
    proto.complete(proto.receive(response("1", res("a", "1"), res("b", "1"))), {})
    action = proto.receive(response("2", res("b", "2"), removed=("a",)))
    assert action.removals == ("a",)
    proto.complete(action, {"b": "bad"})
    assert proto.versions(ADDR) == {}


def test_reconnect_sends_initial_resource_versions_and_node_again() -> None:
    proto = DeltaAdsProtocol([ADDR, AUTHZ])
    proto.start_stream()
    proto.complete(proto.receive(response("1", res("a", "1"), res("bad", "1"))), {"bad": "x"})
    proto.complete(proto.receive(response("2", res("ns/p", "7", AUTHZ), type_url=AUTHZ)), {})
    reqs = {r.type_url: r for r in proto.start_stream()}
    assert reqs[ADDR].initial_resource_versions == {"a": "1"}
    assert reqs[AUTHZ].initial_resource_versions == {"ns/p": "7"}
    assert all(r.include_node for r in reqs.values())
    # The new stream's first ACK again has no node.
    ack = proto.complete(proto.receive(response("1", res("a", "2"))), {})
    assert not ack.include_node
    assert proto.versions(ADDR) == {"a": "2"}


def test_ready_after_first_ack_or_nack_of_every_type() -> None:
    proto = DeltaAdsProtocol([ADDR, AUTHZ])
    proto.start_stream()
    proto.complete(proto.receive(response("1", res("bad"))), {"bad": "x"})
    assert not proto.ready
    proto.complete(proto.receive(response("2", type_url=AUTHZ)), {})
    assert proto.ready


def test_unknown_type_is_acked_without_bookkeeping() -> None:
    proto = DeltaAdsProtocol([ADDR])
    proto.start_stream()
    other = "type.googleapis.com/other.Thing"
    ack = proto.complete(proto.receive(response("1", res("x", type_url=other), type_url=other)), {})
    assert not ack.is_nack and ack.response_nonce == "1"
    assert proto.type_urls == (ADDR,)


def test_completing_out_of_order_is_a_protocol_error() -> None:
    proto = DeltaAdsProtocol([ADDR])
    proto.start_stream()
    first = proto.receive(response("1"))
    with pytest.raises(ProtocolError):
        proto.receive(response("2"))
    proto.complete(first, {})
    with pytest.raises(ProtocolError):
        proto.complete(first, {})


names = st.sampled_from(["a", "b", "c", "d"])
steps = st.lists(
    st.tuples(
        st.dictionaries(names, st.sampled_from(["1", "2", "3"]), max_size=4),  # upserts
        st.lists(names, max_size=2, unique=True),  # removals
        st.sets(names, max_size=2),  # names the sink rejects
        st.booleans(),  # reconnect before this response
    ),
    max_size=12,
)


@given(steps)
def test_versions_always_equal_the_accepted_state_across_reconnects(
    script: list[tuple[dict[str, str], list[str], set[str], bool]],
) -> None:
    proto = DeltaAdsProtocol([ADDR])
    proto.start_stream()
    model: dict[str, str] = {}
    for i, (upserts, removals, bad, reconnect) in enumerate(script):
        if reconnect:
            (initial,) = proto.start_stream()
            assert initial.initial_resource_versions == model and initial.include_node
        resp = response(str(i), *(res(n, v) for n, v in upserts.items()), removed=tuple(removals))
        action = proto.receive(resp)
        rejected = {n: "bad" for n in bad if n in upserts}
        reply = proto.complete(action, rejected)
        for n in removals:
            model.pop(n, None)
        for n, v in upserts.items():
            if n in rejected:
                model.pop(n, None)
            else:
                model[n] = v
        assert reply.is_nack == bool(rejected)
        assert all(f"{n}: bad" in (reply.error_message or "") for n in rejected)
        assert proto.versions(ADDR) == model


def test_optional_types_are_subscribed_but_never_hold_readiness() -> None:
    # A control plane that serves only ztunnel's types never answers the config kinds.
    proto = DeltaAdsProtocol([ADDR, AUTHZ, VS, DR], optional=[VS, DR])
    assert [r.type_url for r in proto.start_stream()] == [ADDR, AUTHZ, VS, DR]
    proto.complete(proto.receive(response("n1", res("a"))), {})
    assert not proto.ready
    proto.complete(proto.receive(response("n2", type_url=AUTHZ)), {})
    assert proto.ready


def test_optional_type_is_acked_and_versioned_when_it_is_served() -> None:
    proto = DeltaAdsProtocol([ADDR, VS], optional=[VS], resource_types={VS: MCP})
    proto.start_stream()
    ack = proto.complete(proto.receive(response("n1", res("shop/r", "7", MCP), type_url=VS)), {})
    assert not ack.is_nack and proto.versions(VS) == {"shop/r": "7"}


def test_config_kind_resources_must_be_envelopes() -> None:
    proto = DeltaAdsProtocol([VS], resource_types={VS: MCP})
    proto.start_stream()
    action = proto.receive(response("n1", res("shop/a", type_url=VS), type_url=VS))
    assert action.upserts == ()
    assert "istio.mcp.v1alpha1.Resource" in action.pre_rejected["shop/a"]
