"""RequestTelemetry: Istio's HTTP metrics as a waypoint reports them, and the access log."""

from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType

import pytest

from nodeagent.model.identity import Identity
from nodeagent.model.workload import Port
from nodeagent.waypoint.exchange import HTTP1, HTTP2, Endpoint, RequestHead, RequestRecord
from nodeagent.waypoint.router import TunnelCaller
from nodeagent.waypoint.telemetry import REQUEST_LABELS, RequestTelemetry
from tests.builders import service, workload

pytestmark = pytest.mark.unit

NS = "demo"
BACKEND = service("backend", "10.96.0.10", namespace=NS, ports=(Port(8080, 8080),))
CLIENT = workload(
    "client-7d9", "10.2.0.5", namespace=NS, canonical_name="client", canonical_revision="v3"
)
DEST = workload(
    "backend-v2-abc",
    "10.1.0.2",
    namespace=NS,
    canonical_name="backend",
    canonical_revision="v2",
    workload_name="backend-v2",
)
CLIENT_ID = Identity("cluster.local", NS, "client")
CALLER = TunnelCaller(CLIENT_ID, ("10.2.0.5", 51234), CLIENT, 'for="10.2.0.5:51234"', "")
ENDPOINT = Endpoint(("backend-v2-abc", "10.1.0.2", 8080), "10.1.0.2:8080")


def record(
    status: int = 200,
    flags: str = "",
    *,
    protocol: str = HTTP1,
    content_type: str | None = None,
    duration: float = 0.0125,
    request_bytes: int = 0,
    response_bytes: int = 0,
    endpoint: Endpoint | None = ENDPOINT,
) -> RequestRecord:
    headers = (("content-type", content_type),) if content_type else ()
    head = RequestHead("POST", "/items?x=1", "backend:8080", headers, protocol)
    return RequestRecord(
        head, status, flags, duration, request_bytes, response_bytes, endpoint, "demo/backend"
    )


def labels(**overrides: str) -> dict[str, str]:
    base = {
        "reporter": "waypoint",
        "source_workload": "client-7d9",
        "source_canonical_service": "client",
        "source_canonical_revision": "v3",
        "source_workload_namespace": NS,
        "source_principal": "spiffe://cluster.local/ns/demo/sa/client",
        "source_app": "client",
        "source_version": "v3",
        "source_cluster": "unknown",
        "destination_service": "backend.demo.svc.cluster.local",
        "destination_service_namespace": NS,
        "destination_service_name": "backend",
        "destination_workload": "backend-v2",
        "destination_canonical_service": "backend",
        "destination_canonical_revision": "v2",
        "destination_workload_namespace": NS,
        "destination_principal": str(DEST.identity()),
        "destination_app": "backend",
        "destination_version": "v2",
        "destination_cluster": "unknown",
        "request_protocol": "http",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
        "response_code": "200",
    }
    base.update(overrides)
    assert tuple(base) == REQUEST_LABELS
    return base


def cluster_of(w: object) -> str:
    return getattr(w, "cluster_id", "") or "unknown"


def test_a_request_counts_with_waypoint_labels() -> None:
    t = RequestTelemetry()
    t.request_done(record(), CALLER, BACKEND, DEST)
    t.request_done(record(), CALLER, BACKEND, DEST)
    want = labels(source_cluster=cluster_of(CLIENT), destination_cluster=cluster_of(DEST))
    assert t.registry.get_sample_value("istio_requests_total", want) == 2.0


def test_response_code_and_flags_are_labels() -> None:
    t = RequestTelemetry()
    t.request_done(record(503, "UH", endpoint=None), CALLER, BACKEND, None)
    t.request_done(record(404, "NR", endpoint=None), CALLER, BACKEND, None)
    t.request_done(record(0, "DC"), CALLER, BACKEND, DEST)
    no_dest = {
        "destination_workload": "unknown",
        "destination_canonical_service": "unknown",
        "destination_canonical_revision": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_app": "unknown",
        "destination_version": "unknown",
        "destination_cluster": "unknown",
    }
    common = {"source_cluster": cluster_of(CLIENT)}
    uh = labels(response_code="503", response_flags="UH", **no_dest, **common)
    nr = labels(response_code="404", response_flags="NR", **no_dest, **common)
    dc = labels(
        response_code="0", response_flags="DC", destination_cluster=cluster_of(DEST), **common
    )
    get = t.registry.get_sample_value
    assert get("istio_requests_total", uh) == 1.0
    assert get("istio_requests_total", nr) == 1.0
    assert get("istio_requests_total", dc) == 1.0


