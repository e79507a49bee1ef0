"""`/routes` for http routes and pools: timeout, retry policy (Istio's default named as such),
fault, mirrors, connectionPool.http and outlier detection, as JSON and as the CLI's text."""

from __future__ import annotations

import random

import pytest

from nodeagent.admin import views
from nodeagent.admin.traffic import (
    RoutesReport,
    http_fault_json,
    http_pool_json,
    outlier_json,
    retries_json,
)
from nodeagent.cli.agent import routes_text
from nodeagent.model.routing import (
    HttpFault,
    HttpPool,
    HttpRetry,
    OutlierDetection,
    Percent,
)
from nodeagent.model.workload import Port
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.state.store import StateBatch, StateStore
from nodeagent.traffic.outlier import OutlierDetector
from tests.builders import destination_rule, service, virtual_service, workload

pytestmark = pytest.mark.unit

DEFAULT_ON = ["connect-failure", "refused-stream", "unavailable", "cancelled"]


@pytest.mark.parametrize(
    ("retry", "want"),
    [
        (
            None,
            {
                "default": True,
                "attempts": 2,
                "perTryTimeoutSeconds": None,
                "retryOn": [*DEFAULT_ON, "retriable-status-codes"],
                "retryOnDefault": True,
                "statusCodes": [],
                "remoteLocalities": False,
            },
        ),
        (  # attempts written, retryOn not: Istio keeps its default conditions (no 503 since 1.24)
            HttpRetry(3, per_try_timeout=0.5),
            {
                "default": False,
                "attempts": 3,
                "perTryTimeoutSeconds": 0.5,
                "retryOn": [*DEFAULT_ON, "retriable-status-codes"],
                "retryOnDefault": True,
                "statusCodes": [],
                "remoteLocalities": False,
            },
        ),
        (  # status codes in retryOn bring retriable-status-codes, as istiod adds it
            HttpRetry(1, retry_on=("5xx",), status_codes=(502, 504), remote_localities=True),
            {
                "default": False,
                "attempts": 1,
                "perTryTimeoutSeconds": None,
                "retryOn": ["5xx", "retriable-status-codes"],
                "retryOnDefault": False,
                "statusCodes": [502, 504],
                "remoteLocalities": True,
            },
        ),
        (
            HttpRetry(0),
            {
                "default": False,
                "attempts": 0,
                "perTryTimeoutSeconds": None,
                "retryOn": [*DEFAULT_ON, "retriable-status-codes"],
                "retryOnDefault": True,
                "statusCodes": [],
                "remoteLocalities": False,
            },
        ),
    ],
)
def test_retries_json_names_the_policy_in_effect(retry, want) -> None:
    assert retries_json(retry) == want


@pytest.mark.parametrize(
    ("retry", "text"),
    [
        (
            None,
            "retries default: 2 on connect-failure, refused-stream, unavailable, cancelled",
        ),
        (
            HttpRetry(3, per_try_timeout=0.5),
            "retries: 3 on connect-failure, refused-stream, unavailable, cancelled"
            " (default retryOn), perTryTimeout 0.5s",
        ),
        (
            HttpRetry(1, retry_on=("5xx", "reset"), remote_localities=True),
            "retries: 1 on 5xx, reset, remote localities",
        ),
        (
            HttpRetry(2, retry_on=("gateway-error",), status_codes=(409,)),
            "retries: 2 on gateway-error, 409",
        ),
        (HttpRetry(0), "no retries (attempts 0)"),
    ],
)
def test_retries_text(retry, text) -> None:
    assert views.retries_text(retries_json(retry)) == text


@pytest.mark.parametrize(
    ("fault", "json", "texts"),
    [
        (
            HttpFault(delay=1.5, delay_percent=Percent(10)),
            {
                "delaySeconds": 1.5,
                "delayPercent": 10.0,
                "abortHttpStatus": None,
                "abortGrpcStatus": None,
                "abortPercent": None,
            },
            ["delay 1.5s at 10%"],
        ),
        (
            HttpFault(abort_status=503, abort_percent=Percent(5)),
            {
                "delaySeconds": None,
                "delayPercent": None,
                "abortHttpStatus": 503,
                "abortGrpcStatus": None,
                "abortPercent": 5.0,
            },
            ["abort 503 at 5%"],
        ),
        (
            HttpFault(
                delay=0.2, delay_percent=Percent(100), abort_grpc=14, abort_percent=Percent(0.5)
            ),
            {
                "delaySeconds": 0.2,
                "delayPercent": 100.0,
                "abortHttpStatus": None,
                "abortGrpcStatus": 14,
                "abortPercent": 0.5,
            },
            ["delay 0.2s at 100%", "abort grpc 14 at 0.5%"],
        ),
    ],
)
def test_http_fault_json_and_text(fault, json, texts) -> None:
    assert http_fault_json(fault) == json
    assert views.http_fault_text(json) == texts


