"""Access log lines: one JSON object per closed connection, ztunnel's field names."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.admin.accesslog import (
    AccessLogger,
    AccessRecord,
    access_fields,
    format_access_log,
)

RECORD = AccessRecord(
    end_time=1_700_000_000.25,
    direction="outbound",
    src_addr="10.1.0.5:40000",
    dst_addr="10.96.0.10:80",
    dst_hbone_addr="10.2.0.5:15008",
    src_workload="client-1",
    src_namespace="default",
    src_identity="spiffe://cluster.local/ns/default/sa/client",
    dst_service="server.default.svc.cluster.local",
    dst_workload="server-1",
    dst_namespace="default",
    dst_identity="spiffe://cluster.local/ns/default/sa/server",
    bytes_sent=100,
    bytes_recv=2000,
    duration_ms=12.3456,
    policy="allow",
)


def test_line_is_json_with_every_field() -> None:
    line = format_access_log(RECORD)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["timestamp"] == "2023-11-14T22:13:20.250Z"
    assert fields["direction"] == "outbound"
    assert fields["src.addr"] == "10.1.0.5:40000"
    assert fields["dst.addr"] == "10.96.0.10:80"
    assert fields["dst.hbone_addr"] == "10.2.0.5:15008"
    assert fields["src.identity"].endswith("/sa/client")
    assert fields["dst.workload"] == "server-1"
    assert (fields["bytes_sent"], fields["bytes_recv"]) == (100, 2000)
    assert fields["duration_ms"] == 12.346
    assert fields["policy"] == "allow"
    assert fields["response_flags"] == "-"
    assert fields["error"] == ""


def test_logger_named_access_gets_one_line_per_record(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="access"):
        AccessLogger().log(RECORD)
    [rec] = caplog.records
    assert rec.name == "access"
    assert json.loads(rec.getMessage())["dst.identity"].endswith("/sa/server")


def test_nothing_is_formatted_when_access_logs_are_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="access"):
        AccessLogger().log(RECORD)
    assert caplog.records == []


TEXT = st.text(max_size=40)


@given(
    st.builds(
        AccessRecord,
        end_time=st.floats(min_value=0, max_value=4e9),
        direction=st.sampled_from(["inbound", "outbound"]),
        src_addr=TEXT,
        dst_addr=TEXT,
        dst_hbone_addr=TEXT,
        src_workload=TEXT,
        src_identity=TEXT,
        dst_service=TEXT,
        policy=TEXT,
        error=TEXT,
        bytes_sent=st.integers(min_value=0, max_value=2**63),
        bytes_recv=st.integers(min_value=0, max_value=2**63),
        duration_ms=st.floats(allow_nan=True, allow_infinity=True),
        response_flags=st.sampled_from(["-", "UF", "DI,UF"]),
    )
)
def test_the_line_is_exactly_what_json_dumps_makes_of_the_fields(record: AccessRecord) -> None:
    # Any text (quotes, control characters, non-ASCII), any number: escaped as json escapes.
    assert format_access_log(record) == json.dumps(access_fields(record), separators=(",", ":"))