def test_destination_version_is_the_picked_workload_revision() -> None:
    t = RequestTelemetry()
    v1 = workload("backend-v1-x", "10.1.0.1", namespace=NS, canonical_revision="v1")
    t.request_done(record(), CALLER, BACKEND, v1)
    t.request_done(record(), CALLER, BACKEND, DEST)
    samples = [
        s
        for m in t.registry.collect()
        if m.name == "istio_requests"
        for s in m.samples
        if s.name == "istio_requests_total"
    ]
    assert sorted(s.labels["destination_version"] for s in samples) == ["v1", "v2"]


@pytest.mark.parametrize(
    ("protocol", "content_type", "expected"),
    [
        (HTTP2, "application/grpc", "grpc"),
        (HTTP2, "application/grpc+proto", "grpc"),
        (HTTP2, "application/json", "http"),
        (HTTP2, None, "http"),
        (HTTP1, "application/grpc", "http"),  # gRPC needs HTTP/2
    ],
)
def test_request_protocol(protocol: str, content_type: str | None, expected: str) -> None:
    t = RequestTelemetry()
    t.request_done(record(protocol=protocol, content_type=content_type), CALLER, BACKEND, DEST)
    samples = [
        s.labels["request_protocol"]
        for m in t.registry.collect()
        if m.name == "istio_requests"
        for s in m.samples
        if s.name == "istio_requests_total"
    ]
    assert samples == [expected]


def test_histograms_observe_duration_in_ms_and_body_sizes() -> None:
    t = RequestTelemetry()
    t.request_done(
        record(duration=0.0125, request_bytes=300, response_bytes=5000), CALLER, BACKEND, DEST
    )
    t.request_done(record(duration=2.0, request_bytes=0, response_bytes=50), CALLER, BACKEND, DEST)
    want = labels(source_cluster=cluster_of(CLIENT), destination_cluster=cluster_of(DEST))
    get = t.registry.get_sample_value
    assert get("istio_request_duration_milliseconds_count", want) == 2.0
    assert get("istio_request_duration_milliseconds_sum", want) == pytest.approx(2012.5)
    assert get("istio_request_duration_milliseconds_bucket", {**want, "le": "25.0"}) == 1.0
    assert get("istio_request_duration_milliseconds_bucket", {**want, "le": "2500.0"}) == 2.0
    assert get("istio_request_bytes_sum", want) == 300.0
    assert get("istio_request_bytes_bucket", {**want, "le": "1.0"}) == 1.0
    assert get("istio_request_bytes_bucket", {**want, "le": "1000.0"}) == 2.0
    assert get("istio_response_bytes_sum", want) == 5050.0
    assert get("istio_response_bytes_bucket", {**want, "le": "100.0"}) == 1.0
    assert get("istio_response_bytes_bucket", {**want, "le": "10000.0"}) == 2.0


def test_an_unknown_service_and_caller_workload_are_unknown() -> None:
    t = RequestTelemetry()
    caller = TunnelCaller(CLIENT_ID, ("10.9.9.9", 1), None, "", "")
    t.request_done(record(404, "NR", endpoint=None), caller, None, None)
    samples = [
        s.labels
        for m in t.registry.collect()
        if m.name == "istio_requests"
        for s in m.samples
        if s.name == "istio_requests_total"
    ]
    assert len(samples) == 1
    got = samples[0]
    assert got["source_principal"] == str(CLIENT_ID)
    assert got["source_workload"] == "unknown"
    assert got["destination_service"] == "unknown"
    assert got["response_flags"] == "NR"


def test_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    t = RequestTelemetry()
    ep = Endpoint(ENDPOINT.key, ENDPOINT.address, MappingProxyType({"uid": "backend-v2-abc"}))
    with caplog.at_level(logging.INFO, logger="nodeagent.waypoint.access"):
        t.request_done(
            record(201, duration=0.0125, request_bytes=3, response_bytes=7, endpoint=ep),
            CALLER,
            BACKEND,
            DEST,
        )
    (line,) = [r.getMessage() for r in caplog.records if r.name == "nodeagent.waypoint.access"]
    assert '"POST /items?x=1 HTTP/1.1" 201 - 3 7 12 "-" "backend:8080"' in line
    assert f"{BACKEND.key} 10.1.0.2:8080 route=demo/backend src={CLIENT_ID}" in line


def test_a_changed_workload_record_is_counted_under_its_new_labels() -> None:
    # Label sets are cached per record object: the store replaces a record that changes.
    t = RequestTelemetry()
    t.request_done(record(), CALLER, BACKEND, DEST)
    t.request_done(record(), CALLER, BACKEND, DEST)
    moved = dataclasses.replace(DEST, canonical_revision="v9")
    t.request_done(record(), CALLER, BACKEND, moved)
    count = t.registry.get_sample_value
    assert count("istio_requests_total", labels()) == 2
    v9 = labels(destination_version="v9", destination_canonical_revision="v9")
    assert count("istio_requests_total", v9) == 1
