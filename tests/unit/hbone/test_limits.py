"""Inbound HBONE connection limits: in total from accept, per peer identity after TLS."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.hbone.limits import ConnectionLimits, Refusal
from nodeagent.model.identity import Identity

ALICE = Identity("cluster.local", "ns", "alice")
BOB = Identity("cluster.local", "ns", "bob")


def test_total_limit_refuses_at_accept_and_counts() -> None:
    limits = ConnectionLimits(max_connections=2, max_per_identity=2)
    a, b = limits.admit(), limits.admit()
    assert a is not None and b is not None
    assert limits.admit() is None
    assert limits.refused_by_reason() == {"connection_limit": 1, "identity_limit": 0}
    assert limits.open == 2
    a.release()
    assert limits.admit() is not None  # the freed place is taken again


def test_identity_limit_refuses_the_third_connection_of_one_peer_only() -> None:
    limits = ConnectionLimits(max_connections=10, max_per_identity=2)
    slots = [limits.admit() for _ in range(4)]
    assert all(s is not None for s in slots)
    s1, s2, s3, s4 = slots  # type: ignore[misc]
    assert s1.claim(ALICE) and s2.claim(ALICE)
    assert not s3.claim(ALICE)
    assert s4.claim(BOB)  # another identity still gets in
    assert limits.refused[Refusal.IDENTITY_LIMIT] == 1
    assert limits.held_by(ALICE) == 2
    s3.release()  # the refused connection closes: its accept place frees, ALICE's are kept
    assert limits.open == 3 and limits.held_by(ALICE) == 2
    s1.release()
    s1.release()  # idempotent
    assert limits.held_by(ALICE) == 1 and limits.open == 2
    again = limits.admit()
    assert again is not None and again.claim(ALICE)


def test_a_slot_claims_once() -> None:
    limits = ConnectionLimits(max_connections=1, max_per_identity=1)
    slot = limits.admit()
    assert slot is not None and slot.claim(ALICE)
    with pytest.raises(ValueError):
        slot.claim(BOB)


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionLimits(max_connections=0, max_per_identity=1)
    with pytest.raises(ValueError, match="max_per_identity"):
        ConnectionLimits(max_connections=2, max_per_identity=3)


@given(
    st.lists(
        st.tuples(st.sampled_from(["open", "close"]), st.sampled_from([ALICE, BOB, None])),
        max_size=60,
    )
)
def test_counts_always_match_the_connections_held(ops: list[tuple[str, Identity | None]]) -> None:
    limits = ConnectionLimits(max_connections=5, max_per_identity=3)
    held: list[tuple[object, Identity | None]] = []
    for op, identity in ops:
        if op == "open":
            slot = limits.admit()
            if slot is None:
                assert len(held) == 5
                continue
            if identity is not None and not slot.claim(identity):
                assert sum(1 for _, i in held if i == identity) == 3
                slot.release()
                continue
            held.append((slot, identity))
        elif held:
            slot, _ = held.pop(0)
            slot.release()  # type: ignore[attr-defined]
        assert limits.open == len(held) <= 5
        for who in (ALICE, BOB):
            assert limits.held_by(who) == sum(1 for _, i in held if i == who) <= 3
