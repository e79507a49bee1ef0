"""The node manager: drives the pod lifecycle from state changes, scans and timers.

`NodeManager` is the asyncio driver around the pure `PodLifecycle`:

inputs
  * the StateStore's change feed: workloads placed on this node
    (`workload.node == node_name`) or leaving it;
  * namespace scans (a `NamespaceScanner`): after every state change, a few
    milliseconds after a `NamespaceWatcher` (inotify on the netns dir) reports a
    namespace appearing or going, with short follow-ups while a workload is
    still unmatched, and every `scan_interval` seconds as the safety net (the
    only trigger when the watch is unavailable); each matches local workloads'
    IPs to namespaces, so pods that appear before or after their workload
    record, vanish, or come back in a new namespace are all seen, in either
    order without waiting for the periodic scan (`node.scan.ScanSchedule`);
  * retry times of failed pods (backoff from the lifecycle).

actions
  * StartSetup: open the pod's listeners (15001/15006/15008) inside its
    namespace, then apply capture there. Listeners first: a freshly captured
    pod must never have rules pointing at ports nobody listens on. A failure
    (namespace gone, iptables error, port taken) closes the listeners this
    attempt opened (the capture backend rolls back its own half-applies), and
    the pod goes to failed with the reason, logged at warning, and is retried
    with backoff.
  * StartTeardown: close the listeners (live connections get `drain_seconds`)
    and remove capture if the namespace still exists.

Operations for one pod never overlap (the lifecycle keeps at most one in
flight per pod); different pods run concurrently, at most `max_concurrent`
kernel operations at once.

Restart and shutdown: applying capture that is already installed is a no-op
(the backend adopts what a previous agent left), so an agent restart never
uncaptures a pod. `shutdown()` closes listeners but leaves the in-pod rules:
while no agent listens, captured connections are refused, never leaked, and
the next agent adopts the rules. `shutdown(cleanup=True)` (uninstall) also
removes capture from every local pod. `hold_stale_capture()`, called once the
control plane's state is complete, lists rules a previous agent left in pods
that no local workload claims as held pods: refused until released.

Fail closed: capture is only removed from a living namespace by `release()` (or
the uninstall). A pod whose workload record disappears, or whose record's
addresses are not in its namespace, is held: listeners closed, capture kept, so
its connections are refused, never relayed in plaintext.

Each local workload's identity is registered with the certificate manager as
soon as the workload is placed here, so its certificate is fetched early.

With a `PodAnnotationManager` (in a cluster), a pod that reaches ready is
annotated `ambient.istio.io/redirection: enabled`, and the annotation is removed
when capture is removed from a pod that still exists, including at
`shutdown(cleanup=True)`. The annotation work runs beside capture and never
delays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nodeagent.datapath.capture import CaptureBackend, PlanBuilder, netns_alive, plan_from_addresses
from nodeagent.datapath.discovery import MatchResult
from nodeagent.datapath.netns import NetnsHandle
from nodeagent.model.constants import REDIRECTION_ANNOTATION
from nodeagent.model.enrollment import Enrollment, NamespaceMeta, PodMeta, Reason, enrollment
from nodeagent.model.identity import Identity
from nodeagent.model.workload import Workload
from nodeagent.node.annotations import PodAnnotationManager, PodRef, pod_ref
from nodeagent.node.lifecycle import (
    Action,
    Backoff,
    Event,
    LifecycleError,
    Netns,
    PodLifecycle,
    PodState,
    Released,
    SetupDone,
    SetupFailed,
    StartSetup,
    StartTeardown,
    TeardownDone,
    TeardownFailed,
    Unenrolled,
    WorkloadGone,
    WorkloadPlaced,
)
from nodeagent.node.scan import (
    Conflict,
    Matched,
    Mismatch,
    Notice,
    OrphanReleased,
    ScanSchedule,
    ScanTiming,
    ScanView,
    decide,
    mismatch_reason,
)
from nodeagent.state.store import StateChange, StateStore

log = logging.getLogger(__name__)

# How long shutdown waits for setups/teardowns in flight (kernel operations).
OPERATION_GRACE = 10.0
# How long an uninstall waits for the pods' annotations to be removed. It runs
# during the connection drain, so this is on top of it only when the API server
# is slow; keep drain + this below terminationGracePeriodSeconds.
ANNOTATION_GRACE = 5.0
HOLD_LOOKS = 5  # scans that may look for an outside pod's namespace (it may not exist yet)
# How long the drift check waits, before each pod, for a scan or a setup to finish.
DRIFT_YIELD = 1.0


# -- what the manager needs from other packages (injected by app.py) -----------


class NamespaceScanner(Protocol):
    """Finds each workload's namespace by IP (nodeagent.datapath.discovery.NetnsScanner).

    Blocking; the manager calls it on a thread.
    """

    def find(
        self, workloads: Mapping[str, Iterable[str]]
    ) -> tuple[MatchResult, dict[int, NetnsHandle]]: ...

    def unowned(self, workloads: Mapping[str, Iterable[str]]) -> dict[int, NetnsHandle]:
        """Namespaces read successfully that hold none of the workloads' IPs."""
        ...


class NamespaceWatcher(Protocol):
    """Tells when a pod namespace may have appeared or gone
    (nodeagent.datapath.nswatch.NetnsWatcher)."""

    def start(self, on_change: Callable[[], None]) -> None:
        """Call `on_change()` from the loop on every change; OSError if it cannot watch."""
        ...

    def close(self) -> None: ...


class OpenListeners(Protocol):
    """One pod's open listeners (nodeagent.proxy.listeners.PodListeners)."""

    @property
    def ports(self) -> tuple[int, ...]: ...

    async def close(self, *, drain: float = 0.0) -> None: ...


class ListenerOpener(Protocol):
    """Opens a pod's listeners in its namespace (nodeagent.proxy.listeners.PodListenerFactory)."""

    async def open(self, workload: Workload, netns: NetnsHandle) -> OpenListeners: ...


