"""Pods on this node and every namespace's labels, kept current from the API server.

Enrollment (nodeagent.model.enrollment) needs a pod's labels and annotations
and its namespace's labels. `KubeMetaCache` holds just that, as `PodMeta` and
`NamespaceMeta`, and never the raw objects; it is plain data with no I/O.
`KubeWatcher` fills it the way client-go's reflector does: LIST, then WATCH
from the list's resourceVersion; after a dropped or silent connection it
watches again from the last version it saw (bookmarks move that forward); after
410 Gone (the server no longer holds that version) it lists again and replaces
the cache, so objects deleted meanwhile disappear.

Memory stays bounded on a large cluster: pods are listed and watched with
`fieldSelector=spec.nodeName=<this node>`, so other nodes' pods never arrive,
and a namespace is kept as its name and labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from nodeagent.kube.api import ApiResponse, KubeError, namespace_meta, pod_meta
from nodeagent.kube.client import KubeStatusError
from nodeagent.model.enrollment import NamespaceMeta, PodMeta

log = logging.getLogger(__name__)

PODS_PATH = "/api/v1/pods"
NAMESPACES_PATH = "/api/v1/namespaces"
# The server ends each watch after this long; the client's read-idle timeout
# (nodeagent.kube.client.WATCH_IDLE_TIMEOUT) is a little longer.
WATCH_TIMEOUT_SECONDS = 300
# A watch that ends sooner than this without an event counts as a failure, so a
# server that closes every watch at once is not hammered.
MIN_HEALTHY_WATCH = 1.0
GONE = 410


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"
    ERROR = "ERROR"


class BadEvent(ValueError):
    """A watch event we cannot use; the message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchEvent:
    """One decoded watch event; `object` is only read, never kept."""

    type: EventType
    object: Mapping[str, Any]

    @property
    def resource_version(self) -> str:
        meta = self.object.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        return version if isinstance(version, str) else ""

    @property
    def code(self) -> int:
        """An ERROR event's status code (410: relist), 0 if it has none."""
        code = self.object.get("code")
        return code if isinstance(code, int) else 0


def parse_event(raw: Mapping[str, Any]) -> WatchEvent:
    """A watch line's event; raises BadEvent for an unknown type or a missing object."""
    kind = raw.get("type")
    try:
        type_ = EventType(kind)
    except ValueError:
        raise BadEvent(f"unknown event type {kind!r}") from None
    obj = raw.get("object")
    if not isinstance(obj, Mapping):
        raise BadEvent(f"{type_.value} event without an object")
    if type_ in (EventType.ADDED, EventType.MODIFIED, EventType.DELETED):
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping) or not meta.get("name"):
            raise BadEvent(f"{type_.value} event for an object without metadata.name")
    return WatchEvent(type=type_, object=obj)


