"""Discovery finds a pod's namespace from its IP, by name and through a process."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from nodeagent.datapath.discovery import NetnsScanner
from nodeagent.datapath.netns import NetnsWorker

from .conftest import Topology


def test_pod_namespace_found_by_ip_under_var_run_netns(
    topology: Topology, worker: NetnsWorker
) -> None:
    scanner = NetnsScanner(worker)
    result, handles = scanner.find({"pod-a": [topology.ip_a], "ghost": ["10.254.254.254"]})
    assert result.matches == {"pod-a": topology.pod_a.inode}
    assert handles[topology.pod_a.inode].path == topology.pod_a.path
    assert result.unmatched == frozenset({"ghost"})


def test_pod_namespace_found_by_ip_through_a_process(
    topology: Topology, worker: NetnsWorker, tmp_path: Path
) -> None:
    sleeper = subprocess.Popen(["ip", "netns", "exec", topology.name_a, "sleep", "60"])
    try:
        # Popen returns before `ip netns exec` has entered the namespace.
        ns_link = Path(f"/proc/{sleeper.pid}/ns/net")
        for _ in range(500):
            if ns_link.stat().st_ino == topology.pod_a.inode:
                break
            time.sleep(0.01)
        scanner = NetnsScanner(worker, netns_dir=tmp_path)  # no named namespaces at all
        result, handles = scanner.find({"pod-a": [topology.ip_a]})
        assert result.matches == {"pod-a": topology.pod_a.inode}
        path = handles[topology.pod_a.inode].path
        assert path.startswith("/proc/") and path.endswith("/ns/net")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_deleted_pod_namespace_is_no_longer_found(topology: Topology, worker: NetnsWorker) -> None:
    scanner = NetnsScanner(worker)
    subprocess.run(["ip", "netns", "del", topology.name_b], check=True)
    result, _ = scanner.find({"pod-b": [topology.ip_b]})
    assert result.unmatched == frozenset({"pod-b"})
