"""HTTP routing for the waypoint: what one request asks, and what the route table answers.

`RouteTable.decide_http` (traffic/routes.py) walks a service's `http:` routes
in order and takes the first whose match holds (any one of its `match` entries;
no entries: every request), as Envoy does with the routes istiod writes. The
helpers here are the per-request parts, pure and without state:

* matching follows Envoy's route matcher: `uri` exact and regex hold on the path
  without its query string, prefix on the whole `:path` (query included);
  regexes are full matches; `headers` see repeated values joined by ","; a
  `queryParams` entry sees the first value of that name, percent-decoded;
* `rewrite.uri` replaces the matched prefix (Envoy's `prefix_rewrite`, as
  istiod writes it); with an exact or regex uri match the whole path is
  replaced; with no uri match, the route's implicit prefix "/" is (so "/a"
  with `uri: /v2/` becomes "/v2/a"). The query string is kept;
* a redirect's Location is built as Envoy's `newUri` builds it: scheme, host
  (the redirect's authority or the request's), port (`port`, or the request's
  with FROM_REQUEST_PORT; with the protocol default, a port that is the old
  scheme's default is dropped when the scheme changes), the path (`uri`
  replaces it; the request's query is kept unless `uri` has its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING
from urllib.parse import unquote

from nodeagent.model.routing import (
    DerivePort,
    HeaderOps,
    HttpDirectResponse,
    HttpMatch,
    HttpRedirect,
    HttpRewrite,
    HttpRoute,
    MatchKind,
)

if TYPE_CHECKING:
    from nodeagent.traffic.resilience import RetryPolicy
    from nodeagent.traffic.routes import Caller, RouteDecision, Target

_DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_REQUEST = HttpMatch()  # the match of a route that lists none


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What routing sees of one request."""

    method: str
    path: str  # as sent: path and query
    authority: str  # Host / :authority
    headers: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )  # lowercase names; repeated values joined by ","
    scheme: str = "http"

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> str:
        """The query string without "?" ("" when there is none)."""
        return self.path.partition("?")[2]

    def query_param(self, name: str) -> str | None:
        """The first value of query parameter `name`, percent-decoded ("" for `?name`)."""
        for part in self.query.split("&"):
            key, _, value = part.partition("=")
            if unquote(key) == name:
                return unquote(value)
        return None


