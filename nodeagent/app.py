"""The composition root: builds every component of a running agent from a Config.

Plain wiring, no logic. `build` creates

* the state: StateStore + StateUpdater, fed by the delta-xDS client;
* identity: CaClient + CertificateManager (certificates are fetched as soon
  as the node manager registers a local workload);
* the data path: the capture backend (iptables), the namespace scanner and its
  watcher (inotify on the netns dir), one socket factory per pod on a shared
  namespace worker, the pod listeners
  with their connection handlers: the HBONE tunnel (outbound 15001 over a
  client pool, the 15008 server, plaintext 15006, with authorization and a
  registry of live connections that policy changes re-check) when workload
  certificates are available; without them (an agent built without a CA, in
  tests) the same handlers with no tunnel: outbound in plaintext to what the
  tunnel would reach, 15008 refused;
* the NodeManager that drives it all, with the pod annotation manager when
  there is a Kubernetes API server (in a pod, or `kube_api_address`);
* the admin, metrics and readiness servers, with providers over all of the
  above, connection telemetry (Istio's traffic metrics, access logs) hooked
  into the connection registry and the policy checker, and the agent's own
  gauges read from their components at each scrape;

and returns `AgentHandles`: the components, `start()` / `run()` /
`stop()` / `shutdown(cleanup=)`, and `ready`. `run()` ends with an uninstall
(capture and annotations removed from every local pod) when asked to, or when
the agent's DaemonSet is gone or being deleted; otherwise the rules stay for
the next agent (nodeagent.kube.shutdown).

Anything that needs the kernel or the network can be replaced through
`build`'s keyword arguments, so tests run the real wiring with fakes or with
an in-process control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nodeagent.admin.httpserver import HttpServer, Request, Response, parse_host_port, route
from nodeagent.admin.loglevel import StdlibLogLevelControl
from nodeagent.admin.memory import trim_after_bursts
from nodeagent.admin.metrics import AgentMetrics
from nodeagent.admin.providers import AdminProviders, DrainHook
from nodeagent.admin.readiness import Readiness
from nodeagent.admin.server import AdminServers
from nodeagent.admin.sources import (
    CaptureRulesSource,
    MeshExplainer,
    NodePodsSource,
    RegistryConnections,
    config_dump_sections,
)
from nodeagent.admin.telemetry import ConnectionTelemetry
from nodeagent.admin.traffic import RoutePreviewer, RoutesReport
from nodeagent.config import Config, ConfigError
from nodeagent.datapath.capture import CaptureBackend, PlanBuilder, plan_from_namespace
from nodeagent.datapath.capture import netns_alive as namespace_exists
from nodeagent.datapath.discovery import NetnsScanner
from nodeagent.datapath.ebpf import ConnectRedirect, EbpfCapture, bpf_pin_dir, kernel_headers
from nodeagent.datapath.hostprobe import HostProbeRules
from nodeagent.datapath.iptables import CaptureError, IptablesBackend
from nodeagent.datapath.netns import (
    NetnsHandle,
    NetnsSocketFactory,
    NetnsWorker,
    original_destination,
)
from nodeagent.datapath.nswatch import NetnsWatcher
from nodeagent.hbone.server import HboneServer, ServerSettings
from nodeagent.identity.caclient import CaClient
from nodeagent.identity.manager import CertificateManager, CertState
from nodeagent.kube.api import KubeApi
from nodeagent.kube.client import KubeClient, resolve_endpoint
from nodeagent.kube.shutdown import ShutdownMode
from nodeagent.kube.watch import KubeMetaCache, KubeWatcher
from nodeagent.model.constants import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from nodeagent.model.identity import Identity
from nodeagent.node.annotations import PodAnnotationManager
from nodeagent.node.cni_server import CniAdd, CniDel, CniEventServer, CniReply
from nodeagent.node.lifecycle import Backoff
from nodeagent.node.manager import NamespaceScanner, NodeManager, NodeTiming
from nodeagent.node.shutdown import read_shutdown_decision
from nodeagent.proxy.connections import (
    ConnectionRegistry,
    ObservedPolicyChecker,
    store_policy_lookup,
)
from nodeagent.proxy.inbound import (
    HboneUnavailable,
    InboundHboneHandler,
    InboundPlaintextHandler,
)
from nodeagent.proxy.listeners import ConnectionHandler, PodListenerFactory, SocketFactoryMaker
from nodeagent.proxy.outbound import OutboundHandler, OutboundRouter
from nodeagent.proxy.pool import HbonePool, PoolSettings
from nodeagent.proxy.routing import ServiceRouting
from nodeagent.proxy.tunnel_end import WorkloadTls
from nodeagent.state.store import StateStore
from nodeagent.state.updater import StateUpdater
from nodeagent.traffic.outlier import OutlierDetector
from nodeagent.xds.client import XdsClient

if TYPE_CHECKING:  # the agent never loads the waypoint's L7 stack (h2, h11): build_waypoint does
    from nodeagent.waypoint.server import WaypointListener, WaypointTunnels
    from nodeagent.waypoint.telemetry import RequestTelemetry

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AgentHandles:
    """A built agent: its components and its lifecycle verbs."""

    config: Config
    store: StateStore
    updater: StateUpdater
    xds: XdsClient | None
    ca_client: CaClient | None
    certificates: CertificateManager | None
    listeners: PodListenerFactory
    node_manager: NodeManager
    connections: ConnectionRegistry | None = None
    pool: HbonePool | None = None
    admin: AdminServers | None = None
    metrics: AgentMetrics | None = None
    kube: KubeApi | None = None
    annotations: PodAnnotationManager | None = None
    cni: CniEventServer | None = None
    kube_watch: KubeWatcher | None = None
    _closers: list[Any] = field(default_factory=list)
    _ebpf: EbpfCapture | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _cleanup: bool = False
    _started: bool = False
    _shut_down: bool = False

    @property
    def ready(self) -> bool:
        """Config received (when there is a control plane) and every found pod settled."""
        xds_ready = self.xds is None or self.xds.ready
        return xds_ready and self.node_manager.ready

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.xds is not None:
            self.xds.start()
        if self.certificates is not None:
            self._tasks.append(asyncio.create_task(self.certificates.run(), name="certificates"))
        if self.kube_watch is not None:
            self._tasks.append(asyncio.create_task(self.kube_watch.run(), name="kube-watch"))
        self.node_manager.start()
        if self.xds is not None:
            self._tasks.append(asyncio.create_task(self._sweep_stale(), name="stale-capture"))
        if self.connections is not None:
            connections = self.connections
            self._tasks.append(
                asyncio.create_task(
                    trim_after_bursts(
                        lambda: len(connections),
                        release=self.pool.release_idle if self.pool is not None else None,
                    ),
                    name="trim",
                )
            )
        log.info("agent started on node %s", self.config.node_name)

    async def _sweep_stale(self) -> None:
        """Once the control plane's state is complete, hold capture no local workload claims."""
        assert self.xds is not None
        await self.xds.wait_ready()
        await self.node_manager.hold_stale_capture()

    def stop(self, *, cleanup: bool = False) -> None:
        """Ask `run()` to return (signal handlers call this)."""
        self._cleanup = self._cleanup or cleanup
        self._stop.set()

    async def run(self, *, cleanup: bool = False) -> None:
        """Start, serve until `stop()`, then shut down: an uninstall when `cleanup`
        or when `uninstalling()` says so, otherwise the in-pod rules stay."""
        try:
            # Inside: a start that fails halfway (an admin port in use) still shuts down what
            # was built and started (the closers run; the in-pod rules stay, as on any stop).
            if self.admin is not None:
                await self.admin.start()
            self.start()
            if self.cni is not None:
                try:
                    await self.cni.start()
                except OSError as exc:
                    # New pods then start with the plugin's fail-closed rules: never open.
                    log.error("CNI socket %s: %s; new pods wait for a scan", self.cni.path, exc)
            await self._stop.wait()
        finally:
            forced = cleanup or self._cleanup
            await self.shutdown(cleanup=forced or await self.uninstalling())

    async def uninstalling(self) -> bool:
        """Whether this shutdown is an uninstall, from the agent's DaemonSet.

        Without an API server the answer is no: the rules stay (fail closed).
        """
        if self.kube is None:
            return False
        decision = await read_shutdown_decision(
            self.kube, namespace=self.config.pod_namespace, name=self.config.daemonset_name
        )
        log.info("shutdown is an %s: %s", decision.mode.value, decision.reason)
        return decision.mode is ShutdownMode.UNINSTALL

    async def shutdown(self, *, cleanup: bool = False) -> None:
        """Close listeners (draining), keep or remove capture, stop xDS and certificates."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.cni is not None:
            # First: an ADD from now on finds no agent, and the plugin fails closed.
            await self.cni.stop()
        if self.admin is not None:
            await self.admin.stop()
        await self.node_manager.shutdown(cleanup=cleanup, drain=self.config.drain_seconds)
        if self._ebpf is not None:
            # Kept (pinned) unless uninstalling: the pods stay captured, failing closed.
            with contextlib.suppress(Exception):
                self._ebpf.close(keep=not cleanup)
        if self.pool is not None:
            await self.pool.close()
        if self.xds is not None:
            await self.xds.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ca_client is not None:
            await self.ca_client.close()
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                close()
        log.info("agent stopped")


async def build(
    config: Config,
    *,
    capture: CaptureBackend | None = None,
    scanner: NamespaceScanner | None = None,
    sockets_for: SocketFactoryMaker | None = None,
    plan_for: PlanBuilder | None = None,
    handlers: Mapping[int, ConnectionHandler] | None = None,
    store: StateStore | None = None,
    xds: bool = True,
    ca: bool = True,
    admin: bool = True,
    scan_interval: float = 1.0,
    backoff: Backoff | None = None,
    kube: KubeApi | None = None,
    environ: Mapping[str, str] | None = None,
    netns_alive: Callable[[NetnsHandle], bool] | None = None,
) -> AgentHandles:
    """Build an agent from `config`; keyword arguments replace parts for tests.

    xds=False: no control-plane client (tests fill `store` directly);
    ca=False: no certificate manager; kube: the API server client (default:
    from `config` and `environ`, the process environment unless given).
    """
    if not config.node_name:
        raise ConfigError("field 'node_name' is required (NODE_NAME or --node-name)")
    closers: list[Any] = []
    if kube is None:
        kube = _kube_client(config, os.environ if environ is None else environ)
    annotations = (
        PodAnnotationManager(kube, node_name=config.node_name) if kube is not None else None
    )
    # Enrollment needs the pods' and namespaces' labels, so a real API server is watched.
    directory = KubeMetaCache() if isinstance(kube, KubeClient) else None
    store = store or StateStore()
    updater = StateUpdater(store)
    xds_client = XdsClient(config, updater) if xds else None
    ca_client, certificates = _certificate_manager(config) if ca else (None, None)

    # One worker per kind of namespace work, so a slow iptables apply never
    # delays a scan or a socket the proxy is waiting for.
    ebpf: EbpfCapture | None = None
    probes: HostProbeRules | None = None
    if capture is None:
        capture, ebpf = _capture_backend(config, closers)
        # With the real backend, the node's probe rule too (in this, the node's, netns).
        probes = HostProbeRules(worker=_worker("probes", closers))
    watcher: NetnsWatcher | None = None
    if scanner is None:
        scan_worker = _worker("scan", closers)
        scanner = NetnsScanner(
            scan_worker,
            netns_dir=Path(config.netns_dir),
            proc_root=Path(config.proc_root),
            reuse_for=scan_interval / 2,  # the periodic scan re-reads every namespace
        )
        # A new pod namespace is scanned for at once, not at the next periodic scan.
        watcher = NetnsWatcher([Path(config.netns_dir)])
    if sockets_for is None or plan_for is None:
        sockets_worker = _worker("sockets", closers)
        sockets_for = sockets_for or _sockets_in(sockets_worker)
        plan_for = plan_for or plan_from_namespace(
            sockets_worker, ebpf_outbound_ipv4=ebpf is not None
        )

    destination_of = ebpf.destination_of if ebpf is not None else original_destination
    metrics = AgentMetrics()
    telemetry = ConnectionTelemetry(store, metrics)
    registry: ConnectionRegistry | None = None
    pool: HbonePool | None = None
    routing = ServiceRouting(store, OutlierDetector(time.monotonic))
    if handlers is None:
        handlers, registry, pool = _mesh_handlers(
            config, store, certificates, metrics, telemetry, destination_of, routing, closers
        )
    listeners = PodListenerFactory(
        handlers,
        sockets_for,
        on_drained=pool.close_source if pool is not None else None,
    )
    node_manager = NodeManager(
        node_name=config.node_name,
        store=store,
        capture=capture,
        scanner=scanner,
        listeners=listeners,
        certificates=certificates,
        plan_for=plan_for,
        timing=NodeTiming(
            scan_interval=scan_interval,
            backoff=backoff or Backoff(),
            drain_seconds=config.drain_seconds,
            drift_interval=config.capture_check_interval,
        ),
        on_setup=metrics.observe_capture_setup,
        annotations=annotations,
        netns_alive=netns_alive or namespace_exists,
        probes=probes,
        directory=directory,
        watcher=watcher,
    )
    kube_watch = None
    if directory is not None:
        assert isinstance(kube, KubeClient)
        kube_watch = KubeWatcher(
            kube, config.node_name, directory, on_change=node_manager.enrollment_changed
        )
    _refresh_metrics(metrics, xds_client, certificates, node_manager)
    metrics.add_refresh(telemetry.flush)
    metrics.add_refresh(lambda: metrics.sync_traffic_clusters(routing.cluster_stats()))
    readiness = _readiness(xds_client, node_manager, certificates)
    stop = asyncio.Event()  # set by `AgentHandles.stop()` and by the admin's quitquitquit
    servers: AdminServers | None = None
    cni = (
        _cni_server(config, node_manager, metrics)
        if admin and config.effective_cni_socket
        else None
    )
    if admin:

        async def drain_then_exit() -> None:
            stop.set()

        servers = _admin_servers(
            config, store, certificates, node_manager, registry, capture, plan_for,
            metrics, readiness, routing, drain_then_exit,
        )  # fmt: skip
    return AgentHandles(
        config=config,
        store=store,
        updater=updater,
        xds=xds_client,
        ca_client=ca_client,
        certificates=certificates,
        listeners=listeners,
        node_manager=node_manager,
        connections=registry,
        pool=pool,
        admin=servers,
        metrics=metrics,
        kube=kube,
        annotations=annotations,
        cni=cni,
        kube_watch=kube_watch,
        _closers=closers,
        _ebpf=ebpf,
        _stop=stop,
    )


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_allocator_tuned = False


def tune_allocator() -> bool:
    """Keep glibc from returning the heap top to the kernel after every large buffer.

    Bulk relaying allocates and frees ~256 KiB buffers (TCP reads, TLS output) many times a
    second. With glibc's dynamic thresholds each free trims the heap and the next allocation
    faults the pages back in: measured here, fixed thresholds cut the CPU per Gbit/s of an
    HBONE relay pair by about a quarter. Fixed values cost at most a few MiB of retained heap.
    A setting of the data-path processes, not of the transport: the agent's and the
    waypoint's entry points call it once (nodeagent.cli.run.tune_data_path). Process-wide
    and idempotent; False where the C library has no mallopt (not glibc).
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt(_M_TRIM_THRESHOLD, 8 * 1024 * 1024)
    mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)  # above our largest buffers, below the trim
    _allocator_tuned = True
    return True


