"""`nodeagent routes --waypoint HOST:PORT` and `--sandbox NAME --waypoint`: flags, the
waypoint's answer as text, and one-line errors when there is no waypoint to ask."""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from nodeagent.admin.httpserver import HttpServer
from nodeagent.cli import agent as agent_cli
from nodeagent.cli.errors import CliError
from nodeagent.cli.main import main
from nodeagent.model.workload import Port
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.sandbox.manager import SandboxError
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector
from nodeagent.waypoint.admin import admin_routes
from tests.builders import service, virtual_service, workload

pytestmark = pytest.mark.unit

BACKEND = service("backend", "10.96.0.10", namespace="demo", ports=(Port(80, 8080),))


@asynccontextmanager
async def waypoint() -> AsyncIterator[int]:
    """A waypoint's metrics server with `/routes` (as app.py adds it); yields its port."""
    store = StateStore()
    store.apply(
        StateBatch(
            workloads=(
                workload(
                    "a",
                    "10.0.0.1",
                    namespace="demo",
                    canonical_name="backend",
                    services={BACKEND.key: (Port(80, 8080),)},
                ),
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
                                "route": [{"destination": {"host": "backend"}}],
                                "timeout": "3s",
                                "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 1}}},
                            }
                        ],
                    },
                ),
            ),
        )
    )
    routing = ServiceRouting(store, OutlierDetector(lambda: 0.0), random.Random(1))
    server = HttpServer("waypoint-metrics", admin_routes(store, routing))
    _, port = await server.listen_tcp("127.0.0.1", 0)
    try:
        yield port
    finally:
        await server.stop()


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def args(**given: Any) -> argparse.Namespace:
    base = {"agent": None, "sandbox": None, "node": None, "service": None, "waypoint": None}
    return argparse.Namespace(**{**base, **given})


@pytest.mark.parametrize(
    ("given", "service", "waypoint"),
    [
        ({}, None, None),  # no --waypoint: an agent is asked
        ({"waypoint": "10.0.0.5:15020"}, None, "10.0.0.5:15020"),
        ({"waypoint": "waypoint.demo", "service": "backend"}, "backend", "waypoint.demo"),
        ({"sandbox": "dev", "waypoint": ""}, None, ""),
        ({"sandbox": "dev", "waypoint": "", "service": "backend"}, "backend", ""),
        # `routes --sandbox dev --waypoint backend`: the word after --waypoint is the service
        ({"sandbox": "dev", "waypoint": "backend"}, "backend", ""),
        ({"sandbox": "dev", "waypoint": "demo/backend"}, "demo/backend", ""),
    ],
)
def test_waypoint_flags_accepted(given, service, waypoint) -> None:
    a = args(**given)
    agent_cli.check_waypoint_flags(a)
    assert (a.service, a.waypoint) == (service, waypoint)


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({"waypoint": ""}, "--waypoint needs HOST:PORT (the waypoint's :15020), or --sandbox NAME"),
        ({"waypoint": "h:1", "agent": "/x.sock"}, "--waypoint asks a waypoint, not an agent"),
        ({"waypoint": "", "sandbox": "dev", "node": "node1"}, "drop --agent/--node"),
        ({"waypoint": "h:1", "sandbox": "dev"}, "use either --waypoint HOST:PORT or --sandbox"),
        (
            {"waypoint": "backend", "sandbox": "dev", "service": "echo"},
            "--sandbox NAME --waypoint takes no address (got 'backend')",
        ),
    ],
)
def test_waypoint_flags_refused(given, error) -> None:
    with pytest.raises(CliError) as exc:
        agent_cli.check_waypoint_flags(args(**given))
    assert error in str(exc.value)


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("10.0.0.5:15020", "http://10.0.0.5:15020"),
        ("waypoint.demo", "http://waypoint.demo"),  # the client adds :15020
        ("http://[::1]:15020", "http://[::1]:15020"),
    ],
)
def test_waypoint_url(value, url) -> None:
    assert agent_cli.waypoint_url(value) == url


def test_waypoint_address_defaults_to_its_metrics_port() -> None:
    client = agent_cli._waypoint_client(args(waypoint="10.0.0.5"))
    assert (client._host, client._port, client.what) == ("10.0.0.5", 15020, "waypoint")