def test_pool_and_outlier_json_fill_istio_defaults_and_null_when_unset() -> None:
    assert http_pool_json(None) is None and outlier_json(None) is None
    assert http_pool_json(HttpPool(max_pending_requests=5, idle_timeout=30.0)) == {
        "http1MaxPendingRequests": 5,
        "http2MaxRequests": None,
        "maxRequestsPerConnection": None,
        "maxRetries": None,
        "idleTimeoutSeconds": 30.0,
    }
    split = outlier_json(
        OutlierDetection(
            split_external_local_origin_errors=True, consecutive_local_origin_failures=2
        )
    )
    assert split is not None
    assert (split["splitExternalLocalOriginErrors"], split["threshold"]) == (True, 2)
    plain = outlier_json(OutlierDetection(consecutive_gateway_errors=3))
    assert plain is not None
    assert (plain["consecutive5xxErrors"], plain["consecutiveGatewayErrors"]) == (5, 3)
    assert (plain["threshold"], plain["intervalSeconds"], plain["baseEjectionSeconds"]) == (
        3,
        10.0,
        30.0,
    )


@pytest.mark.parametrize(
    ("endpoint", "cell"),
    [
        ({"ejectedSeconds": None, "ejections": 0}, "no"),
        ({"ejectedSeconds": None, "ejections": 2}, "no (2x)"),
        ({"ejectedSeconds": 21.5, "ejections": 1}, "21.5s left (1x)"),
        ({"ejectedSeconds": 60.0, "ejections": 2}, "60s left (2x)"),
        ({}, "no"),  # an older agent's answer
    ],
)
def test_ejected_cell_shows_time_left_and_times_ejected(endpoint, cell) -> None:
    [row] = views.subset_rows({"subsets": [{"name": "v1", "endpoints": [endpoint]}]})
    assert row["ejected"] == cell


@pytest.mark.parametrize(
    ("port", "line"),
    [
        ({"maxConnections": None, "tcpPool": None, "httpPool": None}, None),
        (
            {
                "maxConnections": 10,
                "tcpPool": {"maxConnections": 10, "connectTimeoutSeconds": 2.0},
                "httpPool": {"http1MaxPendingRequests": 1, "maxRetries": 3},
            },
            "subset v1: tcp maxConnections 10, connectTimeout 2s;"
            " http maxPendingRequests 1, maxRetries 3",
        ),
        (
            {"httpPool": {"http2MaxRequests": None}},
            "subset v1: http defaults (unlimited)",
        ),
        (
            {
                "outlierDetection": outlier_json(
                    OutlierDetection(
                        split_external_local_origin_errors=True,
                        consecutive_local_origin_failures=2,
                        min_health_percent=50,
                    )
                )
            },
            "subset v1: outlier consecutiveLocalOriginFailures 2, split local-origin errors,"
            " interval 10s, baseEjectionTime 30s, maxEjectionPercent 10%, minHealthPercent 50%",
        ),
    ],
)
def test_subset_policy_line(port, line) -> None:
    lines = views.subset_policy_lines(
        {"subsets": [{"name": "v1", "ports": [{"port": 80, **port}]}]}
    )
    assert lines == ([line] if line else [])


def test_subset_policy_lines_name_ports_only_when_they_differ() -> None:
    ports = [{"port": 80, "maxConnections": 1}, {"port": 81, "maxConnections": 2}]
    assert views.subset_policy_lines({"subsets": [{"name": "", "ports": ports}]}) == [
        "subset (all) port 80: tcp maxConnections 1",
        "subset (all) port 81: tcp maxConnections 2",
    ]


BACKEND = service("backend", "10.96.0.10", namespace="demo", ports=(Port(80, 8080),))
ECHO = service("echo", "10.96.0.11", namespace="demo", ports=(Port(80, 8080),))
RULE = destination_rule(
    "backend",
    "demo",
    spec={
        "host": "backend",
        "trafficPolicy": {
            "connectionPool": {
                "tcp": {"maxConnections": 10},
                "http": {"http1MaxPendingRequests": 4, "maxRetries": 2, "idleTimeout": "30s"},
            },
            "outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100},
        },
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {
                "name": "v2",
                "labels": {"version": "v2"},
                "trafficPolicy": {
                    "outlierDetection": {
                        "splitExternalLocalOriginErrors": True,
                        "consecutiveLocalOriginFailures": 2,
                    }
                },
            },
        ],
    },
)
ROUTES = virtual_service(
    "backend",
    "demo",
    spec={
        "hosts": ["backend"],
        "http": [
            {
                "match": [{"uri": {"prefix": "/slow"}}],
                "route": [{"destination": {"host": "backend", "subset": "v2"}}],
                "timeout": "2s",
                "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,503"},
                "fault": {
                    "delay": {"fixedDelay": "1s", "percentage": {"value": 10}},
                    "abort": {"httpStatus": 503, "percentage": {"value": 5}},
                },
                "mirrors": [
                    {"destination": {"host": "echo"}, "percentage": {"value": 20}},
                    {"destination": {"host": "nosuch"}},
                ],
            },
            {"route": [{"destination": {"host": "backend", "subset": "v1"}}]},
        ],
    },
)