def _worker(name: str, closers: list[Any]) -> NetnsWorker:
    worker = NetnsWorker(name)
    closers.append(worker.close)
    return worker


def _sockets_in(worker: NetnsWorker) -> SocketFactoryMaker:
    def sockets_for(netns: NetnsHandle) -> NetnsSocketFactory:
        return NetnsSocketFactory(netns, worker)

    return sockets_for


def _cni_server(config: Config, manager: NodeManager, metrics: AgentMetrics) -> CniEventServer:
    """The socket nodeagent-cni posts new pods to: an ADD returns once the pod is
    captured (or known to be outside the mesh); any other answer makes the plugin
    leave fail-closed rules, which the manager adopts when it sets the pod up."""

    async def on_add(event: CniAdd) -> CniReply:
        outcome, detail = await manager.capture_new_pod(
            namespace=event.pod_namespace,
            name=event.pod_name,
            ips=event.ips,
            within=config.cni_add_timeout,
            netns=event.netns,
        )
        return CniReply(200 if outcome in ("captured", "not_enrolled") else 503, outcome, detail)

    async def on_del(event: CniDel) -> CniReply:
        manager.request_scan()  # its namespace is about to go: notice it promptly
        return CniReply(200, "removed", f"pod {event.pod_namespace}/{event.pod_name}")

    return CniEventServer(
        config.effective_cni_socket, on_add, on_del, observe=metrics.observe_cni_add
    )


