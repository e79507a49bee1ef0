"""Header rules of the sans-IO HTTP/2 core (RFC 9113 §8.2-8.5) and the CONNECT authority.

Field names must be lowercase tokens, values free of NUL/CR/LF and surrounding
whitespace, connection-specific fields are refused, pseudo-headers come first and only
the allowed ones. A CONNECT authority is `host:port`, IPv6 in brackets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from nodeagent.hbone.events import Headers

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE = re.compile(r"[\x00\r\n]|^[ \t]|[ \t]$")
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
REQUEST_PSEUDO = frozenset({":method", ":scheme", ":authority", ":path"})


def check_field(name: str, value: str) -> None:
    if not _TOKEN.match(name):
        raise ValueError(f"header name {name!r} is not a lowercase token")
    if _BAD_VALUE.search(value):
        raise ValueError(f"header {name!r} has a value with NUL/CR/LF or surrounding whitespace")
    if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
        raise ValueError(f"connection-specific header {name!r} is not allowed in HTTP/2")


def split_pseudo(
    fields: Sequence[tuple[str, str]], allowed: frozenset[str]
) -> tuple[dict[str, str], Headers]:
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for name, value in fields:
        if name.startswith(":"):
            if regular:
                raise ValueError(f"pseudo-header {name} after a regular header")
            if name not in allowed:
                raise ValueError(f"pseudo-header {name} is not allowed here")
            if name in pseudo:
                raise ValueError(f"pseudo-header {name} repeated")
            pseudo[name] = value
        else:
            check_field(name, value)
            regular.append((name, value))
    return pseudo, tuple(regular)


def check_extra_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """Validate application-supplied regular headers (no pseudo-headers, lowercase names)."""
    out = tuple((str(n), str(v)) for n, v in headers)
    for name, value in out:
        if name.startswith(":"):
            raise ValueError(f"pseudo-header {name} cannot be set as an extra header")
        check_field(name, value)
    return out


def parse_authority(authority: str) -> tuple[str, int]:
    """Split a CONNECT authority `host:port` / `[v6]:port` into (host, port); ValueError if bad."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"authority {authority!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"authority {authority!r} has port outside 1..65535")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"authority {authority!r} has an unterminated IPv6 literal")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"authority {authority!r}: an IPv6 address must be in brackets")
    return host, port


def format_authority(host: str, port: int) -> str:
    """`ip:port`, with IPv6 as `[addr]:port` (as ztunnel writes it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forwarded_host(value: str) -> str:
    """The `host=` of a `forwarded` header (RFC 7239), "" when it has none.

    ztunnel's outbound names the service the app dialled there (its hostname), and
    its inbound reads it back to tell the service in telemetry (`parse_forwarded_host`
    in src/proxy/inbound.rs). Only the first element counts: it is the one the
    client's own proxy wrote."""
    first = value.split(",", 1)[0]
    for pair in first.split(";"):
        key, sep, raw = pair.strip().partition("=")
        if sep and key.strip().lower() == "host":
            return raw.strip().strip('"')
    return ""
