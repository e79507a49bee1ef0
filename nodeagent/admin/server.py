"""The agent's three HTTP surfaces, started and stopped together by `AdminServers`.

* admin (localhost:15000 and a Unix socket): `/config_dump` in ztunnel's
  shape, `/connections`, `/pods`, `/rules?pod=`, `/explain?from=&to=`, `/routes`,
  `POST /logging?level=`, `POST /quitquitquit`;
* metrics (:15020): `/metrics` and `/stats/prometheus`;
* readiness (:15021): `/healthz/ready`.

Handlers only read providers (see `providers.py`) and shape JSON; they
hold no state of their own beyond the drain task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

import nodeagent
from nodeagent.admin.httpserver import (
    HttpServer,
    Request,
    Response,
    Route,
    is_loopback,
    parse_host_port,
    route,
)
from nodeagent.admin.metrics import AgentMetrics
from nodeagent.admin.providers import AdminProviders, ConnectionInfo, DrainHook, PodStatus
from nodeagent.admin.readiness import Readiness
from nodeagent.admin.rules import has_drift, rule_drift

log = logging.getLogger(__name__)

ADMIN_ENDPOINTS = (
    ("/config_dump", "GET", "workloads, services, policies, certificates, config, workloadState"),
    ("/connections", "GET", "live proxied connections"),
    ("/pods", "GET", "local pods: capture state, listeners, last error"),
    ("/rules", "GET", "?pod=POD: intended vs installed capture rules, with drift"),
    ("/explain", "GET", "?from=POD&to=ADDR:PORT: what the agent would do and why"),
    ("/routes", "GET", "per service: routes, subsets, endpoints, ejections, limits, notes"),
    ("/logging", "POST", "?level=LEVEL or ?level=target=level,...; ?reset; no params lists"),
    ("/release", "POST", "?pod=POD: un-mesh a held pod (remove its capture)"),
    ("/quitquitquit", "POST", "drain, then exit"),
)


def _ztunnel_state(capture_state: str) -> str:
    # ztunnel's workloadState knows only Pending and Up; the detail is in captureState.
    return "Up" if capture_state == "ready" else "Pending"


def _ztunnel_connection(c: ConnectionInfo) -> dict[str, str]:
    if c.direction == "inbound":
        return {
            "src": c.remote,
            "originalDst": c.local,
            "actualDst": c.local,
            "protocol": c.protocol,
        }
    return {
        "src": c.local,
        "originalDst": c.remote_target or c.remote,
        "actualDst": c.remote,
        "protocol": c.protocol,
    }


class AdminApi:
    """Route handlers of the admin port, over the providers."""

    def __init__(self, providers: AdminProviders) -> None:
        self.providers = providers
        self._drain_task: asyncio.Task[None] | None = None

    def routes(self) -> dict[str, Route]:
        return {
            "/": route(self.index),
            "/config_dump": route(self.config_dump),
            "/connections": route(self.connections),
            "/pods": route(self.pods),
            "/rules": route(self.rules),
            "/explain": route(self.explain),
            "/routes": route(self.routes_view),
            "/logging": route(self.logging, "POST"),
            "/release": route(self.release, "POST"),
            "/quitquitquit": route(self.quitquitquit, "POST"),
        }

    async def stop(self) -> None:
        task = self._drain_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def index(self, _req: Request) -> Response:
        lines = [f"nodeagent {nodeagent.__version__} admin"]
        lines += [f"{method:5} {path:14} {doc}" for path, method, doc in ADMIN_ENDPOINTS]
        return Response.text(200, "\n".join(lines) + "\n")

    def _pods(self) -> list[PodStatus]:
        return self.providers.pods.pods() if self.providers.pods else []

    def _connections(self) -> list[ConnectionInfo]:
        return self.providers.connections.connections() if self.providers.connections else []

    def workload_state(self) -> dict[str, Any]:
        by_uid: dict[str, dict[str, list[dict[str, str]]]] = {}
        for c in self._connections():
            conns = by_uid.setdefault(c.uid, {"inbound": [], "outbound": []})
            conns.setdefault(c.direction, []).append(_ztunnel_connection(c))
        state: dict[str, Any] = {}
        for pod in self._pods():
            state[pod.uid] = {
                "info": {
                    "name": pod.name,
                    "namespace": pod.namespace,
                    "serviceAccount": pod.service_account,
                },
                "state": _ztunnel_state(pod.capture_state),
                "captureState": pod.capture_state,
                "backend": pod.backend,
                "netns": pod.netns,
                "listeners": list(pod.listeners),
                "attempts": pod.attempts,
                "lastError": pod.last_error,
                "connections": by_uid.get(pod.uid, {"inbound": [], "outbound": []}),
            }
        return state

    def config_dump(self, _req: Request) -> Response:
        src = self.providers.config_dump
        return Response.json(
            {
                "workloads": src.workloads(),
                "services": src.services(),
                "policies": src.policies(),
                "certificates": src.certificates(),
                "workloadState": self.workload_state(),
                "config": dict(src.config()),
                "version": {"version": nodeagent.__version__, "component": "nodeagent"},
            }
        )

    def connections(self, _req: Request) -> Response:
        return Response.json([dataclasses.asdict(c) for c in self._connections()])

    def pods(self, _req: Request) -> Response:
        return Response.json([dataclasses.asdict(p) for p in self._pods()])

    async def rules(self, req: Request) -> Response:
        pod = req.param("pod")
        if not pod:
            return Response.text(400, "missing ?pod=POD (namespace/name, name or uid)\n")
        if self.providers.rules is None:
            return Response.text(501, "capture rules are not available from this agent\n")
        rules = await self.providers.rules.pod_rules(pod)
        if rules is None:
            return Response.text(404, f"unknown pod {pod!r}\n")
        lines = rule_drift(rules.intended, rules.installed) if not rules.error else []
        return Response.json(
            {
                "pod": {"uid": rules.uid, "name": rules.name, "namespace": rules.namespace},
                "backend": rules.backend,
                "drift": has_drift(lines),
                "error": rules.error,
                "lines": [dataclasses.asdict(line) for line in lines],
                "intended": rules.intended,
                "installed": rules.installed,
            }
        )

    def explain(self, req: Request) -> Response:
        src, dst = req.param("from"), req.param("to")
        if not src or not dst:
            return Response.text(400, "missing ?from=POD&to=ADDR:PORT\n")
        if self.providers.explain is None:
            return Response.text(501, "explain is not available from this agent\n")
        try:
            host, port = parse_host_port(dst)
        except ValueError as exc:
            return Response.text(400, f"bad destination: {exc}\n")
        try:
            result = self.providers.explain.explain(src, host, port)
        except LookupError as exc:
            return Response.text(404, f"{_one_line(exc)}\n")
        except ValueError as exc:
            return Response.text(400, f"{_one_line(exc)}\n")
        return Response.json(dict(result))

    def routes_view(self, _req: Request) -> Response:
        if self.providers.routes is None:
            return Response.text(501, "traffic management is not available from this agent\n")
        return Response.json(dict(self.providers.routes.routes()))

    def release(self, req: Request) -> Response:
        pod = req.param("pod")
        if not pod:
            return Response.text(400, "missing ?pod=POD (uid or namespace/name)\n")
        if self.providers.release is None:
            return Response.text(501, "pods cannot be released on this agent\n")
        try:
            released = self.providers.release.release(pod)
        except LookupError as exc:
            return Response.text(404, f"{_one_line(exc)}\n")
        except ValueError as exc:
            return Response.text(409, f"{_one_line(exc)}\n")
        return Response.text(200, f"released {released}: its capture is being removed\n")

    def logging(self, req: Request) -> Response:
        control = self.providers.log_level
        if control is None:
            return Response.text(501, "log levels cannot be changed on this agent\n")
        try:
            if "reset" in req.query:
                level = control.reset()
            elif (spec := req.param("level")) is not None:
                level = control.set_level(spec)
            else:
                level = control.current()
        except ValueError as exc:
            return Response.text(400, f"{_one_line(exc)}\n")
        return Response.text(200, f"current log level is {level}\n")

    def quitquitquit(self, _req: Request) -> Response:
        hook = self.providers.drain_then_exit
        if hook is None:
            return Response.text(501, "this agent has no drain hook\n")
        if self._drain_task is not None:
            return Response.text(200, "already draining\n")
        log.info("quitquitquit: draining, then exiting")
        self._drain_task = asyncio.get_running_loop().create_task(
            self._run_drain(hook), name="admin-quitquitquit"
        )
        return Response.text(200, "draining, then exiting\n")

    async def _run_drain(self, hook: DrainHook) -> None:
        # Yield once so the 200 is written before draining starts closing things.
        await asyncio.sleep(0)
        try:
            await hook()
        except Exception:
            log.exception("drain hook failed")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def readiness_routes(readiness: Readiness) -> dict[str, Route]:
    def ready(_req: Request) -> Response:
        failing = readiness.not_ready()
        if failing:
            return Response.text(503, f"not ready: {', '.join(failing)}\n")
        return Response.text(200, "ready\n")

    return {"/healthz/ready": route(ready)}


def metrics_routes(metrics: AgentMetrics) -> dict[str, Route]:
    def scrape(_req: Request) -> Response:
        return Response(status=200, body=metrics.exposition(), content_type=CONTENT_TYPE_LATEST)

    return {"/metrics": route(scrape), "/stats/prometheus": route(scrape)}


@dataclass(frozen=True, kw_only=True)
class BoundAddresses:
    """Where the servers actually listen (ports resolved when 0 was asked for)."""

    admin: tuple[str, int] | None
    admin_socket: str | None
    metrics: tuple[str, int] | None
    readiness: tuple[str, int] | None

    @property
    def admin_url(self) -> str:
        assert self.admin is not None
        return _url(self.admin)

    @property
    def metrics_url(self) -> str:
        assert self.metrics is not None
        return _url(self.metrics)

    @property
    def readiness_url(self) -> str:
        assert self.readiness is not None
        return _url(self.readiness)


def _url(addr: tuple[str, int]) -> str:
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"http://{host}:{addr[1]}"


class AdminServers:
    """Admin, metrics and readiness servers as one unit; empty address = not served."""

    def __init__(
        self,
        *,
        providers: AdminProviders,
        metrics: AgentMetrics,
        readiness: Readiness,
        admin_address: str = "127.0.0.1:15000",
        admin_socket: str = "",
        metrics_address: str = "0.0.0.0:15020",
        readiness_address: str = "0.0.0.0:15021",
    ) -> None:
        if admin_address:
            host, _ = parse_host_port(admin_address)
            if not is_loopback(host):
                # The admin API exposes config and can stop the agent.
                raise ValueError(f"admin address {admin_address!r} must be a loopback address")
        self.api = AdminApi(providers)
        self._admin = HttpServer("admin", self.api.routes())
        self._metrics = HttpServer("metrics", metrics_routes(metrics))
        self._readiness = HttpServer("readiness", readiness_routes(readiness))
        self._addresses: Mapping[str, str] = {
            "admin": admin_address,
            "metrics": metrics_address,
            "readiness": readiness_address,
        }
        self._admin_socket = admin_socket
        self.bound: BoundAddresses | None = None

    async def start(self) -> BoundAddresses:
        try:
            admin = await self._tcp(self._admin, self._addresses["admin"])
            sock = await self._admin.listen_unix(self._admin_socket) if self._admin_socket else None
            metrics = await self._tcp(self._metrics, self._addresses["metrics"])
            readiness = await self._tcp(self._readiness, self._addresses["readiness"])
        except BaseException:
            await self.stop()
            raise
        self.bound = BoundAddresses(
            admin=admin, admin_socket=sock, metrics=metrics, readiness=readiness
        )
        return self.bound

    @staticmethod
    async def _tcp(server: HttpServer, address: str) -> tuple[str, int] | None:
        if not address:
            return None
        host, port = parse_host_port(address)
        try:
            return await server.listen_tcp(host, port)
        except OSError as exc:
            raise OSError(
                exc.errno, f"{server.name} server cannot listen on {address}: {exc.strerror}"
            ) from exc

    async def stop(self) -> None:
        await self.api.stop()
        for server in (self._admin, self._metrics, self._readiness):
            await server.stop()

    async def __aenter__(self) -> AdminServers:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
