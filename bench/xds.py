"""Time and memory to receive and index a large mesh over delta xDS; print JSON.

The real control plane (ControlPlaneServer, fed by a generated mesh file) and
the real client (XdsClient -> StateUpdater -> StateStore) run in one process on
loopback. Measured:
* `server_load_s`: parse + validate the mesh file and build every resource,
* `client_ready_s`: client start -> every resource received, converted, indexed
  and ACKed (the median of --runs fresh clients),
* `update_s`: one workload edited in the file -> that change indexed by the
  client, through the server's file watch (inotify; the 0.5 s poll is only its
  safety net): the median of --edits edits, each of another workload's IP, in the
  single mesh file (`update_layout`). Goal (issue 21): `update_goal_s`, met or not
  in `update_goal_met`; `update_spliced` says whether every edit was read
  incrementally (only the edited entry parsed, see controlplane/reader.py),
* `update_add_s`: a workload added at the end of the list (the lines after it
  move: the services' positions are shifted, not read again),
* `update_full_read_s`: one edit read in full (the reader's incremental path off),
  as every edit was before it: the figure this replaces,
* `rss_*_mb`: resident memory of the process (server and client together):
  before the client starts, and the peak (ru_maxrss) at the end,
* `client_alloc_peak_mb` (with --tracemalloc): Python allocations of one client
  run alone, from its start until indexed (tracemalloc slows the run down, so
  it is a separate run and its time is not reported).

    python -m bench.xds [--workloads 10000] [--services 1000] [--runs 3] [--edits 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import os
import resource
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.harness import rss_kib
from bench.report import emit, goal
from nodeagent.config import Config
from nodeagent.controlplane.server import ControlPlaneServer
from nodeagent.state.store import StateStore
from nodeagent.state.updater import StateUpdater
from nodeagent.xds.client import XdsClient


def generate_mesh(workloads: int, services: int, nodes: int = 100) -> str:
    lines = ["meshConfig: {trustDomain: cluster.local}", "nodes:"]
    lines += [f"- {{name: node{n}, token: tok-{n}}}" for n in range(nodes)]
    lines.append("workloads:")
    for i in range(workloads):
        svc = i % services
        ip = f"10.{i // 65536 + 1}.{(i // 256) % 256}.{i % 256}"
        lines.append(
            f"- {{name: pod{i}, namespace: ns{svc % 20}, node: node{i % nodes}, ip: {ip}, "
            f"serviceAccount: sa{svc}, labels: {{app: app{svc}, version: v1}}}}"
        )
    lines.append("services:")
    for s in range(services):
        lines.append(
            f"- {{name: svc{s}, namespace: ns{s % 20}, vip: 10.96.{s // 256}.{s % 256}, "
            f"ports: [{{port: 80, targetPort: 8080}}, {{port: 443, targetPort: 8443}}], "
            f"selector: {{app: app{s}}}}}"
        )
    lines.append("authorizationPolicies:")
    for p in range(20):
        lines.append(
            f"- metadata: {{name: allow-ns{p}, namespace: ns{p}}}\n"
            f"  spec: {{rules: [{{from: [{{source: {{namespaces: [ns{p}, istio-system]}}}}]}}]}}"
        )
    return "\n".join(lines) + "\n"


UPDATE_GOAL_S = 0.2
"""Issue 21: a mesh-file edit reaches clients in 200 ms with 10,000 workloads."""


async def edit(path: Path, text: str, store: StateStore, ip: str) -> float:
    """Write `text` (as an editor saves: in place) and time until `ip` is indexed."""
    start = time.perf_counter()
    path.write_text(text)  # noqa: ASYNC240 (the write is what is timed)
    target = ipaddress.ip_address(ip)
    while store.workload_by_address("", target) is None:  # noqa: ASYNC110 (poll the store)
        await asyncio.sleep(0.001)
    return time.perf_counter() - start


def rss_mb() -> float:
    return rss_kib([os.getpid()]) / 1024


async def client_run(port: int, token: Path, expected: int) -> tuple[float, XdsClient, StateStore]:
    store = StateStore()
    cfg = Config(
        xds_address=f"http://127.0.0.1:{port}", auth_token_path=str(token), node_name="node0"
    )
    client = XdsClient(cfg, StateUpdater(store))
    start = time.perf_counter()
    client.start()
    await client.wait_ready()
    elapsed = time.perf_counter() - start
    counts = store.counts()
    if (
        client.stats.nacks
        or sum(1 for _ in store.workloads()) + sum(1 for _ in store.services()) != expected
    ):
        raise SystemExit(
            f"incomplete: {counts}, nacks={client.stats.nacks} {client.stats.last_nack[:200]}"
        )
    return elapsed, client, store


async def bench(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        mesh_path = Path(tmp) / "mesh.yaml"
        text = generate_mesh(args.workloads, args.services)
        mesh_path.write_text(text)
        token = Path(tmp) / "token"
        token.write_text("tok-0")
        t0 = time.perf_counter()
        # As `nodeagent controlplane` runs it (freeze_gc; inotify, the default 0.5 s poll).
        server = ControlPlaneServer(mesh_path, "127.0.0.1:0", freeze_gc=True)
        server_load = time.perf_counter() - t0
        await server.start()
        expected = args.workloads + args.services
        try:
            gc.collect()
            rss_before = rss_mb()
            times = []
            for _ in range(args.runs):
                elapsed, client, store = await client_run(server.port, token, expected)
                times.append(elapsed)
                last = (client, store)
                if len(times) < args.runs:
                    await client.stop()
            rss_after = rss_mb()
            client, store = last
            # Incremental edits, end to end through the file watcher.
            updates, spliced = [], True
            for i in range(args.edits):
                text = text.replace(f"ip: 10.1.0.{i},", f"ip: 10.200.0.{i},", 1)
                updates.append(await edit(mesh_path, text, store, f"10.200.0.{i}"))
                spliced = spliced and server.watcher.last_spliced
            # A workload added (the lines after it move), then an edit read in full.
            added = "- {name: added, namespace: ns0, node: node0, ip: 10.201.0.1}\n"
            text = text.replace("services:\n", added + "services:\n", 1)
            add = await edit(mesh_path, text, store, "10.201.0.1")
            add_spliced = server.watcher.last_spliced
            server.watcher.reader.incremental = False
            text = text.replace("ip: 10.1.0.100,", "ip: 10.202.0.1,", 1)
            full_read = await edit(mesh_path, text, store, "10.202.0.1")
            await client.stop()
            alloc_peak = None
            if args.tracemalloc:
                gc.collect()
                tracemalloc.start()
                _, c2, _ = await client_run(server.port, token, expected)
                alloc_peak = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
                await c2.stop()
        finally:
            await server.stop(grace=None)
        return {
            "workloads": args.workloads,
            "services": args.services,
            "mesh_file_kb": round(len(text) / 1024),
            "server_load_s": round(server_load, 3),
            "client_ready_s": round(statistics.median(times), 3),
            "client_ready_runs_s": [round(t, 3) for t in times],
            "update_s": round(statistics.median(updates), 3),
            "update_runs_s": [round(t, 3) for t in updates],
            "update_goal_s": UPDATE_GOAL_S,
            "update_goal_met": statistics.median(updates) <= UPDATE_GOAL_S,
            "goals": [
                goal(
                    f"mesh-file edit reaching a client, {args.workloads} workloads (s)",
                    statistics.median(updates),
                    "<=",
                    UPDATE_GOAL_S,
                )
            ],
            "update_layout": f"one file, {args.workloads} workloads, one workload's ip edited",
            "update_watch": "inotify" if server.watcher.watching_events else "poll",
            "update_spliced": spliced,
            "update_add_s": round(add, 3),
            "update_add_spliced": add_spliced,
            "update_full_read_s": round(full_read, 3),
            "rss_before_client_mb": round(rss_before, 1),
            "rss_after_clients_mb": round(rss_after, 1),
            "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "client_alloc_peak_mb": None if alloc_peak is None else round(alloc_peak, 1),
        }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workloads", type=int, default=10_000)
    p.add_argument("--services", type=int, default=1_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--edits", type=int, default=5, help="edits timed (median reported)")
    p.add_argument(
        "--tracemalloc", action="store_true", help="also measure one client's allocations"
    )
    args = p.parse_args()
    emit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
