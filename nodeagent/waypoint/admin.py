"""What the waypoint serves beside its metrics on :15020: `/routes`.

The same JSON as an agent's admin `/routes` (`nodeagent.admin.traffic.RoutesReport`, one
builder for both), read from the waypoint's own state store and route state, with
`proxy: waypoint`: the http routes in it are the ones this process applies per request,
and the endpoints' ejections are its own outlier detection's. `nodeagent routes
--waypoint HOST:PORT` (or `--sandbox NAME --waypoint`) reads it.
"""

from __future__ import annotations

from nodeagent.admin.httpserver import Request, Response, Route, route
from nodeagent.admin.traffic import RoutesReport, RoutingState
from nodeagent.state.store import StateStore

WAYPOINT_PROXY = "waypoint"  # the `proxy` field of the answer


def admin_routes(store: StateStore, routing: RoutingState) -> dict[str, Route]:
    """The extra routes of the waypoint's metrics server (`HttpServer`): GET `/routes`."""
    report = RoutesReport(store, routing, proxy=WAYPOINT_PROXY)

    def routes_view(_req: Request) -> Response:
        # Read-only, as the agent's: no round-robin turn, no draw, no connection slot.
        return Response.json(report.routes())

    return {"/routes": route(routes_view)}
