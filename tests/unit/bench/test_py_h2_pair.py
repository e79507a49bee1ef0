"""bench.py_h2_pair, the bare Python HTTP/2 CONNECT pair (`bench.connections`' `py_h2`).

It is only a floor if it does the HBONE shape for real: byte-exact both ways over mutual TLS,
one pooled connection, half-closes, a refused target, and the same wire as another HTTP/2
implementation (Node's, both ways round). Real processes and real TLS on loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench import py_h2_pair
from bench.harness import ROOT, program, workload_certs
from tests.unit.bench.relaying import echo_through, free_port

NODE = shutil.which("node")


def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            threading.Event().wait(0.05)
    raise AssertionError(f"nothing listens on :{port}")


class Pair:
    """A server side and a client side (each ours or Node's), torn down by PID."""

    def __init__(self, tmp: Path, echo: int, server: str = "py", client: str = "py") -> None:
        self.certs = workload_certs(tmp)
        self.tls, self.plain, self.refused = free_port(), free_port(), free_port()
        self.dead = free_port()  # nothing listens on it
        self.procs: list[subprocess.Popen[str]] = []
        if server == "py":
            self.start_py("server", f"127.0.0.1:{self.tls}")
        else:
            self.start_node("server", str(self.tls))
        wait_listening(self.tls)
        maps = [(self.plain, f"127.0.0.1:{echo}"), (self.refused, f"127.0.0.1:{self.dead}")]
        if client == "py":
            self.start_py("client", f"127.0.0.1:{self.tls}", *(f"{p}={t}" for p, t in maps))
        else:
            (first, target), (second, target2) = maps
            tls = ["127.0.0.1", str(self.tls)]
            self.start_node("client", str(first), *tls, target, str(second), target2)
        wait_listening(self.plain)
        self.client_pid = self.procs[-1].pid

    def start_py(self, role: str, *args: str) -> None:
        certs = self.certs
        self.start(
            program(
                "py_h2_pair", role, certs[f"{role}_cert"], certs[f"{role}_key"], certs["ca"], *args
            )
        )

    def start_node(self, role: str, *args: str) -> None:
        certs = self.certs
        env = os.environ | {
            "H2_CA": certs["ca"],
            "H2_CERT": certs[f"{role}_cert"],
            "H2_KEY": certs[f"{role}_key"],
        }
        self.start(self.node(role, *args), env)

    @staticmethod
    def node(*args: str) -> list[str]:
        assert NODE is not None
        return [NODE, str(ROOT / "bench" / "h2_connect_pair.js"), *args]

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.procs.append(
            subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, text=True)
        )

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def pair(tmp_path: Path, echo_port: int) -> Iterator[Pair]:
    p = Pair(tmp_path, echo_port)
    try:
        yield p
    finally:
        p.stop()


def test_carries_bytes_exactly_both_ways_past_the_window_credits(pair: Pair) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 7)  # three 1 MiB credits, cut into 16 KiB frames
    assert echo_through(pair.plain, payload) == payload


def test_connections_share_one_pooled_tls_connection(pair: Pair) -> None:
    for i in range(20):
        assert echo_through(pair.plain, b"ping %d" % i) == b"ping %d" % i
    to_server = [
        c
        for c in psutil.Process(pair.client_pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == pair.tls and c.status == psutil.CONN_ESTABLISHED
    ]
    assert len(to_server) == 1


def test_a_half_close_travels_and_the_answer_still_arrives(pair: Pair) -> None:
    with socket.create_connection(("127.0.0.1", pair.plain), timeout=10) as s:
        s.sendall(b"last words")
        s.shutdown(socket.SHUT_WR)  # END_STREAM; the echo answers, then closes its side
        got = bytearray()
        while data := s.recv(65536):
            got += data
    assert bytes(got) == b"last words"


def test_a_target_that_refuses_closes_the_app_connection(pair: Pair) -> None:
    with socket.create_connection(("127.0.0.1", pair.refused), timeout=10) as s:
        s.sendall(b"anyone?")
        assert s.recv(100) == b""  # the 502 ends the stream; nothing was relayed
    assert echo_through(pair.plain, b"still up") == b"still up"


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("server,client", [("py", "node"), ("node", "py")])
def test_speaks_http2_with_nodes_pair(
    tmp_path: Path, echo_port: int, server: str, client: str
) -> None:
    p = Pair(tmp_path, echo_port, server=server, client=client)
    try:
        payload = os.urandom(1024 * 1024 + 3)
        assert echo_through(p.plain, payload) == payload
        assert echo_through(p.plain, b"again") == b"again"
    finally:
        p.stop()


def test_frames_are_read_whole_across_reads_after_the_preface() -> None:
    wire = py_h2_pair.PREFACE + py_h2_pair.settings_frame()
    wire += py_h2_pair.frame(py_h2_pair.DATA, py_h2_pair.END_STREAM, 3, b"abc")
    reader = py_h2_pair.FrameReader(preface=True)
    got = []
    for i in range(0, len(wire), 5):
        got += reader.feed(wire[i : i + 5])
    assert [(t, f, sid) for t, f, sid, _ in got] == [
        (py_h2_pair.SETTINGS, 0, 0),
        (py_h2_pair.DATA, py_h2_pair.END_STREAM, 3),
    ]
    assert got[1][3] == b"abc"
    with pytest.raises(ValueError, match="preface"):
        py_h2_pair.FrameReader(preface=True).feed(b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxx")


def test_data_is_cut_to_the_default_frame_size_with_the_end_on_the_last() -> None:
    frames = py_h2_pair.data_frames(1, b"x" * (2 * py_h2_pair.MAX_FRAME + 1), True)
    read = py_h2_pair.FrameReader(preface=False).feed(b"".join(frames))
    assert [len(payload) for _, _, _, payload in read] == [py_h2_pair.MAX_FRAME] * 2 + [1]
    assert [flags for _, flags, _, _ in read] == [0, 0, py_h2_pair.END_STREAM]
    (only,) = py_h2_pair.data_frames(1, b"y", False)
    assert py_h2_pair.FrameReader(preface=False).feed(only)[0][1] == 0