class KubeMetaCache:
    """This node's pods (by namespace/name, IP and uid) and all namespaces; no I/O."""

    def __init__(self) -> None:
        self._pods: dict[str, PodMeta] = {}
        self._by_ip: dict[str, str] = {}
        self._by_uid: dict[str, str] = {}
        self._namespaces: dict[str, NamespaceMeta] = {}
        self._pods_listed = False
        self._namespaces_listed = False

    @property
    def synced(self) -> bool:
        """Both initial lists are applied: an absent pod or namespace really is absent."""
        return self._pods_listed and self._namespaces_listed

    # -- reading ---------------------------------------------------------------------

    def pods(self) -> tuple[PodMeta, ...]:
        return tuple(self._pods.values())

    def pod(self, key: str) -> PodMeta | None:
        """By `namespace/name`."""
        return self._pods.get(key)

    def pod_by_ip(self, ip: str) -> PodMeta | None:
        key = self._by_ip.get(ip)
        return self._pods.get(key) if key else None

    def pod_by_uid(self, uid: str) -> PodMeta | None:
        key = self._by_uid.get(uid)
        return self._pods.get(key) if key else None

    def namespace(self, name: str) -> NamespaceMeta | None:
        return self._namespaces.get(name)

    def namespaces(self) -> tuple[NamespaceMeta, ...]:
        return tuple(self._namespaces.values())

    # -- writing ---------------------------------------------------------------------

    def replace_pods(self, pods: Iterable[PodMeta]) -> None:
        """All pods, from a LIST: pods not in it are gone."""
        self._pods, self._by_ip, self._by_uid = {}, {}, {}
        for pod in pods:
            self._put(pod)
        self._pods_listed = True

    def replace_namespaces(self, namespaces: Iterable[NamespaceMeta]) -> None:
        self._namespaces = {ns.name: ns for ns in namespaces}
        self._namespaces_listed = True

    def apply_pod(self, type_: EventType, pod: PodMeta) -> bool:
        """One watch event; True if the cache changed."""
        old = self._pods.get(pod.key)
        if type_ is EventType.DELETED:
            if old is None:
                return False
            self._remove(old)
            return True
        if type_ not in (EventType.ADDED, EventType.MODIFIED) or old == pod:
            return False
        if old is not None:
            self._remove(old)
        self._put(pod)
        return True

    def apply_namespace(self, type_: EventType, namespace: NamespaceMeta) -> bool:
        """One watch event; True if the cache changed."""
        old = self._namespaces.get(namespace.name)
        if type_ is EventType.DELETED:
            return self._namespaces.pop(namespace.name, None) is not None
        if type_ not in (EventType.ADDED, EventType.MODIFIED) or old == namespace:
            return False
        self._namespaces[namespace.name] = namespace
        return True

    def _put(self, pod: PodMeta) -> None:
        self._pods[pod.key] = pod
        if pod.uid:
            self._by_uid[pod.uid] = pod.key
        # A host-network pod's IPs are the node's, shared by all such pods.
        if not pod.host_network:
            for ip in pod.ips:
                self._by_ip[ip] = pod.key

    def _remove(self, pod: PodMeta) -> None:
        del self._pods[pod.key]
        if self._by_uid.get(pod.uid) == pod.key:
            del self._by_uid[pod.uid]
        for ip in pod.ips:
            if self._by_ip.get(ip) != pod.key:
                continue
            del self._by_ip[ip]
            # A finished pod's IP may be reused: another pod may still hold it.
            for other in self._pods.values():
                if ip in other.ips and not other.host_network:
                    self._by_ip[ip] = other.key


