"""Matching workloads to namespaces by IP, and changes between scans (pure core)."""

from __future__ import annotations

import pytest

from nodeagent.datapath.discovery import (
    Appeared,
    Replaced,
    Vanished,
    diff_matches,
    match_workloads,
    unowned_namespaces,
)

NAMESPACES = {
    101: {"127.0.0.1", "::1", "10.1.0.5", "fd00::5"},
    102: {"127.0.0.1", "10.1.0.6"},
    103: {"10.1.0.7"},
    104: {"10.1.0.7"},  # a stale copy of 103's address
}


@pytest.mark.parametrize(
    ("workloads", "matches", "conflicts", "unmatched"),
    [
        ({"a": ["10.1.0.5"]}, {"a": 101}, {}, set()),
        ({"a": ["fd00:0::5"]}, {"a": 101}, {}, set()),  # IPv6 compared canonically
        ({"a": ["10.1.0.5", "fd00::5"]}, {"a": 101}, {}, set()),  # dual stack, one namespace
        ({"a": ["10.1.0.5", "10.1.0.6"]}, {}, {"a": (101, 102)}, set()),  # IPs split
        ({"a": ["10.1.0.7"]}, {}, {"a": (103, 104)}, set()),  # one IP in two namespaces
        ({"a": ["10.9.9.9"]}, {}, {}, {"a"}),  # pod not started yet
        ({"a": []}, {}, {}, {"a"}),  # workload without IPs
        ({"a": ["10.1.0.5"], "b": ["10.1.0.6"]}, {"a": 101, "b": 102}, {}, set()),
    ],
)
def test_match_workloads_table(workloads, matches, conflicts, unmatched) -> None:  # type: ignore[no-untyped-def]
    result = match_workloads(NAMESPACES, workloads)
    assert result.matches == matches
    assert result.conflicts == conflicts
    assert result.unmatched == frozenset(unmatched)


def test_pod_seen_before_its_workload_record_matches_on_a_later_scan() -> None:
    first = match_workloads(NAMESPACES, {})
    second = match_workloads(NAMESPACES, {"a": ["10.1.0.6"]})
    assert diff_matches(first.matches, second.matches) == [Appeared("a", 102)]


@pytest.mark.parametrize(
    ("before", "after", "events"),
    [
        ({}, {"a": 1}, [Appeared("a", 1)]),
        ({"a": 1}, {}, [Vanished("a", 1)]),
        ({"a": 1}, {"a": 2}, [Replaced("a", 1, 2)]),  # namespace reused: new inode
        ({"a": 1, "b": 2}, {"a": 1, "b": 2}, []),
        ({"b": 2}, {"a": 1}, [Appeared("a", 1), Vanished("b", 2)]),
    ],
)
def test_diff_matches_table(before, after, events) -> None:  # type: ignore[no-untyped-def]
    assert diff_matches(before, after) == events


@pytest.mark.parametrize(
    ("namespaces", "workloads", "unowned"),
    [
        ({1: ["10.0.0.1"], 2: ["10.0.0.2"]}, {"a": ["10.0.0.1"]}, {2}),
        # An IPv6 workload address matches however the namespace writes it.
        ({1: ["fd00::0:1"], 2: ["127.0.0.1"]}, {"a": ["fd00::1"]}, {2}),
        # A namespace holding a wanted IP is owned even when the IP is in two (a conflict).
        ({1: ["10.0.0.1"], 2: ["10.0.0.1"]}, {"a": ["10.0.0.1"]}, set()),
        # One of a workload's addresses is enough.
        ({1: ["10.0.0.9", "fd00::9"]}, {"a": ["10.0.0.1", "fd00::9"]}, set()),
        ({1: [], 2: ["10.0.0.3"]}, {}, {1, 2}),
    ],
    ids=["plain", "ipv6-forms", "conflict-is-owned", "any-address", "no-workloads"],
)
def test_unowned_namespaces_table(namespaces, workloads, unowned) -> None:  # type: ignore[no-untyped-def]
    assert unowned_namespaces(namespaces, workloads) == unowned
