"""Which pods the mesh captures: Istio ambient's enrollment rule, as pure data.

A pod is captured exactly when istio-cni would redirect it (istio/istio
`cni/pkg/util/podutil.go` and the enablement selector in `cni/pkg/nodeagent/`):

* its namespace or the pod itself is labelled `istio.io/dataplane-mode=ambient`;
* the pod does not set that label to anything else (`none` opts a pod out of an
  enrolled namespace; istio-cni treats any other explicit value the same way);
* it is not host-network (its "namespace" is the node's: rules there would
  capture the node);
* it has no sidecar: the `sidecar.istio.io/status` annotation (what injection
  writes) or a container named `istio-proxy` (a sidecar added by hand or as a
  native sidecar init container).

`PodMeta` and `NamespaceMeta` keep only what this rule and the agent's views
need, so a cache of them stays small.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT: Final = "ambient"
DATAPLANE_MODE_NONE: Final = "none"
SIDECAR_STATUS_ANNOTATION: Final = "sidecar.istio.io/status"
SIDECAR_CONTAINER: Final = "istio-proxy"


@dataclass(frozen=True, slots=True, kw_only=True)
class PodMeta:
    """The parts of a Kubernetes pod that enrollment and the agent's views read."""

    namespace: str
    name: str
    uid: str = ""
    node: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False
    containers: tuple[str, ...] = ()  # names of containers and init containers
    ips: tuple[str, ...] = ()
    service_account: str = ""
    resource_version: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceMeta:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


class Reason(enum.Enum):
    """Why a pod is, or is not, captured (`nodeagent pods` shows the value)."""

    NAMESPACE_LABELLED = "namespace labelled"
    POD_LABELLED = "pod labelled"
    NOT_LABELLED = "namespace not labelled"
    OPTED_OUT = "opted out"
    SIDECAR = "sidecar"
    HOST_NETWORK = "host network"


@dataclass(frozen=True, slots=True)
class Enrollment:
    enrolled: bool
    reason: Reason

    def describe(self) -> str:
        return self.reason.value


def enrollment(pod: PodMeta, namespace: NamespaceMeta | None) -> Enrollment:
    """Whether Istio ambient captures `pod` (its namespace's metadata, None if unknown)."""
    ns_labels = namespace.labels if namespace is not None else {}
    pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode is not None and pod_mode != DATAPLANE_MODE_AMBIENT:
        return Enrollment(False, Reason.OPTED_OUT)
    if pod_mode == DATAPLANE_MODE_AMBIENT:
        matched = Reason.POD_LABELLED
    elif ns_labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT:
        matched = Reason.NAMESPACE_LABELLED
    else:
        return Enrollment(False, Reason.NOT_LABELLED)
    if pod.host_network:
        return Enrollment(False, Reason.HOST_NETWORK)
    if SIDECAR_STATUS_ANNOTATION in pod.annotations or SIDECAR_CONTAINER in pod.containers:
        return Enrollment(False, Reason.SIDECAR)
    return Enrollment(True, matched)