class KubeListWatchApi(Protocol):
    """The two calls the watcher makes (nodeagent.kube.client.KubeClient)."""

    async def list(self, path: str, params: Mapping[str, str] | None = None) -> ApiResponse: ...

    def watch(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> AsyncGenerator[dict[str, Any], None]: ...


def default_backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (1, 2, ...): 0.5 s doubling, capped at 30 s."""
    return float(min(30.0, 0.5 * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True, slots=True)
class _Resource:
    name: str  # for logs: "pods", "namespaces"
    path: str
    params: Mapping[str, str]  # selectors, on both the LIST and the WATCH
    replace: Callable[[list[Mapping[str, Any]]], None]
    apply: Callable[[EventType, Mapping[str, Any]], None]


class _WatchEnd(enum.Enum):
    ENDED = "ended"  # the server closed it (timeoutSeconds)
    LOST = "lost"  # connection failed, dropped or silent; or an error status
    GONE = "gone"  # 410: the version is too old, relist


class KubeWatcher:
    """Keeps a `KubeMetaCache` current: LIST+WATCH of this node's pods and of namespaces.

    `on_change()` is called after every applied list or event. `run()` returns
    only by cancellation; failures are logged and retried with `backoff`.
    """

    def __init__(
        self,
        api: KubeListWatchApi,
        node_name: str,
        cache: KubeMetaCache,
        on_change: Callable[[], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff: Callable[[int], float] = default_backoff,
        watch_timeout: int = WATCH_TIMEOUT_SECONDS,
    ) -> None:
        self._api = api
        self._node = node_name
        self._cache = cache
        self._on_change = on_change
        self._clock = clock
        self._sleep = sleep
        self._backoff = backoff
        self._watch_timeout = watch_timeout
        self.pods = _Resource(
            "pods",
            PODS_PATH,
            {"fieldSelector": f"spec.nodeName={node_name}"},
            self._replace_pods,
            self._apply_pod,
        )
        self.namespaces = _Resource(
            "namespaces", NAMESPACES_PATH, {}, self._replace_namespaces, self._apply_namespace
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for resource in (self.pods, self.namespaces):
                group.create_task(self._follow(resource), name=f"kube-watch-{resource.name}")

    # -- one resource: list, watch, and again ------------------------------------------

    async def _follow(self, resource: _Resource) -> None:
        version: str | None = None  # None: list first
        failures = 0
        while True:
            if version is None:
                version = await self._list(resource)
                if version is None:
                    failures += 1
                    await self._sleep(self._backoff(failures))
                    continue
            started = self._clock()
            end, version, delivered = await self._watch(resource, version)
            # Only a watch that lasted or carried events resets the backoff; a lost
            # one always waits a little, as the server may be restarting.
            healthy = delivered or self._clock() - started >= MIN_HEALTHY_WATCH
            failures = 0 if healthy else failures + 1
            if end is _WatchEnd.LOST:
                failures = max(failures, 1)
            if end is _WatchEnd.GONE:
                log.info(
                    "%s watch: version %s is gone (410); listing again", resource.name, version
                )
                version = None
            if failures:
                await self._sleep(self._backoff(failures))

    async def _list(self, resource: _Resource) -> str | None:
        """LIST and replace the cache; the list's resourceVersion, or None on failure."""
        try:
            answer = await self._api.list(resource.path, resource.params)
        except KubeError as exc:
            log.warning("%s list failed: %s", resource.name, exc)
            return None
        if not answer.ok:
            log.warning("%s list failed: %s", resource.name, answer.describe())
            return None
        items = answer.body.get("items")
        meta = answer.body.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        if not isinstance(items, list) or not isinstance(version, str):
            log.warning("%s list: no items or resourceVersion in the answer", resource.name)
            return None
        resource.replace([item for item in items if isinstance(item, Mapping)])
        log.info("%s listed: %d at version %s", resource.name, len(items), version)
        self._changed()
        return version

    async def _watch(self, resource: _Resource, version: str) -> tuple[_WatchEnd, str, bool]:
        """Follow one WATCH until it ends: (why, the last version seen, whether any
        object event arrived)."""
        params = {
            **resource.params,
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._watch_timeout),
        }
        delivered = False
        try:
            async with contextlib.aclosing(self._api.watch(resource.path, params)) as events:
                async for raw in events:
                    try:
                        event = parse_event(raw)
                    except BadEvent as exc:
                        log.warning("%s watch: skipped an event: %s", resource.name, exc)
                        continue
                    if event.type is EventType.ERROR:
                        if event.code == GONE:
                            return _WatchEnd.GONE, version, delivered
                        log.warning(
                            "%s watch: error event %s: %s",
                            resource.name,
                            event.code,
                            event.object.get("message", ""),
                        )
                        return _WatchEnd.LOST, version, delivered
                    if event.type is not EventType.BOOKMARK:
                        resource.apply(event.type, event.object)
                        delivered = True
                        self._changed()
                    version = event.resource_version or version
        except KubeStatusError as exc:
            if exc.status == GONE:
                return _WatchEnd.GONE, version, delivered
            log.warning("%s watch refused: %s", resource.name, exc)
            return _WatchEnd.LOST, version, delivered
        except KubeError as exc:
            log.warning("%s watch lost at version %s: %s", resource.name, version, exc)
            return _WatchEnd.LOST, version, delivered
        log.debug("%s watch ended by the server at version %s", resource.name, version)
        return _WatchEnd.ENDED, version, delivered

    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:
            # A consumer's bug must not stop the cache from following the cluster.
            log.exception("on_change failed")

    # -- what each resource keeps --------------------------------------------------------

    def _replace_pods(self, items: list[Mapping[str, Any]]) -> None:
        pods = (pod_meta(item) for item in items)
        self._cache.replace_pods(pod for pod in pods if pod.node == self._node)

    def _apply_pod(self, type_: EventType, obj: Mapping[str, Any]) -> None:
        pod = pod_meta(obj)
        if pod.node != self._node:
            # Not ours (a server that ignores the field selector): never kept.
            type_ = EventType.DELETED
        self._cache.apply_pod(type_, pod)

    def _replace_namespaces(self, items: list[Mapping[str, Any]]) -> None:
        self._cache.replace_namespaces(namespace_meta(item) for item in items)

    def _apply_namespace(self, type_: EventType, obj: Mapping[str, Any]) -> None:
        self._cache.apply_namespace(type_, namespace_meta(obj))
