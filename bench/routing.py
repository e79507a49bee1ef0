"""Benchmark: the cost of one new connection's traffic decision, and of compiling the table.

1,000 services with 4 endpoints each (two `version: v1`, two `version: v2`), each with
a DestinationRule (subsets, a connection pool, outlier detection) and a VirtualService
of `--routes` tcp routes: routes 0..N-2 match other ports, the last matches every
connection with a 90/10 split, so every decision walks all N routes (the worst case).
Times, per connection, what the agent does before it connects:

* `decide`: `RouteTable.decide` alone (match, weighted pick, faults);
* `plan+pick`: `ServiceRouting.plan` + `next_pick` (decide, the subset's endpoints,
  health, ejections, the balancer), on the same route table;
* the same `plan+pick` for a service without VirtualService or DestinationRule, as the
  reference: the difference is what traffic management adds per connection;
* `compile`: building the route table after a change.

    python -m bench.routing [--services 1000] [--routes 100] [--calls 20000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import time

from bench.report import emit
from nodeagent.model import routing as rm
from nodeagent.model import workload as wm
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector
from nodeagent.traffic.routes import Caller, RouteTable


def build(services: int, routes: int) -> StateBatch:
    svcs, workloads, rules, virtuals = [], [], [], []
    for i in range(services):
        ns, name = f"ns-{i % 50}", f"svc-{i}"
        svc = wm.Service(
            name=name,
            namespace=ns,
            hostname=f"{name}.{ns}.svc.cluster.local",
            addresses=(wm.NetworkAddress("", ipaddress.IPv4Address(0x0A600000 + i)),),
            ports=(wm.Port(80, 8080),),
        )
        svcs.append(svc)
        for j in range(4):
            workloads.append(
                wm.Workload(
                    uid=f"{name}-{j}",
                    name=f"{name}-{j}",
                    namespace=ns,
                    addresses=(ipaddress.IPv4Address(0x0A000000 + i * 8 + j),),
                    tunnel_protocol=wm.TunnelProtocol.HBONE,
                    canonical_name=name,
                    canonical_revision="v1" if j < 2 else "v2",
                    services={svc.key: (wm.Port(80, 8080),)},
                )
            )
        rules.append(
            rm.parse_destination_rule(
                ns,
                name,
                {
                    "host": name,
                    "trafficPolicy": {
                        "connectionPool": {"tcp": {"maxConnections": 1000}},
                        "outlierDetection": {"consecutive5xxErrors": 3},
                    },
                    "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}},
                        {"name": "v2", "labels": {"version": "v2"}},
                    ],
                },
            )
        )
        tcp = [
            {"match": [{"port": 1000 + k}], "route": [{"destination": {"host": name}}]}
            for k in range(routes - 1)
        ]
        tcp.append(
            {
                "route": [
                    {"destination": {"host": name, "subset": "v1"}, "weight": 90},
                    {"destination": {"host": name, "subset": "v2"}, "weight": 10},
                ]
            }
        )
        virtuals.append(rm.parse_virtual_service(ns, name, {"hosts": [name], "tcp": tcp}))
    # One more service with nothing configured: the reference.
    plain = wm.Service(
        name="plain",
        namespace="ref",
        hostname="plain.ref.svc.cluster.local",
        addresses=(wm.NetworkAddress("", ipaddress.IPv4Address(0x0A6F0000)),),
        ports=(wm.Port(80, 8080),),
    )
    svcs.append(plain)
    for j in range(4):
        workloads.append(
            wm.Workload(
                uid=f"plain-{j}",
                name=f"plain-{j}",
                namespace="ref",
                addresses=(ipaddress.IPv4Address(0x0B000000 + j),),
                tunnel_protocol=wm.TunnelProtocol.HBONE,
                services={plain.key: (wm.Port(80, 8080),)},
            )
        )
    return StateBatch(
        workloads=tuple(workloads),
        services=tuple(svcs),
        virtual_services=tuple(virtuals),
        destination_rules=tuple(rules),
    )


def per_call_us(fn: object, calls: int) -> float:
    call = fn  # type: ignore[assignment]
    start = time.perf_counter()
    for _ in range(calls):
        call()  # type: ignore[operator]
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    store = StateStore()
    store.apply(build(args.services, args.routes))
    start = time.perf_counter()
    table = RouteTable.compile(
        store.virtual_services(), store.destination_rules(), store.services()
    )
    compile_ms = (time.perf_counter() - start) * 1e3
    routing = ServiceRouting(store, OutlierDetector(time.monotonic), random.Random(1))
    routed = store.service(f"ns-{7 % 50}/svc-7.ns-{7 % 50}.svc.cluster.local")
    plain = store.service("ref/plain.ref.svc.cluster.local")
    assert routed is not None and plain is not None
    rng, caller = random.Random(2), Caller()
    vip = ipaddress.IPv4Address("10.96.0.7")

    def decide() -> None:
        table.decide(routed.key, 80, caller, rng, vip)

    def pick(service: wm.Service) -> object:
        def one() -> None:
            plan = routing.plan(None, service, 80, vip, "10.0.0.1")
            assert routing.next_pick(plan) is not None

        return one

    routing.table  # compile once, outside the timing  # noqa: B018
    figures = {
        "services": args.services,
        "routes_per_service": args.routes,
        "compile_ms": round(compile_ms, 1),
        "decide_us": round(per_call_us(decide, args.calls), 2),
        "plan_pick_us": round(per_call_us(pick(routed), args.calls), 2),
        "plan_pick_plain_us": round(per_call_us(pick(plain), args.calls), 2),
    }
    figures["added_us"] = round(figures["plan_pick_us"] - figures["plan_pick_plain_us"], 2)
    emit(figures)


if __name__ == "__main__":
    main()
