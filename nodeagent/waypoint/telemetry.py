"""The waypoint's request telemetry: Istio's HTTP metrics and one access-log line per request.

Names and labels are Istio's standard metrics as a waypoint (`reporter="waypoint"`)
reports them: `istio_requests_total`, `istio_request_duration_milliseconds`,
`istio_request_bytes`, `istio_response_bytes`, with the common traffic labels
plus `response_code` (the label set of nodeagent.admin.metrics, which the
agent's TCP metrics use too).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from nodeagent.admin.metrics import TRAFFIC_LABELS, connection_labels
from nodeagent.model.workload import Service, Workload
from nodeagent.waypoint.exchange import HTTP2, RequestRecord
from nodeagent.waypoint.router import RequestObserver, TunnelCaller

access_log = logging.getLogger("nodeagent.waypoint.access")

REQUEST_LABELS = (*TRAFFIC_LABELS, "response_code")
# Istio's default buckets (milliseconds) for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
)  # fmt: skip
SIZE_BUCKETS = tuple(10.0**i for i in range(10))
MAX_CACHED_SERIES = 10_000  # label sets whose children are kept; cleared when full


class RequestTelemetry(RequestObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("istio_requests", "Total requests", REQUEST_LABELS, registry=r)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration",
            REQUEST_LABELS,
            buckets=DURATION_BUCKETS_MS,
            registry=r,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes", "Request body size", REQUEST_LABELS, buckets=SIZE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.response_bytes = Histogram(
            "istio_response_bytes", "Response body size", REQUEST_LABELS, buckets=SIZE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.mirrors = Counter(
            "nodeagent_waypoint_mirror_requests",
            "Mirror copies sent, by outcome (ok: a response below 500)",
            ("outcome",),
            registry=r,
        )
        self._series: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def mirror_done(self, status: int) -> None:
        self.mirrors.labels("ok" if 0 < status < 500 else "failed").inc()

    def _children(
        self,
        caller: TunnelCaller,
        service: Service | None,
        workload: Workload | None,
        grpc: bool,
        flags: str,
        status: int,
    ) -> tuple[Any, ...]:
        labels = connection_labels(
            reporter="waypoint",
            source=caller.workload,
            destination=workload,
            service=service,
            source_principal=str(caller.identity),
            mtls=True,
            response_flags=flags,
        )
        values = (*labels.values()[:-3], "grpc" if grpc else "http", flags, "mutual_tls",
                  str(status))  # fmt: skip
        return (
            self.requests.labels(*values),
            self.duration.labels(*values),
            self.request_bytes.labels(*values),
            self.response_bytes.labels(*values),
            caller.workload,  # kept alive: their ids are in the key
            workload,
            service,
        )

    def request_done(
        self,
        record: RequestRecord,
        caller: TunnelCaller,
        service: Service | None,
        workload: Workload | None,
    ) -> None:
        head = record.head
        grpc = head.protocol == HTTP2 and (head.header("content-type") or "").startswith(
            "application/grpc"
        )
        flags = record.flags or "-"
        # The state store replaces a record when it changes, so the objects' identities key
        # the label set; the cached entry holds them, so an id is never reused meanwhile.
        key = (id(caller.workload), id(workload), id(service), caller.identity, grpc, flags,
               record.status)  # fmt: skip
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= MAX_CACHED_SERIES:
                self._series.clear()
            series = self._series[key] = self._children(
                caller, service, workload, grpc, flags, record.status
            )
        requests, duration, request_bytes, response_bytes = series[:4]
        requests.inc()
        duration.observe(record.duration * 1000.0)
        request_bytes.observe(record.request_bytes)
        response_bytes.observe(record.response_bytes)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                '[%s] "%s %s %s" %d %s %d %d %d "%s" "%s" %s %s route=%s src=%s attempts=%d%s',
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                head.method,
                head.path,
                head.protocol,
                record.status,
                record.flags or "-",
                record.request_bytes,
                record.response_bytes,
                int(record.duration * 1000),
                head.header("user-agent") or "-",
                head.authority,
                service.key if service is not None else "-",
                record.endpoint.address if record.endpoint is not None else "-",
                record.route or "default",
                caller.identity,
                record.attempts,
                f' note="{record.note}"' if record.note else "",
            )
