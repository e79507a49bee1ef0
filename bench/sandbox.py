"""Time `nodeagent sandbox up` for 2x2 and 4x10 sandboxes; print JSON.

For each size: the median of 5 runs (down between runs) of
* `cli`: the whole `nodeagent sandbox up` command, as a user waits for it
  (interpreter start and imports included), and
* `inprocess`: SandboxManager.up alone.
Needs root.

    python -m bench.sandbox [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from bench.harness import NODEAGENT, require_root
from bench.report import emit
from nodeagent.sandbox.manager import SandboxManager

SIZES = ((2, 2), (4, 10))


def time_cli(name: str, nodes: int, pods: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        [NODEAGENT, "sandbox", "up", "--name", name, "--nodes", str(nodes),
         "--pods-per-node", str(pods)],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - start


def time_inprocess(manager: SandboxManager, name: str, nodes: int, pods: int) -> float:
    start = time.perf_counter()
    manager.up(name, nodes, pods)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not require_root("bench.sandbox"):
        return 1
    name = f"bench{os.getpid() % 100000}"
    results = []
    with SandboxManager() as manager:
        try:
            for nodes, pods in SIZES:
                row: dict[str, object] = {"nodes": nodes, "pods_per_node": pods}
                for mode in ("cli", "inprocess"):
                    samples = []
                    for _ in range(args.runs):
                        if mode == "cli":
                            samples.append(time_cli(name, nodes, pods))
                        else:
                            samples.append(time_inprocess(manager, name, nodes, pods))
                        manager.down(name)
                    row[f"{mode}_median_s"] = round(statistics.median(samples), 3)
                    row[f"{mode}_samples_s"] = [round(s, 3) for s in samples]
                results.append(row)
        finally:
            manager.down(name)
    emit({"benchmark": "sandbox_up", "runs": args.runs, "results": results}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
