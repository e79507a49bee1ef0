"""Gateway API HTTPRoute attached to a Service, compiled to VirtualServices."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.model.httproute import parse_http_route, percentages
from nodeagent.model.routing import HeaderOps, MatchKind, RoutingSpecError

pytestmark = pytest.mark.unit

PARENT = {"kind": "Service", "group": "", "name": "backend", "port": 8080}
BACKEND = {"name": "backend", "port": 8080}


def convert(*rules: dict[str, Any], parents: list[Any] | None = None) -> Any:
    spec = {"parentRefs": parents or [PARENT], "rules": list(rules)}
    return parse_http_route("demo", "web", spec)


def test_prefix_match_headers_rewrite_and_weights() -> None:
    (vs,) = convert(
        {
            "matches": [
                {
                    "path": {"type": "PathPrefix", "value": "/api"},
                    "headers": [{"name": "X-User", "value": "ios"}],
                }
            ],
            "filters": [
                {
                    "type": "URLRewrite",
                    "urlRewrite": {
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}
                    },
                }
            ],
            "backendRefs": [{**BACKEND, "weight": 2}, {"name": "echo", "port": 9000}],
        },
        {"backendRefs": [BACKEND]},
    )
    assert vs.key == "demo/httproute-web" and vs.hosts == ("backend.demo.svc.cluster.local",)
    exact, prefix, rest = vs.http
    assert exact.match[0].uri is not None and exact.match[0].uri.kind is MatchKind.EXACT
    assert prefix.match[0].uri is not None and prefix.match[0].uri.value == "/api/"
    assert exact.match[0].port == 8080 and exact.match[0].headers[0][0] == "x-user"
    assert exact.rewrite is not None and prefix.rewrite is not None
    assert (exact.rewrite.uri, prefix.rewrite.uri) == ("/v2", "/v2/")
    assert [d.weight for d in exact.route] == [67, 33]
    assert exact.route[1].destination.host == "echo.demo.svc.cluster.local"
    assert rest.match[0].uri is not None and rest.match[0].uri.value == "/"


def test_precedence_exact_before_longer_prefix_before_shorter() -> None:
    (vs,) = convert(
        {"matches": [{"path": {"value": "/a"}}], "backendRefs": [BACKEND]},
        {"matches": [{"path": {"value": "/a/b"}}], "backendRefs": [BACKEND]},
        {"matches": [{"path": {"type": "Exact", "value": "/z"}}], "backendRefs": [BACKEND]},
    )
    uris = [(r.match[0].uri.kind.value, r.match[0].uri.value) for r in vs.http]
    assert uris == [
        ("exact", "/z"),
        ("exact", "/a/b"),
        ("prefix", "/a/b/"),
        ("exact", "/a"),
        ("prefix", "/a/"),
    ]


def test_redirect_header_filters_and_no_backend() -> None:
    (vs,) = convert(
        {
            "filters": [
                {
                    "type": "RequestRedirect",
                    "requestRedirect": {
                        "scheme": "https",
                        "hostname": "b.example",
                        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"},
                    },
                },
                {
                    "type": "ResponseHeaderModifier",
                    "responseHeaderModifier": {"set": [{"name": "X-A", "value": "1"}]},
                },
            ]
        },
        {"matches": [{"method": "POST"}]},
    )
    no_backend, redirect = vs.http  # a method match takes precedence
    assert redirect.redirect is not None
    assert (redirect.redirect.code, redirect.redirect.uri, redirect.redirect.scheme) == (
        302,
        "/new",
        "https",
    )
    assert redirect.headers.response == HeaderOps(set=(("x-a", "1"),))
    assert no_backend.direct_response is not None and no_backend.direct_response.status == 500


def test_full_path_rewrite_and_several_parents() -> None:
    parents = [PARENT, {"kind": "Service", "name": "echo"}]
    first, second = convert(
        {
            "filters": [
                {
                    "type": "URLRewrite",
                    "urlRewrite": {
                        "hostname": "h",
                        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"},
                    },
                }
            ],
            "backendRefs": [BACKEND],
        },
        parents=parents,
    )
    assert (first.name, second.name) == ("httproute-web-0", "httproute-web-1")
    assert second.http[0].match[0].port == 0
    rewrite = first.http[0].rewrite
    assert rewrite is not None and rewrite.authority == "h" and rewrite.regex is not None
    assert rewrite.regex.sub(rewrite.regex_substitution, "/a/b") == "/x"


@pytest.mark.parametrize(
    ("weights", "shares"),
    [([1], [100]), ([1, 1, 1], [34, 33, 33]), ([2, 1], [67, 33]), ([0, 5], [0, 100]), ([], [])],
)
def test_percentages(weights: list[int], shares: list[int]) -> None:
    assert percentages(weights) == shares


@pytest.mark.parametrize(
    ("spec", "path", "problem"),
    [
        (
            {"parentRefs": []},
            "spec.parentRefs",
            "at least one parentRef (a Service) is required",
        ),
        (
            {"parentRefs": [{"name": "gw"}]},
            "spec.parentRefs[0].kind",
            'only parentRefs of kind Service (group "" or core) are supported, got Gateway '
            "of group 'gateway.networking.k8s.io'",
        ),
        (
            {"parentRefs": [{**PARENT, "namespace": "other"}]},
            "spec.parentRefs[0].namespace",
            "a route attaches to services of its own namespace only",
        ),
        (
            {"parentRefs": [PARENT], "rules": [{"backendRefs": [{"name": "backend"}]}]},
            "spec.rules[0].backendRefs[0].port",
            "port is required in backendRef",
        ),
        (
            {"parentRefs": [PARENT], "rules": [{"backendRefs": [{"name": "a.b", "port": 1}]}]},
            "spec.rules[0].backendRefs[0].name",
            "the name of the Service must be used, not the hostname",
        ),
        (
            {"parentRefs": [PARENT], "rules": [{"filters": [{"type": "CORS"}]}]},
            "spec.rules[0].filters[0].type",
            "unsupported filter type 'CORS'",
        ),
        (
            {
                "parentRefs": [PARENT],
                "rules": [{"matches": [{"path": {"type": "Glob", "value": "/"}}]}],
            },
            "spec.rules[0].matches[0].path.type",
            "unknown path match type 'Glob'",
        ),
        (
            {
                "parentRefs": [PARENT],
                "rules": [
                    {
                        "matches": [{"path": {"type": "RegularExpression", "value": "(x"}}],
                        "backendRefs": [BACKEND],
                    }
                ],
            },
            "spec.rules[0].matches[0]",
            "invalid regular expression '(x': missing ), unterminated subpattern at position 0",
        ),
    ],
)
def test_bad_route_names_the_field(spec: dict[str, Any], path: str, problem: str) -> None:
    with pytest.raises(RoutingSpecError) as caught:
        parse_http_route("demo", "web", spec)
    assert (caught.value.path, caught.value.problem) == (path, problem)