def _kube_client(config: Config, environ: Mapping[str, str]) -> KubeApi | None:
    endpoint = resolve_endpoint(config, environ)
    log.info(
        "kubernetes API: %s",
        f"{endpoint.url} (enrollment by labels; pod annotations; upgrade or uninstall at shutdown)"
        if endpoint is not None
        else "not used (every workload placed here is captured; pods are not annotated;"
        " shutdown keeps the rules)",
    )
    return KubeClient(endpoint) if endpoint is not None else None


def _certificate_manager(config: Config) -> tuple[CaClient, CertificateManager]:
    try:
        ca_client = CaClient.connect(
            config.effective_ca_address,
            root_ca_path=config.xds_root_ca,
            token_path=config.auth_token_path,
            cluster_id=config.cluster_id,
            ttl=float(config.secret_ttl_seconds),
        )
    except (ValueError, OSError) as exc:
        raise ConfigError(f"field 'ca_address': {exc}") from None
    return ca_client, CertificateManager(ca_client)


def _capture_backend(
    config: Config, closers: list[Any]
) -> tuple[CaptureBackend, EbpfCapture | None]:
    iptables = IptablesBackend()
    closers.append(iptables.close)
    if config.redirect_backend != "ebpf":
        return iptables, None
    ebpf_worker = _worker("ebpf", closers)
    try:
        redirect = ConnectRedirect(
            cgroup=config.cgroup2_path,
            pin_dir=bpf_pin_dir(config.bpf_pin_dir, config.cluster_id, config.node_name),
            kernel_headers=kernel_headers(),
            worker=ebpf_worker,
        )
    except CaptureError as exc:
        for close in reversed(closers):
            close()
        raise ConfigError(f"field 'redirect_backend': ebpf: {exc}") from None
    if redirect.pin_dir is None:
        log.warning(
            "eBPF capture is not pinned (bpf_pin_dir %r, no bpffs at /sys/fs/bpf?): "
            "it ends with the agent, and the pods' connects then go out uncaptured",
            config.bpf_pin_dir,
        )
    ebpf = EbpfCapture(iptables, redirect, ebpf_worker)
    return ebpf, ebpf


