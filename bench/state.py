"""Benchmark: convert and index N workloads and M services in one xDS batch.

Builds realistic `istio.workload.Address` resources (each workload in one service,
with an IP, a service account, a node, locality and a port mapping; each service
with a VIP and two ports), serializes them as the xDS client would receive them,
then times `StateUpdater.apply_delta` on one batch. A second, separate run under
tracemalloc gives the peak and retained Python memory (tracemalloc slows the code,
so time is measured without it).

    python -m bench.state [--workloads 10000] [--services 1000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import resource
import time
import tracemalloc

from bench.report import emit
from nodeagent.model import workload as wm
from nodeagent.model.constants import TYPE_URL_ADDRESS
from nodeagent.state.encode import address_resource_name, address_to_pb
from nodeagent.state.store import StateStore
from nodeagent.state.updater import StateUpdater


def build_batch(n_workloads: int, n_services: int) -> list[tuple[str, bytes]]:
    services = [
        wm.Service(
            name=f"svc-{i}",
            namespace=f"ns-{i % 50}",
            hostname=f"svc-{i}.ns-{i % 50}.svc.cluster.local",
            addresses=(wm.NetworkAddress("", ipaddress.IPv4Address(0x0A600000 + i)),),
            ports=(wm.Port(80, 8080, wm.AppProtocol.HTTP11), wm.Port(443, 8443)),
        )
        for i in range(n_services)
    ]
    workloads = []
    for i in range(n_workloads):
        svc = services[i % n_services]
        workloads.append(
            wm.Workload(
                uid=f"Kubernetes//Pod/{svc.namespace}/pod-{i}",
                name=f"pod-{i}",
                namespace=svc.namespace,
                addresses=(ipaddress.IPv4Address(0x0A010000 + i),),
                network="",
                tunnel_protocol=wm.TunnelProtocol.HBONE,
                service_account=f"sa-{i % n_services}",
                node=f"node-{i % 100}",
                canonical_name=svc.name,
                canonical_revision="v1",
                workload_name=f"deploy-{i % n_services}",
                services={svc.key: (wm.Port(80, 8080), wm.Port(443, 8443))},
                authorization_policies=(f"{svc.namespace}/allow-{i % n_services}",),
                cluster_id="Kubernetes",
                locality=wm.Locality("region-1", f"zone-{i % 3}"),
            )
        )
    values: list[wm.Workload | wm.Service] = [*services, *workloads]
    return [(address_resource_name(v), address_to_pb(v).SerializeToString()) for v in values]


def run_once(batch: list[tuple[str, bytes]]) -> tuple[float, StateUpdater, dict[str, str]]:
    updater = StateUpdater(StateStore())
    start = time.perf_counter()
    rejected = updater.apply_delta(TYPE_URL_ADDRESS, batch, [])
    return time.perf_counter() - start, updater, rejected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    args = parser.parse_args()

    batch = build_batch(args.workloads, args.services)
    input_bytes = sum(len(data) for _, data in batch)

    times = []
    for _ in range(args.repeat):
        gc.collect()
        elapsed, updater, rejected = run_once(batch)
        assert not rejected, rejected
        times.append(elapsed)
        del updater

    gc.collect()
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    _, updater, _ = run_once(batch)
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    store = updater.store
    # Sanity: the indexes hold what was sent.
    first = store.service("ns-0/svc-0.ns-0.svc.cluster.local")
    assert first is not None
    assert len(store.endpoints(first.key)) == args.workloads // args.services

    emit(
        {
            "workloads": args.workloads,
            "services": args.services,
            "resources": len(batch),
            "input_bytes": input_bytes,
            "apply_delta_seconds_best": round(min(times), 3),
            "apply_delta_seconds_all": [round(t, 3) for t in times],
            "per_resource_us": round(min(times) / len(batch) * 1e6, 1),
            "tracemalloc_peak_mib": round((peak - base) / 2**20, 1),
            "tracemalloc_retained_mib": round((retained - base) / 2**20, 1),
            "max_rss_mib_before_traced_run": round(rss_before_kib / 1024, 1),
            "counts": store.counts(),
        },
        indent=2,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
