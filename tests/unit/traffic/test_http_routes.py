"""RouteTable.decide_http: matching, weighted picks, rewrites, redirects, direct responses and
header changes for one HTTP request, with the draws injected."""

from __future__ import annotations

import random
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.model.routing import (
    DestinationRule,
    HeaderOps,
    VirtualService,
    parse_destination_rule,
    parse_virtual_service,
)
from nodeagent.traffic.http import HttpRequest, merged, split_authority
from nodeagent.traffic.routes import Caller, RouteDecision, RouteTable, workload_labels

from ...builders import workload
from .test_routes import BACKEND, ECHO, KEY, Draws

pytestmark = pytest.mark.unit

RULE = parse_destination_rule(
    "demo",
    "backend",
    {
        "host": "backend",
        "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
)
V1 = {"destination": {"host": "backend", "subset": "v1"}}
V2 = {"destination": {"host": "backend", "subset": "v2"}}


def vs(*routes: dict[str, Any], tcp: list[Any] | None = None) -> VirtualService:
    spec: dict[str, Any] = {"hosts": ["backend"], "http": list(routes)}
    if tcp:
        spec["tcp"] = tcp
    return parse_virtual_service("demo", "web", spec)


def table(*resources: VirtualService | DestinationRule) -> RouteTable:
    return RouteTable.compile(
        [r for r in resources if isinstance(r, VirtualService)],
        [r for r in resources if isinstance(r, DestinationRule)],
        (BACKEND, ECHO),
    )


def req(
    path: str = "/", method: str = "GET", authority: str = "backend:8080", **headers: str
) -> HttpRequest:
    names = {k.replace("_", "-"): v for k, v in headers.items()}
    return HttpRequest(method, path, authority, MappingProxyType(names))


def decide(t: RouteTable, request: HttpRequest, *draws: float, caller: Caller | None = None) -> Any:
    return t.decide_http(KEY, 8080, request, caller or Caller(), Draws(*draws))


def test_without_virtual_service_the_default_route_with_the_rule() -> None:
    d = decide(table(RULE), req("/x?y=1"))
    assert d.route == "" and d.reply is None
    assert (d.path, d.authority) == ("/x?y=1", "backend:8080")
    assert [t.label for t in d.decision.targets] == [f"{KEY}:8080"]
    assert d.decision.target.policy.load_balancer is not None
    # A VirtualService with only tcp routes leaves HTTP on the default route too.
    only_tcp = parse_virtual_service("demo", "t", {"hosts": ["backend"], "tcp": [{"route": [V1]}]})
    assert decide(table(only_tcp, RULE), req()).route == ""


def test_no_route_holds_is_none() -> None:
    t = table(vs({"match": [{"uri": {"exact": "/only"}}], "route": [V1]}), RULE)
    assert decide(t, req("/other")) is None


def test_first_holding_route_wins_in_order() -> None:
    t = table(
        vs(
            {"match": [{"headers": {"x-user": {"exact": "ios"}}}], "route": [V2]},
            {"route": [V1]},
        ),
        RULE,
    )
    ios = decide(t, req(x_user="ios"))
    assert ios.route == "demo/web http[0]" and ios.decision.target.subset == "v2"
    other = decide(t, req(x_user="android"))
    assert other.route == "demo/web http[1]" and other.decision.target.subset == "v1"


FRONTEND = Caller(workload_labels(workload("f", canonical_name="frontend")), "demo")


@pytest.mark.parametrize(
    ("match", "request_", "caller", "holds"),
    [
        ({"uri": {"exact": "/a"}}, req("/a?q=1"), None, True),  # exact ignores the query
        ({"uri": {"exact": "/a"}}, req("/a/b"), None, False),
        ({"uri": {"prefix": "/api/"}}, req("/api/v1"), None, True),
        ({"uri": {"prefix": "/api/"}}, req("/apix"), None, False),
        ({"uri": {"regex": "/item/[0-9]+"}}, req("/item/42?x=y"), None, True),
        ({"uri": {"regex": "/item/[0-9]+"}}, req("/item/42/more"), None, False),
        ({"uri": {"exact": "/A"}, "ignoreUriCase": True}, req("/a"), None, True),
        ({"method": {"exact": "POST"}}, req(method="POST"), None, True),
        ({"method": {"exact": "POST"}}, req(method="GET"), None, False),
        ({"authority": {"exact": "backend:8080"}}, req(), None, True),
        ({"authority": {"prefix": "echo"}}, req(), None, False),
        ({"headers": {"x-user": {"exact": "ios"}}}, req(x_user="ios"), None, True),
        ({"headers": {"x-user": {"exact": "ios"}}}, req(), None, False),
        ({"headers": {"x-user": {"prefix": "io"}}}, req(x_user="ios"), None, True),
        ({"headers": {"x-user": {"regex": "i.s"}}}, req(x_user="ios"), None, True),
        ({"headers": {"x-user": {"regex": "i"}}}, req(x_user="ios"), None, False),
        ({"headers": {"x-user": {}}}, req(x_user=""), None, True),  # presence
        ({"headers": {"x-user": {}}}, req(), None, False),
        ({"headers": {"x-list": {"exact": "a,b"}}}, req(x_list="a,b"), None, True),
        ({"withoutHeaders": {"x-debug": {}}}, req(), None, True),  # absence
        ({"withoutHeaders": {"x-debug": {}}}, req(x_debug="1"), None, False),
        ({"withoutHeaders": {"x-debug": {"exact": "1"}}}, req(x_debug="2"), None, True),
        ({"queryParams": {"v": {"exact": "2"}}}, req("/p?a=1&v=2"), None, True),
        ({"queryParams": {"v": {"exact": "2"}}}, req("/p?v=3"), None, False),
        ({"queryParams": {"v": {"regex": "[0-9]"}}}, req("/p?v=7"), None, True),
        ({"queryParams": {"q": {"exact": "a b"}}}, req("/p?q=a%20b"), None, True),
        ({"queryParams": {"v": {}}}, req("/p?v"), None, True),
        ({"sourceLabels": {"app": "frontend"}}, req(), FRONTEND, True),
        ({"sourceLabels": {"app": "frontend"}}, req(), Caller(), False),
        ({"sourceNamespace": "demo"}, req(), FRONTEND, True),
        ({"sourceNamespace": "other"}, req(), FRONTEND, False),
        ({"port": 8080}, req(), None, True),
        ({"port": 9000}, req(), None, False),
        ({"gateways": ["ingress"]}, req(), None, False),
        ({"gateways": ["mesh"]}, req(), None, True),
    ],
)
def test_match_kinds(
    match: dict[str, Any], request_: HttpRequest, caller: Caller | None, holds: bool
) -> None:
    t = table(vs({"match": [match], "route": [V1]}), RULE)
    assert (decide(t, request_, caller=caller) is not None) is holds


def test_any_of_the_matches_holds() -> None:
    t = table(
        vs({"match": [{"uri": {"exact": "/a"}}, {"uri": {"exact": "/b"}}], "route": [V1]}), RULE
    )
    assert decide(t, req("/b")) is not None and decide(t, req("/c")) is None


def test_weighted_pick_then_fallbacks_like_tcp() -> None:
    t = table(vs({"route": [{**V1, "weight": 80}, {**V2, "weight": 20}]}), RULE)
    first = decide(t, req(), 0.79)
    assert [x.subset for x in first.decision.targets] == ["v1", "v2"]
    second = decide(t, req(), 0.8)
    assert [x.subset for x in second.decision.targets] == ["v2", "v1"]
    assert second.decision.route == "demo/web http[0]"


def decide_with(t: RouteTable, rng: random.Random) -> RouteDecision:
    found = t.decide_http(KEY, 8080, req(), Caller(), rng)
    assert found is not None and found.decision is not None
    return found.decision


@settings(max_examples=50, deadline=None)
@given(weight=st.integers(0, 100), seed=st.integers(0, 2**32 - 1))
def test_weighted_pick_follows_the_weights(weight: int, seed: int) -> None:
    """Over many draws, each subset's share stays inside a 99.99% binomial band."""
    t = table(vs({"route": [{**V1, "weight": weight}, {**V2, "weight": 100 - weight}]}), RULE)
    rng = random.Random(seed)
    n = 2000
    v1 = sum(decide_with(t, rng).target.subset == "v1" for _ in range(n))
    p = weight / 100
    band = 4 * (n * p * (1 - p)) ** 0.5 + 1
    assert abs(v1 - n * p) <= band


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "sent"),
    [
        ({"uri": {"prefix": "/old/"}}, {"uri": "/new/"}, "/old/x?q=1", "/new/x?q=1"),
        ({"uri": {"prefix": "/old"}}, {"uri": "/"}, "/old", "/"),
        ({"uri": {"exact": "/a"}}, {"uri": "/b"}, "/a?q=1", "/b?q=1"),
        ({"uri": {"regex": "/a/.*"}}, {"uri": "/b"}, "/a/zz", "/b"),
        ({}, {"uri": "/v2/"}, "/a", "/v2/a"),  # no uri match: Envoy's prefix "/"
        (
            {},
            {"uriRegexRewrite": {"match": "^/svc/([^/]+)(/.*)$", "rewrite": "/p\\2/\\1"}},
            "/svc/up/api?x=1",
            "/p/api/up?x=1",
        ),
        ({}, {"authority": "other:9"}, "/k", "/k"),
    ],
)
def test_rewrite(match: dict[str, Any], rewrite: dict[str, Any], path: str, sent: str) -> None:
    route: dict[str, Any] = {"route": [V1], "rewrite": rewrite}
    if match:
        route["match"] = [match]
    d = decide(table(vs(route), RULE), req(path))
    assert d.path == sent
    assert d.authority == rewrite.get("authority", "backend:8080")


