"""`nodeagent waypoint` refuses a port it cannot listen on: one line naming the address, exit 1,
and what it had started (xDS, certificates, the other listener) stopped first. Real processes
on loopback; the control plane and CA addresses lead nowhere, as before a first connect."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as held:
        yield held.getsockname()[1]


def waypoint(listen: str, metrics: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "nodeagent.cli.main", "waypoint", "--name", "wp"]
    argv += ["--namespace", "demo", "--node-name", "n1", "--listen", listen]
    argv += ["--metrics-address", metrics, "--xds-address", "http://127.0.0.1:1"]
    argv += ["--ca-address", "http://127.0.0.1:1", "--auth-token-path", "/nonexistent"]
    # The timeout only bounds a hang (a shutdown that never ended was the bug).
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_taken_hbone_port_is_named_and_the_waypoint_exits(busy_port: int) -> None:
    done = waypoint(f"127.0.0.1:{busy_port}", "127.0.0.1:0")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"nodeagent: waypoint demo/wp: listen on 127.0.0.1:{busy_port}: Address already in use"
    )
    assert "Traceback" not in done.stderr


def test_a_taken_metrics_port_stops_what_was_started(busy_port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    done = waypoint(f"127.0.0.1:{free}", f"127.0.0.1:{busy_port}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("nodeagent: waypoint demo/wp: ")
    assert str(busy_port) in done.stderr.strip().splitlines()[-1]
    assert "waypoint stopped" in done.stderr  # the shutdown ran, after the HBONE listener was up
