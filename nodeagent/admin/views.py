"""Rows for the CLI's tables, computed from admin API answers (pure).

Columns follow `istioctl ztunnel-config` so the output reads the same as
Istio's. Input is the config dump's JSON (ztunnel's camelCase keys); missing
keys render as empty cells or "None", never errors, because the dump may come
from an agent of another version.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

Row = dict[str, Any]

WORKLOAD_COLUMNS = [
    ("namespace", "NAMESPACE"),
    ("name", "POD NAME"),
    ("address", "ADDRESS"),
    ("node", "NODE"),
    ("waypoint", "WAYPOINT"),
    ("protocol", "PROTOCOL"),
]
SERVICE_COLUMNS = [
    ("namespace", "NAMESPACE"),
    ("name", "SERVICE NAME"),
    ("vip", "SERVICE VIP"),
    ("waypoint", "WAYPOINT"),
    ("endpoints", "ENDPOINTS"),
]
POLICY_COLUMNS = [
    ("namespace", "NAMESPACE"),
    ("name", "POLICY NAME"),
    ("action", "ACTION"),
    ("scope", "SCOPE"),
]
CERT_COLUMNS = [
    ("name", "CERTIFICATE NAME"),
    ("type", "TYPE"),
    ("status", "STATUS"),
    ("valid", "VALID CERT"),
    ("serial", "SERIAL NUMBER"),
    ("not_after", "NOT AFTER"),
    ("not_before", "NOT BEFORE"),
]
CONNECTION_COLUMNS = [
    ("workload", "WORKLOAD"),
    ("direction", "DIRECTION"),
    ("local", "LOCAL"),
    ("remote", "REMOTE"),
    ("remote_target", "REMOTE TARGET"),
    ("protocol", "PROTOCOL"),
]
POD_COLUMNS = [
    ("namespace", "NAMESPACE"),
    ("name", "POD NAME"),
    ("capture_state", "STATE"),
    ("enrollment", "MESH"),
    ("backend", "BACKEND"),
    ("listeners", "LISTENERS"),
    ("attempts", "ATTEMPTS"),
    ("last_error", "LAST ERROR"),
]
RULE_COLUMNS = [("mark", ""), ("table", "TABLE"), ("rule", "RULE")]
RULE_MARKS = {"ok": " ", "missing": "-", "extra": "+"}


def _waypoint(value: Any) -> str:
    if not value:
        return "None"
    if isinstance(value, Mapping):
        dest = value.get("destination", "")
        if isinstance(dest, Mapping):
            dest = dest.get("hostname") or dest.get("address") or ""
        text = str(dest)
        # "ns/name.ns.svc.cluster.local" -> "name", as istioctl shows it.
        return text.rsplit("/", 1)[-1].split(".", 1)[0] or "None"
    return str(value)


def workload_rows(dump: Mapping[str, Any]) -> list[Row]:
    rows = [
        {
            "namespace": w.get("namespace", ""),
            "name": w.get("name", ""),
            "address": ",".join(w.get("workloadIps") or []) or "None",
            "node": w.get("node", ""),
            "waypoint": _waypoint(w.get("waypoint")),
            "protocol": w.get("protocol", "TCP"),
        }
        for w in dump.get("workloads") or []
    ]
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


def service_rows(dump: Mapping[str, Any]) -> list[Row]:
    rows = []
    for s in dump.get("services") or []:
        endpoints = s.get("endpoints") or {}
        items = list(endpoints.values()) if isinstance(endpoints, Mapping) else list(endpoints)
        healthy = sum(1 for e in items if str(e.get("status", "Healthy")) == "Healthy")
        vips = [str(v).rsplit("/", 1)[-1] for v in s.get("vips") or []]
        rows.append(
            {
                "namespace": s.get("namespace", ""),
                "name": s.get("hostname") or s.get("name", ""),
                "vip": ",".join(vips) or "None",
                "waypoint": _waypoint(s.get("waypoint")),
                "endpoints": f"{healthy}/{len(items)}",
            }
        )
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


def policy_rows(dump: Mapping[str, Any]) -> list[Row]:
    rows = [
        {
            "namespace": p.get("namespace", ""),
            "name": p.get("name", ""),
            "action": p.get("action", ""),
            "scope": p.get("scope", ""),
        }
        for p in dump.get("policies") or []
    ]
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


def _parse_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _short_time(t: datetime | None, raw: Any) -> str:
    # Minutes are enough to read a certificate's validity; -o json has the exact value.
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if t else str(raw or "")


def cert_rows(dump: Mapping[str, Any], now: datetime | None = None) -> list[Row]:
    now = now or datetime.now(UTC)
    rows: list[Row] = []
    for cert in dump.get("certificates") or []:
        name = cert.get("identity", "")
        status = str(cert.get("state", ""))
        chain = [("Leaf", c) for c in cert.get("certChain") or []]
        chain += [("Root", c) for c in cert.get("rootCerts") or []]
        if not chain:
            rows.append({"name": name, "type": "NA", "status": status, "valid": "false"})
            continue
        for kind, c in chain:
            start, end = _parse_time(c.get("validFrom")), _parse_time(c.get("expirationTime"))
            valid = start is not None and end is not None and start <= now <= end
            rows.append(
                {
                    "name": name,
                    "type": kind,
                    "status": status,
                    "valid": "true" if valid else "false",
                    "serial": c.get("serialNumber", ""),
                    "not_after": _short_time(end, c.get("expirationTime")),
                    "not_before": _short_time(start, c.get("validFrom")),
                }
            )
    return rows


def connection_data(connections: list[Mapping[str, Any]]) -> list[Row]:
    """Connections for `-o json|yaml`: `opened_at` (unix seconds) as RFC 3339 UTC."""
    out = []
    for c in connections:
        row = dict(c)
        if isinstance(row.get("opened_at"), (int, float)):
            opened = datetime.fromtimestamp(row["opened_at"], UTC)
            row["opened_at"] = opened.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out.append(row)
    return out


def connection_rows(connections: list[Mapping[str, Any]]) -> list[Row]:
    rows = [{k: c.get(k, "") for k, _ in CONNECTION_COLUMNS} for c in connections]
    return sorted(rows, key=lambda r: (r["workload"], r["direction"], r["local"], r["remote"]))


def pod_rows(pods: list[Mapping[str, Any]]) -> list[Row]:
    rows = []
    for p in pods:
        row = {k: p.get(k, "") for k, _ in POD_COLUMNS}
        row["listeners"] = ", ".join(p.get("listeners") or []) or "-"
        row["last_error"] = p.get("last_error") or "-"
        row["enrollment"] = p.get("enrollment") or "-"
        row["backend"] = p.get("backend") or "-"
        rows.append(row)
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


def rule_rows(rules: Mapping[str, Any]) -> list[Row]:
    return [
        {"mark": RULE_MARKS.get(line["status"], "?"), "table": line["table"], "rule": line["rule"]}
        for line in rules.get("lines") or []
    ]


def rules_summary(rules: Mapping[str, Any]) -> str:
    pod = rules.get("pod") or {}
    name = f"pod {pod.get('namespace', '')}/{pod.get('name', '')} ({rules.get('backend', '')})"
    if rules.get("error"):
        return f"{name}: cannot read installed rules: {rules['error']}"
    lines = rules.get("lines") or []
    missing = sum(1 for line in lines if line["status"] == "missing")
    extra = sum(1 for line in lines if line["status"] == "extra")
    if not missing and not extra:
        return f"{name}: installed rules match the plan ({len(lines)} lines)"
    return f"{name}: DRIFT: {missing} missing (-), {extra} extra (+)"


LOG_LEVEL_PREFIX = "current log level is "


def log_level_data(answer: str) -> dict[str, Any]:
    """`current log level is debug,access=info` -> level and per-logger levels."""
    spec = answer.strip().removeprefix(LOG_LEVEL_PREFIX)
    default, *named = spec.split(",")
    targets = dict(part.partition("=")[::2] for part in named if "=" in part)
    return {"level": default, "loggers": targets}


# -- routes ----------------------------------------------------------------------------------

ROUTE_COLUMNS = [
    ("route", "ROUTE"),
    ("match", "MATCH"),
    ("destinations", "DESTINATIONS"),
    ("extensions", "FAULT / MIRROR"),
    ("attempts", "ATTEMPTS"),
]
HTTP_ROUTE_COLUMNS = [
    ("route", "HTTP ROUTE"),
    ("match", "MATCH"),
    ("action", "ACTION"),
    ("policy", "TIMEOUT / RETRIES / FAULT / MIRRORS"),
]
SUBSET_COLUMNS = [
    ("subset", "SUBSET"),
    ("connections", "CONNECTIONS"),
    ("endpoint", "ENDPOINT"),
    ("workload", "WORKLOAD"),
    ("version", "VERSION"),
    ("active", "ACTIVE"),
    ("ejected", "EJECTED"),
]
WHOLE_SERVICE = "(all)"  # the subset cell of the whole service


def routes_for(data: Mapping[str, Any], name: str | None) -> list[Mapping[str, Any]]:
    """The `/routes` services, or those `name` designates (`ns/name`, name, hostname, key)."""
    services = list(data.get("services") or [])
    if not name:
        return services
    out = []
    for s in services:
        hostname = str(s.get("hostname", ""))
        short, _, rest = hostname.partition(".")
        namespace = rest.split(".", 1)[0]
        if name in (s.get("service"), hostname, short, f"{namespace}/{short}"):
            out.append(s)
    return out


def service_heading(service: Mapping[str, Any]) -> str:
    parts = [str(service.get("hostname") or service.get("service", ""))]
    parts.append(f"VirtualService {service.get('virtualService') or 'none'}")
    parts.append(f"DestinationRule {service.get('destinationRule') or 'none'}")
    return "  ".join(parts)


def _destination_text(d: Mapping[str, Any], own: str) -> str:
    where = d.get("subset") or WHOLE_SERVICE
    if d.get("service") != own:
        where = f"{d.get('host', '')} {d.get('subset', '')}".strip()
    port = f":{d['port']}" if d.get("port") else ""
    text = f"{where}{port}"
    if not d.get("service"):
        text += " (unresolved)"
    return text


def _percent(value: Any) -> str:
    return f"{float(value):g}%"


def _seconds(value: Any) -> str:
    return f"{float(value):g}s"


def retries_text(retries: Mapping[str, Any] | None) -> str:
    """`retries default: 2 on connect-failure, ..., 503`, or as written; `no retries` for 0."""
    if not retries:
        return "retries: -"
    attempts = retries.get("attempts", 0)
    if not attempts:
        return "no retries (attempts 0)"
    on = [str(c) for c in retries.get("retryOn") or [] if c != "retriable-status-codes"]
    on += [str(c) for c in retries.get("statusCodes") or []]
    text = "retries default: " if retries.get("default") else "retries: "
    text += f"{attempts} on {', '.join(on) or '-'}"
    if retries.get("retryOnDefault") and not retries.get("default"):
        text += " (default retryOn)"
    if retries.get("perTryTimeoutSeconds") is not None:
        text += f", perTryTimeout {_seconds(retries['perTryTimeoutSeconds'])}"
    if retries.get("remoteLocalities"):
        text += ", remote localities"
    return text


def http_fault_text(fault: Mapping[str, Any] | None) -> list[str]:
    """`delay 1s at 10%`, `abort 503 at 5%` (`abort grpc 14 at 5%`)."""
    if not fault:
        return []
    out = []
    if fault.get("delaySeconds") is not None:
        out.append(
            f"delay {_seconds(fault['delaySeconds'])} at {_percent(fault.get('delayPercent', 100))}"
        )
    if fault.get("abortPercent") is not None:
        status = fault.get("abortHttpStatus")
        if status is None and fault.get("abortGrpcStatus") is not None:
            status = f"grpc {fault['abortGrpcStatus']}"
        out.append(f"abort {status} at {_percent(fault['abortPercent'])}")
    return out


def http_policy_text(route: Mapping[str, Any], own: str) -> str:
    """A route's timeout, retry policy, fault and mirrors, `; `-separated."""
    timeout = route.get("timeoutSeconds")
    parts = [f"timeout {_seconds(timeout)}" if timeout else "no timeout"]
    if "retries" in route:
        parts.append(retries_text(route.get("retries")))
    parts += [f"fault {f}" for f in http_fault_text(route.get("fault"))]
    parts += [
        f"mirror {_destination_text(m, own)} at {_percent(m.get('percent', 100))}"
        for m in route.get("mirrors") or []
    ]
    return "; ".join(parts)