@pytest.mark.parametrize(
    ("redirect", "authority", "path", "location", "code"),
    [
        ({"uri": "/new"}, "backend:8080", "/old?q=1", "http://backend:8080/new?q=1", 301),
        ({"uri": "/new?x=2"}, "backend", "/old?q=1", "http://backend/new?x=2", 301),
        ({"authority": "b.example"}, "backend", "/p", "http://b.example/p", 301),
        ({"scheme": "https", "redirectCode": 302}, "backend", "/p", "https://backend/p", 302),
        ({"scheme": "https"}, "backend:80", "/p", "https://backend/p", 301),
        ({"scheme": "https"}, "backend:8080", "/p", "https://backend:8080/p", 301),
        ({"port": 8443}, "backend:8080", "/p", "http://backend:8443/p", 301),
        ({"port": 80}, "backend:8080", "/p", "http://backend/p", 301),
        (
            {"authority": "b", "derivePort": "FROM_REQUEST_PORT"},
            "backend:8080",
            "/p",
            "http://b:8080/p",
            301,
        ),
        ({"port": 9}, "[fd00::1]:8080", "/p", "http://[fd00::1]:9/p", 301),
    ],
)
def test_redirect_location(
    redirect: dict[str, Any], authority: str, path: str, location: str, code: int
) -> None:
    d = decide(table(vs({"redirect": redirect}), RULE), req(path, authority=authority))
    assert d.decision is None and d.route == "demo/web http[0]"
    assert (d.reply.status, d.reply.headers, d.reply.body) == (
        code,
        (("location", location),),
        b"",
    )