class PodDirectory(Protocol):
    """Pods on this node and namespaces, from the Kubernetes API
    (nodeagent.kube.watch.KubeMetaCache): what enrollment is decided from."""

    @property
    def synced(self) -> bool: ...

    def pod(self, key: str) -> PodMeta | None:
        """By `namespace/name`."""
        ...

    def pod_by_ip(self, ip: str) -> PodMeta | None: ...

    def namespace(self, name: str) -> NamespaceMeta | None: ...

    def pods(self) -> Iterable[PodMeta]: ...


class ProbeRules(Protocol):
    """The node's probe SNAT rule and its set of meshed pod IPs
    (nodeagent.datapath.hostprobe.HostProbeRules). Blocking; run on a thread."""

    def install(self) -> bool: ...

    def sync(self, ips: Iterable[str]) -> bool: ...

    def uninstall(self) -> None: ...


class IdentityRegistry(Protocol):
    """Certificate prefetch (nodeagent.identity.manager.CertificateManager)."""

    def add_workload_identity(self, identity: Identity) -> None: ...

    def remove_workload_identity(self, identity: Identity) -> None: ...


# -- status ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PodStatus:
    """One local pod, for the admin API and the CLI."""

    uid: str
    name: str
    namespace: str
    state: str
    netns: str
    listeners: tuple[int, ...]
    attempts: int
    last_error: str
    since: float  # epoch seconds of the last state change
    enrolled: bool = True
    enrollment: str = ""  # why (not) captured: "namespace labelled", "sidecar", ...

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "name": self.name,
            "namespace": self.namespace,
            "state": self.state,
            "netns": self.netns,
            "listeners": list(self.listeners),
            "attempts": self.attempts,
            "lastError": self.last_error,
            "since": self.since,
            "enrolled": self.enrolled,
            "enrollment": self.enrollment,
        }


@dataclass
class ManagerStats:
    """Counters for metrics."""

    scans: int = 0
    setups: int = 0
    setup_failures: int = 0
    adopted: int = 0  # setups that found capture already in place
    teardowns: int = 0
    teardown_failures: int = 0
    repairs: int = 0  # ready pods whose drifted capture was put back
    repair_failures: int = 0
    holds: int = 0  # pods whose listeners closed while their capture stays (refused)
    released: int = 0
    stale_held: int = 0  # namespaces found captured that no local workload claimed
    unenrolled: int = 0  # pods released because they left the mesh by label
    holds_released: int = 0  # plugin holds removed from pods found outside the mesh


class SetupError(RuntimeError):
    """Setup could not start (e.g. the workload left the node meanwhile)."""


def _inode_of(path: str) -> int | None:
    try:
        return Path(path).stat().st_ino
    except OSError:
        return None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeTiming:
    """How often and how much the node manager works."""

    scan_interval: float = 1.0
    """Seconds between namespace scans (one also follows every state change and,
    with a watcher, every namespace appearing or going)."""
    backoff: Backoff = field(default_factory=Backoff)
    """Retry delays of failed setups."""
    max_concurrent: int = 4
    """Kernel operations (capture apply/remove) at once, across pods."""
    drain_seconds: float = 5.0
    """How long a pod's live connections may finish when its listeners close."""
    drift_interval: float = 10.0
    """Seconds between re-applies of every ready pod's capture: a rule deleted by hand
    is put back (apply is idempotent and says whether it changed anything). The pass
    steps aside, pod by pod, while a scan or a new pod's setup runs."""


