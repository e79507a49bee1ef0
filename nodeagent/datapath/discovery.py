"""Find the network namespace of each workload placed on this node.

Two parts:

* a pure matching core, `match_workloads`: given the addresses seen in each
  namespace and the IPs of our workloads, which namespace is each workload's
  (matches), which workloads are ambiguous (conflicts), which are not found
  yet (unmatched); and `diff_matches`, which turns two successive scans into
  appeared / replaced / vanished events;
* the OS adapter, `NetnsScanner`: lists namespaces from /var/run/netns and
  from every process's /proc/<pid>/ns/net (psutil), dedupes them by inode,
  and reads each one's addresses with pyroute2 on a NetnsWorker.

Scans are cheap and repeatable, which is how the cases are handled: a pod
whose namespace appears before its workload record simply matches on a later
scan; one that disappears is missing from the next scan (vanished); a pod
recreated with the same IP shows up under a new inode (replaced).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.datapath.netns import NETNS_DIR, NetnsHandle, NetnsWorker, current_inode

# -- pure core -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MatchResult:
    """Workload uid -> namespace inode, plus what could not be decided."""

    matches: dict[str, int]
    conflicts: dict[str, tuple[int, ...]]  # uid -> every namespace holding one of its IPs
    unmatched: frozenset[str]
    # Every namespace whose addresses were read, with them: one absent here could
    # not be read, which is not the same as holding none of a workload's IPs.
    addresses: Mapping[int, frozenset[str]] = field(default_factory=dict)


def match_workloads(
    namespaces: Mapping[int, Iterable[str]], workloads: Mapping[str, Iterable[str]]
) -> MatchResult:
    """Match workloads to namespaces by IP.

    A workload matches a namespace that holds any of its IPs; if its IPs are
    spread over several namespaces (or one IP is in several, e.g. a stale
    copy), it is a conflict: capturing the wrong namespace is worse than
    waiting a scan. A workload without IPs, or whose IPs are nowhere, is
    unmatched.
    """
    by_ip: dict[str, set[int]] = {}
    for inode, ips in namespaces.items():
        for ip in ips:
            by_ip.setdefault(_canonical(ip), set()).add(inode)
    matches: dict[str, int] = {}
    conflicts: dict[str, tuple[int, ...]] = {}
    unmatched: set[str] = set()
    for uid, ips in workloads.items():
        found: set[int] = set()
        for ip in ips:
            found |= by_ip.get(_canonical(ip), set())
        if len(found) == 1:
            matches[uid] = found.pop()
        elif found:
            conflicts[uid] = tuple(sorted(found))
        else:
            unmatched.add(uid)
    return MatchResult(
        matches=matches,
        conflicts=conflicts,
        unmatched=frozenset(unmatched),
        addresses={inode: frozenset(ips) for inode, ips in namespaces.items()},
    )


def unowned_namespaces(
    namespaces: Mapping[int, Iterable[str]], workloads: Mapping[str, Iterable[str]]
) -> set[int]:
    """Namespaces holding none of the workloads' IPs (a namespace with one of them, even
    in a conflict, is never unowned)."""
    wanted = {_canonical(ip) for ips in workloads.values() for ip in ips}
    return {
        inode
        for inode, ips in namespaces.items()
        if not any(_canonical(ip) in wanted for ip in ips)
    }


def _canonical(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip.split("/", 1)[0]))
    except ValueError:
        return ip


@dataclass(frozen=True, slots=True)
class Appeared:
    uid: str
    inode: int


@dataclass(frozen=True, slots=True)
class Replaced:
    """The workload's IP now lives in another namespace (pod sandbox recreated)."""

    uid: str
    old_inode: int
    inode: int


@dataclass(frozen=True, slots=True)
class Vanished:
    uid: str
    old_inode: int


NetnsChange = Appeared | Replaced | Vanished


def diff_matches(before: Mapping[str, int], after: Mapping[str, int]) -> list[NetnsChange]:
    """Events between two scans' matches, sorted by uid."""
    events: list[NetnsChange] = []
    for uid in sorted(set(before) | set(after)):
        old, new = before.get(uid), after.get(uid)
        if old is None and new is not None:
            events.append(Appeared(uid, new))
        elif old is not None and new is None:
            events.append(Vanished(uid, old))
        elif old is not None and new is not None and old != new:
            events.append(Replaced(uid, old, new))
    return events


# -- OS adapter ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ScannedNetns:
    handle: NetnsHandle
    addresses: frozenset[str]


def _read_addresses() -> frozenset[str]:
    from pyroute2 import IPRoute  # slow import: only when scanning

    with IPRoute() as ipr:
        return frozenset(str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr())


class NetnsScanner:
    """Lists this node's network namespaces and the addresses inside each."""

    def __init__(
        self,
        worker: NetnsWorker,
        *,
        netns_dir: Path = NETNS_DIR,
        proc_root: Path = Path("/proc"),
        include_own: bool = False,
    ) -> None:
        self._worker = worker
        self._netns_dir = netns_dir
        self._proc_root = proc_root
        self._include_own = include_own

    def list_namespaces(self) -> dict[int, NetnsHandle]:
        """inode -> a handle; named bind mounts are preferred over /proc paths
        (they outlive any one process)."""
        found: dict[int, NetnsHandle] = {}
        try:
            entries = sorted(self._netns_dir.iterdir())
        except OSError:
            entries = []
        for path in entries:
            self._add(found, str(path))
        for pid in self._pids():
            self._add(found, str(self._proc_root / str(pid) / "ns" / "net"))
        if not self._include_own:
            # The agent's own (host) namespace holds node addresses, never a pod.
            found.pop(self._worker.call(None, current_inode), None)
        return found

    def _pids(self) -> list[int]:
        if self._proc_root == Path("/proc"):
            import psutil

            return sorted(psutil.pids())
        try:
            return sorted(int(p.name) for p in self._proc_root.iterdir() if p.name.isdigit())
        except OSError:
            return []

    @staticmethod
    def _add(found: dict[int, NetnsHandle], path: str) -> None:
        try:
            inode = Path(path).stat().st_ino  # process gone, or not a namespace we may see
        except OSError:
            return
        if inode not in found:
            found[inode] = NetnsHandle(path=path, inode=inode)

    def scan(self) -> dict[int, ScannedNetns]:
        """Every namespace with its addresses; ones that vanish mid-scan are skipped."""
        result: dict[int, ScannedNetns] = {}
        for inode, handle in self.list_namespaces().items():
            try:
                addresses = self._worker.call(handle, _read_addresses)
            except Exception:  # gone or replaced since listing: not there any more
                continue
            result[inode] = ScannedNetns(handle=handle, addresses=addresses)
        return result

    def unowned(self, workloads: Mapping[str, Iterable[str]]) -> dict[int, NetnsHandle]:
        """Namespaces whose addresses could be read and hold none of the workloads' IPs.

        One whose addresses cannot be read right now is left out: not knowing is no reason
        to treat a namespace as nobody's.
        """
        scanned = self.scan()
        inodes = unowned_namespaces({i: s.addresses for i, s in scanned.items()}, workloads)
        return {inode: scanned[inode].handle for inode in inodes}

    def find(
        self, workloads: Mapping[str, Iterable[str]]
    ) -> tuple[MatchResult, dict[int, NetnsHandle]]:
        """Scan and match: the result and the handle of every matched namespace."""
        scanned = self.scan()
        result = match_workloads({i: s.addresses for i, s in scanned.items()}, workloads)
        handles = {inode: scanned[inode].handle for inode in result.matches.values()}
        return result, handles
