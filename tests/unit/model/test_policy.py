"""The authorization model: keys, builders and validation of bad values."""

from __future__ import annotations

import ipaddress

import pytest

from nodeagent.model.identity import Identity
from nodeagent.model.policy import (
    Action,
    Authorization,
    ConnectionAttributes,
    Match,
    PolicyError,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)


def test_key_is_namespace_slash_name() -> None:
    policy = Authorization(name="deny-sleep", namespace="default", action=Action.DENY)
    assert policy.key == "default/deny-sleep"
    assert policy.scope is Scope.WORKLOAD_SELECTOR
    assert policy.rules == ()
    assert not policy.dry_run


def test_enums_keep_protobuf_numbers() -> None:
    assert [s.value for s in Scope] == [0, 1, 2]
    assert (Action.ALLOW.value, Action.DENY.value) == (0, 1)


def test_string_match_builders_and_text() -> None:
    assert StringMatch.exact("a") == StringMatch(StringMatchKind.EXACT, "a")
    assert [str(m) for m in (StringMatch.prefix("a"), StringMatch.suffix("b"))] == ["a*", "*b"]
    assert str(StringMatch.presence()) == "*"


def test_presence_with_a_value_is_refused() -> None:
    with pytest.raises(PolicyError, match="presence"):
        StringMatch(StringMatchKind.PRESENCE, "x")


@pytest.mark.parametrize("field", ["destination_ports", "not_destination_ports"])
def test_out_of_range_port_is_refused_naming_the_field(field: str) -> None:
    with pytest.raises(PolicyError, match=field):
        Match(**{field: (70000,)})


def test_empty_match_is_empty_and_any_field_makes_it_not() -> None:
    assert Match().is_empty
    assert not Match(service_accounts=(ServiceAccountMatch("ns", "sa"),)).is_empty
    assert not Match(not_source_ips=(ipaddress.ip_network("10.0.0.0/8"),)).is_empty


def test_policy_needs_a_name() -> None:
    with pytest.raises(PolicyError, match="name"):
        Authorization(name="", namespace="default")


def test_connection_build_parses_text() -> None:
    conn = ConnectionAttributes.build("fd00::7", "[fd00::5]:8080", identity="spiffe://td/ns/a/sa/b")
    assert conn.source_ip == ipaddress.ip_address("fd00::7")
    assert conn.destination_ip == ipaddress.ip_address("fd00::5")
    assert conn.destination_port == 8080
    assert conn.source_identity == Identity("td", "a", "b")


@pytest.mark.parametrize("bad", ["10.0.0.1", "10.0.0.1:http", "10.0.0.1:99999"])
def test_connection_build_refuses_bad_destination(bad: str) -> None:
    with pytest.raises(PolicyError):
        ConnectionAttributes.build("10.0.0.2", bad)
