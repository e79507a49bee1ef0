"""`nodeagent workloads|services|...` against an in-process agent admin server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from nodeagent.admin.metrics import AgentMetrics
from nodeagent.admin.providers import AdminProviders
from nodeagent.admin.readiness import Readiness
from nodeagent.admin.server import AdminServers, BoundAddresses
from nodeagent.cli import agent as agent_cli
from nodeagent.cli.main import main
from nodeagent.sandbox.manager import SandboxManager
from nodeagent.sandbox.state import SandboxState, StateStore
from nodeagent.sandbox.state import admin_socket as sandbox_admin_socket


@asynccontextmanager
async def agent(providers: AdminProviders, tmp_path: Path) -> AsyncIterator[BoundAddresses]:
    servers = AdminServers(
        providers=providers,
        metrics=AgentMetrics(),
        readiness=Readiness(),
        admin_address="127.0.0.1:0",
        admin_socket=str(tmp_path / "admin.sock"),
        metrics_address="",
        readiness_address="",
    )
    async with servers:
        assert servers.bound is not None
        yield servers.bound


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # main() blocks on its HTTP request; the server runs on this loop.
    rc = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


async def test_workloads_table_over_socket_and_url(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        assert bound.admin_socket
        for target in (bound.admin_socket, bound.admin_url):
            rc, out, err = await cli(capsys, "workloads", "--agent", target)
            assert (rc, err) == (0, "")
            header, *rows = out.strip().splitlines()
            assert header.split() == [
                "NAMESPACE",
                "POD",
                "NAME",
                "ADDRESS",
                "NODE",
                "WAYPOINT",
                "PROTOCOL",
            ]
            assert rows[0].split() == ["default", "client-1", "10.1.0.5", "node1", "None", "HBONE"]
            assert rows[1].split() == [
                "default",
                "server-1",
                "10.2.0.5",
                "node2",
                "waypoint",
                "HBONE",
            ]


async def test_workloads_json_and_yaml_are_the_config_dump_section(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        rc, out, _ = await cli(capsys, "workloads", "--agent", bound.admin_url, "-o", "json")
        assert rc == 0
        data = json.loads(out)
        assert [w["uid"] for w in data] == [
            "Kubernetes//Pod/default/client-1",
            "Kubernetes//Pod/default/server-1",
        ]
        rc, out, _ = await cli(capsys, "w", "--agent", bound.admin_url, "-o", "yaml")
        assert rc == 0
        assert yaml.safe_load(out)[1]["serviceAccount"] == "server"


async def test_services_policies_certs_tables(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        target = bound.admin_url
        rc, out, _ = await cli(capsys, "services", "--agent", target)
        assert rc == 0
        assert _lines(out)[1] == [
            "default",
            "server.default.svc.cluster.local",
            "10.96.0.10",
            "None",
            "1/2",
        ]
        rc, out, _ = await cli(capsys, "policies", "--agent", target)
        assert rc == 0
        assert _lines(out) == [
            ["NAMESPACE", "POLICY", "NAME", "ACTION", "SCOPE"],
            ["default", "deny-client", "Deny", "Namespace"],
        ]
        rc, out, _ = await cli(capsys, "certs", "--agent", target)
        assert rc == 0
        rows = _lines(out)
        assert rows[0][:4] == ["CERTIFICATE", "NAME", "TYPE", "STATUS"]
        leaf, root = (r for r in rows if r[1:2] in (["Leaf"], ["Root"]))
        assert leaf[1:7] == ["Leaf", "Available", "true", "1a2b", "2099-01-01", "00:00"]
        assert root[1:5] == ["Root", "Available", "false", "ff"]  # expired in 2021
        # Issue 16: the SPIFFE id is never broken over lines (it once took three).
        assert leaf[0] == root[0] == "spiffe://cluster.local/ns/default/sa/client"
        assert len(rows) == 3


async def test_connections_and_pods(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        rc, out, _ = await cli(capsys, "connections", "--agent", bound.admin_socket or "")
        assert rc == 0
        assert _lines(out)[1] == [
            "default/client-1",
            "outbound",
            "10.1.0.5:40000",
            "10.2.0.5:15008",
            "10.96.0.10:80",
            "HBONE",
        ]
        rc, out, _ = await cli(capsys, "pods", "--agent", bound.admin_socket or "")
        assert rc == 0
        assert "ready" in out and "failed" in out
        assert "iptables-restore: exit 1" in " ".join(out.split())  # wrapped to fit
        assert all(len(line) <= 100 for line in out.splitlines())
        rc, out, _ = await cli(capsys, "pods", "--agent", bound.admin_url, "-o", "json")
        assert json.loads(out)[1]["attempts"] == 3
        rc, out, _ = await cli(capsys, "connections", "--agent", bound.admin_url, "-o", "json")
        # RFC 3339 (UTC), not a raw epoch float.
        opened = json.loads(out)[0]["opened_at"]
        assert isinstance(opened, str) and opened.endswith("Z")
        assert datetime.fromisoformat(opened).tzinfo is not None


async def test_rules_marks_missing_and_extra_lines(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        rc, out, _ = await cli(capsys, "rules", "default/client-1", "--agent", bound.admin_url)
        assert rc == 0
        summary, *table = out.strip().splitlines()
        assert "DRIFT: 1 missing (-), 1 extra (+)" in summary
        assert "-  nat    -A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in table
        assert "+  nat    -A ISTIO_OUTPUT -j DROP" in table
        rc, out, _ = await cli(
            capsys, "rules", "client-1", "--agent", bound.admin_url, "-o", "json"
        )
        assert rc == 0 and json.loads(out)["drift"] is True


async def test_unknown_pod_is_one_line_and_nonzero(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        rc, out, err = await cli(capsys, "rules", "default/ghost", "--agent", bound.admin_url)
        assert rc != 0 and out == ""
        assert err == "nodeagent: unknown pod 'default/ghost'\n"
        rc, _, err = await cli(
            capsys,
            "explain",
            "--from",
            "default/ghost",
            "--to",
            "10.0.0.1:80",
            "--agent",
            bound.admin_url,
        )
        assert rc != 0
        assert err == "nodeagent: unknown pod 'default/ghost'\n"


async def test_explain_prints_verdict_and_steps(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        args = ("explain", "--from", "default/client-1", "--agent", bound.admin_url)
        rc, out, _ = await cli(capsys, *args, "--to", "10.96.0.10:9999")
        assert rc == 0
        assert out.splitlines()[0] == "verdict: DENY"
        assert "policy: default/deny-client" in out
        assert "  2. verdict deny" in out
        # A list of mappings reads as indented items, not as raw Python or JSON.
        assert (
            "\n".join(
                [
                    "traffic:",
                    "  route: default/canary tcp[0]",
                    "  destinations:",
                    "    - subset: v1",
                    "      weight: 90",
                    "      candidates:",
                    "        - address: 10.2.0.5:8080",
                    "    - subset: v2",
                    "      weight: 10",
                    "      candidates: none",
                ]
            )
            in out
        )
        rc, out, _ = await cli(capsys, *args, "--to", "10.96.0.10:80", "-o", "json")
        assert json.loads(out)["verdict"] == "allow"
        rc, _, err = await cli(capsys, *args, "--to", "10.96.0.10")
        assert rc != 0 and len(err.splitlines()) == 1 and "bad destination" in err


async def test_routes_table_shows_routes_endpoints_and_notes(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        rc, out, _ = await cli(capsys, "routes", "--agent", bound.admin_socket or "")
        assert rc == 0
        lines = out.splitlines()
        assert lines[0].split("  ") == [
            "backend.demo.svc.cluster.local",
            "VirtualService demo/canary",
            "DestinationRule demo/backend",
        ]
        assert lines[1].split() == [
            "ROUTE",
            "MATCH",
            "DESTINATIONS",
            "FAULT",
            "/",
            "MIRROR",
            "ATTEMPTS",
        ]
        assert "v1 90%, v2 10%" in out
        assert "abort 5%, delay 1s at 20%," in out and "mirror echo at 50%" in out
        rows = {line[0]: line for line in _lines(out) if line and line[0] in ("v1", "v2")}
        assert rows["v1"] == ["v1", "3/10", "10.1.0.7:8080", "demo/backend-1", "v1", "3", "no"]
        assert rows["v2"][1:] == [
            "0/10",
            "10.2.0.7:8080",
            "demo/backend-2",
            "v2",
            "0",
            "21.5s",
            "left",
            "(1x)",  # times ejected so far
        ]
        assert "needs a waypoint (not applied): demo/canary: spec.http" in out
        assert out.rstrip().endswith("note: VirtualService demo/typo: host nosuch is not a service")
        assert all(len(line) <= 100 for line in lines)


async def test_routes_filters_by_service_and_renders_json_and_yaml(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        target = bound.admin_socket or ""
        for name in ("backend", "demo/backend", "backend.demo.svc.cluster.local"):
            rc, out, _ = await cli(capsys, "routes", name, "--agent", target, "-o", "json")
            assert rc == 0 and len(json.loads(out)["services"]) == 1, name
        rc, out, _ = await cli(capsys, "routes", "--agent", target, "-o", "yaml")
        data = yaml.safe_load(out)
        assert data["services"][0]["subsets"][1]["endpoints"][0]["ejectedSeconds"] == 21.5
        rc, _, err = await cli(capsys, "routes", "nosuch", "--agent", target)
        assert rc != 0 and "no routes, rules or traffic for service 'nosuch'" in err


async def test_log_shows_sets_and_refuses_bad_level(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agent(providers, tmp_path) as bound:
        target = bound.admin_socket or ""
        assert await cli(capsys, "log", "--agent", target) == (0, "current log level is info\n", "")
        rc, out, _ = await cli(capsys, "log", "--agent", target, "--level", "debug")
        assert (rc, out) == (0, "current log level is debug\n")
        rc, _, err = await cli(capsys, "log", "--agent", target, "--level", "loud")
        assert rc != 0 and err.startswith("nodeagent: unknown log level 'loud'")
        rc, out, _ = await cli(capsys, "log", "--agent", target, "--reset")
        assert (rc, out) == (0, "current log level is info\n")


def test_unreachable_agent_is_one_line_and_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "none.sock")
    assert main(["workloads", "--agent", sock]) != 0
    _, err = capsys.readouterr()
    assert err == f"nodeagent: cannot reach agent at {sock}: no such socket\n"
    assert main(["pods", "--agent", "http://127.0.0.1:1"]) != 0
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1
    assert err.startswith("nodeagent: cannot reach agent at http://127.0.0.1:1: ")


def test_bad_flag_value_is_one_line_and_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["workloads", "-o", "xml"])
    assert exc.value.code != 0
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1
    assert "invalid choice: 'xml'" in err


def test_agent_and_sandbox_flags_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pods", "--agent", "/x.sock", "--sandbox", "s", "--node", "n"]) != 0
    assert main(["pods", "--sandbox", "s"]) != 0
    _, err = capsys.readouterr()
    assert err.splitlines() == [
        "nodeagent: use either --agent or --sandbox/--node, not both",
        "nodeagent: --sandbox and --node go together",
    ]


def test_sandbox_flags_resolve_to_the_node_socket(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        sandbox_admin_socket("demo", "node1") == "/var/run/nodeagent-sandbox/demo/node1/admin.sock"
    )
    with pytest.raises(ValueError):
        sandbox_admin_socket("../x", "node1")
    assert main(["pods", "--sandbox", "no-such-sandbox-xyz", "--node", "node1"]) != 0
    _, err = capsys.readouterr()
    # Issue 16: an unknown sandbox is named as such, not as a socket that is not there.
    assert "unknown sandbox 'no-such-sandbox-xyz'" in err


async def test_log_speaks_json_and_yaml(
    providers: AdminProviders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The README presents -o as common to all commands.
    async with agent(providers, tmp_path) as bound:
        target = bound.admin_socket or ""
        rc, out, err = await cli(
            capsys, "log", "--agent", target, "--level", "x.y=debug,warn", "-o", "json"
        )
        assert (rc, err) == (0, "")
        assert json.loads(out) == {"level": "warn", "loggers": {"x.y": "debug"}}
        rc, out, _ = await cli(capsys, "log", "--agent", target, "--reset", "-o", "yaml")
        assert rc == 0 and yaml.safe_load(out) == {"level": "info", "loggers": {}}


@pytest.mark.parametrize("command", ["log", "explain", "routes"])
def test_log_and_explain_have_a_help_description(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    _usage, _, rest = help_text.partition("\n\n")
    assert not rest.startswith("options:"), help_text


@pytest.fixture
def sandbox_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StateStore:
    """A state dir holding sandbox `s` (2 nodes x 2 pods), no agents running."""
    store = StateStore(tmp_path / "state")
    assert store.claim(SandboxState(name="s", nodes=2, pods_per_node=2))
    monkeypatch.setattr(agent_cli, "SandboxManager", lambda: SandboxManager(store=store))
    return store


def test_unknown_sandbox_or_node_is_named(
    sandbox_store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["workloads", "--sandbox", "nosuch", "--node", "node1"]) != 0
    assert capsys.readouterr().err == "nodeagent: unknown sandbox 'nosuch' (existing: s)\n"
    assert main(["workloads", "--sandbox", "s", "--node", "node9"]) != 0
    assert "has no node 'node9' (nodes: node1, node2)" in capsys.readouterr().err


def test_rules_on_the_wrong_node_says_where_the_pod_is(
    sandbox_store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rules", "node2-pod1", "--sandbox", "s", "--node", "node1"]) != 0
    err = capsys.readouterr().err
    assert "pod node2-pod1 is on node2: use --node node2" in err
    # --sandbox/--node resolve to that node's socket under the state dir.
    assert str(sandbox_store.root / "s" / "node1" / "admin.sock") in err
    assert len(err.splitlines()) == 1


def test_explain_text_shows_nested_fields_as_lines_not_json() -> None:
    text = agent_cli._explain_text(
        {"verdict": "allow", "route": {"kind": "hbone", "via": ["a", "b"]}, "steps": ["s"]}
    )
    assert text.splitlines() == [
        "verdict: ALLOW",
        "route:",
        "  kind: hbone",
        "  via: a, b",
        "steps:",
        "  1. s",
    ]
