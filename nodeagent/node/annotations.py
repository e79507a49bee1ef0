"""The `ambient.istio.io/redirection` annotation on the pods this agent captures.

istiod advertises a pod as reachable over HBONE only when the pod carries
`ambient.istio.io/redirection: enabled`; in stock Istio istio-cni writes it
once capture is in place. Here the node manager asks for it when a pod reaches
ready, and for its removal when capture is removed from a live pod (the pod
left the mesh, or uninstall).

`PodAnnotationManager` keeps the wanted value per pod and one worker per pod
with work to do, which

1. reads the pod (404: gone, nothing to do; another node's pod: not ours to touch),
2. stops if the annotation is already as wanted (an agent restart writes nothing),
3. patches it, conditional on the resourceVersion it read (409: read again).

Anything else (no answer, 403, 5xx) is logged and retried with backoff, for
as long as the agent runs. Asking never blocks and never fails: capture does
not wait for the API server. The latest wish wins: a pod that is removed and
set up again before the first patch went out ends up annotated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from nodeagent.kube.api import KubeApi, pod_view, redirection_patch
from nodeagent.model.constants import REDIRECTION_ANNOTATION
from nodeagent.model.workload import Workload
from nodeagent.node.lifecycle import Backoff

log = logging.getLogger(__name__)

# A 409 means the pod changed between our read and our patch (the kubelet
# updates status often around a pod's start): read again at once, a few times,
# before backing off.
CONFLICT_RETRIES = 3


@dataclass(frozen=True, slots=True, order=True)
class PodRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_ref(workload: Workload) -> PodRef | None:
    """The Kubernetes pod behind a workload record, or None if it is not a pod.

    istiod names a pod's workload `<cluster>//Pod/<namespace>/<name>` and gives
    it the pod's name and namespace; other workloads (a WorkloadEntry, say)
    have another kind in that place and no pod to annotate.
    """
    parts = workload.uid.split("/")
    if len(parts) == 5 and parts[2] != "Pod":
        return None
    if not workload.name or not workload.namespace:
        return None
    return PodRef(workload.namespace, workload.name)


class AnnotationError(RuntimeError):
    """The API server answered, but not with what we asked for."""


@dataclass
class AnnotationStats:
    patches: int = 0  # patches the API server accepted
    failures: int = 0  # attempts that failed and were retried


class PodAnnotationManager:
    """Drives each local pod's redirection annotation towards the wanted value."""

    def __init__(self, api: KubeApi, *, node_name: str, backoff: Backoff | None = None) -> None:
        self._api = api
        self._node = node_name
        self._backoff = backoff or Backoff(initial=1.0, cap=30.0)
        self._wanted: dict[PodRef, bool] = {}
        self._workers: dict[PodRef, asyncio.Task[None]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.stats = AnnotationStats()

    def set_redirection(self, ref: PodRef, enabled: bool) -> None:
        """Ask for the annotation on (or off) the pod; returns at once."""
        if self._closed:
            return
        self._wanted[ref] = enabled
        if ref not in self._workers:
            self._idle.clear()
            self._workers[ref] = asyncio.create_task(self._work(ref), name=f"annotate-{ref}")

    @property
    def pending(self) -> list[PodRef]:
        """Pods whose annotation is not yet as wanted."""
        return sorted(self._workers)

    async def wait_idle(self) -> None:
        """Until no pod has work left (callers bound it with asyncio.timeout)."""
        await self._idle.wait()

    async def flush(self, grace: float) -> bool:
        """Wait up to `grace` seconds for the work to finish; True if it did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        return not self._workers

    async def close(self) -> None:
        """Stop every worker; unfinished work is dropped (logged)."""
        self._closed = True
        workers = list(self._workers.values())
        if workers:
            log.info(
                "annotations: giving up on %d pod(s): %s",
                len(workers),
                ", ".join(map(str, self.pending)),
            )
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    # -- work -----------------------------------------------------------------

    async def _work(self, ref: PodRef) -> None:
        try:
            await self._converge(ref)
        finally:
            # Synchronously with the last check of the wish: a wish made after
            # this point starts a new worker instead of landing on a dead one.
            if self._workers.get(ref) is asyncio.current_task():
                del self._workers[ref]
            if not self._workers:
                self._idle.set()

    async def _converge(self, ref: PodRef) -> None:
        attempt = 0
        while True:
            enabled = self._wanted[ref]
            try:
                await self._apply(ref, enabled)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no answer, or an answer we cannot use
                attempt += 1
                self.stats.failures += 1
                delay = self._backoff.delay(attempt)
                log.warning(
                    "pod %s: cannot %s annotation %s (attempt %d, retrying in %.1f s): %s",
                    ref,
                    "set" if enabled else "remove",
                    REDIRECTION_ANNOTATION,
                    attempt,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            if self._wanted.get(ref) == enabled:
                del self._wanted[ref]
                return
            attempt = 0  # asked for the other value meanwhile: go again

    async def _apply(self, ref: PodRef, enabled: bool) -> None:
        """One attempt; returns when the pod is as wanted (or gone, or not ours)."""
        for _ in range(CONFLICT_RETRIES):
            got = await self._api.get_pod(ref.namespace, ref.name)
            if got.status == 404:
                log.debug("pod %s: gone; no annotation to change", ref)
                return
            if not got.ok:
                raise AnnotationError(f"GET pod {ref}: {got.describe()}")
            pod = pod_view(got.body)
            if pod.node_name != self._node:
                # The workload record and the API disagree about the pod; never
                # annotate a pod another node's agent is responsible for.
                log.warning(
                    "pod %s: runs on node %r, not %r; leaving its annotation alone",
                    ref,
                    pod.node_name,
                    self._node,
                )
                return
            if pod.redirected if enabled else pod.redirection is None:
                return  # already as wanted: an agent restart writes nothing
            patch = redirection_patch(enabled=enabled, resource_version=pod.resource_version)
            done = await self._api.patch_pod(ref.namespace, ref.name, patch)
            if done.status == 409:
                continue
            if done.status == 404:
                return
            if not done.ok:
                raise AnnotationError(f"PATCH pod {ref}: {done.describe()}")
            self.stats.patches += 1
            log.info(
                "pod %s: annotation %s %s",
                ref,
                REDIRECTION_ANNOTATION,
                "set" if enabled else "removed",
            )
            return
        raise AnnotationError(f"PATCH pod {ref}: conflict {CONFLICT_RETRIES} times in a row")
