"""Fake providers for the admin servers: plain in-memory data, as the components give it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest

from nodeagent.admin.loglevel import StdlibLogLevelControl
from nodeagent.admin.providers import (
    AdminProviders,
    ConfigDumpSections,
    ConnectionInfo,
    PodRules,
    PodStatus,
)

INTENDED = """*nat
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m mark --mark 0x539/0xfff -j ACCEPT
-A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""

WORKLOADS = [
    {
        "uid": "Kubernetes//Pod/default/client-1",
        "name": "client-1",
        "namespace": "default",
        "serviceAccount": "client",
        "workloadIps": ["10.1.0.5"],
        "node": "node1",
        "protocol": "HBONE",
    },
    {
        "uid": "Kubernetes//Pod/default/server-1",
        "name": "server-1",
        "namespace": "default",
        "serviceAccount": "server",
        "workloadIps": ["10.2.0.5"],
        "node": "node2",
        "protocol": "HBONE",
        "waypoint": {"destination": "default/waypoint.default.svc.cluster.local"},
    },
]
SERVICES = [
    {
        "name": "server",
        "namespace": "default",
        "hostname": "server.default.svc.cluster.local",
        "vips": ["/10.96.0.10"],
        "ports": {"80": 8080},
        "endpoints": {
            "Kubernetes//Pod/default/server-1": {"workloadUid": "x", "status": "Healthy"},
            "Kubernetes//Pod/default/server-2": {"workloadUid": "y", "status": "Unhealthy"},
        },
    }
]
POLICIES = [
    {"name": "deny-client", "namespace": "default", "scope": "Namespace", "action": "Deny"},
]
CERTIFICATES = [
    {
        "identity": "spiffe://cluster.local/ns/default/sa/client",
        "state": "Available",
        "certChain": [
            {
                "pem": "LS0t",
                "serialNumber": "1a2b",
                "validFrom": "2020-01-01T00:00:00Z",
                "expirationTime": "2099-01-01T00:00:00Z",
            }
        ],
        "rootCerts": [
            {
                "pem": "LS0t",
                "serialNumber": "ff",
                "validFrom": "2020-01-01T00:00:00Z",
                "expirationTime": "2021-01-01T00:00:00Z",
            }
        ],
    }
]
PODS = [
    PodStatus(
        uid="Kubernetes//Pod/default/client-1",
        name="client-1",
        namespace="default",
        service_account="client",
        capture_state="ready",
        listeners=("10.1.0.5:15001", "10.1.0.5:15006", "10.1.0.5:15008"),
        netns="/var/run/netns/client-1",
        backend="iptables",
    ),
    PodStatus(
        uid="Kubernetes//Pod/default/client-2",
        name="client-2",
        namespace="default",
        capture_state="failed",
        last_error="iptables-restore: exit 1",
        attempts=3,
    ),
]
CONNECTIONS = [
    ConnectionInfo(
        workload="default/client-1",
        uid="Kubernetes//Pod/default/client-1",
        direction="outbound",
        local="10.1.0.5:40000",
        remote="10.2.0.5:15008",
        remote_target="10.96.0.10:80",
        protocol="HBONE",
        src_identity="spiffe://cluster.local/ns/default/sa/client",
        dst_identity="spiffe://cluster.local/ns/default/sa/server",
        bytes_sent=100,
        bytes_recv=2000,
    )
]


class FakePods:
    def pods(self) -> list[PodStatus]:
        return list(PODS)


class FakeConnections:
    def connections(self) -> list[ConnectionInfo]:
        return list(CONNECTIONS)


class FakeRules:
    """client-1 has one intended rule deleted in the kernel and one stranger added."""

    def __init__(self) -> None:
        self.installed = INTENDED.replace(
            "-A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n", "-A ISTIO_OUTPUT -j DROP\n"
        ).replace("[0:0]", "[12:3400]")

    async def pod_rules(self, pod: str) -> PodRules | None:
        if pod not in ("default/client-1", "client-1", "Kubernetes//Pod/default/client-1"):
            return None
        return PodRules(
            uid="Kubernetes//Pod/default/client-1",
            name="client-1",
            namespace="default",
            intended=INTENDED,
            installed=self.installed,
        )


class FakeExplain:
    def explain(self, from_pod: str, to_host: str, to_port: int) -> Mapping[str, Any]:
        if from_pod != "default/client-1":
            raise LookupError(f"unknown pod {from_pod!r}")
        if to_port == 0:
            raise ValueError("port 0 is not a destination")
        verdict = "deny" if to_port == 9999 else "allow"
        return {
            "verdict": verdict,
            "destination": f"{to_host}:{to_port}",
            "endpoint": "10.2.0.5:8080",
            "policy": "default/deny-client" if verdict == "deny" else "",
            "traffic": {
                "route": "default/canary tcp[0]",
                "destinations": [
                    {"subset": "v1", "weight": 90, "candidates": [{"address": "10.2.0.5:8080"}]},
                    {"subset": "v2", "weight": 10, "candidates": []},
                ],
            },
            "steps": [f"{to_host} is service default/server", f"verdict {verdict}"],
        }