@pytest.fixture
def report() -> tuple[RoutesReport, ServiceRouting]:
    store = StateStore()
    store.apply(
        StateBatch(
            workloads=tuple(
                workload(
                    name,
                    addr,
                    namespace="demo",
                    canonical_name="backend",
                    canonical_revision=version,
                    services={BACKEND.key: (Port(80, 8080),)},
                )
                for name, addr, version in (("a", "10.0.0.1", "v1"), ("b", "10.0.0.2", "v2"))
            ),
            services=(BACKEND, ECHO),
            virtual_services=(ROUTES,),
            destination_rules=(RULE,),
        )
    )
    routing = ServiceRouting(store, OutlierDetector(lambda: 1000.0), random.Random(1))
    return RoutesReport(store, routing, proxy="waypoint"), routing


def test_http_routes_show_timeout_retries_fault_mirrors(report) -> None:
    data = report[0].routes()
    assert data["proxy"] == "waypoint"
    [backend, _echo] = data["services"] if len(data["services"]) > 1 else [*data["services"], None]
    slow, rest = backend["httpRoutes"]
    assert slow["timeoutSeconds"] == 2.0
    assert slow["retries"]["attempts"] == 3 and slow["retries"]["perTryTimeoutSeconds"] == 0.5
    assert slow["retries"]["retryOn"] == ["5xx", "retriable-status-codes"]
    assert slow["retries"]["statusCodes"] == [503] and not slow["retries"]["default"]
    assert slow["fault"]["delayPercent"] == 10.0 and slow["fault"]["abortHttpStatus"] == 503
    assert slow["mirrors"] == [
        {"host": "echo", "service": ECHO.key, "subset": "", "port": None, "percent": 20.0},
        {"host": "nosuch", "service": "", "subset": "", "port": None, "percent": 100.0},
    ]
    assert rest["timeoutSeconds"] is None and rest["fault"] is None and rest["mirrors"] == []
    assert rest["retries"]["default"] is True


def test_subset_ports_carry_http_pool_and_outlier(report) -> None:
    [backend, *_] = report[0].routes()["services"]
    subsets = {s["name"]: s["ports"][0] for s in backend["subsets"]}
    v1, v2 = subsets["v1"], subsets["v2"]
    assert v1["httpPool"] == {
        "http1MaxPendingRequests": 4,
        "http2MaxRequests": None,
        "maxRequestsPerConnection": None,
        "maxRetries": 2,
        "idleTimeoutSeconds": 30.0,
    }
    assert v1["tcpPool"]["maxConnections"] == 10 == v1["maxConnections"]
    assert v1["outlierDetection"]["threshold"] == 1
    assert v2["outlierDetection"]["splitExternalLocalOriginErrors"] is True
    assert v2["outlierDetection"]["threshold"] == 2


def test_routes_text_from_a_waypoint_shows_policies_and_no_agent_hints(report) -> None:
    data = report[0].routes()
    text = routes_text(data, views.routes_for(data, "backend"), 100)
    assert "TIMEOUT / RETRIES / FAULT / MIRRORS" in text
    flat = " ".join(text.split())
    assert "timeout 2s; retries: 3 on 5xx, 503, perTryTimeout 0.5s;" in flat
    assert "fault delay 1s at 10%; fault abort 503 at 5%; mirror echo at 20%;" in flat
    assert "mirror nosuch (unresolved) at 100%" in flat
    assert "no timeout; retries default: 2 on connect-failure," in flat
    assert (
        "subset v1: tcp maxConnections 10; http maxPendingRequests 4, maxRetries 2,"
        " idleTimeout 30s; outlier consecutive5xxErrors 1, consecutiveGatewayErrors 0,"
        " interval 10s, baseEjectionTime 30s, maxEjectionPercent 100%" in flat
    )
    assert "subset v2: tcp maxConnections 10;" in flat and "split local-origin errors" in flat
    assert "needs a waypoint" not in text and "behind waypoint" not in text
    assert all(len(line) <= 100 for line in text.splitlines())
