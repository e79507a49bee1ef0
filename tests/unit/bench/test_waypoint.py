"""The waypoint benchmark's pure parts: wrk's result line, the added p50, the ratios, and the
upstream program's answer to pipelined request heads."""

from __future__ import annotations

import json

import pytest

from bench.waypoint import (
    RESPONSE,
    _Upstream,
    add_overheads,
    median_figures,
    parse_wrk,
    ratios,
)

WRK_OUT = """\
Running 4s test @ http://127.0.0.1:40000/
  1 threads and 16 connections
  40000 requests in 4.00s, 3.05MB read
Requests/sec:  10000.00
{"requests": 40000, "duration_us": 4000000, "socket_errors": 0, "status_errors": 0, \
"p50_us": 120, "p99_us": 900}
"""


def test_wrk_result_line_gives_rate_and_latency() -> None:
    assert parse_wrk(WRK_OUT) == {
        "requests": 40000.0,
        "rps": 10000.0,
        "p50_us": 120.0,
        "p99_us": 900.0,
    }


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("Running 4s test\n", "no result line"),
        (WRK_OUT.replace('"socket_errors": 0', '"socket_errors": 3'), "3 socket errors"),
        (WRK_OUT.replace('"status_errors": 0', '"status_errors": 7'), "7 non-2xx"),
        (WRK_OUT.replace('"requests": 40000', '"requests": 0'), "no requests"),
    ],
)
def test_wrk_failures_are_errors_not_figures(stdout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_wrk(stdout)


def _round(direct: float, haproxy: float, waypoint: float) -> dict[str, dict[str, float]]:
    return {
        "direct": {"rps": 30000.0, "p50_us": direct},
        "haproxy": {"rps": 15000.0, "p50_us": haproxy, "cpu_ms_per_1k_req": 20.0},
        "waypoint": {"rps": 3000.0, "p50_us": waypoint, "cpu_ms_per_1k_req": 300.0},
    }


def test_added_p50_is_against_the_same_rounds_direct_run() -> None:
    rnd = add_overheads(_round(25.0, 60.0, 330.0))
    assert "added_p50_us" not in rnd["direct"]
    assert rnd["haproxy"]["added_p50_us"] == 35.0
    assert rnd["waypoint"]["added_p50_us"] == 305.0


def test_medians_over_rounds_then_waypoint_over_haproxy_ratios() -> None:
    rounds = [
        add_overheads(_round(25.0, 60.0, 330.0)),
        add_overheads(_round(30.0, 70.0, 380.0)),  # the median round
        add_overheads(_round(35.0, 90.0, 500.0)),
    ]
    summary = median_figures(rounds)
    assert summary["haproxy"]["added_p50_us"] == 40.0
    assert summary["waypoint"]["added_p50_us"] == 350.0
    assert ratios(summary) == {"rps": 0.2, "added_p50": 8.75, "cpu_per_1k_requests": 15.0}
    # a zero in HAProxy's figures gives no ratio, not a crash
    summary["haproxy"]["added_p50_us"] = 0.0
    assert ratios(summary)["added_p50"] is None
    assert "NaN" not in json.dumps(ratios(summary))


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_upstream_answers_every_head_even_split_across_reads() -> None:
    upstream = _Upstream()
    transport = _Transport()
    upstream.connection_made(transport)  # type: ignore[arg-type]
    head = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    upstream.data_received(head * 2 + head[:-3])
    upstream.data_received(head[-3:])
    assert b"".join(transport.written) == RESPONSE * 3
    assert upstream.pending == b""