def http_route_rows(service: Mapping[str, Any]) -> list[Row]:
    """The http routes a service's waypoint applies, one row per route."""
    own = service.get("service", "")
    rows = []
    for r in service.get("httpRoutes") or []:
        if "redirect" in r:
            red = r["redirect"]
            target = (red.get("authority") or "") + (red.get("uri") or "")
            action = f"redirect {red.get('code', 301)} {target or '(same)'}"
        elif "directResponse" in r:
            action = f"answer {r['directResponse']['status']}"
        else:
            action = ", ".join(
                f"{_destination_text(d, own)} {_percent(d.get('weight', 0))}"
                for d in r.get("destinations") or []
            )
        rewrite = r.get("rewrite") or {}
        if rewrite.get("uri") or rewrite.get("authority"):
            action += " rewrite " + " ".join(f"{k}={v}" for k, v in rewrite.items() if v)
        rows.append(
            {
                "route": r["route"],
                "match": " | ".join(r["match"]),
                "action": action,
                "policy": http_policy_text(r, own),
            }
        )
    return rows


def route_rows(service: Mapping[str, Any]) -> list[Row]:
    own = service.get("service", "")
    rows = []
    for r in service.get("routes") or []:
        destinations = [
            f"{_destination_text(d, own)} {_percent(d.get('weight', 0))}"
            for d in r.get("destinations") or []
        ]
        extensions = []
        fault = r.get("fault") or {}
        if fault.get("abortPercent") is not None:
            extensions.append(f"abort {_percent(fault['abortPercent'])}")
        if fault.get("delaySeconds") is not None:
            extensions.append(
                f"delay {fault['delaySeconds']:g}s at {_percent(fault.get('delayPercent', 100))}"
            )
        mirror = r.get("mirror")
        if mirror:
            extensions.append(
                f"mirror {_destination_text(mirror, own)} at {_percent(mirror.get('percent', 100))}"
            )
        rows.append(
            {
                "route": r.get("name", ""),
                "match": "; ".join(r.get("match") or []) or "any",
                "destinations": ", ".join(destinations),
                "extensions": ", ".join(extensions) or "-",
                "attempts": r.get("maxConnectAttempts", ""),
            }
        )
    return rows


