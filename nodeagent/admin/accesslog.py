"""Access logs: one JSON line per proxied connection, written when it closes.

Field names follow ztunnel's access log (`src.addr`, `dst.hbone_addr`, ...)
so log pipelines built for it parse ours. The formatter is pure; the
`access` logger is where lines go, so its level is set like any other
(`POST /logging?level=access=off,info`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

ACCESS_LOGGER = "access"


# Not frozen: one is built per closed connection, and a frozen dataclass's __init__ pays an
# object.__setattr__ call per field (18 here).
@dataclass(slots=True, kw_only=True)
class AccessRecord:
    """What is known about one connection when it closes."""

    end_time: float  # unix seconds
    direction: str  # inbound | outbound
    src_addr: str
    dst_addr: str  # the original destination the client asked for
    dst_hbone_addr: str = ""  # the HBONE endpoint used, if tunnelled
    src_workload: str = ""
    src_namespace: str = ""
    src_identity: str = ""
    dst_service: str = ""
    dst_workload: str = ""
    dst_namespace: str = ""
    dst_identity: str = ""
    bytes_sent: int = 0  # towards the destination
    bytes_recv: int = 0  # back from the destination
    duration_ms: float = 0.0
    policy: str = ""  # allow | deny, with the deciding policy if any
    response_flags: str = "-"
    error: str = ""


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _timestamp(t: float) -> str:
    # One line per connection: format the date and time once per second, not per line.
    fraction, whole = math.modf(t)  # rounded to microseconds as datetime rounds them
    second, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if _second[0] != second:
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{micros // 1000:03d}Z"


def access_fields(record: AccessRecord) -> dict[str, Any]:
    """The log line's fields, always all of them, in a stable order."""
    fields: dict[str, Any] = {
        "timestamp": _timestamp(record.end_time),
        "level": "info",
        "scope": ACCESS_LOGGER,
        "message": "connection complete",
        "direction": record.direction,
        "src.addr": record.src_addr,
        "src.workload": record.src_workload,
        "src.namespace": record.src_namespace,
        "src.identity": record.src_identity,
        "dst.addr": record.dst_addr,
        "dst.hbone_addr": record.dst_hbone_addr,
        "dst.service": record.dst_service,
        "dst.workload": record.dst_workload,
        "dst.namespace": record.dst_namespace,
        "dst.identity": record.dst_identity,
        "bytes_sent": record.bytes_sent,
        "bytes_recv": record.bytes_recv,
        "duration_ms": round(record.duration_ms, 3),
        "policy": record.policy,
        "response_flags": record.response_flags,
        "error": record.error,
    }
    return fields


def format_access_log(record: AccessRecord) -> str:
    """One JSON line (no newline) for `record`: `access_fields` as json.dumps writes them
    compactly, built directly (one line per connection: no dict, no encoder walk)."""
    duration = round(record.duration_ms, 3)
    if not math.isfinite(duration):
        return json.dumps(access_fields(record), separators=(",", ":"))
    q = encode_basestring_ascii  # json's own string escaping (C)
    return (
        f'{{"timestamp":{q(_timestamp(record.end_time))},"level":"info",'
        f'"scope":"{ACCESS_LOGGER}","message":"connection complete",'
        f'"direction":{q(record.direction)},"src.addr":{q(record.src_addr)},'
        f'"src.workload":{q(record.src_workload)},"src.namespace":{q(record.src_namespace)},'
        f'"src.identity":{q(record.src_identity)},"dst.addr":{q(record.dst_addr)},'
        f'"dst.hbone_addr":{q(record.dst_hbone_addr)},"dst.service":{q(record.dst_service)},'
        f'"dst.workload":{q(record.dst_workload)},"dst.namespace":{q(record.dst_namespace)},'
        f'"dst.identity":{q(record.dst_identity)},"bytes_sent":{int(record.bytes_sent)!r},'
        f'"bytes_recv":{int(record.bytes_recv)!r},"duration_ms":{float(duration)!r},'
        f'"policy":{q(record.policy)},"response_flags":{q(record.response_flags)},'
        f'"error":{q(record.error)}}}'
    )


class AccessLogger:
    """Writes access records to the `access` logger at INFO."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)

    def log(self, record: AccessRecord) -> None:
        # Check first: formatting JSON per connection is wasted when access logs are off.
        if self._logger.isEnabledFor(logging.INFO):
            # A record made here, not by Logger.info: that would walk the stack for the
            # caller's file and line on every connection, and the line names neither.
            self._logger.handle(
                self._logger.makeRecord(
                    self._logger.name,
                    logging.INFO,
                    __file__,
                    0,
                    format_access_log(record),
                    (),
                    None,
                )
            )