def _mesh_handlers(
    config: Config,
    store: StateStore,
    certificates: CertificateManager | None,
    metrics: AgentMetrics,
    telemetry: ConnectionTelemetry,
    destination_of: Callable[[socket.socket], Any],
    routing: ServiceRouting,
    closers: list[Any],
) -> tuple[dict[int, ConnectionHandler], ConnectionRegistry, HbonePool | None]:
    """The in-pod listeners' handlers: outbound over the HBONE pool, inbound plaintext
    and HBONE, all authorized and recorded in one connection registry. Without
    certificates: no pool (outbound goes in plaintext) and 15008 refuses."""
    checker = ObservedPolicyChecker(store_policy_lookup(store), telemetry)
    registry = ConnectionRegistry(checker, observer=telemetry)
    closers.append(registry.watch(store))
    if certificates is None:
        return (
            {
                OUTBOUND_PORT: OutboundHandler(
                    store, None, registry, routing=routing, destination_of=destination_of
                ),
                INBOUND_PLAINTEXT_PORT: InboundPlaintextHandler(checker, registry),
                INBOUND_HBONE_PORT: HboneUnavailable(),
            },
            registry,
            None,
        )
    tls = WorkloadTls(certificates)
    pool = HbonePool(tls, PoolSettings())
    inbound_hbone = InboundHboneHandler(
        tls, checker, registry, settings=ServerSettings.from_config(config)
    )
    handlers: dict[int, ConnectionHandler] = {
        OUTBOUND_PORT: OutboundHandler(
            store, pool, registry, routing=routing, destination_of=destination_of
        ),
        INBOUND_PLAINTEXT_PORT: InboundPlaintextHandler(checker, registry),
        INBOUND_HBONE_PORT: inbound_hbone,
    }
    hbone_server = inbound_hbone.server
    metrics.add_refresh(
        lambda: metrics.sync_hbone_inbound(
            open_connections=hbone_server.limits.open,
            refused_by_reason=hbone_server.limits.refused_by_reason(),
            timeouts_by_reason=hbone_server.stats.timeouts,
        )
    )
    return handlers, registry, pool


