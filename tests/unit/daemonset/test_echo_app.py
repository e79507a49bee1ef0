"""The kind test app (tests/kind/apps/echo.py) on loopback: reply format and failure exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[3] / "tests" / "kind" / "apps" / "echo.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def call(port: int, message: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(APP), "call", "127.0.0.1", str(port), message],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def server() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(APP), "serve", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "POD_NAME": "server-a-123"},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"serving on {port}"
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_server_names_itself_the_peer_ip_and_the_message(server: int) -> None:
    result = call(server, "hello-from-client-a")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "server-a-123 saw 127.0.0.1 said hello-from-client-a"


def test_call_to_a_closed_port_exits_non_zero() -> None:
    result = call(free_port(), "anyone")
    assert result.returncode == 1
    assert "failed" in result.stderr


def test_usage_error_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, str(APP), "bogus"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "echo.py serve PORT" in result.stderr
