"""Benchmark: new connections per second through a service, with and without traffic management.

A 2x2 sandbox with agents; the client is node1-pod1, the service the sandbox's `backend`
(two pods, v1 and v2). Interleaved rounds: the connection rate (short HTTP/1.1 requests,
one connection each, `bench.probe connrate`) to the service's VIP as it is, then with a
DestinationRule (two subsets, a connection pool, outlier detection) and a VirtualService
(a 50/50 split: the same spread over the two pods as the service's own random pick, so
the two measurements differ only by traffic management, not by where the connections
land) applied through `sandbox apply`, then removed again.

    python -m bench.traffic [--rounds 3] [--seconds 5]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.harness import HTTP_PORT, NODEAGENT, Session, in_ns, program, require_root, sh
from bench.report import emit

BACKEND_VIP = "10.96.0.10"

SETTLE = 3.0  # seconds for an apply to reach the agents (file poll + xDS push)

ROUTING = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: demo}
spec:
  host: backend
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 10000, connectTimeout: 5s}}
    outlierDetection: {consecutive5xxErrors: 5, baseEjectionTime: 30s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend-split, namespace: demo}
spec:
  hosts: [backend]
  tcp:
  - route:
    - {destination: {host: backend, subset: v1}, weight: 50}
    - {destination: {host: backend, subset: v2}, weight: 50}
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if not require_root("traffic"):
        return 0
    with Session("traffic") as session:
        box = session.sandbox("t", agents=True, pods_per_node=2)
        client = box.pods["node1-pod1"]["netns"]
        routing = session.workdir / "routing.yaml"
        routing.write_text(ROUTING)

        def rate() -> float:
            argv = program("probe", "connrate", BACKEND_VIP, str(HTTP_PORT), str(args.seconds))
            return float(sh(*in_ns(client, *argv)).stdout)

        def apply(*extra: str) -> None:
            sh(NODEAGENT, "sandbox", "apply", box.name, str(routing), *extra)
            time.sleep(SETTLE)

        plain, routed = [], []
        for _ in range(args.rounds):
            plain.append(rate())
            apply()
            routed.append(rate())
            apply("--delete")
        result = {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "conn_per_s_plain": round(statistics.median(plain), 1),
            "conn_per_s_with_vs_dr": round(statistics.median(routed), 1),
            "plain_rounds": [round(r, 1) for r in plain],
            "with_vs_dr_rounds": [round(r, 1) for r in routed],
        }
        result["ratio"] = round(result["conn_per_s_with_vs_dr"] / result["conn_per_s_plain"], 3)
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