def _readiness(
    xds_client: XdsClient | None,
    node_manager: NodeManager,
    certificates: CertificateManager | None,
) -> Readiness:
    readiness = Readiness()
    readiness.add("xds-synced", lambda: xds_client is None or xds_client.ready)
    readiness.add("pods-settled", lambda: node_manager.ready)
    if certificates is not None:
        certs = certificates
        readiness.add(
            "certificates-held",
            lambda: all(s.state is CertState.AVAILABLE for s in certs.status()),
        )
    return readiness


def _admin_servers(
    config: Config,
    store: StateStore,
    certificates: CertificateManager | None,
    node_manager: NodeManager,
    registry: ConnectionRegistry | None,
    capture: CaptureBackend,
    plan_for: PlanBuilder,
    metrics: AgentMetrics,
    readiness: Readiness,
    routing: ServiceRouting,
    drain_then_exit: DrainHook,
) -> AdminServers:
    pods = NodePodsSource(node_manager, store, config.redirect_backend)
    providers = AdminProviders(
        config_dump=config_dump_sections(store, certificates, config),
        pods=pods,
        connections=RegistryConnections(lambda: registry if registry is not None else ()),
        log_level=StdlibLogLevelControl(config.log_level),
        rules=CaptureRulesSource(pods, store, plan_for, capture, config.redirect_backend),
        explain=MeshExplainer(
            store,
            # Over a preview copy: explaining takes no round-robin turn and no draw.
            lambda *args: OutboundRouter(store, routing.preview()).route(*args),
            RoutePreviewer(store, routing),
        ),
        routes=RoutesReport(store, routing),
        release=node_manager,
        drain_then_exit=drain_then_exit,
    )
    return AdminServers(
        providers=providers,
        metrics=metrics,
        readiness=readiness,
        admin_address=config.admin_address,
        admin_socket=config.admin_socket,
        metrics_address=config.metrics_address,
        readiness_address=config.readiness_address,
    )