class NodeManager:
    """Keeps capture and listeners in place for every local pod."""

    def __init__(
        self,
        *,
        node_name: str,
        store: StateStore,
        capture: CaptureBackend,
        scanner: NamespaceScanner,
        listeners: ListenerOpener,
        certificates: IdentityRegistry | None = None,
        plan_for: PlanBuilder = plan_from_addresses,
        netns_alive: Callable[[NetnsHandle], bool] = netns_alive,
        timing: NodeTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_setup: Callable[[float], None] | None = None,
        annotations: PodAnnotationManager | None = None,
        directory: PodDirectory | None = None,
        probes: ProbeRules | None = None,
        watcher: NamespaceWatcher | None = None,
    ) -> None:
        timing = timing or NodeTiming()
        # Without a Kubernetes API every workload placed here is captured: the control
        # plane is then the only authority on what is meshed.
        self._directory = directory
        # Kubelet's probes reach captured pods past mTLS (SNAT to 169.254.7.127).
        self._probes = probes
        self._probe_ips: frozenset[str] | None = None  # what the set holds, once synced
        self._probe_task: asyncio.Task[None] | None = None
        self._on_setup = on_setup  # observes each pod's setup time (seconds), for metrics
        if not node_name:
            raise ValueError("node_name is required: it selects the workloads on this node")
        self.node_name = node_name
        self._store = store
        self._capture = capture
        self._scanner = scanner
        self._listeners = listeners
        self._certificates = certificates
        self._annotations = annotations
        self._plan_for = plan_for
        self._alive = netns_alive
        self._scan_interval = timing.scan_interval
        self._watcher = watcher
        # The debounce and follow-ups are ScanTiming's own (no caller tunes them).
        self._schedule = ScanSchedule(ScanTiming(interval=timing.scan_interval))
        self._drift_interval = timing.drift_interval
        self._next_drift_at = clock() + timing.drift_interval
        self._drift_task: asyncio.Task[None] | None = None
        self._pod_locks: dict[str, asyncio.Lock] = {}  # setup/teardown vs drift repair
        self._drain = timing.drain_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._sem = asyncio.Semaphore(timing.max_concurrent)
        self.lifecycle = PodLifecycle(backoff=timing.backoff)
        self.stats = ManagerStats()

        self._workloads: dict[str, Workload] = {}  # local workloads by uid
        self._identities: dict[str, Identity] = {}  # registered with the cert manager
        self._annotated: dict[str, PodRef] = {}  # pods asked to carry the annotation
        self._open: dict[str, OpenListeners] = {}
        self._labels: dict[str, str] = {}
        self._scan: tuple[MatchResult, dict[int, NetnsHandle]] | None = None
        self._warned: set[str] = set()  # pods warned about (conflict, unreadable) until matched
        self._present: set[str] = set()  # unmatched by the last scan, namespace still there
        self._absent: set[str] = set()  # unmatched by the last scan, namespace gone
        self._former: dict[str, Workload] = {}  # held pods' last records, for status
        self._outside: dict[str, tuple[Workload, Enrollment]] = {}  # placed, not enrolled
        self._ops: set[asyncio.Task[None]] = set()
        # Pods outside the mesh are looked at for a CNI plugin hold (fail-closed rules it
        # leaves when no agent answered the ADD) a few times each, then left alone.
        self._hold_looks: dict[str, int] = {}
        self._hold_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._stopping = False
        self._scanning = False
        self._quieter = asyncio.Event()  # a scan ended or the lifecycle moved: re-check
        self.synced = False  # the first reconcile (with a scan) has run

    # -- running -------------------------------------------------------------

    def start(self) -> None:
        """Start the control loop (idempotent)."""
        if self._task is None:
            self._stopping = False
            self._unsubscribe = self._store.subscribe(self._on_state_change)
            self._watch()
            self._task = asyncio.create_task(self._run(), name=f"node-manager-{self.node_name}")

    def _watch(self) -> None:
        if self._watcher is None:
            return
        try:
            self._watcher.start(self._namespaces_changed)
        except OSError as exc:
            log.warning(
                "namespace watch unavailable (%s): new pod namespaces are found by the"
                " periodic scan, every %g s",
                _reason(exc),
                self._scan_interval,
            )
            self._watcher = None

    async def _run(self) -> None:
        while True:
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop capture for every other pod
                log.exception("node manager: reconcile failed; retrying")
                await asyncio.sleep(self._scan_interval)
            await self._idle()

    async def shutdown(self, *, cleanup: bool = False, drain: float | None = None) -> None:
        """Stop; close every listener. Rules stay in the pods unless `cleanup`."""
        self._stopping = True
        if cleanup:
            # Uninstall: start removing the annotations now, so the API calls
            # overlap the connection drain below.
            self._unannotate_all()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._watcher is not None:
            self._watcher.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._drift_task is not None:
            self._drift_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drift_task
        if self._hold_task is not None:
            self._hold_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hold_task
        if self._ops:
            _, pending = await asyncio.wait(set(self._ops), timeout=OPERATION_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        drain = self._drain if drain is None else drain
        opened, self._open = self._open, {}
        await asyncio.gather(
            *(listeners.close(drain=drain) for listeners in opened.values()),
            return_exceptions=True,
        )
        if self._probe_task is not None:
            with contextlib.suppress(Exception):
                await self._probe_task
        if cleanup:
            await self._remove_all_capture()
            if self._probes is not None:
                try:
                    await asyncio.to_thread(self._probes.uninstall)
                except Exception as exc:
                    log.warning("cleanup: kubelet probe rule: %s", _reason(exc))
        else:
            log.info(
                "node manager stopped: listeners of %d pod(s) closed, capture left in place",
                len(opened),
            )
        if self._annotations is not None:
            if cleanup and not await self._annotations.flush(ANNOTATION_GRACE):
                log.warning(
                    "cleanup: annotation %s still on pod(s) %s",
                    REDIRECTION_ANNOTATION,
                    ", ".join(map(str, self._annotations.pending)),
                )
            await self._annotations.close()
        if self._certificates is not None:
            for identity in self._identities.values():
                self._certificates.remove_workload_identity(identity)
        self._identities.clear()

    async def _remove_all_capture(self) -> None:
        handles: dict[int, NetnsHandle] = {}
        for rec in self.lifecycle.pods.values():
            for netns in (rec.netns, rec.next_netns):
                if netns is not None:
                    handles[netns.inode] = NetnsHandle(path=netns.path, inode=netns.inode)
        try:
            # A fresh scan also finds local pods whose setup never finished.
            _, found = await asyncio.to_thread(self._scanner.find, self._wanted())
            handles.update(found)
        except Exception as exc:
            log.warning("cleanup: scan failed, removing capture from known pods only: %s", exc)
        removed = 0
        for handle in handles.values():
            if not await asyncio.to_thread(self._alive, handle):
                continue
            try:
                await asyncio.to_thread(self._capture.remove, handle)
                removed += 1
            except Exception as exc:
                log.warning("cleanup: %s", _reason(exc))
        log.info("node manager stopped: capture removed from %d pod namespace(s)", removed)

    async def hold_stale_capture(self) -> int:
        """Hold capture that no local workload claims; returns how many namespaces.

        A previous agent's pod whose record is gone now (it left the mesh while no agent
        ran, or the control plane lost it) keeps its rules and is listed `held`: its
        traffic stays refused, never relayed in plaintext, until an operator releases it
        (`release`), its namespace goes, or a workload's record claims it again. Call this
        once the control plane's state is complete (after the first xDS sync): a
        namespace counts only if its addresses were read and hold no local workload's IP
        then. The scanner never lists the agent's own namespace.
        """
        wanted = self._local_addresses()
        try:
            candidates = await asyncio.to_thread(self._scanner.unowned, wanted)
        except Exception as exc:
            log.warning("stale capture sweep: scan failed, skipped: %s", _reason(exc))
            return 0
        stale: dict[int, NetnsHandle] = {}
        for inode, handle in candidates.items():
            try:
                installed = await asyncio.to_thread(self._capture.read_installed, handle)
            except Exception as exc:
                log.warning("stale capture in %s: %s", handle.path, _reason(exc))
                continue
            if not installed.empty:
                stale[inode] = handle
        # Records may have arrived while the namespaces were read: a new pod's namespace
        # carries the CNI plugin's fail-closed rules before its record does, and is its
        # workload's, not an earlier agent's. Decide on the records as they are now.
        while stale and (now := self._local_addresses()) != wanted:
            wanted = now
            try:
                still = await asyncio.to_thread(self._scanner.unowned, wanted)
            except Exception as exc:
                log.warning("stale capture sweep: scan failed, skipped: %s", _reason(exc))
                return 0
            stale = {inode: handle for inode, handle in stale.items() if inode in still}
        keep: set[int] = set()
        for rec in self.lifecycle.pods.values():
            keep.update(ns.inode for ns in (rec.netns, rec.next_netns) if ns is not None)
        held = 0
        reason = (
            "captured by an earlier agent, and no workload record claims it now:"
            " its traffic is refused until it is released"
        )
        for inode, handle in stale.items():
            if inode in keep:
                continue
            self.lifecycle.hold_orphan(
                f"netns:{inode}", Netns(path=handle.path, inode=inode), reason, self._clock()
            )
            held += 1
            log.warning("pod namespace %s: %s", handle.path, reason)
        if held:
            self._notify()
        self.stats.stale_held += held
        return held

    # -- waiting (tests, readiness) -----------------------------------------

    @property
    def ready(self) -> bool:
        """Synced once (and the pod directory, if any), and no pod whose namespace is
        known is still being set up."""
        listed = self._directory is None or self._directory.synced
        return (
            self.synced
            and listed
            and not any(rec.state is PodState.CAPTURING for rec in self.lifecycle.pods.values())
        )

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checking after every lifecycle change
        (callers bound the wait with `asyncio.timeout`)."""
        while not predicate():
            await self._changed.wait()

    def state_of(self, uid: str) -> PodState | None:
        rec = self.lifecycle.pods.get(uid)
        return rec.state if rec else None

    async def wait_for_state(self, uid: str, state: PodState | None) -> None:
        """Wait until the pod is in `state` (None: no longer tracked)."""
        await self.wait_until(lambda: self.state_of(uid) is state)

    # -- status --------------------------------------------------------------

    def pods(self) -> list[PodStatus]:
        now, wall = self._clock(), self._wall_clock()
        out = []
        for stale in [u for u in self._former if u not in self.lifecycle.pods]:
            del self._former[stale]
        for uid, rec in sorted(self.lifecycle.pods.items()):
            base = uid.split("@", 1)[0]  # a namespace a pod left is held under uid@inode
            w = self._workloads.get(uid) or self._former.get(base) or self._workloads.get(base)
            listeners = self._open.get(uid)
            out.append(
                PodStatus(
                    uid=uid,
                    name=w.name if w else "",
                    namespace=w.namespace if w else "",
                    state=rec.state.value,
                    netns=rec.netns.path if rec.netns else "",
                    listeners=listeners.ports if listeners else (),
                    attempts=rec.attempts,
                    last_error=rec.last_error,
                    since=wall - (now - rec.since),
                    enrollment=self._why_enrolled(w),
                )
            )
        listed = {(s.namespace, s.name) for s in out}
        for uid, (w, verdict) in sorted(self._outside.items()):
            if uid not in self.lifecycle.pods:
                listed.add((w.namespace, w.name))
                out.append(self._outside_status(uid, w.namespace, w.name, verdict, wall))
        if self._directory is not None and self._directory.synced:
            for pod in self._directory.pods():
                if (pod.namespace, pod.name) in listed:
                    continue
                verdict = enrollment(pod, self._directory.namespace(pod.namespace))
                state = "not-captured" if not verdict.enrolled else "no-record"
                out.append(
                    self._outside_status(pod.uid, pod.namespace, pod.name, verdict, wall, state)
                )
        return out

    def _why_enrolled(self, workload: Workload | None) -> str:
        verdict = self.enrollment_of(workload) if workload is not None else None
        return verdict.describe() if verdict is not None else ""

    @staticmethod
    def _outside_status(
        uid: str,
        namespace: str,
        name: str,
        verdict: Enrollment,
        wall: float,
        state: str = "not-captured",
    ) -> PodStatus:
        return PodStatus(
            uid=uid,
            name=name,
            namespace=namespace,
            state=state,
            netns="",
            listeners=(),
            attempts=0,
            last_error="" if verdict.enrolled else f"not in the mesh: {verdict.describe()}",
            since=wall,
            enrolled=verdict.enrolled,
            enrollment=verdict.describe(),
        )

    def counts(self) -> dict[str, int]:
        return self.lifecycle.counts()

    def release(self, pod: str) -> str:
        """Release a held pod (by uid or `namespace/name`): remove its capture and forget it.

        The explicit step that un-meshes a pod whose record is gone: until then its
        traffic is refused. Raises LookupError for an unknown pod and ValueError for
        one that is not held. Returns the uid released.
        """
        found = [s.uid for s in self.pods() if pod in (s.uid, f"{s.namespace}/{s.name}")]
        if not found:
            raise LookupError(f"no pod {pod!r} on node {self.node_name}")
        held = [u for u in found if self.state_of(u) is PodState.HELD]
        if not held:
            states = ", ".join(sorted({str(getattr(self.state_of(u), "value", "")) for u in found}))
            raise ValueError(f"pod {pod!r} is {states}, not held: only held pods are released")
        for uid in held:
            log.warning("pod %s: released by the operator; removing its capture", uid)
            self.stats.released += 1
            self._dispatch(Released(uid=uid, now=self._clock()))
        return ", ".join(held)

    # -- inputs --------------------------------------------------------------

    def _on_state_change(self, change: StateChange) -> None:
        if change.workloads:
            self.request_scan()

    def request_scan(self) -> None:
        """Scan namespaces now (e.g. a CNI plugin reported a new pod)."""
        self._schedule.request(self._clock())
        self._wake.set()

    def _namespaces_changed(self) -> None:
        """The watcher saw a namespace appear or go: scan shortly (coalesced)."""
        self._schedule.namespace_changed(self._clock())
        self._wake.set()

    def _wanted(self) -> dict[str, list[str]]:
        return {uid: [str(a) for a in w.addresses] for uid, w in self._workloads.items()}

    async def _idle(self) -> None:
        now = self._clock()
        timeout = max(0.0, self._schedule.next_at() - now)
        retry_at = self.lifecycle.next_retry_at()
        if retry_at is not None:
            timeout = min(timeout, max(0.0, retry_at - now))
        timeout = min(timeout, max(0.0, self._next_drift_at - now))
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
        # cancellation that races with the event, and shutdown would hang.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()

    async def _reconcile(self) -> None:
        self._sync_placement()
        now = self._clock()
        if self._schedule.due(now):
            self._schedule.scan_started(now)
            self._scanning = True
            waiting = True
            try:
                self._scan = await asyncio.to_thread(self._scanner.find, self._wanted())
                self.stats.scans += 1
                waiting = bool(self._scan[0].unmatched or self._scan[0].conflicts)
                unmatched = self._unmatched()
                self._present = await asyncio.to_thread(self._still_present, unmatched)
                self._absent = {uid for uid, _ in unmatched} - self._present
            except Exception as exc:
                log.warning("namespace scan failed: %s", _reason(exc))
            finally:
                self._scanning = False
                self._quieter.set()
            self._schedule.scan_done(waiting=waiting)
            # Placement may have changed while scanning.
            self._sync_placement()
        self._apply_scan()
        for action in self.lifecycle.due_retries(self._clock()):
            self._start(action)
        if self._clock() >= self._next_drift_at and self._drift_task is None:
            self._next_drift_at = self._clock() + self._drift_interval
            self._drift_task = asyncio.create_task(self._repair_drift(), name="drift-repair")
            self._drift_task.add_done_callback(self._drift_finished)
        self._sync_probes()
        self._sync_outside_holds()
        if self._scan is not None and not self.synced:
            self.synced = True
            self._notify()

    def _sync_outside_holds(self) -> None:
        """Look for plugin holds in the namespaces of pods outside the mesh, off the loop,
        one look at a time. The plugin leaves its fail-closed rules when the agent did not
        answer an ADD (not running, say); if the pod then proves to be outside the mesh,
        nothing would ever lift them and every connection of the pod stays refused."""
        if self._hold_task is not None or self._stopping or self._scan is None:
            return
        due = {
            uid: [str(a) for a in w.addresses]
            for uid, (w, verdict) in self._outside.items()
            # A host-network pod has no namespace of its own for a plugin to hold.
            if verdict.reason is not Reason.HOST_NETWORK
            and uid not in self.lifecycle.pods
            and self._hold_looks.get(uid, 0) < HOLD_LOOKS
        }
        for uid in [u for u in self._hold_looks if u not in self._outside]:
            del self._hold_looks[uid]
        if due:
            self._hold_task = asyncio.create_task(self._release_holds(due), name="holds")

    async def _release_holds(self, due: dict[str, list[str]]) -> None:
        try:
            result, handles = await asyncio.to_thread(self._scanner.find, due)
            for uid in due:
                self._hold_looks[uid] = self._hold_looks.get(uid, 0) + 1
            for uid, inode in result.matches.items():
                self._hold_looks[uid] = HOLD_LOOKS  # found: one look decides
                try:
                    await self._lift_hold(uid, handles[inode])
                finally:
                    self._forget_lock(uid)
        except Exception as exc:
            log.warning("plugin hold check: %s", _reason(exc))
        finally:
            self._hold_task = None

    async def _lift_hold(self, uid: str, handle: NetnsHandle) -> None:
        """Remove the plugin's rules from an outside pod's namespace. Under the pod's lock,
        and only if it is still outside: a pod enrolled while we looked is being (or was)
        set up, and the rules there are the agent's own now (fail closed)."""
        async with self._lock(uid):
            if uid in self.lifecycle.pods or uid not in self._outside:
                return
            w, verdict = self._outside[uid]
            installed = await asyncio.to_thread(self._capture.read_installed, handle)
            if installed.empty:
                return
            await asyncio.to_thread(self._capture.remove, handle)
        self.stats.holds_released += 1
        log.warning(
            "pod %s is outside the mesh (%s) but its namespace %s held capture rules"
            " (the CNI plugin's, left while no agent answered): removed",
            w.label,
            verdict.describe(),
            handle.path,
        )

    def _captured_ips(self) -> frozenset[str]:
        """Addresses of the pods whose capture is in place (ready, or held: refused)."""
        captured = (PodState.READY, PodState.HELD, PodState.REMOVING)
        return frozenset(
            str(a)
            for uid, rec in self.lifecycle.pods.items()
            if rec.state in captured and (w := self._workloads.get(uid)) is not None
            for a in w.addresses
        )

    def _sync_probes(self) -> None:
        """Keep the probe set equal to the captured pods' IPs, off the loop, one at a time."""
        if self._probes is None or self._probe_task is not None or self._stopping:
            return
        wanted = self._captured_ips()
        if wanted == self._probe_ips:
            return
        self._probe_task = asyncio.create_task(self._write_probes(wanted), name="probe-set")

    async def _write_probes(self, wanted: frozenset[str]) -> None:
        assert self._probes is not None
        try:
            if self._probe_ips is None:
                await asyncio.to_thread(self._probes.install)
            await asyncio.to_thread(self._probes.sync, sorted(wanted))
            self._probe_ips = wanted
        except Exception as exc:
            log.warning("kubelet probe rule: %s; retrying at the next scan", _reason(exc))
        finally:
            self._probe_task = None
        self._wake.set()
        self._notify()

    def _local_addresses(self) -> dict[str, list[str]]:
        return {w.uid: [str(a) for a in w.addresses] for w in self._local_workloads()}

    def _local_workloads(self) -> list[Workload]:
        """The workloads on this node the agent serves. One with a native tunnel (a
        waypoint) terminates HBONE itself on its 15008: not captured, no listeners."""
        return [w for w in self._store.workloads_on_node(self.node_name) if not w.native_tunnel]

    def enrollment_of(self, workload: Workload) -> Enrollment | None:
        """Whether Istio ambient captures the workload's pod; None when it cannot be
        told (no Kubernetes API, or no such pod): then it is captured, never released on
        a guess. (Before the directory has synced nothing is placed at all.)"""
        directory = self._directory
        if directory is None or not directory.synced:
            return None
        pod = directory.pod(f"{workload.namespace}/{workload.name}")
        if pod is None:
            pod = next((p for a in workload.addresses if (p := directory.pod_by_ip(str(a)))), None)
        if pod is None:
            return None
        return enrollment(pod, directory.namespace(pod.namespace))

    async def capture_new_pod(
        self, *, namespace: str, name: str, ips: Iterable[str], within: float, netns: str = ""
    ) -> tuple[str, str]:
        """A CNI ADD: capture the pod before its containers start. Returns (outcome,
        detail): `captured` (rules and listeners in place), `not_enrolled`, or
        `no_record` / `failed` / `timeout`, on which the plugin installs fail-closed
        rules that this manager adopts once it can set the pod up. With `netns` (the
        ADD's namespace path), captured means captured in that namespace: a pod
        recreated with the same address must not pass on its predecessor's capture."""
        ips = [str(ip) for ip in ips]
        inode = await asyncio.to_thread(_inode_of, netns) if netns else None
        directory = self._directory
        if directory is not None and directory.synced:
            pod = directory.pod(f"{namespace}/{name}")
            if pod is not None:
                verdict = enrollment(pod, directory.namespace(namespace))
                if not verdict.enrolled:
                    return "not_enrolled", verdict.describe()
        self.request_scan()
        uid = ""
        try:
            async with asyncio.timeout(within):
                while not uid:
                    uid = self._uid_for(namespace, name, ips) or ""
                    if not uid:
                        await self._changed.wait()
                await self.wait_until(lambda: self._settled(uid, inode))
        except TimeoutError:
            if not uid:
                return "no_record", f"no workload record for {namespace}/{name} ({', '.join(ips)})"
            return "timeout", f"pod {namespace}/{name} not captured within {within:g} s"
        rec = self.lifecycle.pods.get(uid)
        if rec is None:  # left the mesh or the node meanwhile
            verdict_now = self._outside.get(uid)
            if verdict_now is not None:
                return "not_enrolled", verdict_now[1].describe()
            return "no_record", f"pod {namespace}/{name} is no longer placed on this node"
        if rec.state is PodState.READY:
            return (
                "captured",
                f"pod {namespace}/{name} captured in {rec.netns.path if rec.netns else '?'}",
            )
        return "failed", rec.last_error or rec.state.value

    def _uid_for(self, namespace: str, name: str, ips: list[str]) -> str | None:
        """The local workload of a pod, by name or by one of its addresses."""
        for uid, w in self._workloads.items():
            if (w.namespace, w.name) == (namespace, name) or any(
                str(a) in ips for a in w.addresses
            ):
                return uid
        for uid, (w, _) in self._outside.items():
            if (w.namespace, w.name) == (namespace, name):
                return uid
        return None

    def _settled(self, uid: str, inode: int | None = None) -> bool:
        rec = self.lifecycle.pods.get(uid)
        if rec is None:
            return uid not in self._workloads
        if inode is not None and (rec.netns is None or rec.netns.inode != inode):
            if rec.state is PodState.READY:
                self.request_scan()  # still the old namespace: look again
            return False
        return rec.state in (PodState.READY, PodState.HELD, PodState.FAILED)

    def enrollment_changed(self) -> None:
        """The pods or namespaces the directory knows changed: decide again."""
        self._wake.set()

    def _sync_placement(self) -> None:
        if self._directory is not None and not self._directory.synced:
            # Until the pods and namespaces are listed nothing is placed: istiod sends a
            # record for every pod, and capturing one that is outside the mesh even for
            # a moment would break it (and advertise it as HBONE).
            return
        now = self._clock()
        local: dict[str, Workload] = {}
        outside: dict[str, tuple[Workload, Enrollment]] = {}
        for w in self._local_workloads():
            verdict = self.enrollment_of(w)
            if verdict is None or verdict.enrolled:
                local[w.uid] = w
            else:
                outside[w.uid] = (w, verdict)
        for uid, (w, verdict) in outside.items():
            if uid not in self._outside:
                log.info(
                    "pod %s (uid %s) is not in the mesh (%s): not captured",
                    w.label,
                    uid,
                    verdict.describe(),
                )
            newly = uid not in self._outside
            if uid in self._workloads or (newly and uid in self.lifecycle.pods):
                self._workloads.pop(uid, None)
                self._former[uid] = w
                self._release_identity(uid)
                self.stats.unenrolled += 1
                log.info(
                    "pod %s (uid %s) left the mesh (%s): removing its capture",
                    w.label,
                    uid,
                    verdict.describe(),
                )
                self._dispatch(Unenrolled(uid=uid, now=now))
        self._outside = outside
        for uid, workload in local.items():
            self._workloads[uid] = workload
            self._labels[uid] = workload.label
            self._sync_identity(uid, workload)
            self._former.pop(uid, None)
            if uid not in self.lifecycle.pods:
                # New here, or re-placed after its old namespace was torn down.
                self._dispatch(WorkloadPlaced(uid=uid, now=now))
        for uid in [u for u in self._workloads if u not in local]:
            self._former[uid] = self._workloads.pop(uid)
            self._release_identity(uid)
            log.info("pod %s (uid %s) left the node", self._labels.get(uid, uid), uid)
            self._dispatch(WorkloadGone(uid=uid, now=now))

    def _sync_identity(self, uid: str, workload: Workload) -> None:
        if self._certificates is None:
            return
        identity = workload.identity()
        old = self._identities.get(uid)
        if old == identity:
            return
        self._certificates.add_workload_identity(identity)
        self._identities[uid] = identity
        if old is not None:
            self._certificates.remove_workload_identity(old)

    def _release_identity(self, uid: str) -> None:
        identity = self._identities.pop(uid, None)
        if identity is not None and self._certificates is not None:
            self._certificates.remove_workload_identity(identity)

    def _unmatched(self) -> list[tuple[str, NetnsHandle]]:
        """Pods the latest scan did not place, with the namespace they were last in."""
        if self._scan is None:
            return []
        result = self._scan[0]
        out = []
        for uid, rec in self.lifecycle.pods.items():
            current = rec.next_netns or rec.netns
            if current is not None and uid not in result.matches and uid not in result.conflicts:
                out.append((uid, NetnsHandle(path=current.path, inode=current.inode)))
        return out

    def _still_present(self, pods: list[tuple[str, NetnsHandle]]) -> set[str]:
        """Of those, the pods whose namespace still exists (blocking: run on a thread)."""
        return {uid for uid, handle in pods if self._alive(handle)}

    def _apply_scan(self) -> None:
        """Turn the latest scan into lifecycle events (the decision is `node.scan`'s)."""
        if self._scan is None:
            return
        result, handles = self._scan
        view = ScanView(
            matches=result.matches,
            paths={inode: handle.path for inode, handle in handles.items()},
            conflicts=result.conflicts,
            addresses=result.addresses,
            present=frozenset(self._present),
            absent=frozenset(self._absent),
        )
        wanted = {uid: tuple(str(a) for a in w.addresses) for uid, w in self._workloads.items()}
        decision = decide(self.lifecycle.pods, wanted, view, self._clock())
        for notice in decision.notices:
            self._log_notice(notice)
        for event in decision.events:
            self._dispatch(event)

    def _log_notice(self, notice: Notice) -> None:
        label = self._labels.get(notice.uid, notice.uid)
        if isinstance(notice, Matched):
            self._warned.discard(notice.uid)
        elif isinstance(notice, Mismatch):
            log.warning(
                "pod %s (uid %s): %s; listeners closed, capture kept",
                label,
                notice.uid,
                notice.reason,
            )
        elif isinstance(notice, OrphanReleased):
            if notice.claimed:
                log.info("held namespace %s is claimed by a workload again", notice.path)
            else:
                log.info("held pod %s: its namespace is gone; forgotten", label)
        elif notice.uid not in self._warned:  # Conflict, Unreadable: once until matched
            self._warned.add(notice.uid)
            if isinstance(notice, Conflict):
                log.warning(
                    "pod %s (uid %s): its IPs are in several namespaces (inodes %s); waiting",
                    label,
                    notice.uid,
                    ", ".join(map(str, notice.inodes)),
                )
            else:
                log.warning(
                    "pod %s (uid %s): its namespace exists but its addresses could not be"
                    " read; keeping capture until a scan sees it again",
                    label,
                    notice.uid,
                )

    # -- lifecycle plumbing ---------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        try:
            actions = self.lifecycle.handle(event)
        except LifecycleError:
            log.exception("node manager: lifecycle rejected %s", event)
            return
        for action in actions:
            self._start(action)
        self._notify()

    def _notify(self) -> None:
        self._quieter.set()
        self._changed.set()
        self._changed = asyncio.Event()

    def _start(self, action: Action) -> None:
        if self._stopping:
            return
        coro = self._setup(action) if isinstance(action, StartSetup) else self._teardown(action)
        task = asyncio.create_task(coro, name=f"{type(action).__name__}-{action.uid}")
        self._ops.add(task)
        task.add_done_callback(self._op_finished)

    def _op_finished(self, task: asyncio.Task[None]) -> None:
        self._ops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "node manager: operation %s crashed", task.get_name(), exc_info=task.exception()
            )
        self._wake.set()

    # -- operations -------------------------------------------------------------

    def _apply_capture(self, workload: Workload, handle: NetnsHandle) -> bool:
        return self._capture.apply(handle, self._plan_for(workload, handle))

    async def _setup(self, action: StartSetup) -> None:
        async with self._lock(action.uid):
            await self._setup_locked(action)

    async def _setup_locked(self, action: StartSetup) -> None:
        uid = action.uid
        label = self._labels.get(uid, uid)
        handle = NetnsHandle(path=action.netns.path, inode=action.netns.inode)
        started = self._clock()
        try:
            workload = self._workloads.get(uid)
            if workload is None:
                raise SetupError("the workload left the node")
            scanned = self._scan[0].addresses.get(handle.inode) if self._scan else None
            if scanned is not None:
                wanted = [str(a) for a in workload.addresses]
                wrong = mismatch_reason(wanted, handle.path, scanned)
                if wrong is not None:
                    raise SetupError(wrong)
            listeners = await self._listeners.open(workload, handle)
            try:
                async with self._sem:
                    changed = await asyncio.to_thread(self._apply_capture, workload, handle)
            except BaseException:
                await listeners.close()
                raise
            self._open[uid] = listeners
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = _reason(exc)
            self.stats.setup_failures += 1
            log.warning(
                "pod %s (uid %s): setup failed (attempt %d): %s",
                label,
                uid,
                action.attempt,
                reason,
            )
            self._dispatch(SetupFailed(uid=uid, reason=reason, now=self._clock()))
            return
        self.stats.setups += 1
        if not changed:
            self.stats.adopted += 1
        log.info(
            "pod %s (uid %s): ready in %.0f ms: capture %s, listening on %s in %s",
            label,
            uid,
            (self._clock() - started) * 1000,
            "installed" if changed else "already in place (adopted)",
            ",".join(map(str, listeners.ports)),
            handle,
        )
        if self._on_setup is not None:
            self._on_setup(self._clock() - started)
        self._dispatch(SetupDone(uid=uid, now=self._clock()))
        if self.state_of(uid) is PodState.READY:
            self._annotate(uid)

    async def _teardown(self, action: StartTeardown) -> None:
        async with self._lock(action.uid):
            await self._teardown_locked(action)
        self._forget_lock(action.uid)

    async def _teardown_locked(self, action: StartTeardown) -> None:
        """Close the pod's listeners. Capture is removed only on a release: a pod that
        lost its record, or its namespace, keeps it (refused, never relayed in clear)."""
        uid = action.uid
        label = self._labels.get(uid, uid)
        handle = self._handle_for(uid, action.netns)
        try:
            listeners = self._open.pop(uid, None)
            if listeners is not None:
                await listeners.close(drain=self._drain)
            async with self._sem:
                alive = await asyncio.to_thread(self._alive, handle)
                if alive and action.remove_capture:
                    await asyncio.to_thread(self._capture.remove, handle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = _reason(exc)
            self.stats.teardown_failures += 1
            log.warning("pod %s (uid %s): teardown failed: %s", label, uid, reason)
            self._dispatch(TeardownFailed(uid=uid, reason=reason, now=self._clock()))
            return
        self.stats.teardowns += 1
        if not alive:
            log.info("pod %s (uid %s): namespace gone, listeners closed", label, uid)
        elif action.remove_capture:
            # Released: the pod lives on uncaptured, so peers must stop sending it
            # HBONE. A held pod keeps the annotation: it is still captured.
            self._unannotate(uid)
            log.info(
                "pod %s (uid %s): released: capture and listeners removed from %s",
                label,
                uid,
                handle,
            )
        else:
            self.stats.holds += 1
            log.warning(
                "pod %s (uid %s): listeners closed, capture kept in %s: its traffic is refused",
                label,
                uid,
                handle,
            )
        self._dispatch(TeardownDone(uid=uid, now=self._clock()))

    # -- drift ------------------------------------------------------------------

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._pod_locks.setdefault(uid, asyncio.Lock())

    def _forget_lock(self, uid: str) -> None:
        """Drop a pod's lock once nothing holds it and the pod is not in the lifecycle."""
        lock = self._pod_locks.get(uid)
        if lock is not None and not lock.locked() and uid not in self.lifecycle.pods:
            del self._pod_locks[uid]

    def _drift_finished(self, task: asyncio.Task[None]) -> None:
        self._drift_task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("node manager: drift check crashed", exc_info=task.exception())

    def _quiet(self) -> bool:
        """No scan running and no pod being set up."""
        return not self._scanning and not any(
            rec.state is PodState.CAPTURING for rec in self.lifecycle.pods.values()
        )

    async def _yield_to_new_pods(self) -> None:
        """New pods first: each re-apply is tens of ms of iptables work (measured: a pass
        over 73 pods took 2 s), and a pass over a full node running beside a scan or a
        setup doubled their time. Waits at most DRIFT_YIELD, so churn never stops it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRIFT_YIELD):
                while not self._quiet():
                    self._quieter.clear()
                    await self._quieter.wait()

    async def _repair_drift(self) -> None:
        """Re-apply every ready pod's capture; log, count and show what had to change."""
        ready = [u for u, r in self.lifecycle.pods.items() if r.state is PodState.READY]
        for uid in ready:
            await self._yield_to_new_pods()
            async with self._lock(uid):
                rec = self.lifecycle.pods.get(uid)
                workload = self._workloads.get(uid)
                if rec is None or rec.state is not PodState.READY or workload is None:
                    continue  # it moved on while others were checked
                assert rec.netns is not None
                handle = self._handle_for(uid, rec.netns)
                label = self._labels.get(uid, uid)
                try:
                    async with self._sem:
                        changed = await asyncio.to_thread(self._apply_capture, workload, handle)
                except Exception as exc:
                    self.stats.repair_failures += 1
                    why = f"capture drifted and could not be repaired: {_reason(exc)}"
                    log.warning("pod %s (uid %s): %s", label, uid, why)
                    self.lifecycle.note_error(uid, why)
                    continue
                if changed:
                    self.stats.repairs += 1
                    log.warning(
                        "pod %s (uid %s): capture in %s had drifted from the plan; repaired",
                        label,
                        uid,
                        handle,
                    )
                    self.lifecycle.note_error(uid, "capture had drifted from the plan; repaired")
                elif rec.last_error:
                    self.lifecycle.note_error(uid, "")  # in place again since the last check
        self._notify()

    # -- annotations ------------------------------------------------------------

    def _annotate(self, uid: str) -> None:
        workload = self._workloads.get(uid)
        ref = pod_ref(workload) if workload is not None else None
        if self._annotations is None or ref is None or self._stopping:
            return
        self._annotated[uid] = ref
        self._annotations.set_redirection(ref, True)

    def _unannotate(self, uid: str) -> None:
        workload = self._workloads.get(uid)
        ref = self._annotated.pop(uid, None) or (pod_ref(workload) if workload else None)
        if self._annotations is not None and ref is not None:
            self._annotations.set_redirection(ref, False)

    def _unannotate_all(self) -> None:
        """Every local pod, including those a previous agent annotated."""
        if self._annotations is None:
            return
        refs = set(self._annotated.values())
        refs.update(r for w in self._workloads.values() if (r := pod_ref(w)) is not None)
        self._annotated.clear()
        for ref in sorted(refs):
            self._annotations.set_redirection(ref, False)

    def _handle_for(self, uid: str, netns: Netns) -> NetnsHandle:
        """The freshest path to the namespace (a /proc path dies with its process)."""
        if self._scan is not None:
            _, handles = self._scan
            fresh = handles.get(netns.inode)
            if fresh is not None:
                return fresh
        return NetnsHandle(path=netns.path, inode=netns.inode)
