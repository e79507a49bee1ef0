#!/usr/bin/env python3
"""Time from a pod appearing to its capture being ready, through the real agent wiring.

For each of N pods (fresh network namespaces with a veth holding the
pod IP) the agent built by `nodeagent.app.build` (real NodeManager, iptables
backend, namespace scanner, in-pod listeners) must scan, match, apply the
in-pod rules and open 15001/15006/15008. Two orders are timed, from the moment
the second of (workload record, namespace) exists to the pod being `ready`:

* namespace first, then the workload record (the record triggers a scan at once);
* workload record first, then the namespace (found by the periodic scan, so
  this includes waiting for the next scan: about half the scan interval).

Needs root. Prints one JSON object. Usage: bench_capture.py [--pods 20] [--scan-interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nodeagent import app
from nodeagent.config import Config
from nodeagent.model.workload import Workload
from nodeagent.node.lifecycle import PodState
from nodeagent.state.store import StateBatch

NODE = "bench-node"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_pod(name: str, ip: str, made: list[str]) -> None:
    sh("ip", "netns", "add", name)
    made.append(name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    sh("ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    sh("ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "d0")
    sh("ip", "-n", name, "link", "set", "d0", "up")


def workload(uid: str, ip: str) -> Workload:
    return Workload(
        uid=uid,
        name=uid,
        namespace="bench",
        addresses=(ipaddress.ip_address(ip),),
        node=NODE,
    )


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(samples) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
        "min_ms": round(min(samples) * 1000, 1),
    }


async def bench(
    pods: int, scan_interval: float, tag: str, netns_dir: Path, proc: Path, made: list[str]
) -> dict:
    config = Config(node_name=NODE, netns_dir=str(netns_dir), proc_root=str(proc))
    agent = await app.build(config, xds=False, ca=False, scan_interval=scan_interval)
    agent.start()
    manager = agent.node_manager
    results: dict[str, list[float]] = {"namespace_then_record": [], "record_then_namespace": []}
    try:
        for order in results:
            for _ in range(pods):
                n = len(made)
                name, uid, ip = f"{tag}{n}", f"{tag}-uid{n}", f"10.250.{n // 250}.{n % 250 + 1}"
                if order == "namespace_then_record":
                    make_pod(name, ip, made)
                    (netns_dir / name).symlink_to(f"/var/run/netns/{name}")
                    start = time.monotonic()
                    agent.store.apply(StateBatch(workloads=(workload(uid, ip),)))
                else:
                    agent.store.apply(StateBatch(workloads=(workload(uid, ip),)))
                    await asyncio.sleep(0.05)
                    make_pod(name, ip, made)
                    start = time.monotonic()
                    (netns_dir / name).symlink_to(f"/var/run/netns/{name}")
                async with asyncio.timeout(30):
                    await manager.wait_for_state(uid, PodState.READY)
                results[order].append(time.monotonic() - start)
        return {
            "pods": pods,
            "scan_interval_s": scan_interval,
            **{order: summary(samples) for order, samples in results.items()},
            "setups": manager.stats.setups,
            "setup_failures": manager.stats.setup_failures,
        }
    finally:
        await agent.shutdown(cleanup=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--scan-interval", type=float, default=1.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_capture.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    tag = f"bc{os.getpid() % 100000}p"
    with tempfile.TemporaryDirectory() as tmp:
        netns_dir, proc = Path(tmp, "netns"), Path(tmp, "proc")
        netns_dir.mkdir()
        proc.mkdir()
        made: list[str] = []
        try:
            result = asyncio.run(bench(args.pods, args.scan_interval, tag, netns_dir, proc, made))
        finally:
            for name in made:
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
