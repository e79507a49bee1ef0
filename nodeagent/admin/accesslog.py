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
import operator
from collections.abc import Callable
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


class SecondText:
    """The text of a whole second, made by `make` once per second, not once per line (a line
    per connection). Shared by the access log and the agent's log formatter."""

    __slots__ = ("_make", "_second", "_text")

    def __init__(self, make: Callable[[int], str]) -> None:
        self._make = make
        self._second: int | None = None
        self._text = ""

    def __call__(self, second: int) -> str:
        if second != self._second:
            self._text = self._make(second)
            self._second = second
        return self._text


_utc_second = SecondText(lambda s: datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S"))


def _timestamp(t: float) -> str:
    fraction, whole = math.modf(t)  # rounded to microseconds as datetime rounds them
    second, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    return f"{_utc_second(second)}.{micros // 1000:03d}Z"


# The record's fields after the fixed ones, in line order: (key, attribute).
_FIELDS: tuple[tuple[str, str], ...] = (
    ("direction", "direction"),
    ("src.addr", "src_addr"),
    ("src.workload", "src_workload"),
    ("src.namespace", "src_namespace"),
    ("src.identity", "src_identity"),
    ("dst.addr", "dst_addr"),
    ("dst.hbone_addr", "dst_hbone_addr"),
    ("dst.service", "dst_service"),
    ("dst.workload", "dst_workload"),
    ("dst.namespace", "dst_namespace"),
    ("dst.identity", "dst_identity"),
    ("bytes_sent", "bytes_sent"),
    ("bytes_recv", "bytes_recv"),
    ("duration_ms", "duration_ms"),
    ("policy", "policy"),
    ("response_flags", "response_flags"),
    ("error", "error"),
)
_FIXED = {"level": "info", "scope": ACCESS_LOGGER, "message": "connection complete"}
_VALUES = operator.attrgetter(*(attr for _, attr in _FIELDS))  # all of them in one C call
_DURATION = [attr for _, attr in _FIELDS].index("duration_ms")
# The line with a %s per value, keys and separators written as json writes them.
_LINE = "".join(
    [
        '{"timestamp":%s',
        *(f",{json.dumps(k)}:{json.dumps(v)}" for k, v in _FIXED.items()),
        *(f",{json.dumps(key)}:%s" for key, _ in _FIELDS),
        "}",
    ]
)


def _values(record: AccessRecord) -> list[Any]:
    values = list(_VALUES(record))
    values[_DURATION] = round(values[_DURATION], 3)
    return values


def access_fields(record: AccessRecord) -> dict[str, Any]:
    """The log line's fields, always all of them, in a stable order."""
    fields: dict[str, Any] = {"timestamp": _timestamp(record.end_time), **_FIXED}
    fields.update(zip((key for key, _ in _FIELDS), _values(record), strict=True))
    return fields


def format_access_log(record: AccessRecord) -> str:
    """One JSON line (no newline) for `record`: `access_fields` as json.dumps writes them
    compactly, built directly (one line per connection: no dict, no encoder walk)."""
    values = _values(record)
    if not math.isfinite(values[_DURATION]):
        return json.dumps(access_fields(record), separators=(",", ":"))
    q = encode_basestring_ascii  # json's own string escaping (C)
    texts = [q(v) if v.__class__ is str else repr(v) for v in values]  # ints, floats: as json
    return _LINE % (q(_timestamp(record.end_time)), *texts)


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
