"""Gateway API `HTTPRoute` attached to a Service, compiled to the VirtualService it means.

Istio ambient users attach an HTTPRoute to a service with `parentRefs` of kind
Service (GAMMA); istiod converts Gateway API resources to VirtualServices
internally (pilot/pkg/config/kube/gateway/conversion.go), and so do we: the
control plane serves the result over the VirtualService type URL and the
waypoint applies it as any other.

`parse_http_route(namespace, name, spec)` gives one VirtualService per parent
service, named `httproute-NAME` (`httproute-NAME-I` for parentRefs[I] when
there are several), with `hosts: [the service's FQDN]`. Conversion, after
istiod's where it has one:

* each (rule, match) pair becomes its own http route, so that a rewrite of a
  prefix applies to that match's prefix, and the routes are ordered by Gateway
  API precedence (exact path, then longest prefix, then method, most headers,
  most query params; ties keep rule order). No matches: PathPrefix "/";
* PathPrefix is element-wise in Gateway API (`/foo` matches `/foo` and
  `/foo/bar`, not `/foobar`): it becomes two routes, exact `/foo` and prefix
  `/foo/` (istiod gets the same from Envoy's path_separated_prefix);
* headers Exact/RegularExpression (names lowercased, a repeated name's first
  entry counts), queryParams Exact/RegularExpression, method exact;
* backendRefs to Services (port required, name not a hostname) with weights
  (default 1, 0 dropped) as percentages summing to 100, largest remainder
  first: the VirtualService reader wants 100, where istiod passes the raw
  weights to Envoy's total_weight. No backend with weight: directResponse 500
  (the spec's answer);
* filters RequestHeaderModifier, ResponseHeaderModifier (rule and backendRef
  level), RequestRedirect (ReplaceFullPath; statusCode default 302, the CRD's;
  no port: the request's, as istiod sets FROM_REQUEST_PORT), URLRewrite
  (hostname; ReplacePrefixMatch as a prefix rewrite; ReplaceFullPath as a
  whole-path regex rewrite), RequestMirror (kept, not applied yet); anything
  else is refused as istiod refuses it;
* `hostnames` are accepted and not used: the parent service names the traffic.

Errors are RoutingSpecError naming the HTTPRoute's own field
(`spec.rules[0].backendRefs[1].port`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from nodeagent.model.routing import _READ as READ  # the one reader of resource fields
from nodeagent.model.routing import (
    DOMAIN_SUFFIX,
    RoutingSpecError,
    VirtualService,
    parse_virtual_service,
)
from nodeagent.model.routing import _sub as sub

GROUP = "gateway.networking.k8s.io"
API_VERSIONS = ("v1", "v1beta1")
KIND = "HTTPRoute"
NAME_PREFIX = "httproute-"

_SPEC_FIELDS = ("parentRefs", "hostnames", "rules")
_PARENT_FIELDS = ("group", "kind", "namespace", "name", "sectionName", "port")
_RULE_FIELDS = (
    "name",
    "matches",
    "filters",
    "backendRefs",
    "timeouts",
    "retry",
    "sessionPersistence",
)
_MATCH_FIELDS = ("path", "headers", "queryParams", "method")
_BACKEND_FIELDS = ("group", "kind", "name", "namespace", "port", "weight", "filters")
_FILTER_KEYS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
}
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_CORE = ("", "core")


def virtual_service_name(name: str, index: int | None = None) -> str:
    return f"{NAME_PREFIX}{name}" if index is None else f"{NAME_PREFIX}{name}-{index}"


def parse_http_route(
    namespace: str, name: str, spec: Mapping[str, Any]
) -> tuple[VirtualService, ...]:
    """The VirtualServices an HTTPRoute compiles to (one per parent service)."""
    data = READ.mapping(spec, "spec", _SPEC_FIELDS)
    for i, host in enumerate(READ.sequence(data.get("hostnames"), "spec.hostnames")):
        READ.string(host, sub("spec.hostnames", i))
    parents = [
        _parent(p, sub("spec.parentRefs", i), namespace)
        for i, p in enumerate(READ.sequence(data.get("parentRefs"), "spec.parentRefs"))
    ]
    if not parents:
        raise RoutingSpecError("spec.parentRefs", "at least one parentRef (a Service) is required")
    routes: list[tuple[tuple[int, ...], dict[str, Any], str]] = []
    rules = READ.sequence(data.get("rules"), "spec.rules") or [{}]
    for i, rule in enumerate(rules):
        routes.extend(_rule(rule, sub("spec.rules", i), namespace, name, i))
    routes.sort(key=lambda r: r[0])  # stable: equal precedence keeps rule order
    out: list[VirtualService] = []
    for index, (service, port) in enumerate(parents):
        http = []
        for _, route, _ in routes:
            route = (
                {**route, "match": [{**m, "port": port} for m in route["match"]]} if port else route
            )
            http.append(route)
        vs_name = virtual_service_name(name, index if len(parents) > 1 else None)
        vs_spec = {"hosts": [f"{service}.{namespace}.{DOMAIN_SUFFIX}"], "http": http}
        try:
            out.append(parse_virtual_service(namespace, vs_name, vs_spec))
        except RoutingSpecError as e:
            raise _back_to_route(e, [origin for _, _, origin in routes]) from None
    return tuple(out)


def _back_to_route(error: RoutingSpecError, origins: Sequence[str]) -> RoutingSpecError:
    """An error the VirtualService reader found, placed on the HTTPRoute field it came from."""
    m = re.match(r"spec\.http\[(\d+)\]", error.path)
    if m is None or int(m[1]) >= len(origins):
        return error
    return RoutingSpecError(origins[int(m[1])], error.problem)


def _parent(value: Any, path: str, namespace: str) -> tuple[str, int]:
    data = READ.mapping(value, path, _PARENT_FIELDS)
    kind = str(data.get("kind", "Gateway"))
    # The spec's default group is Gateway API's; with kind Service, people leave it out.
    group = str(data.get("group", "" if kind == "Service" else GROUP))
    if kind != "Service" or group not in _CORE:
        raise RoutingSpecError(
            sub(path, "kind"),
            f'only parentRefs of kind Service (group "" or core) are supported, got {kind} '
            f"of group {group!r}",
        )
    if "name" not in data:
        raise RoutingSpecError(sub(path, "name"), "required field is missing")
    service = READ.string(data["name"], sub(path, "name"))
    if str(data.get("namespace", namespace)) != namespace:
        raise RoutingSpecError(
            sub(path, "namespace"), "a route attaches to services of its own namespace only"
        )
    if "sectionName" in data:
        raise RoutingSpecError(sub(path, "sectionName"), "not supported; give port")
    port = READ.integer(data.get("port", 0), sub(path, "port"), 0, 65535)
    return service, port


def _rule(
    value: Any, path: str, namespace: str, route_name: str, index: int
) -> list[tuple[tuple[int, ...], dict[str, Any], str]]:
    """(precedence key, VirtualService http route, origin path) for each match of the rule."""
    data = READ.mapping(value, path, _RULE_FIELDS)
    base: dict[str, Any] = {}
    filters = _filters(data.get("filters"), sub(path, "filters"), namespace, rule=True)
    if "requestRedirect" in filters and "urlRewrite" in filters:
        raise RoutingSpecError(
            sub(path, "filters"), "RequestRedirect and URLRewrite cannot both be set"
        )
    headers = {k: filters[k] for k in ("request", "response") if k in filters}
    if headers:
        base["headers"] = headers
    if "mirror" in filters:
        base["mirror"] = filters["mirror"]
    if "requestRedirect" in filters:
        base["redirect"] = filters["requestRedirect"]
    else:
        destinations = _backends(data.get("backendRefs"), sub(path, "backendRefs"), namespace)
        if destinations:
            base["route"] = destinations
        else:  # the spec: no backend to send to is a 500
            base["directResponse"] = {"status": 500}
    timeouts = READ.mapping(
        data.get("timeouts"), sub(path, "timeouts"), ("request", "backendRequest")
    )
    if "request" in timeouts:
        base["timeout"] = timeouts["request"]
    rewrite = filters.get("urlRewrite", {})
    out = []
    matches = READ.sequence(data.get("matches"), sub(path, "matches")) or [{}]
    for j, match in enumerate(matches):
        where = sub(sub(path, "matches"), j)
        label = str(data.get("name") or f"rule{index}")
        for key, istio_match, rewrite_uri in _match(match, where, rewrite.get("_prefix")):
            route = {"name": f"{route_name}.{label}.{j}", "match": [istio_match], **base}
            written = {k: v for k, v in rewrite.items() if not k.startswith("_")}
            if rewrite_uri is not None:
                written["uri"] = rewrite_uri
            if written and "redirect" not in route:
                route["rewrite"] = written
            out.append((key, route, where))
    return out


def _match(
    value: Any, path: str, replace_prefix: str | None
) -> list[tuple[tuple[int, ...], dict[str, Any], str | None]]:
    """The Istio match(es) of one HTTPRouteMatch, with its precedence key and, for a
    ReplacePrefixMatch rewrite, the uri that replaces this match's prefix."""
    data = READ.mapping(value, path, _MATCH_FIELDS)
    where = sub(path, "path")
    block = READ.mapping(data.get("path"), where, ("type", "value"))
    kind = str(block.get("type", "PathPrefix"))
    text = str(block.get("value", "/"))
    if kind not in ("Exact", "PathPrefix", "RegularExpression"):
        raise RoutingSpecError(sub(where, "type"), f"unknown path match type {kind!r}")
    if kind != "RegularExpression" and not text.startswith("/"):
        raise RoutingSpecError(sub(where, "value"), f"must start with /, got {text!r}")
    common: dict[str, Any] = {}
    headers = _pairs(data.get("headers"), sub(path, "headers"), lower=True)
    if headers:
        common["headers"] = headers
    params = _pairs(data.get("queryParams"), sub(path, "queryParams"), lower=False)
    if params:
        common["queryParams"] = params
    if "method" in data:
        method = data["method"]
        if method not in _METHODS:
            raise RoutingSpecError(sub(path, "method"), f"unknown method {method!r}")
        common["method"] = {"exact": method}
    # Gateway API precedence: exact path, longest prefix, method, most headers, most params.
    tail = (0 if "method" in data else 1, -len(headers), -len(params))
    if kind == "Exact":
        return [((0, -len(text), *tail), {"uri": {"exact": text}, **common}, replace_prefix)]
    if kind == "RegularExpression":
        return [((2, -len(text), *tail), {"uri": {"regex": text}, **common}, None)]
    prefix = text.rstrip("/")
    if not prefix:  # "/": every path
        return [((1, -1, *tail), {"uri": {"prefix": "/"}, **common}, replace_prefix)]
    element = replace_prefix.rstrip("/") + "/" if replace_prefix is not None else None
    return [
        ((1, -len(prefix), *tail), {"uri": {"exact": prefix}, **common}, replace_prefix),
        ((1, -len(prefix), *tail), {"uri": {"prefix": prefix + "/"}, **common}, element),
    ]