def _connections(ports: list[Mapping[str, Any]]) -> str:
    """`open/limit` per port (`open` alone without a limit); the port named when several."""
    cells = []
    for p in ports:
        limit = p.get("maxConnections")
        cell = f"{p.get('open', 0)}/{limit}" if limit is not None else str(p.get("open", 0))
        cells.append(f"{p.get('port')}: {cell}" if len(ports) > 1 else cell)
    return ", ".join(cells) or "-"


def _ejected(endpoint: Mapping[str, Any]) -> str:
    """`21.5s left (2x)`: time left and times ejected so far (each ejection lasts longer)."""
    left = endpoint.get("ejectedSeconds")
    times = int(endpoint.get("ejections") or 0)
    count = f" ({times}x)" if times else ""
    return f"no{count}" if left is None else f"{float(left):g}s left{count}"


def subset_rows(service: Mapping[str, Any]) -> list[Row]:
    """One row per endpoint; the subset and its connections on the subset's first row."""
    rows: list[Row] = []
    for s in service.get("subsets") or []:
        head = {
            "subset": s.get("name") or WHOLE_SERVICE,
            "connections": _connections(list(s.get("ports") or [])),
        }
        endpoints = s.get("endpoints") or []
        if not endpoints:
            rows.append({**head, "endpoint": "no endpoint"})
            continue
        for i, e in enumerate(endpoints):
            rows.append(
                {
                    **(head if i == 0 else {"subset": "", "connections": ""}),
                    "endpoint": e.get("address", ""),
                    "workload": e.get("workload", ""),
                    "version": e.get("version") or "-",
                    "active": e.get("active", 0),
                    "ejected": _ejected(e) + ("" if e.get("healthy", True) else ", unhealthy"),
                }
            )
    return rows


