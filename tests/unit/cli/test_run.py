"""`nodeagent run`'s log formatting: the time text made once per second reads exactly as the
standard formatter's."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest

from nodeagent.cli.run import LOG_FORMAT, SecondCachedFormatter


def record_at(created: float) -> logging.LogRecord:
    rec = logging.LogRecord("access", logging.INFO, __file__, 1, "a line", (), None)
    rec.created = created
    rec.msecs = (created - int(created)) * 1000
    return rec


@pytest.mark.parametrize(
    "times",
    [
        [1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25],
        [0.0, 59.9999, 60.0, 86_399.5, 86_400.0],
    ],
)
def test_cached_time_text_is_the_standard_formatters(times: list[float]) -> None:
    cached, standard = SecondCachedFormatter(LOG_FORMAT), logging.Formatter(LOG_FORMAT)
    for t in times:  # the same second twice, the next one, and back again
        assert cached.format(record_at(t)) == standard.format(record_at(t))


def test_an_explicit_date_format_is_still_honoured() -> None:
    rec = record_at(1_700_000_000.5)
    assert SecondCachedFormatter(LOG_FORMAT).formatTime(rec, "%Y") == logging.Formatter(
        LOG_FORMAT
    ).formatTime(rec, "%Y")


def test_a_taken_metrics_port_is_one_line_naming_it() -> None:
    """The agent refuses a port it cannot listen on: exit 1, the address named, no traceback."""
    with socket.create_server(("127.0.0.1", 0)) as held, socket.socket() as spare:
        busy = held.getsockname()[1]
        spare.bind(("127.0.0.1", 0))
        free = spare.getsockname()[1]
        spare.close()
        env = dict(os.environ, NODE_NAME="n1", METRICS_ADDRESS=f"127.0.0.1:{busy}")
        env |= {"ADMIN_ADDRESS": f"127.0.0.1:{free}", "ADMIN_SOCKET": "", "READINESS_ADDRESS": ""}
        argv = [sys.executable, "-m", "nodeagent.cli.main", "run"]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"nodeagent: agent on node n1: metrics server cannot listen on 127.0.0.1:{busy}: "
    )
    # The failed start still ran the shutdown (closers, workers), not just an exit.
    assert "agent stopped" in done.stderr
