"""The sandbox's Kubernetes API: what it holds, and how `sandbox label` changes it.

Every sandbox runs one in-memory API server (nodeagent.sandbox.kubeapi) in its
underlay namespace, so each node's agent decides enrollment exactly as on a
cluster: it lists and watches the pods on its node and the namespaces. It starts
with the sandbox's namespaces (the demo namespace labelled
`istio.io/dataplane-mode=ambient`, so every demo pod is in the mesh) and one Pod
object per pod (node, labels, address, service account). `sandbox label` and
`sandbox annotate` patch labels or annotations live, as `kubectl label` would.

Pure but for `patch_object`, which speaks HTTP/1.1 over a socket the caller has
opened in the underlay namespace.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from nodeagent.model.enrollment import (
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_LABEL,
    DATAPLANE_MODE_NONE,
)
from nodeagent.sandbox.plan import PodPlan, SandboxPlan

KUBEAPI_PORT = 6443
KUBEAPI_KIND = "kubeapi"
AGENT_DAEMONSET = ("istio-system", "nodeagent")  # the agents' POD_NAMESPACE and default name
MERGE_PATCH = "application/merge-patch+json"
_KEY = re.compile(
    r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


class KubeEditError(ValueError):
    """A `sandbox label` / `annotate` argument or answer that is not usable."""


def seed_objects(plan: SandboxPlan) -> list[dict[str, Any]]:
    """The objects the sandbox's API server starts with."""
    namespaces = sorted({p.namespace for p in plan.wired_pods()})
    objects: list[dict[str, Any]] = [
        {
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {DATAPLANE_MODE_LABEL: DATAPLANE_MODE_AMBIENT}},
        }
        for ns in namespaces
    ]
    objects.extend(_pod_object(plan.name, pod) for pod in plan.pods)
    if plan.waypoint is not None:
        # As Istio's waypoint template does: the waypoint is the mesh, never captured.
        waypoint = _pod_object(plan.name, plan.waypoint)
        waypoint["metadata"]["labels"][DATAPLANE_MODE_LABEL] = DATAPLANE_MODE_NONE
        objects.append(waypoint)
    # The agents' own DaemonSet: present, so an agent stopped by SIGTERM takes it as an
    # upgrade and leaves the pods' rules in place (fail closed), as before.
    objects.append(
        {
            "kind": "DaemonSet",
            "metadata": {"name": AGENT_DAEMONSET[1], "namespace": AGENT_DAEMONSET[0]},
        }
    )
    return objects


def _pod_object(sandbox: str, pod: PodPlan) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": f"{sandbox}-{pod.name}",
            "labels": pod.labels(sandbox),
            "annotations": {},
        },
        "spec": {
            "nodeName": pod.node,
            "serviceAccountName": pod.service_account,
            "containers": [{"name": pod.app}],
        },
        "status": {"podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "phase": "Running"},
    }


def parse_changes(items: Sequence[str]) -> dict[str, str | None]:
    """`key=value` sets, `key-` removes (kubectl's syntax); keys are checked."""
    if not items:
        raise KubeEditError("nothing to change: give key=value or key-")
    changes: dict[str, str | None] = {}
    for item in items:
        if item.endswith("-") and "=" not in item:
            key, value = item[:-1], None
        elif "=" in item:
            key, _, value = item.partition("=")
        else:
            raise KubeEditError(f"{item!r}: expected key=value or key-")
        if not _KEY.match(key):
            raise KubeEditError(f"{item!r}: {key!r} is not a valid label or annotation key")
        changes[key] = value
    return changes


def object_path(target: str, plan: SandboxPlan) -> str:
    """`namespace/NS` or `pod/NAME` (or `pod/NS/NAME`) to its API path."""
    kind, _, rest = target.partition("/")
    if kind in ("namespace", "ns") and rest and "/" not in rest:
        return f"/api/v1/namespaces/{quote(rest, safe='')}"
    if kind in ("pod", "po") and rest:
        namespace, _, name = rest.rpartition("/")
        if not namespace:
            pod = plan.pod(name)
            if pod is None:
                known = ", ".join(p.name for p in plan.wired_pods())
                raise KubeEditError(f"no pod {name!r} in sandbox {plan.name} (pods: {known})")
            namespace = pod.namespace
        return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
    raise KubeEditError(f"{target!r}: expected namespace/NAME or pod/NAME")


def metadata_patch(field: str, changes: Mapping[str, str | None]) -> dict[str, Any]:
    """A JSON merge patch of `labels` or `annotations` (None deletes a key)."""
    return {"metadata": {field: dict(changes)}}


def patch_object(
    sock: socket.socket, host: str, path: str, patch: Mapping[str, Any], token: str = ""
) -> dict[str, Any]:
    """PATCH over `sock` (already connected); the object, or KubeEditError naming why."""
    body = json.dumps(patch).encode()
    head = [
        f"PATCH {path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Type: {MERGE_PATCH}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if token:
        head.append(f"Authorization: Bearer {token}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    response = http.client.HTTPResponse(sock)
    response.begin()
    raw = response.read()
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {}
    if response.status != 200:
        message = answer.get("message") if isinstance(answer, dict) else None
        raise KubeEditError(f"PATCH {path}: {response.status} {message or raw[:200]!r}")
    return answer if isinstance(answer, dict) else {}


def describe(obj: Mapping[str, Any], fields: Iterable[str] = ("labels", "annotations")) -> str:
    meta = obj.get("metadata") or {}
    name = "/".join(x for x in (meta.get("namespace"), meta.get("name")) if x)
    parts = [f"{f}: {json.dumps(meta.get(f) or {}, sort_keys=True)}" for f in fields]
    return f"{name} " + ", ".join(parts)