def _events(**counts: int) -> dict[str, int]:
    names = ("overflow", "fault_abort", "fault_delay", "retry", "mirror_dropped", "ejection")
    return {name: counts.get(name, 0) for name in names}


def _endpoint(workload: str, address: str, version: str, **state: Any) -> dict[str, Any]:
    return {
        "workload": workload,
        "address": address,
        "servicePort": 80,
        "version": version,
        "healthy": True,
        "ejectedSeconds": None,
        "ejections": 0,
        "active": 0,
        **state,
    }


BACKEND = "demo/backend.demo.svc.cluster.local"
# `/routes` as the agent answers it (tests/unit/admin/test_traffic.py builds the real one).
ROUTES: dict[str, Any] = {
    "services": [
        {
            "service": BACKEND,
            "hostname": "backend.demo.svc.cluster.local",
            "virtualService": "demo/canary",
            "destinationRule": "demo/backend",
            "routes": [
                {
                    "name": "demo/canary tcp[0]",
                    "match": ["port 80, sourceLabels app=web"],
                    "destinations": [
                        {
                            "host": "backend",
                            "service": BACKEND,
                            "subset": "v1",
                            "port": None,
                            "weight": 90,
                        },
                        {
                            "host": "backend",
                            "service": BACKEND,
                            "subset": "v2",
                            "port": None,
                            "weight": 10,
                        },
                    ],
                    "maxConnectAttempts": 3,
                    "fault": {"abortPercent": 5.0, "delaySeconds": 1.0, "delayPercent": 20.0},
                    "mirror": {
                        "host": "echo",
                        "service": "demo/echo.demo.svc.cluster.local",
                        "subset": "",
                        "port": None,
                        "weight": 100,
                        "percent": 50.0,
                    },
                },
            ],
            "subsets": [
                {
                    "name": "v1",
                    "labels": {"version": "v1"},
                    "ports": [
                        {
                            "port": 80,
                            "open": 3,
                            "maxConnections": 10,
                            "loadBalancer": "",
                            "events": _events(overflow=2),
                        }
                    ],
                    "endpoints": [_endpoint("demo/backend-1", "10.1.0.7:8080", "v1", active=3)],
                },
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "ports": [
                        {
                            "port": 80,
                            "open": 0,
                            "maxConnections": 10,
                            "loadBalancer": "",
                            "events": _events(ejection=1, retry=4),
                        }
                    ],
                    "endpoints": [
                        _endpoint(
                            "demo/backend-2",
                            "10.2.0.7:8080",
                            "v2",
                            ejectedSeconds=21.5,
                            ejections=1,
                        ),
                    ],
                },
            ],
            "notes": [],
            "needsWaypoint": ["demo/canary: spec.http"],
        },
    ],
    "notes": ["VirtualService demo/typo: host nosuch is not a service"],
}


class FakeRoutes:
    def routes(self) -> Mapping[str, Any]:
        return ROUTES


class DrainRecorder:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


@pytest.fixture
def drain() -> DrainRecorder:
    return DrainRecorder()


@pytest.fixture
def providers(drain: DrainRecorder) -> AdminProviders:
    return AdminProviders(
        config_dump=ConfigDumpSections(
            workloads_fn=lambda: list(WORKLOADS),
            services_fn=lambda: list(SERVICES),
            policies_fn=lambda: list(POLICIES),
            certificates_fn=lambda: list(CERTIFICATES),
            config_fn=lambda: {"clusterDomain": "cluster.local", "redirectBackend": "iptables"},
        ),
        pods=FakePods(),
        connections=FakeConnections(),
        log_level=StdlibLogLevelControl(
            "info", root=logging.getLogger("fake-root"), own=logging.getLogger("fake-own")
        ),
        rules=FakeRules(),
        explain=FakeExplain(),
        routes=FakeRoutes(),
        drain_then_exit=drain,
    )


Fetch = Callable[..., Awaitable[tuple[int, dict[str, str], bytes]]]


async def _fetch(
    method: str,
    path: str,
    *,
    tcp: tuple[str, int] | None = None,
    unix: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over TCP or a Unix socket: (status, headers, body)."""
    if unix is not None:
        reader, writer = await asyncio.open_unix_connection(unix)
    else:
        assert tcp is not None
        reader, writer = await asyncio.open_connection(*tcp)
    try:
        writer.write(raw or f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()  # the server closes after one response
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


@pytest.fixture
def fetch() -> Fetch:
    return _fetch