_HTTP_POOL_FIELDS = (
    ("http1MaxPendingRequests", "maxPendingRequests"),
    ("http2MaxRequests", "maxRequests"),
    ("maxRequestsPerConnection", "maxRequestsPerConnection"),
    ("maxRetries", "maxRetries"),
)


def _pool_text(port: Mapping[str, Any]) -> list[str]:
    """The connection-pool and outlier settings of one subset port, one part per block."""
    parts = []
    tcp = port.get("tcpPool") or {}
    limit = port.get("maxConnections")
    tcp_fields = [f"maxConnections {limit}"] if limit is not None else []
    if tcp.get("connectTimeoutSeconds") is not None:
        tcp_fields.append(f"connectTimeout {_seconds(tcp['connectTimeoutSeconds'])}")
    if tcp.get("idleTimeoutSeconds") is not None:
        tcp_fields.append(f"idleTimeout {_seconds(tcp['idleTimeoutSeconds'])}")
    if tcp_fields:
        parts.append("tcp " + ", ".join(tcp_fields))
    http = port.get("httpPool")
    if http:
        http_fields = [f"{name} {http[key]}" for key, name in _HTTP_POOL_FIELDS if http.get(key)]
        if http.get("idleTimeoutSeconds") is not None:
            http_fields.append(f"idleTimeout {_seconds(http['idleTimeoutSeconds'])}")
        parts.append("http " + (", ".join(http_fields) or "defaults (unlimited)"))
    outlier = port.get("outlierDetection")
    if outlier:
        if outlier.get("splitExternalLocalOriginErrors"):
            eject = [
                f"consecutiveLocalOriginFailures {outlier.get('consecutiveLocalOriginFailures')}",
                "split local-origin errors",
            ]
        else:
            eject = [
                f"consecutive5xxErrors {outlier.get('consecutive5xxErrors')}",
                f"consecutiveGatewayErrors {outlier.get('consecutiveGatewayErrors')}",
            ]
        eject += [
            f"interval {_seconds(outlier.get('intervalSeconds', 0))}",
            f"baseEjectionTime {_seconds(outlier.get('baseEjectionSeconds', 0))}",
            f"maxEjectionPercent {outlier.get('maxEjectionPercent')}%",
        ]
        if outlier.get("minHealthPercent"):
            eject.append(f"minHealthPercent {outlier['minHealthPercent']}%")
        parts.append("outlier " + ", ".join(eject))
    return parts


def subset_policy_lines(service: Mapping[str, Any]) -> list[str]:
    """Per subset (and port, when they differ): connection pools and outlier detection."""
    lines = []
    for s in service.get("subsets") or []:
        name = s.get("name") or WHOLE_SERVICE
        ports = list(s.get("ports") or [])
        texts = [(p.get("port"), _pool_text(p)) for p in ports]
        same = len({tuple(t) for _, t in texts}) <= 1
        for port, parts in texts[:1] if same else texts:
            if not parts:
                continue
            label = name if same else f"{name} port {port}"
            lines.append(f"subset {label}: " + "; ".join(parts))
    return lines


def routes_unattributed_notes(data: Mapping[str, Any]) -> list[str]:
    """Compile notes no service claims (a host that is no service, say)."""
    claimed = {n for s in data.get("services") or [] for n in s.get("notes") or []}
    return [n for n in data.get("notes") or [] if n not in claimed]
