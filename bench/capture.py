"""Time from a pod appearing to its capture being ready, through the real agent wiring.

For each of N pods (fresh network namespaces with a veth holding the
pod IP) the agent built by `nodeagent.app.build` (real NodeManager, iptables
backend, namespace scanner, in-pod listeners) must scan, match, apply the
in-pod rules and open 15001/15006/15008. Two orders are timed, from the moment
the second of (workload record, namespace) exists to the pod being `ready`:

* namespace first, then the workload record (the record triggers a scan at once);
* workload record first, then the namespace (found by the periodic scan, so
  this includes waiting for the next scan: about half the scan interval).

Pods are made the way the sandbox makes its namespaces (`nodeagent.sandbox.netns.NetnsAdapter`
and a `NamespacePlan`). Needs root. Prints one JSON object.

    python -m bench.capture [--pods 20] [--scan-interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import require_root
from bench.report import emit
from nodeagent import app
from nodeagent.config import Config
from nodeagent.model.workload import Workload
from nodeagent.node.lifecycle import PodState
from nodeagent.sandbox.netns import NetnsAdapter
from nodeagent.sandbox.plan import Interface, NamespacePlan, Veth
from nodeagent.state.store import StateBatch

NODE = "bench-node"


def make_pod(netns: NetnsAdapter, name: str, ip: str, made: list[str]) -> None:
    """A pod namespace holding `ip` on an interface that is up (a veth whose peer stays
    inside, down: the agent needs the address, not a path out)."""
    netns.create([name])
    made.append(name)
    veth = Veth(netns=name, ifname="d0", peer_netns=name, peer_ifname="d1")
    interface = Interface(ifname="d0", addresses=(f"{ip}/32",))
    netns.apply(NamespacePlan(name=name, role="pod", veths=(veth,), interfaces=(interface,)))


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
    netns: NetnsAdapter,
    pods: int,
    scan_interval: float,
    tag: str,
    netns_dir: Path,
    proc: Path,
    made: list[str],
) -> dict[str, object]:
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
                    make_pod(netns, name, ip, made)
                    (netns_dir / name).symlink_to(f"/var/run/netns/{name}")
                    start = time.monotonic()
                    agent.store.apply(StateBatch(workloads=(workload(uid, ip),)))
                else:
                    agent.store.apply(StateBatch(workloads=(workload(uid, ip),)))
                    await asyncio.sleep(0.05)
                    make_pod(netns, name, ip, made)
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
    if not require_root("bench.capture"):
        return 1
    tag = f"bc{os.getpid() % 100000}p"
    with tempfile.TemporaryDirectory() as tmp, NetnsAdapter() as netns:
        netns_dir, proc = Path(tmp, "netns"), Path(tmp, "proc")
        netns_dir.mkdir()
        proc.mkdir()
        made: list[str] = []
        try:
            result = asyncio.run(
                bench(netns, args.pods, args.scan_interval, tag, netns_dir, proc, made)
            )
        finally:
            for name in made:
                netns.remove(name)
    emit(result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
