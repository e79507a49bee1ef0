"""The demo app's behaviour switches: deterministic failures, held responses, the
loopback-only control endpoint and the request log (pure, then the real app)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.sandbox.demoapp import (
    Behaviour,
    Connection,
    JsonValue,
    control_answer,
    http_answer,
    parse_share,
)

IDENTITY = {"pod": "node2-pod2", "namespace": "demo", "service_account": "backend"}
LOCAL = ("127.0.0.1", 40000)


def _conn(data: bytes = b"", peer: tuple[str, int] = ("10.10.1.11", 40000)) -> Connection:
    conn = Connection(None, "http", peer)  # type: ignore[arg-type]
    conn.inbuf += data
    return conn


def _answers(out: bytes) -> list[tuple[int, dict[str, Any]]]:
    """(status, JSON body) of each response in `out`."""
    answers = []
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = int(next(h for h in lines if h.startswith(b"Content-Length")).split(b":")[1])
        answers.append((int(lines[0].split(b" ")[1]), json.loads(rest[:length])))
        out = rest[length:]
    return answers


def _behaviour(**query: str) -> Behaviour:
    b = Behaviour()
    b.set(query)
    return b


def _failures(b: Behaviour, n: int) -> list[int]:
    return [k for k in range(1, n + 1) if b.next_fails()]


# --- which requests fail ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "n", "failing"),
    [
        ("0", 10, []),
        ("0.5", 10, [2, 4, 6, 8, 10]),
        ("1", 5, [1, 2, 3, 4, 5]),
        ("1.0", 3, [1, 2, 3]),
        ("0.25", 8, [4, 8]),
        ("0.3", 10, [4, 7, 10]),  # floor(k*0.3) steps at k = 4, 7, 10: exactly 3 in 10
        ("0.1", 20, [10, 20]),
        (".5", 4, [2, 4]),
    ],
)
def test_request_k_fails_when_floor_k_r_steps(share: str, n: int, failing: list[int]) -> None:
    assert _failures(_behaviour(fail=share), n) == failing


@given(
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=0, max_value=500),
)
def test_exactly_floor_n_r_of_the_first_n_requests_fail(basis_points: int, n: int) -> None:
    share = f"{basis_points // 10_000}.{basis_points % 10_000:04d}"
    b = _behaviour(fail=share)
    assert len(_failures(b, n)) == n * basis_points // 10_000


def test_every_post_restarts_the_count_and_replaces_every_setting() -> None:
    b = _behaviour(fail="0.5", status="503", delay="0.2")
    assert _failures(b, 3) == [2]
    b.set({"fail": "0.5"})  # the count restarts: request 1 again passes
    assert (b.count, b.status, b.delay) == (0, 500, 0.0)  # omitted: defaults
    assert _failures(b, 2) == [2]
    b.set({})  # a bare POST resets
    assert b.view() == {"fail": 0.0, "status": 500, "delay": 0.0, "requests": 0}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"fail": "1.5"}, "fail: must be between 0 and 1"),
        ({"fail": "-0.5"}, "fail: expected a decimal"),
        ({"fail": "half"}, "fail: expected a decimal"),
        ({"fail": ""}, "fail: expected a decimal"),
        ({"status": "abc"}, "status: expected an HTTP status"),
        ({"status": "99"}, "status: must be between 200 and 599"),
        ({"delay": "soon"}, "delay: expected seconds"),
        ({"delay": "-1"}, "delay: must be between"),
        ({"delay": "nan"}, "delay: must be between"),
        ({"fial": "0.5"}, "unknown parameter 'fial'"),
    ],
)
def test_bad_settings_are_refused_by_name_and_change_nothing(
    query: dict[str, str], message: str
) -> None:
    b = _behaviour(fail="0.5", delay="1")
    with pytest.raises(ValueError, match=message):
        b.set(query)
    assert (b.fail, b.delay) == ((5, 10), 1.0)


def test_share_is_read_as_an_exact_decimal() -> None:
    assert parse_share("0.3") == (3, 10)
    assert parse_share(" 1 ") == (1, 1)
    assert parse_share("0.125") == (125, 1000)


# --- the control endpoint ---------------------------------------------------------------------


def test_control_paths_are_refused_to_any_caller_but_loopback() -> None:
    b = Behaviour()
    status, body = control_answer(b, "POST", "/demo/behaviour?fail=1", "10.10.1.11")
    assert status == 403 and "127.0.0.1" in str(body["error"])
    assert b.fail == (0, 1)  # unchanged
    assert control_answer(b, "GET", "/demo/anything", "10.10.2.12")[0] == 403


def test_control_endpoint_sets_reads_and_refuses() -> None:
    b = Behaviour()
    status, body = control_answer(
        b, "POST", "/demo/behaviour?fail=0.5&status=503&delay=0.25", "127.0.0.1"
    )
    assert (status, body) == (200, {"fail": 0.5, "status": 503, "delay": 0.25, "requests": 0})
    assert control_answer(b, "GET", "/demo/behaviour", "127.0.0.1") == (200, body)
    assert control_answer(b, "GET", "/demo/behaviour?fail=1", "127.0.0.1")[0] == 400
    assert control_answer(b, "PUT", "/demo/behaviour", "127.0.0.1")[0] == 405
    assert control_answer(b, "GET", "/demo/other", "127.0.0.1")[0] == 404
    status, body = control_answer(b, "POST", "/demo/behaviour?status=700", "127.0.0.1")
    assert status == 400 and "status" in str(body["error"])


def test_failed_answers_carry_the_usual_body_and_are_logged() -> None:
    b = _behaviour(fail="0.5", status="503")
    logged: list[dict[str, JsonValue]] = []
    conn = _conn(b"GET /a HTTP/1.1\r\nHost: backend\r\n\r\n" * 2)
    assert http_answer(IDENTITY, conn, b, 0.0, logged.append)
    (s1, ok), (s2, failed) = _answers(bytes(conn.outbuf))
    assert (s1, s2) == (200, 503)
    assert "failed" not in ok and failed.pop("failed") is True
    assert failed == ok | {"client_port": 40000}  # the same JSON otherwise
    assert [(r["method"], r["path"], r["host"], r["client_ip"], r["status"]) for r in logged] == [
        ("GET", "/a", "backend", "10.10.1.11", 200),
        ("GET", "/a", "backend", "10.10.1.11", 503),
    ]


def test_control_requests_are_neither_counted_nor_logged_nor_held() -> None:
    b = _behaviour(fail="1", delay="5")
    logged: list[dict[str, JsonValue]] = []
    conn = _conn(b"GET /demo/behaviour HTTP/1.1\r\n\r\n", peer=LOCAL)
    assert http_answer(IDENTITY, conn, b, 100.0, logged.append)
    assert _answers(bytes(conn.outbuf))[0][0] == 200
    assert (b.count, logged, conn.held) == (0, [], [])


# --- held responses ---------------------------------------------------------------------------


def test_a_delay_holds_each_answer_until_its_deadline() -> None:
    b = _behaviour(delay="0.5")
    conn = _conn(b"GET /a HTTP/1.1\r\n\r\n")
    assert http_answer(IDENTITY, conn, b, 10.0)
    assert conn.outbuf == b"" and conn.next_due() == 10.5
    assert not conn.release(10.49) and conn.outbuf == b""
    assert conn.release(10.5)
    assert [s for s, _ in _answers(bytes(conn.outbuf))] == [200]
    assert conn.next_due() is None


def test_held_answers_leave_in_request_order() -> None:
    conn = _conn()
    conn.queue(b"first", due=5.0)
    conn.queue(b"second")  # not held itself, but after the first
    conn.queue(b"third", due=3.0)  # a shorter delay set since: still after the others
    assert conn.next_due() == 5.0
    assert not conn.release(4.0)
    assert conn.release(5.0) and conn.outbuf == b"firstsecondthird"
    conn.queue(b"now")  # nothing held: straight to the send buffer
    assert conn.outbuf.endswith(b"now") and conn.held == []


def test_a_connection_close_request_is_answered_after_its_delay() -> None:
    b = _behaviour(delay="1")
    conn = _conn(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert not http_answer(IDENTITY, conn, b, 0.0)  # the connection ends ...
    assert conn.pending() > 0 and conn.outbuf == b""  # ... once the held answer has left


# --- the real app -----------------------------------------------------------------------------


@pytest.fixture
def app() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodeagent.sandbox.demoapp", "--pod=p1", "--bind=127.0.0.1",
         f"--http-port={port}", "--echo-port=0", f"--ready-fd={w}", "--log-requests"],
        pass_fds=(w,),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    os.close(w)
    try:
        assert os.read(r, 16).startswith(b"ready")
        yield port, proc
    finally:
        os.close(r)
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def _request(sock: socket.socket, method: str, path: str) -> tuple[int, dict[str, Any]]:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    return _read_answer(sock)


def test_real_app_holds_answers_while_serving_other_connections(
    app: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, proc = app
    delay = 0.6
    with socket.create_connection(("127.0.0.1", port), timeout=5) as ctl:
        status, body = _request(ctl, "POST", f"/demo/behaviour?fail=0.5&delay={delay}")
        assert (status, body["fail"], body["delay"]) == (200, 0.5, delay)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        start = time.monotonic()
        for s in socks:  # three requests at once, each on its own connection
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        # The control endpoint answers at once meanwhile: it is never held.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as ctl:
            assert _request(ctl, "GET", "/demo/behaviour")[1]["requests"] == 3
        assert time.monotonic() - start < delay
        statuses = []
        for s in socks:
            status, _ = _read_answer(s)
            statuses.append(status)
            assert time.monotonic() - start >= delay
        # Held side by side, not one after another.
        assert time.monotonic() - start < 2 * delay
        assert sorted(statuses) == [200, 200, 500]
    finally:
        for s in socks:
            s.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as ctl:
        assert _request(ctl, "POST", "/demo/behaviour?fail=0&delay=0")[1]["delay"] == 0.0
        t = time.monotonic()
        assert _request(ctl, "GET", "/fast")[0] == 200
        assert time.monotonic() - t < delay
    proc.terminate()
    assert proc.stdout is not None
    lines = [json.loads(line) for line in proc.stdout.read().decode().splitlines()]
    # Ordinary requests only, each with the status it was sent: the second of the three failed.
    assert [(r["method"], r["path"], r["status"], r["client_ip"]) for r in lines] == [
        ("GET", "/slow", 200, "127.0.0.1"),
        ("GET", "/slow", 500, "127.0.0.1"),
        ("GET", "/slow", 200, "127.0.0.1"),
        ("GET", "/fast", 200, "127.0.0.1"),
    ]
    assert all(r["host"] == "h" and isinstance(r["time"], float) for r in lines)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "closed before an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(4096)
    return int(head.split(b" ")[1]), json.loads(body)
