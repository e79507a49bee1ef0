"""The server's per-stream core: first responses, deltas, removals, initial versions."""

from __future__ import annotations

from nodeagent.controlplane.resources import VersionedResource
from nodeagent.controlplane.stream import DeltaStreamCore, StreamRequest
from nodeagent.model.constants import TYPE_URL_ADDRESS as ADDR
from nodeagent.model.constants import TYPE_URL_AUTHORIZATION as AUTHZ


def snap(
    addresses: dict[str, str], policies: dict[str, str] | None = None
) -> dict[str, dict[str, VersionedResource]]:
    def res(items: dict[str, str]) -> dict[str, VersionedResource]:
        return {n: VersionedResource(v, f"{n}@{v}".encode()) for n, v in items.items()}

    return {ADDR: res(addresses), AUTHZ: res(policies or {})}


def test_first_request_gets_everything_even_when_empty() -> None:
    core = DeltaStreamCore(snap({"a": "1", "b": "1"}))
    (addr,) = core.on_request(StreamRequest(type_url=ADDR))
    assert sorted(n for n, _, _ in addr.resources) == ["a", "b"] and addr.removed == ()
    (authz,) = core.on_request(StreamRequest(type_url=AUTHZ))
    assert authz.resources == () and authz.nonce != addr.nonce


def test_initial_versions_limit_the_first_response_to_the_difference() -> None:
    core = DeltaStreamCore(snap({"a": "1", "b": "2"}))
    (resp,) = core.on_request(
        StreamRequest(type_url=ADDR, initial_resource_versions={"a": "1", "b": "1", "gone": "1"})
    )
    assert [(n, v) for n, v, _ in resp.resources] == [("b", "2")]
    assert resp.removed == ("gone",)


def test_snapshot_change_sends_only_changes_and_removals_to_subscribed_types() -> None:
    core = DeltaStreamCore(snap({"a": "1", "b": "1"}))
    core.on_request(StreamRequest(type_url=ADDR))
    assert core.on_snapshot(snap({"a": "1", "b": "1"}, {"ns/p": "1"})) == []  # AUTHZ not subscribed
    (resp,) = core.on_snapshot(snap({"a": "2", "c": "1"}))
    assert sorted((n, v) for n, v, _ in resp.resources) == [("a", "2"), ("c", "1")]
    assert resp.removed == ("b",)
    assert core.on_snapshot(snap({"a": "2", "c": "1"})) == []


def test_acks_and_nacks_are_recorded_and_answered_with_nothing() -> None:
    core = DeltaStreamCore(snap({"a": "1"}))
    (resp,) = core.on_request(StreamRequest(type_url=ADDR))
    assert core.on_request(StreamRequest(type_url=ADDR, response_nonce=resp.nonce)) == []
    assert (
        core.on_request(
            StreamRequest(type_url=ADDR, response_nonce=resp.nonce, error_message="a: bad")
        )
        == []
    )
    assert [a.error_message for a in core.acks] == [None, "a: bad"]
    # A repeated wildcard subscription is not a new stream.
    assert core.on_request(StreamRequest(type_url=ADDR)) == []


def test_snapshot_with_changes_compares_only_the_names_changed() -> None:
    core = DeltaStreamCore(snap({"a": "1", "b": "1"}))
    core.on_request(StreamRequest(type_url=ADDR))
    core.on_request(StreamRequest(type_url=AUTHZ))
    # "b" differs too, but the hint names only "a" and "gone": only they are looked at.
    (resp,) = core.on_snapshot(snap({"a": "2", "b": "2"}), {ADDR: frozenset({"a", "gone"})})
    assert [(n, v) for n, v, _ in resp.resources] == [("a", "2")] and resp.removed == ()
    (resp,) = core.on_snapshot(snap({"b": "2"}), {ADDR: frozenset({"a"})})
    assert resp.resources == () and resp.removed == ("a",)
    # A type the hint leaves out is unchanged; an unchanged name named is not resent.
    assert core.on_snapshot(snap({"b": "2"}, {"ns/p": "1"}), {ADDR: frozenset({"a"})}) == []
    (resp,) = core.on_snapshot(snap({"b": "2"}))  # no hint: everything is compared
    assert [(n, v) for n, v, _ in resp.resources] == [("b", "2")]