def _refresh_metrics(
    metrics: AgentMetrics,
    xds: XdsClient | None,
    certificates: CertificateManager | None,
    node_manager: NodeManager,
) -> None:
    """Read the agent's own series from their components at every scrape."""
    stats = node_manager.stats
    metrics.add_refresh(
        lambda: metrics.sync_proxy_lifecycle(started=stats.setups, stopped=stats.teardowns)
    )
    if xds is not None:
        client = xds
        metrics.add_refresh(
            lambda: metrics.sync_xds(
                connected=client.stats.connected,
                pushes_by_type=client.stats.by_type,
                nacks_by_type=client.stats.nacks_by_type,
                terminations_by_reason=client.stats.terminations,
                bytes_by_type=client.stats.bytes_by_type,
            )
        )
    if certificates is not None:
        certs = certificates
        metrics.add_refresh(lambda: metrics.sync_certificates(certs.expiries()))
    metrics.add_refresh(lambda: metrics.set_pod_counts(node_manager.counts()))
    metrics.add_refresh(
        lambda: metrics.sync_capture_repairs(
            node_manager.stats.repairs, node_manager.stats.repair_failures
        )
    )


# --- the waypoint ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaypointSettings:
    """What the waypoint is, beyond the agent's Config (xDS, CA, token, trust domain)."""

    name: str  # the waypoint (a Gateway's name); its service account unless given
    namespace: str
    service_account: str = ""
    listen: str = f"0.0.0.0:{INBOUND_HBONE_PORT}"

    @property
    def account(self) -> str:
        return self.service_account or self.name


