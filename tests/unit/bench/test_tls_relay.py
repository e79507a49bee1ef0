"""bench.tls_relay, the benchmark's bare Python TLS relay: byte-exact both ways, mutual.

Real processes and real TLS on loopback; `bench.mesh`'s `py_relay` only means something if
the relay really carries the bytes the way the mesh and stunnel do.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import ROOT, program, workload_certs
from tests.unit.bench.relaying import echo_through, free_port

RelayPair = tuple[int, dict[str, str]]


def start_relay(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        program("tls_relay", *args), stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def relay_pair(tmp_path: Path, echo_port: int) -> Iterator[RelayPair]:
    certs = workload_certs(tmp_path)
    tls_port, plain_port = free_port(), free_port()
    procs = [
        start_relay(
            "server",
            certs["server_cert"],
            certs["server_key"],
            certs["ca"],
            f"127.0.0.1:{tls_port}=127.0.0.1:{echo_port}",
        ),
        start_relay(
            "client",
            certs["client_cert"],
            certs["client_key"],
            certs["ca"],
            f"127.0.0.1:{plain_port}=127.0.0.1:{tls_port}",
        ),
    ]
    try:
        yield plain_port, certs | {"tls_port": str(tls_port)}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def test_carries_bytes_exactly_both_ways(relay_pair: RelayPair) -> None:
    port, _ = relay_pair
    payload = os.urandom(3 * 1024 * 1024 + 7)
    assert echo_through(port, payload) == payload


def test_the_tls_side_refuses_a_client_without_a_certificate(relay_pair: RelayPair) -> None:
    _, certs = relay_pair
    ctx = ssl.create_default_context(cafile=certs["ca"])
    ctx.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", int(certs["tls_port"])), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        ctx.wrap_socket(raw) as tls,
    ):
        # TLS 1.3: the server's refusal of our empty certificate comes after the handshake
        tls.sendall(b"x")
        if not tls.recv(1):
            raise ConnectionResetError("closed without an answer")