async def test_routes_from_a_waypoint_by_address(capsys: pytest.CaptureFixture[str]) -> None:
    async with waypoint() as port:
        rc, out, err = await cli(capsys, "routes", "--waypoint", f"127.0.0.1:{port}")
        assert (rc, err) == (0, "")
        assert "TIMEOUT / RETRIES / FAULT / MIRRORS" in out
        flat = " ".join(out.split())
        assert "timeout 3s; retries default: 2 on connect-failure," in flat
        assert "fault abort 500 at 1%" in flat
        assert "behind waypoint" not in out
        rc, out, _ = await cli(capsys, "routes", "backend", "--waypoint", f"127.0.0.1:{port}")
        assert rc == 0 and "backend.demo.svc.cluster.local" in out
        rc, _, err = await cli(capsys, "routes", "nosuch", "--waypoint", f"127.0.0.1:{port}")
        assert rc != 0
        assert (
            err == "nodeagent: no routes, rules or traffic for service 'nosuch' on this waypoint\n"
        )


def test_unreachable_waypoint_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routes", "--waypoint", "127.0.0.1:1"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("nodeagent: cannot reach waypoint at http://127.0.0.1:1: ")
    assert len(err.splitlines()) == 1


class FakeAdapter:
    def __init__(self, gone: bool = False) -> None:
        self.netns: list[str] = []
        self.gone = gone

    def socket(self, netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM):
        self.netns.append(netns)
        if self.gone:
            raise RuntimeError(f"network namespace {netns} does not exist")  # as NetnsError
        return socket.socket(family, type)


class FakeManager:
    """SandboxManager as the CLI reads it: `status(name)` and the namespace `adapter`."""

    def __init__(self, waypoint: dict[str, Any] | None, adapter: FakeAdapter) -> None:
        self.waypoint = waypoint
        self.adapter = adapter
        self.closed = False

    def __enter__(self) -> FakeManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def status(self, name: str) -> dict[str, Any]:
        if name != "dev":
            raise SandboxError(f"unknown sandbox {name!r} (existing: dev)")
        return {"name": name, "waypoint": self.waypoint}


RUNNING = {
    "name": "waypoint",
    "namespace": "demo",
    "node": "node1",
    "netns": "dev-node1-waypoint",
    "pid": 4242,
    "log": "/var/log/wp.log",
}


def use(monkeypatch: pytest.MonkeyPatch, manager: FakeManager) -> FakeManager:
    monkeypatch.setattr(agent_cli, "SandboxManager", lambda: manager)
    return manager


async def test_sandbox_waypoint_is_asked_inside_its_namespace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manager = use(monkeypatch, FakeManager(RUNNING, FakeAdapter()))
    async with waypoint() as port:
        monkeypatch.setattr(agent_cli, "WAYPOINT_ADMIN_PORT", port)  # :15020 in its namespace
        rc, out, err = await cli(capsys, "routes", "--sandbox", "dev", "--waypoint", "-o", "json")
    assert (rc, err) == (0, "")
    assert '"proxy": "waypoint"' in out
    assert manager.adapter.netns == ["dev-node1-waypoint"] and manager.closed


@pytest.mark.parametrize(
    ("waypoint", "adapter", "error"),
    [
        (
            None,
            FakeAdapter(),
            "nodeagent: sandbox 'dev' has no waypoint (it runs one when brought up with"
            " `nodeagent sandbox up dev --waypoint`)\n",
        ),
        (
            {"name": "waypoint", "netns": "dev-node1-waypoint", "pid": None, "log": "/l"},
            FakeAdapter(),
            "nodeagent: waypoint waypoint of sandbox 'dev' is not running (log /l)\n",
        ),
        (  # started never: no process record, so neither pid nor netns
            {"name": "waypoint", "namespace": "demo", "ip": "10.10.1.30", "node": "node1"},
            FakeAdapter(),
            "nodeagent: waypoint waypoint of sandbox 'dev' is not running\n",
        ),
        (
            RUNNING,
            FakeAdapter(gone=True),
            "nodeagent: cannot reach waypoint at 127.0.0.1:15020 in netns dev-node1-waypoint:"
            " network namespace dev-node1-waypoint does not exist\n",
        ),
    ],
)
def test_sandbox_without_a_live_waypoint_is_one_line(
    waypoint, adapter, error, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, FakeManager(waypoint, adapter))
    assert main(["routes", "--sandbox", "dev", "--waypoint"]) != 0
    assert capsys.readouterr().err == error


def test_unknown_sandbox_with_waypoint_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, FakeManager(RUNNING, FakeAdapter()))
    assert main(["routes", "--sandbox", "nosuch", "--waypoint"]) != 0
    assert capsys.readouterr().err == "nodeagent: unknown sandbox 'nosuch' (existing: dev)\n"
