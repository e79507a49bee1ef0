"""The demo app's HTTP handling (pure) and the real app on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.sandbox.demoapp import Connection, http_answer, to_json

IDENTITY = {"pod": "node1-pod1", "namespace": "demo", "service_account": "frontend"}


def _conn(data: bytes) -> Connection:
    conn = Connection(None, "http", ("10.10.2.11", 40000))  # type: ignore[arg-type]
    conn.inbuf += data
    return conn


def _bodies(out: bytes) -> list[dict[str, object]]:
    bodies = []
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        length = int(
            next(h for h in head.split(b"\r\n") if h.startswith(b"Content-Length")).split(b":")[1]
        )
        bodies.append(json.loads(rest[:length]))
        out = rest[length:]
    return bodies


def test_answer_names_the_pod_and_the_caller() -> None:
    conn = _conn(b"GET /hi HTTP/1.1\r\nHost: x\r\n\r\n")
    assert http_answer(IDENTITY, conn)  # keep-alive: the connection stays
    (body,) = _bodies(bytes(conn.outbuf))
    assert body == {
        **IDENTITY,
        "client_ip": "10.10.2.11",
        "client_port": 40000,
        "method": "GET",
        "path": "/hi",
        "host": "x",
    }


def test_pipelined_requests_get_one_answer_each_and_bodies_are_skipped() -> None:
    conn = _conn(
        b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /b HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert not http_answer(IDENTITY, conn)  # the second asked to close
    assert [b["path"] for b in _bodies(bytes(conn.outbuf))] == ["/a", "/b"]
    assert b"Connection: close" in conn.outbuf


def test_incomplete_requests_wait_for_more() -> None:
    conn = _conn(b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    assert http_answer(IDENTITY, conn)
    assert conn.outbuf == b""
    conn.inbuf += b"defghij"
    assert http_answer(IDENTITY, conn)
    assert [b["path"] for b in _bodies(bytes(conn.outbuf))] == ["/a"]


def test_http10_without_keep_alive_closes() -> None:
    conn = _conn(b"GET / HTTP/1.0\r\n\r\n")
    assert not http_answer(IDENTITY, conn)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
        (b"G" * 20000, b"431"),
    ],
)
def test_bad_requests_are_refused_and_closed(data: bytes, status: bytes) -> None:
    conn = _conn(data)
    assert not http_answer(IDENTITY, conn)
    assert conn.outbuf.startswith(b"HTTP/1.1 " + status)


@pytest.fixture
def app() -> Iterator[tuple[int, int]]:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodeagent.sandbox.demoapp", "--pod=p1", "--bind=127.0.0.1",
         f"--http-port={ports[0]}", f"--echo-port={ports[1]}", f"--ready-fd={w}"],
        pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    try:
        assert os.read(r, 16).startswith(b"ready")
        yield ports[0], ports[1]
    finally:
        os.close(r)
        proc.terminate()
        proc.wait(timeout=10)


def test_real_app_serves_keep_alive_http_and_echo(app: tuple[int, int]) -> None:
    http_port, echo_port = app
    with socket.create_connection(("127.0.0.1", http_port), timeout=5) as s:
        for path in ("/one", "/two"):  # the same connection twice
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            head, _, body = head.partition(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += s.recv(4096)
            answer = json.loads(body)
            assert answer["path"] == path and answer["pod"] == "p1"
            assert answer["client_port"] == s.getsockname()[1]
    payload = os.urandom(300_000)
    with socket.create_connection(("127.0.0.1", echo_port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got == payload


@given(st.dictionaries(st.text(), st.one_of(st.text(), st.integers())))
def test_to_json_is_valid_json_for_any_flat_dict(obj: dict[str, str | int]) -> None:
    assert json.loads(to_json(obj)) == obj