def test_direct_response() -> None:
    t = table(vs({"directResponse": {"status": 418, "body": {"string": "teapot"}}}), RULE)
    d = decide(t, req())
    assert (d.reply.status, d.reply.body) == (418, b"teapot")
    assert d.reply.headers == (("content-type", "text/plain"),) and d.decision is None
    empty = decide(table(vs({"directResponse": {"status": 204}}), RULE), req())
    assert (empty.reply.status, empty.reply.headers, empty.reply.body) == (204, (), b"")


def test_route_and_destination_header_ops_merge() -> None:
    t = table(
        vs(
            {
                "route": [
                    {
                        **V1,
                        "weight": 50,
                        "headers": {
                            "request": {"set": {"x-who": "v1"}, "add": {"x-d": "1"}},
                            "response": {"remove": ["server"]},
                        },
                    },
                    {**V2, "weight": 50},
                ],
                "headers": {
                    "request": {"set": {"x-who": "route", "x-r": "r"}, "remove": ["cookie"]},
                    "response": {"add": {"x-served": "web"}},
                },
            }
        ),
        RULE,
    )
    v1 = decide(t, req(), 0.1)
    assert v1.request_headers == HeaderOps(
        set=(("x-r", "r"), ("x-who", "v1")), add=(("x-d", "1"),), remove=("cookie",)
    )
    assert v1.response_headers == HeaderOps(add=(("x-served", "web"),), remove=("server",))
    v2 = decide(t, req(), 0.9)
    assert v2.request_headers.set == (("x-who", "route"), ("x-r", "r"))
    sent = v2.request_headers.apply((("cookie", "c"), ("x-who", "me"), ("accept", "*/*")))
    assert sent == (("accept", "*/*"), ("x-who", "route"), ("x-r", "r"))


def test_unusable_destination_refuses_rather_than_guesses() -> None:
    t = table(vs({"route": [{"destination": {"host": "nowhere"}}]}), RULE)
    d = decide(t, req())
    assert d.decision is not None and d.decision.targets == ()
    assert any("http[0]: route host nowhere is not a service" in n for n in t.notes)


def test_destination_port_and_subset_policy() -> None:
    t = table(vs({"route": [{"destination": {"host": "echo", "port": {"number": 9000}}}]}), RULE)
    d = decide(t, req())
    assert d.decision.target.label == "demo/echo.demo.svc.cluster.local:9000"


def test_http_and_tcp_routes_of_one_virtual_service_both_compile() -> None:
    t = table(vs({"route": [V2]}, tcp=[{"route": [V1]}]), RULE)
    assert t.decide(KEY, 8080, Caller(), Draws()).target.subset == "v1"
    assert decide(t, req()).decision.target.subset == "v2"


@pytest.mark.parametrize(
    ("authority", "split"),
    [
        ("a:80", ("a", "80")),
        ("a", ("a", "")),
        ("[::1]:8", ("[::1]", "8")),
        ("[::1]", ("[::1]", "")),
        ("::1", ("::1", "")),
    ],
)
def test_split_authority(authority: str, split: tuple[str, str]) -> None:
    assert split_authority(authority) == split


def test_merged_with_nothing_is_the_route() -> None:
    ops = HeaderOps(set=(("a", "1"),))
    assert merged(ops, None) is ops and merged(HeaderOps(), ops) is ops


def test_relative_weights_split_by_their_sum() -> None:
    t = table(vs({"route": [{**V1, "weight": 3}, {**V2, "weight": 1}]}), RULE)
    assert decide(t, req(), 0.74).decision.target.subset == "v1"
    assert decide(t, req(), 0.76).decision.target.subset == "v2"
