"""What the agent asks of the Kubernetes API server, as an interface and pure data.

The agent reads and patches pods (the `ambient.istio.io/redirection`
annotation) and reads its own DaemonSet at SIGTERM. `KubeApi` is that surface;
`nodeagent.kube.client.KubeClient` is the real one, wired in `app.py`. A call
that gets any HTTP answer returns it as an `ApiResponse`, whatever its status:
callers decide what a 404 or a 403 means for them. A call that gets no answer
(connection refused, TLS failure, timeout, unreadable token) raises `KubeError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodeagent.model.constants import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED
from nodeagent.model.enrollment import NamespaceMeta, PodMeta

# The JSON merge patch (RFC 7386): `null` deletes a key, and every API server
# version accepts it for every resource (strategic merge is pods-only sugar).
MERGE_PATCH = "application/merge-patch+json"


class KubeError(RuntimeError):
    """No answer from the API server; the message names the call and what failed."""


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """One answer: the HTTP status and the decoded JSON body ({} if there was none)."""

    status: int
    body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        """The API server's own explanation (a `Status` object's message), if any."""
        text = self.body.get("message") if isinstance(self.body, Mapping) else None
        return text if isinstance(text, str) else ""

    def describe(self) -> str:
        """`403 Forbidden: pods "x" is forbidden: ...` for logs and errors."""
        reason = self.body.get("reason") if isinstance(self.body, Mapping) else None
        head = f"{self.status} {reason}" if isinstance(reason, str) and reason else str(self.status)
        return f"{head}: {self.message}" if self.message else head


class KubeApi(Protocol):
    """The API server calls the agent makes (nodeagent.kube.client.KubeClient)."""

    async def get_pod(self, namespace: str, name: str) -> ApiResponse: ...

    async def patch_pod(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> ApiResponse: ...

    async def get_daemonset(self, namespace: str, name: str) -> ApiResponse: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PodView:
    """The parts of a pod object the annotation logic reads."""

    node_name: str
    resource_version: str
    redirection: str | None  # the annotation's value; None when absent

    @property
    def redirected(self) -> bool:
        return self.redirection == REDIRECTION_ENABLED


def pod_view(body: Mapping[str, Any]) -> PodView:
    """Read a pod object (as returned by GET /api/v1/namespaces/NS/pods/NAME)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    annotations = meta.get("annotations") or {}
    value = annotations.get(REDIRECTION_ANNOTATION)
    return PodView(
        node_name=str(spec.get("nodeName") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        redirection=value if isinstance(value, str) else None,
    )


def redirection_patch(*, enabled: bool, resource_version: str = "") -> dict[str, Any]:
    """The merge patch that sets (or, with `enabled=False`, removes) the annotation.

    With `resource_version` the patch only applies to the pod as it was read
    (the API server answers 409 Conflict otherwise), so a check of the pod's
    node and the patch that follows see the same object.
    """
    meta: dict[str, Any] = {
        "annotations": {REDIRECTION_ANNOTATION: REDIRECTION_ENABLED if enabled else None}
    }
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {"metadata": meta}


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


def pod_meta(body: Mapping[str, Any]) -> PodMeta:
    """The enrollment-relevant parts of a pod object (a list item or a watch event's)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    containers = [
        c.get("name")
        for key in ("initContainers", "containers")
        for c in (spec.get(key) or [])
        if isinstance(c, Mapping)
    ]
    ips = [p.get("ip") for p in (status.get("podIPs") or []) if isinstance(p, Mapping)]
    if not ips and status.get("podIP"):
        ips = [status.get("podIP")]
    return PodMeta(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        node=str(spec.get("nodeName") or ""),
        labels=_strings(meta.get("labels")),
        annotations=_strings(meta.get("annotations")),
        host_network=spec.get("hostNetwork") is True,
        containers=tuple(str(c) for c in containers if isinstance(c, str)),
        ips=tuple(str(ip) for ip in ips if isinstance(ip, str)),
        service_account=str(spec.get("serviceAccountName") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
    )


def namespace_meta(body: Mapping[str, Any]) -> NamespaceMeta:
    meta = body.get("metadata") or {}
    return NamespaceMeta(name=str(meta.get("name") or ""), labels=_strings(meta.get("labels")))