def _pairs(value: Any, path: str, *, lower: bool) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for i, item in enumerate(READ.sequence(value, path)):
        where = sub(path, i)
        data = READ.mapping(item, where, ("type", "name", "value"))
        for key in ("name", "value"):
            if key not in data:
                raise RoutingSpecError(sub(where, key), "required field is missing")
        name = READ.string(data["name"], sub(where, "name"))
        kind = str(data.get("type", "Exact"))
        if kind not in ("Exact", "RegularExpression"):
            raise RoutingSpecError(sub(where, "type"), f"unknown match type {kind!r}")
        key_name = name.lower() if lower else name
        if key_name in out:
            continue  # "subsequent entries with an equivalent name MUST be ignored"
        out[key_name] = {"exact" if kind == "Exact" else "regex": str(data["value"])}
    return out


def _backends(value: Any, path: str, namespace: str) -> list[dict[str, Any]]:
    refs: list[tuple[dict[str, Any], int]] = []
    for i, item in enumerate(READ.sequence(value, path)):
        where = sub(path, i)
        data = READ.mapping(item, where, _BACKEND_FIELDS)
        group, kind = str(data.get("group", "")), str(data.get("kind", "Service"))
        if kind != "Service" or group not in _CORE:
            raise RoutingSpecError(
                sub(where, "kind"),
                f"referencing unsupported backendRef: group {group!r} kind {kind!r}",
            )
        if "name" not in data:
            raise RoutingSpecError(sub(where, "name"), "required field is missing")
        service = READ.string(data["name"], sub(where, "name"))
        if "." in service:
            raise RoutingSpecError(
                sub(where, "name"), "the name of the Service must be used, not the hostname"
            )
        if str(data.get("namespace", namespace)) != namespace:
            raise RoutingSpecError(
                sub(where, "namespace"),
                "a backend in another namespace needs a ReferenceGrant, which is not supported",
            )
        if "port" not in data:
            raise RoutingSpecError(sub(where, "port"), "port is required in backendRef")
        port = READ.integer(data["port"], sub(where, "port"), 1, 65535)
        weight = READ.integer(data.get("weight", 1), sub(where, "weight"), 0, 1_000_000)
        dest: dict[str, Any] = {
            "destination": {
                "host": f"{service}.{namespace}.{DOMAIN_SUFFIX}",
                "port": {"number": port},
            }
        }
        filters = _filters(data.get("filters"), sub(where, "filters"), namespace, rule=False)
        headers = {k: filters[k] for k in ("request", "response") if k in filters}
        if headers:
            dest["headers"] = headers
        if weight:
            refs.append((dest, weight))
    for dest, share in zip((d for d, _ in refs), percentages([w for _, w in refs]), strict=True):
        dest["weight"] = share
    return [d for d, _ in refs]


