"""VirtualService `http:` routes read from Istio's JSON shape: every field, defaults, errors."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from nodeagent.model.routing import (
    DerivePort,
    Destination,
    HeaderOps,
    HttpFault,
    HttpMirror,
    HttpRetry,
    MatchKind,
    Percent,
    RoutingSpecError,
    parse_virtual_service,
)

pytestmark = pytest.mark.unit

DEST = {"destination": {"host": "backend"}}


def http(*routes: dict[str, Any]) -> Any:
    return parse_virtual_service("demo", "web", {"hosts": ["backend"], "http": list(routes)})


def test_header_route_reads_match_destinations_and_headers() -> None:
    vs = http(
        {
            "name": "ios",
            "match": [
                {
                    "uri": {"prefix": "/api"},
                    "headers": {"X-User": {"exact": "ios"}, "x-trace": {}},
                    "withoutHeaders": {"x-debug": {}},
                    "method": {"regex": "GET|HEAD"},
                    "authority": {"prefix": "backend"},
                    "queryParams": {"v": {"exact": "2"}},
                    "sourceLabels": {"app": "frontend"},
                    "sourceNamespace": "demo",
                    "port": 8080,
                }
            ],
            "route": [
                {
                    "destination": {"host": "backend", "subset": "v2"},
                    "weight": 80,
                    "headers": {"request": {"set": {"X-Version": "v2"}}},
                },
                {"destination": {"host": "backend", "subset": "v1"}, "weight": 20},
            ],
            "headers": {
                "request": {"add": {"x-a": "1"}, "remove": ["X-Drop"]},
                "response": {"set": {"x-b": "2"}},
            },
        }
    )
    (route,) = vs.http
    assert route.name == "ios" and not route.notes
    (m,) = route.match
    assert m.uri is not None and m.uri.kind is MatchKind.PREFIX and m.uri.value == "/api"
    assert [(n, s.kind) for n, s in m.headers] == [
        ("x-user", MatchKind.EXACT),
        ("x-trace", MatchKind.PRESENT),
    ]
    assert m.without_headers[0][0] == "x-debug"
    assert m.method is not None and m.method.holds("HEAD") and not m.method.holds("GETX")
    assert m.query_params[0][1].value == "2"
    assert (m.port, m.source_namespace, dict(m.source_labels)) == (
        8080,
        "demo",
        {"app": "frontend"},
    )
    assert [d.weight for d in route.route] == [80, 20]
    assert route.route[0].headers is not None
    assert route.route[0].headers.request == HeaderOps(set=(("x-version", "v2"),))
    assert route.route[1].headers is None
    assert route.headers.request == HeaderOps(add=(("x-a", "1"),), remove=("x-drop",))
    assert route.headers.response.set == (("x-b", "2"),)
    # The agent still lists http as a field it does not apply.
    assert vs.needs_waypoint == ("spec.http",)


@pytest.mark.parametrize(
    ("match", "text", "expected"),
    [
        ({"exact": "/a"}, "/a", True),
        ({"exact": "/a"}, "/A", False),
        ({"prefix": "/a"}, "/ab", True),
        ({"prefix": "/a"}, "/b", False),
        ({"regex": "/a/[0-9]+"}, "/a/12", True),
        ({"regex": "/a/[0-9]+"}, "/a/12/x", False),  # a full match, as RE2 in Envoy
        ({"regex": "[0-9]+"}, "x12", False),
    ],
)
def test_string_match_kinds(match: dict[str, str], text: str, expected: bool) -> None:
    (route,) = http({"match": [{"uri": match}], "route": [DEST]}).http
    uri = route.match[0].uri
    assert uri is not None and uri.holds(text) is expected


@pytest.mark.parametrize(
    ("match", "text"),
    [({"exact": "/Api"}, "/aPI"), ({"prefix": "/Api"}, "/aPIx"), ({"regex": "/api"}, "/API")],
)
def test_ignore_uri_case(match: dict[str, str], text: str) -> None:
    (route,) = http({"match": [{"uri": match, "ignoreUriCase": True}], "route": [DEST]}).http
    uri = route.match[0].uri
    assert uri is not None and uri.holds(text)


def test_route_kinds_redirect_direct_response_rewrite_and_defaults() -> None:
    body = base64.b64encode(b"\x00bin").decode()
    vs = http(
        {"redirect": {"uri": "/new"}},
        {
            "redirect": {
                "authority": "b.example",
                "port": 8443,
                "scheme": "https",
                "redirectCode": 308,
            }
        },
        {"redirect": {"derivePort": "FROM_REQUEST_PORT"}},
        {"directResponse": {"status": 503, "body": {"string": "down"}}},
        {"directResponse": {"status": 200, "body": {"bytes": body}}},
        {"directResponse": {"status": 204}},
        {"route": [DEST], "rewrite": {"uri": "/v2", "authority": "b"}},
        {
            "route": [DEST],
            "rewrite": {"uriRegexRewrite": {"match": "^/a/(.*)", "rewrite": "/b/\\1"}},
        },
    )
    r = vs.http
    assert r[0].redirect is not None and (r[0].redirect.uri, r[0].redirect.code) == ("/new", 301)
    assert r[0].redirect.derive_port is DerivePort.FROM_PROTOCOL_DEFAULT
    assert r[1].redirect is not None
    assert (r[1].redirect.authority, r[1].redirect.port, r[1].redirect.scheme) == (
        "b.example",
        8443,
        "https",
    )
    assert r[1].redirect.code == 308
    assert r[2].redirect is not None
    assert r[2].redirect.derive_port is DerivePort.FROM_REQUEST_PORT
    assert r[3].direct_response is not None
    assert (r[3].direct_response.status, r[3].direct_response.body) == (503, b"down")
    assert r[4].direct_response is not None and r[4].direct_response.body == b"\x00bin"
    assert r[5].direct_response is not None and r[5].direct_response.body == b""
    assert r[6].rewrite is not None and (r[6].rewrite.uri, r[6].rewrite.authority) == ("/v2", "b")
    rx = r[7].rewrite
    assert rx is not None and rx.regex is not None
    assert rx.regex.sub(rx.regex_substitution, "/a/x/y") == "/b/x/y"


def test_resilience_fields_are_read_and_cors_is_noted() -> None:
    vs = http(
        {
            "route": [DEST],
            "timeout": "2s",
            "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,,503,reset"},
            "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 1.5}}},
            "mirror": {"host": "backend", "subset": "v3"},
            "mirrorPercentage": {"value": 5},
            "corsPolicy": {"allowOrigins": [{"exact": "x"}]},
        }
    )
    (route,) = vs.http
    assert route.timeout == 2.0
    assert route.retries == HttpRetry(3, 0.5, ("5xx", "reset"), (503,), False)
    assert route.fault == HttpFault(abort_status=500, abort_percent=Percent(1.5))
    assert route.mirrors == (HttpMirror(Destination("backend", "v3"), Percent(5.0)),)
    assert route.notes == ("spec.http[0].corsPolicy",)
    assert route.unapplied["corsPolicy"] == {"allowOrigins": [{"exact": "x"}]}


def test_fault_delay_grpc_abort_and_defaults() -> None:
    vs = http(
        {
            "route": [DEST],
            "fault": {
                "delay": {"fixedDelay": "2s"},
                "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 20}},
            },
            "timeout": "0s",
        }
    )
    (route,) = vs.http
    assert route.fault == HttpFault(2.0, Percent(100.0), 0, 14, Percent(20.0))
    assert route.timeout is None  # 0s: no timeout, as Istio's default
    assert route.retries is None and route.mirrors == ()


def test_mirrors_list_and_deprecated_percent() -> None:
    (a,) = http(
        {
            "route": [DEST],
            "mirrors": [
                {"destination": {"host": "backend", "subset": "v2"}},
                {"destination": {"host": "other"}, "percentage": {"value": 50}},
            ],
        }
    ).http
    assert a.mirrors == (
        HttpMirror(Destination("backend", "v2"), Percent(100.0)),
        HttpMirror(Destination("other"), Percent(50.0)),
    )
    (b,) = http({"route": [DEST], "mirror": {"host": "x"}, "mirrorPercent": 30}).http
    assert b.mirrors == (HttpMirror(Destination("x"), Percent(30.0)),)


@pytest.mark.parametrize(
    ("route", "path", "problem"),
    [
        ({"retries": {"attempts": -1}}, "spec.http[0].retries.attempts", "out of range"),
        ({"retries": {"retryOn": "5xx,teapot"}}, "spec.http[0].retries.retryOn", "'teapot'"),
        ({"retries": {"retryOn": "5xx,999"}}, "spec.http[0].retries.retryOn", "out of range"),
        ({"retries": {"perTryTimeout": "0s"}}, "spec.http[0].retries.perTryTimeout", ""),
        ({"fault": {}}, "spec.http[0].fault", "delay or abort"),
        ({"fault": {"abort": {"httpStatus": 99}}}, "spec.http[0].fault.abort.httpStatus", "range"),
        (
            {"fault": {"abort": {"httpStatus": 500, "grpcStatus": "INTERNAL"}}},
            "spec.http[0].fault.abort",
            "exactly one",
        ),
        ({"fault": {"abort": {"grpcStatus": "NOPE"}}}, "spec.http[0].fault.abort.grpcStatus", ""),
        (
            {"fault": {"delay": {"percentage": {"value": 5}}}},
            "spec.http[0].fault.delay.fixedDelay",
            "",
        ),
        (
            {"fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 101}}}},
            "spec.http[0].fault.delay.percentage.value",
            "out of range",
        ),
        ({"mirrorPercentage": {"value": 5}}, "spec.http[0].mirrorPercentage", "without mirror"),
        (
            {"mirror": {"host": "a"}, "mirrors": [{"destination": {"host": "b"}}]},
            "spec.http[0].mirrors",
            "not both",
        ),
        ({"mirrors": [{"percentage": {"value": 5}}]}, "spec.http[0].mirrors[0].destination", ""),
    ],
)
def test_bad_resilience_fields_are_refused_by_name(
    route: dict[str, Any], path: str, problem: str
) -> None:
    with pytest.raises(RoutingSpecError) as err:
        http({"route": [DEST], **route})
    assert err.value.path == path
    assert problem in err.value.problem


def test_match_limited_to_gateways_never_holds() -> None:
    (route,) = http({"match": [{"gateways": ["gw"]}], "route": [DEST]}).http
    assert route.match[0].port == -1


@pytest.mark.parametrize(
    ("route", "path", "problem"),
    [
        ({"match": []}, "spec.http[0]", "one of route, redirect or directResponse is required"),
        (
            {"route": [DEST], "redirect": {"uri": "/x"}},
            "spec.http[0].redirect",
            "set only one of route, redirect, directResponse (also has route)",
        ),
        (
            {"redirect": {"uri": "/x"}, "directResponse": {"status": 200}},
            "spec.http[0].directResponse",
            "set only one of route, redirect, directResponse (also has redirect)",
        ),
        (
            {"redirect": {"uri": "/x"}, "rewrite": {"uri": "/y"}},
            "spec.http[0].rewrite",
            "cannot be combined with redirect",
        ),
        (
            {"route": [DEST], "mirror": {"host": "a"}, "mirrors": []},
            "spec.http[0].mirrors",
            "set mirror or mirrors, not both",
        ),
        (
            {"match": [{"uri": {"regex": "(unclosed"}}], "route": [DEST]},
            "spec.http[0].match[0].uri.regex",
            "invalid regular expression '(unclosed': missing ), unterminated subpattern "
            "at position 0",
        ),
        (
            {"match": [{"uri": {}}], "route": [DEST]},
            "spec.http[0].match[0].uri",
            "set one of exact, prefix, regex",
        ),
        (
            {"match": [{"uri": {"exact": "/a", "prefix": "/"}}], "route": [DEST]},
            "spec.http[0].match[0].uri",
            "set one of exact, prefix, regex (got exact, prefix)",
        ),
        (
            {"match": [{"uri": {"exact": 3}}], "route": [DEST]},
            "spec.http[0].match[0].uri.exact",
            "expected a string, got a number (3)",
        ),
        (
            {"match": [{"queryParams": {"q": {"prefix": "a"}}}], "route": [DEST]},
            "spec.http[0].match[0].queryParams.q.prefix",
            "only exact and regex are supported here",
        ),
        (
            {"match": [{"headers": {"": {}}}], "route": [DEST]},
            "spec.http[0].match[0].headers.",
            "a name must not be empty",
        ),
        (
            {"match": [{"bogus": 1}], "route": [DEST]},
            "spec.http[0].match[0].bogus",
            "unknown field (allowed: name, uri, scheme, method, authority, headers, port, "
            "sourceLabels, gateways, queryParams, ignoreUriCase, withoutHeaders, "
            "sourceNamespace, statPrefix)",
        ),
        (
            {"redirect": {"port": 80, "derivePort": "FROM_REQUEST_PORT"}},
            "spec.http[0].redirect.derivePort",
            "set port or derivePort, not both",
        ),
        (
            {"redirect": {"derivePort": "SOMEWHERE"}},
            "spec.http[0].redirect.derivePort",
            "unknown value 'SOMEWHERE' (known: FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT)",
        ),
        (
            {"redirect": {"scheme": "ftp"}},
            "spec.http[0].redirect.scheme",
            "must be http or https, got 'ftp'",
        ),
        (
            {"redirect": {"redirectCode": 200}},
            "spec.http[0].redirect.redirectCode",
            "200 is not one of 301, 302, 303, 307, 308",
        ),
        (
            {"redirect": {"uri": "new"}},
            "spec.http[0].redirect.uri",
            "must start with /, got 'new'",
        ),
        (
            {"directResponse": {}},
            "spec.http[0].directResponse.status",
            "required field is missing",
        ),
        (
            {"directResponse": {"status": 99}},
            "spec.http[0].directResponse.status",
            "99 is out of range 200..599",
        ),
        (
            {"directResponse": {"status": 200, "body": {"string": "a", "bytes": "YQ=="}}},
            "spec.http[0].directResponse.body",
            "set string or bytes, not both",
        ),
        (
            {"directResponse": {"status": 200, "body": {"string": 5}}},
            "spec.http[0].directResponse.body.string",
            "expected a string, got a number (5)",
        ),
        (
            {"directResponse": {"status": 200, "body": {"bytes": "!!"}}},
            "spec.http[0].directResponse.body.bytes",
            "not base64",
        ),
        (
            {"route": [DEST], "rewrite": {"uri": "/a", "uriRegexRewrite": {}}},
            "spec.http[0].rewrite.uriRegexRewrite",
            "set uri or uriRegexRewrite, not both",
        ),
        (
            {"route": [DEST], "rewrite": {"uriRegexRewrite": {"match": "a"}}},
            "spec.http[0].rewrite.uriRegexRewrite.rewrite",
            "required field is missing",
        ),
        (
            {"route": [DEST], "rewrite": {"uriRegexRewrite": {"match": "(a)", "rewrite": "\\2"}}},
            "spec.http[0].rewrite.uriRegexRewrite.rewrite",
            "invalid substitution: invalid group reference 2 at position 1",
        ),
        (
            {"route": [DEST], "headers": {"request": {"set": {"host": "x"}}}},
            "spec.http[0].headers.request.set.host",
            "pseudo-headers and host cannot be changed",
        ),
        (
            {"route": [DEST], "timeout": "soon"},
            "spec.http[0].timeout",
            "unparsable duration 'soon' (use e.g. 1s, 100ms, 1m30s)",
        ),
    ],
)
def test_bad_http_route_names_the_field(route: dict[str, Any], path: str, problem: str) -> None:
    with pytest.raises(RoutingSpecError) as caught:
        http(route)
    assert (caught.value.path, caught.value.problem) == (path, problem)


def test_http_weights_are_relative_as_istiod_sends_them() -> None:
    (route,) = http(
        {
            "route": [
                {"destination": {"host": "a"}, "weight": 2},
                {"destination": {"host": "b"}, "weight": 1},
            ]
        }
    ).http
    assert [d.weight for d in route.route] == [2, 1]


def test_a_non_mapping_header_match_is_a_spec_error() -> None:
    with pytest.raises(RoutingSpecError) as caught:
        http({"match": [{"headers": 5}], "route": [DEST]})
    assert caught.value.path == "spec.http[0].match[0].headers"
