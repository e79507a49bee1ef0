"""The waypoint's `/routes` on its metrics server: the agent's JSON, from the waypoint's own
state and route state (its ejections, its http routes), read by the CLI's client."""

from __future__ import annotations

import asyncio
import random

import pytest

from nodeagent.admin.client import AdminClient, AdminError
from nodeagent.admin.httpserver import HttpServer
from nodeagent.admin.traffic import RoutesReport
from nodeagent.model.workload import Port
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector
from nodeagent.waypoint.admin import admin_routes
from tests.builders import destination_rule, service, virtual_service, workload

pytestmark = pytest.mark.unit

BACKEND = service("backend", "10.96.0.10", namespace="demo", ports=(Port(80, 8080),))


def mesh() -> tuple[StateStore, ServiceRouting]:
    store = StateStore()
    store.apply(
        StateBatch(
            workloads=tuple(
                workload(
                    name,
                    addr,
                    namespace="demo",
                    canonical_name="backend",
                    canonical_revision=version,
                    services={BACKEND.key: (Port(80, 8080),)},
                )
                for name, addr, version in (("a", "10.0.0.1", "v1"), ("b", "10.0.0.2", "v2"))
            ),
            services=(BACKEND,),
            virtual_services=(
                virtual_service(
                    "backend",
                    "demo",
                    spec={
                        "hosts": ["backend"],
                        "http": [
                            {
                                "route": [{"destination": {"host": "backend", "subset": "v2"}}],
                                "retries": {"attempts": 1},
                            }
                        ],
                    },
                ),
            ),
            destination_rules=(
                destination_rule(
                    "backend",
                    "demo",
                    spec={
                        "host": "backend",
                        "trafficPolicy": {
                            "outlierDetection": {
                                "consecutive5xxErrors": 1,
                                "maxEjectionPercent": 100,
                            },
                        },
                        "subsets": [{"name": "v2", "labels": {"version": "v2"}}],
                    },
                ),
            ),
        )
    )
    return store, ServiceRouting(store, OutlierDetector(lambda: 1000.0), random.Random(1))


async def test_waypoint_serves_the_agents_routes_json_with_its_own_ejections() -> None:
    store, routing = mesh()
    target = routing.table.target(BACKEND.key, 80, "v2")
    assert target is not None
    [b] = routing.endpoints_of(target)[0]
    routing.balancer.record(target, b, False, [b.key])  # the waypoint's outlier detection ejects
    server = HttpServer("waypoint-metrics", admin_routes(store, routing))
    host, port = await server.listen_tcp("127.0.0.1", 0)
    try:
        client = AdminClient(f"http://{host}:{port}", what="waypoint")
        data = await asyncio.to_thread(client.routes)
    finally:
        await server.stop()
    # One builder for agent and waypoint: the same answer, but for who applies it.
    assert data == {**RoutesReport(store, routing).routes(), "proxy": "waypoint"}
    [backend] = data["services"]
    [route] = backend["httpRoutes"]
    assert route["retries"]["attempts"] == 1 and route["retries"]["retryOnDefault"]
    v2 = next(s for s in backend["subsets"] if s["name"] == "v2")
    [endpoint] = v2["endpoints"]
    assert (endpoint["address"], endpoint["ejectedSeconds"], endpoint["ejections"]) == (
        "10.0.0.2:8080",
        30.0,
        1,
    )


async def test_a_waypoint_without_routes_is_named_not_a_bare_404() -> None:
    server = HttpServer("waypoint-metrics", {})
    host, port = await server.listen_tcp("127.0.0.1", 0)
    try:
        client = AdminClient(f"http://{host}:{port}", what="waypoint")
        with pytest.raises(AdminError) as exc:
            await asyncio.to_thread(client.routes)
    finally:
        await server.stop()
    assert str(exc.value) == (
        f"waypoint at http://{host}:{port} does not serve /routes (no such endpoint: /routes)"
    )