def percentages(weights: Sequence[int]) -> list[int]:
    """Relative weights as whole percentages summing to 100 (largest remainder first, ties
    to the earlier entry); [] for no weights."""
    total = sum(weights)
    if not weights or total <= 0:
        return []
    exact = [w * 100 / total for w in weights]
    out = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: 100 - sum(out)]:
        out[i] += 1
    return out


def _filters(value: Any, path: str, namespace: str, *, rule: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(READ.sequence(value, path)):
        where = sub(path, i)
        data = READ.mapping(item, where, ("type", *_FILTER_KEYS.values(), "extensionRef", "cors"))
        kind = str(data.get("type", ""))
        allowed = _FILTER_KEYS if rule else tuple(_FILTER_KEYS)[:2]
        if kind not in allowed:
            raise RoutingSpecError(sub(where, "type"), f"unsupported filter type {kind!r}")
        key = _FILTER_KEYS[kind]
        block = data.get(key)
        if block is None:
            raise RoutingSpecError(sub(where, key), f"required for type {kind}")
        at = sub(where, key)
        if kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            out["request" if kind.startswith("Request") else "response"] = _header_filter(block, at)
        elif kind == "RequestRedirect":
            out["requestRedirect"] = _redirect_filter(block, at)
        elif kind == "URLRewrite":
            out["urlRewrite"] = _rewrite_filter(block, at)
        else:
            ref = READ.mapping(block, at, ("backendRef", "percent", "fraction"))
            backends = _backends(
                [{**dict(ref.get("backendRef") or {}), "weight": 1}],
                sub(at, "backendRef"),
                namespace,
            )
            out["mirror"] = backends[0]["destination"] if backends else {}
    return out


def _header_filter(value: Any, path: str) -> dict[str, Any]:
    data = READ.mapping(value, path, ("set", "add", "remove"))
    out: dict[str, Any] = {}
    for key in ("set", "add"):
        pairs = _pairs(
            [
                {**dict(p), "type": "Exact"} if isinstance(p, Mapping) else p
                for p in READ.sequence(data.get(key), sub(path, key))
            ],
            sub(path, key),
            lower=True,
        )
        if pairs:
            out[key] = {name: m["exact"] for name, m in pairs.items()}
    removed = [
        READ.string(n, sub(sub(path, "remove"), i))
        for i, n in enumerate(READ.sequence(data.get("remove"), sub(path, "remove")))
    ]
    if removed:
        out["remove"] = removed
    return out


def _redirect_filter(value: Any, path: str) -> dict[str, Any]:
    data = READ.mapping(value, path, ("scheme", "hostname", "path", "port", "statusCode"))
    out: dict[str, Any] = {
        "redirectCode": READ.integer(data.get("statusCode", 302), sub(path, "statusCode"), 301, 302)
    }
    if "scheme" in data:
        out["scheme"] = data["scheme"]
    if "hostname" in data:
        out["authority"] = READ.string(data["hostname"], sub(path, "hostname"))
    if "port" in data:
        out["port"] = READ.integer(data["port"], sub(path, "port"), 1, 65535)
    else:
        out["derivePort"] = "FROM_REQUEST_PORT"  # "when empty, the port of the request"
    if "path" in data:
        kind, text = _path_modifier(data["path"], sub(path, "path"))
        if kind != "ReplaceFullPath":
            raise RoutingSpecError(
                sub(sub(path, "path"), "type"), "a redirect supports ReplaceFullPath only"
            )
        out["uri"] = text
    return out


def _rewrite_filter(value: Any, path: str) -> dict[str, Any]:
    data = READ.mapping(value, path, ("hostname", "path"))
    out: dict[str, Any] = {}
    if "hostname" in data:
        out["authority"] = READ.string(data["hostname"], sub(path, "hostname"))
    if "path" in data:
        kind, text = _path_modifier(data["path"], sub(path, "path"))
        if kind == "ReplaceFullPath":
            escaped = text.replace("\\", "\\\\")
            out["uriRegexRewrite"] = {"match": "^.*$", "rewrite": escaped}
        else:
            out["_prefix"] = text  # per match: each match's own prefix is replaced
    return out


def _path_modifier(value: Any, path: str) -> tuple[str, str]:
    data = READ.mapping(value, path, ("type", "replaceFullPath", "replacePrefixMatch"))
    kind = str(data.get("type", ""))
    keys = {"ReplaceFullPath": "replaceFullPath", "ReplacePrefixMatch": "replacePrefixMatch"}
    if kind not in keys:
        raise RoutingSpecError(
            sub(path, "type"), f"must be ReplaceFullPath or ReplacePrefixMatch, got {kind!r}"
        )
    if keys[kind] not in data:
        raise RoutingSpecError(sub(path, keys[kind]), f"required for type {kind}")
    text = str(data[keys[kind]])
    if not text.startswith("/"):
        raise RoutingSpecError(sub(path, keys[kind]), f"must start with /, got {text!r}")
    return kind, text
