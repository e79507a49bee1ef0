"""Matching workloads to namespaces by IP, and changes between scans (pure core); the
address dump parsed; the scanner against a fake worker."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest

from nodeagent.datapath.discovery import (
    Appeared,
    NetnsScanner,
    Replaced,
    Vanished,
    addr_dump_request,
    diff_matches,
    match_workloads,
    parse_addr_dump,
    unowned_namespaces,
)
from nodeagent.datapath.netns import NetnsHandle

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


# -- the address dump (netlink) ---------------------------------------------------------


def nlmsg(kind: int, body: bytes, seq: int = 1) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 2, seq, 0) + body + b"\0" * (-length % 4)


def rtattr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def newaddr(family: int, address: str, *, local: str = "") -> bytes:
    raw = ipaddress.ip_address(address).packed
    attrs = rtattr(1, raw)  # IFA_ADDRESS
    if local:
        attrs += rtattr(2, ipaddress.ip_address(local).packed)  # IFA_LOCAL: not listed
    attrs += rtattr(3, b"d0\0")  # IFA_LABEL: padded to 4
    return nlmsg(20, struct.pack("=BBBBI", family, 32, 0, 0, 2) + attrs)


DONE = nlmsg(3, struct.pack("=i", 0))


def test_address_dump_request_asks_every_family() -> None:
    request = addr_dump_request(7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (len(request), 22, 0x301, 7)  # RTM_GETADDR, a dump
    assert request[16] == 0  # AF_UNSPEC: IPv4 and IPv6


@pytest.mark.parametrize(
    ("reads", "addresses"),
    [
        ([DONE], set()),
        (
            [newaddr(2, "10.1.0.5") + newaddr(10, "fd00:0:0::5") + DONE],
            {"10.1.0.5", "fd00::5"},
        ),
        # A dump spread over several reads; IFA_ADDRESS (the peer of a point-to-point
        # link) is what pyroute2's get_addr listed, so it stays what is matched.
        ([newaddr(2, "127.0.0.1"), newaddr(2, "10.9.0.1", local="10.1.0.5"), DONE],
         {"127.0.0.1", "10.9.0.1"}),
    ],
    ids=["empty", "both-families", "several-reads"],
)  # fmt: skip
def test_address_dump_is_parsed_until_done(reads: list[bytes], addresses: set[str]) -> None:
    found: set[str] = set()
    done = [parse_addr_dump(data, found) for data in reads]
    assert done == [False] * (len(reads) - 1) + [True]
    assert found == addresses


def test_address_dump_error_and_truncation_are_raised() -> None:
    with pytest.raises(OSError, match="Operation not permitted"):
        parse_addr_dump(nlmsg(2, struct.pack("=i", -1)), set())  # NLMSG_ERROR, -EPERM
    with pytest.raises(ValueError, match="malformed"):
        parse_addr_dump(newaddr(2, "10.1.0.5")[:-4], set())


# -- the scanner re-reads only what may have changed ------------------------------------


class FakeWorker:
    """Stands in for a NetnsWorker: the addresses of each namespace path, and every read."""

    def __init__(self, addresses: dict[str, set[str]]) -> None:
        self.addresses = addresses
        self.reads: list[str] = []

    def call(self, handle: NetnsHandle, fn: object) -> frozenset[str]:
        self.reads.append(Path(handle.path).name)
        return frozenset(self.addresses[Path(handle.path).name])


def test_a_scan_reuses_fresh_reads_of_owned_namespaces_and_rereads_the_rest(
    tmp_path: Path,
) -> None:
    netns, proc = tmp_path / "netns", tmp_path / "proc"
    netns.mkdir()
    proc.mkdir()  # no processes
    for name in ("pod-a", "pod-b", "other"):
        (netns / name).touch()
    worker = FakeWorker({"pod-a": {"10.1.0.1"}, "pod-b": set(), "other": {"10.9.9.9"}})
    now = [100.0]
    scanner = NetnsScanner(
        worker,  # type: ignore[arg-type]
        netns_dir=netns,
        proc_root=proc,
        include_own=True,
        reuse_for=0.5,
        clock=lambda: now[0],
    )
    wanted = {"a": ["10.1.0.1"], "b": ["10.1.0.2"]}
    result, _ = scanner.find(wanted)
    assert sorted(worker.reads) == ["other", "pod-a", "pod-b"]
    assert result.unmatched == {"b"}
    # Pod B's address arrives (its CNI plugin ran): only what holds no wanted IP is read.
    worker.reads.clear()
    worker.addresses["pod-b"] = {"10.1.0.2"}
    now[0] += 0.1
    result, _ = scanner.find(wanted)
    assert sorted(worker.reads) == ["other", "pod-b"]
    assert result.matches.keys() == {"a", "b"}
    # Older than reuse_for: read again, whoever holds it.
    worker.reads.clear()
    now[0] += 0.5
    scanner.find(wanted)
    assert sorted(worker.reads) == ["other", "pod-a", "pod-b"]
    # A namespace under a new path (its inode recycled) is read again at once.
    worker.reads.clear()
    (netns / "pod-a").rename(netns / "pod-c")
    worker.addresses["pod-c"] = {"10.1.0.1"}
    now[0] += 0.1
    scanner.find(wanted)
    assert sorted(worker.reads) == ["other", "pod-c"]