@dataclass(frozen=True, slots=True)
class LocalResponse:
    """A response the waypoint sends itself (redirect, direct response)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    flags: str = ""  # Envoy response flags for the access log ("FI" for a fault abort)


@dataclass(frozen=True, slots=True)
class HttpDecision:
    """The answer for one request: forward (`decision`) or answer locally (`reply`)."""

    route: str  # `namespace/name http[i]`; "" for the service's default route
    decision: RouteDecision | None = None  # targets: the weighted pick, then fallbacks
    reply: LocalResponse | None = None
    path: str = ""  # to send upstream (after rewrite)
    authority: str = ""
    request_headers: HeaderOps = field(default_factory=HeaderOps)
    response_headers: HeaderOps = field(default_factory=HeaderOps)
    delay: float = 0.0  # the route's fault, drawn for this request (flag DI)
    abort: LocalResponse | None = None  # likewise (flag FI)
    timeout: float | None = None
    retry: RetryPolicy | None = None
    mirrors: tuple[Target, ...] = ()  # where copies go, drawn for this request


def matching(route: HttpRoute, port: int, request: HttpRequest, caller: Caller) -> HttpMatch | None:
    """The first of the route's matches that holds for the request (ANY_REQUEST for a route
    without matches), or None."""
    if not route.match:
        return ANY_REQUEST
    return next((m for m in route.match if holds(m, port, request, caller)), None)


def holds(match: HttpMatch, port: int, request: HttpRequest, caller: Caller) -> bool:
    if match.port < 0 or (match.port and match.port != port):
        return False
    if match.source_namespace and match.source_namespace != caller.namespace:
        return False
    if any(caller.labels.get(k) != v for k, v in match.source_labels.items()):
        return False
    if match.uri is not None:
        # Envoy: prefix on the whole :path, exact and regex on the path without the query.
        text = request.path if match.uri.kind is MatchKind.PREFIX else request.path_only
        if not match.uri.holds(text):
            return False
    if match.method is not None and not match.method.holds(request.method):
        return False
    if match.authority is not None and not match.authority.holds(request.authority):
        return False
    headers = request.headers
    if not all(m.holds(headers.get(name)) for name, m in match.headers):
        return False
    if any(m.holds(headers.get(name)) for name, m in match.without_headers):
        return False
    return all(m.holds(request.query_param(name)) for name, m in match.query_params)


def rewritten(
    rewrite: HttpRewrite | None, match: HttpMatch, request: HttpRequest
) -> tuple[str, str]:
    """(path, authority) to send after the route's rewrite."""
    if rewrite is None:
        return request.path, request.authority
    authority = rewrite.authority or request.authority
    path = request.path
    if rewrite.regex is not None:
        query = f"?{request.query}" if "?" in request.path else ""
        path = rewrite.regex.sub(rewrite.regex_substitution, request.path_only) + query
    elif rewrite.uri:
        uri = match.uri
        if uri is not None and uri.kind is MatchKind.PREFIX:
            path = rewrite.uri + request.path[len(uri.value) :]
        elif uri is not None:  # exact or regex: the whole path was matched
            query = f"?{request.query}" if "?" in request.path else ""
            path = rewrite.uri + query
        else:  # no uri match: Envoy's route is prefix "/"
            path = rewrite.uri + request.path[1:]
    return path, authority


def redirect_reply(redirect: HttpRedirect, request: HttpRequest) -> LocalResponse:
    """The redirect as Envoy sends it: status, Location, empty body."""
    scheme = redirect.scheme or request.scheme
    host, port = split_authority(redirect.authority or request.authority)
    _, request_port = split_authority(request.authority)
    if redirect.port:
        port = str(redirect.port)
    elif redirect.derive_port is DerivePort.FROM_REQUEST_PORT:
        port = request_port
    elif scheme != request.scheme and port == str(_DEFAULT_PORTS.get(request.scheme, "")):
        port = ""  # the old scheme's default port means nothing under the new one
    if port and port == str(_DEFAULT_PORTS.get(scheme, "")):
        port = ""
    path = request.path
    if redirect.uri:
        path = redirect.uri
        if "?" not in redirect.uri and request.query:
            path = f"{redirect.uri}?{request.query}"
    authority = f"{host}:{port}" if port else host
    return LocalResponse(redirect.code, (("location", f"{scheme}://{authority}{path}"),))


def direct_reply(direct: HttpDirectResponse) -> LocalResponse:
    headers: tuple[tuple[str, str], ...] = ()
    if direct.body:
        headers = (("content-type", "text/plain"),)
    return LocalResponse(direct.status, headers, direct.body)


def split_authority(authority: str) -> tuple[str, str]:
    """(host, port) of `host[:port]` or `[v6][:port]`; port "" when absent."""
    if authority.startswith("["):
        end = authority.find("]")
        if end > 0:
            rest = authority[end + 1 :]
            return authority[: end + 1], rest[1:] if rest.startswith(":") else ""
        return authority, ""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, port
    return authority, ""


def merged(route: HeaderOps, destination: HeaderOps | None) -> HeaderOps:
    """The route's operations then the destination's; a destination `set` wins over the
    route's `set` of the same name (Envoy applies the more specific level last)."""
    if destination is None or destination == HeaderOps():
        return route
    if route == HeaderOps():
        return destination
    names = {n for n, _ in destination.set}
    return HeaderOps(
        set=tuple((n, v) for n, v in route.set if n not in names) + destination.set,
        add=route.add + destination.add,
        remove=route.remove + destination.remove,
    )