@dataclass
class WaypointHandles:
    """A built waypoint and its lifecycle."""

    settings: WaypointSettings
    store: StateStore
    xds: XdsClient
    ca_client: CaClient
    certificates: CertificateManager
    pool: HbonePool
    tunnels: WaypointTunnels
    listener: WaypointListener
    telemetry: RequestTelemetry
    metrics_server: HttpServer
    metrics_address: str
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    bound: tuple[str, int] | None = None

    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        self.xds.start()
        self._tasks.append(asyncio.create_task(self.certificates.run(), name="certificates"))
        host, port = parse_host_port(self.settings.listen)
        self.bound = await self.listener.start(host, port)
        tunnels = self.tunnels
        # As the agent does: after a burst, release the pool's extra connections and give
        # the freed heap back (a waypoint kept its peak RSS after 3,000 tunnels had closed).
        self._tasks.append(
            asyncio.create_task(
                trim_after_bursts(lambda: tunnels.live, release=self.pool.release_idle),
                name="trim",
            )
        )
        mhost, mport = parse_host_port(self.metrics_address)
        await self.metrics_server.listen_tcp(mhost, mport)
        log.info(
            "waypoint %s/%s serving HBONE on %s:%d",
            self.settings.namespace, self.settings.name, *self.bound,
        )  # fmt: skip

    async def run(self) -> None:
        try:
            # Inside: a start that fails halfway (a port in use) still stops what it started.
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        await self.listener.stop()
        await self.metrics_server.stop()
        await self.pool.close()
        await self.xds.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ca_client.close()
        log.info("waypoint stopped")


def build_waypoint(config: Config, settings: WaypointSettings) -> WaypointHandles:
    """The waypoint process: xDS into a state store, its own certificate, HBONE in and out."""
    from nodeagent.waypoint.admin import admin_routes
    from nodeagent.waypoint.authz import WaypointAuthorizer
    from nodeagent.waypoint.router import WaypointRouter
    from nodeagent.waypoint.server import WaypointEnd, WaypointListener, WaypointTunnels
    from nodeagent.waypoint.telemetry import RequestTelemetry

    if not config.node_name:
        raise ConfigError("field 'node_name' is required (the node the waypoint runs on)")
    store = StateStore()
    xds_client = XdsClient(config, StateUpdater(store))
    ca_client, certificates = _certificate_manager(config)
    identity = Identity.for_workload(config.trust_domain, settings.namespace, settings.account)
    certificates.add_workload_identity(identity)
    tls = WorkloadTls(certificates)
    pool = HbonePool(tls, PoolSettings())
    routing = ServiceRouting(store, OutlierDetector(time.monotonic))
    telemetry = RequestTelemetry()
    router = WaypointRouter(
        store,
        routing,
        pool,
        identity,
        f"waypoint/{settings.namespace}/{settings.name}",
        telemetry,
        # The AuthorizationPolicies attached to this waypoint, per request (403 when denied).
        authorizer=WaypointAuthorizer(store, settings.name, settings.namespace),
    )
    tunnels = WaypointTunnels(router)
    server = HboneServer(tls, tunnels, settings=ServerSettings.from_config(config))
    listener = WaypointListener(
        server, WaypointEnd(identity, f"waypoint {settings.namespace}/{settings.name}")
    )

    def scrape(_req: Request) -> Response:
        return Response(
            status=200, body=generate_latest(telemetry.registry), content_type=CONTENT_TYPE_LATEST
        )

    def ready(_req: Request) -> Response:
        if not xds_client.ready:
            return Response.text(503, "not ready: xds\n")
        # Without its certificate every HBONE handshake would be reset.
        if any(s.state is not CertState.AVAILABLE for s in certificates.status()):
            return Response.text(503, "not ready: certificate\n")
        return Response.text(200, "ready\n")

    metrics_server = HttpServer(
        "waypoint-metrics",
        {
            "/metrics": route(scrape),
            "/stats/prometheus": route(scrape),
            "/healthz/ready": route(ready),
            **admin_routes(store, routing),
        },
    )
    return WaypointHandles(
        settings=settings,
        store=store,
        xds=xds_client,
        ca_client=ca_client,
        certificates=certificates,
        pool=pool,
        tunnels=tunnels,
        listener=listener,
        telemetry=telemetry,
        metrics_server=metrics_server,
        metrics_address=config.metrics_address,
    )
