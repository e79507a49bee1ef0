"""Response flags joined in Envoy's order, whatever order they were set in."""

from __future__ import annotations

import random

import pytest

from nodeagent.model.response_flags import ENVOY_ORDER, join_flags

# "set first + set next = written": each case is one request's or connection's flags.
CASES = """
URX + UT = UT,URX
UT + URX = UT,URX
FI + DI = DI,FI
URX + UF = UF,URX
UO + UF = UF,UO
DI + URX = DI,URX
 + UO = UO
UH +  = UH
UT,URX + UT = UT,URX
CONNECT + UF = UF,CONNECT
"""


@pytest.mark.parametrize("case", CASES.strip().splitlines())
def test_joined_in_envoys_order(case: str) -> None:
    """A per-try timeout then exhausted retries is UT,URX; each flag once; a flag that is
    not Envoy's (ztunnel's CONNECT) after Envoy's."""
    sides, joined = case.split(" = ")
    flags, more = sides.split(" + ")
    assert join_flags(flags.strip(), more.strip()) == joined


def test_any_insertion_order_gives_the_table_order() -> None:
    draw = random.Random(7)
    for _ in range(50):
        chosen = draw.sample(ENVOY_ORDER, 4)
        flags = ""
        for flag in chosen:
            flags = join_flags(flags, flag)
        assert flags.split(",") == [f for f in ENVOY_ORDER if f in chosen]


def test_the_table_has_each_flag_once() -> None:
    assert len(set(ENVOY_ORDER)) == len(ENVOY_ORDER)
