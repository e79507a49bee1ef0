"""The sandbox's Prometheus (`sandbox up --prometheus`): its config, and how it is run.

Istio's Prometheus addon (istio/istio `samples/addons/prometheus.yaml`) scrapes the
data plane with its `kubernetes-pods` job: every pod annotated
`prometheus.io/scrape: "true"`, at the annotated port and path, with `honor_labels`,
each series labelled with the pod's labels (labelmap of `__meta_kubernetes_pod_label_*`,
so `app.kubernetes.io/name` becomes `app_kubernetes_io_name`), `namespace`, `pod` and
`node`. Istio's dashboards group and select by those (`pod`, `namespace`, `app`) and by
the series' own labels.

The sandbox has no service discovery Prometheus can use, so the same job lists its
targets statically, each with the labels that relabelling gives the pod on a cluster:

* each node's agent, the DaemonSet's pod on that node: at the node's IP (host network),
  port 15020, path /metrics, in namespace istio-system, named as the sandbox names it
  (`nodeagent-<node>`, its POD_NAME), with the pod labels of
  daemonset/kustomize/base/daemonset.yaml (`app: ztunnel` among them);
* the waypoint pod, when there is one: at its pod IP, port 15020, path
  /stats/prometheus, with its labels in the sandbox's API plus the
  `gateway.networking.k8s.io/gateway-name` label Istio gives waypoint pods.

Everything here is pure: the manager writes the file and starts the process.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nodeagent.model.constants import METRICS_PORT
from nodeagent.model.enrollment import DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE
from nodeagent.sandbox.plan import SandboxPlan

PROMETHEUS_KIND = "prometheus"
PROMETHEUS_NAME = "prometheus"
PROMETHEUS_BINARY = "prometheus"  # Debian's package `prometheus` (scripts/setup.sh)
PROMETHEUS_PORT = 9090
# The name of Istio's addon job for annotated pods: a panel filtering on `job` finds it.
JOB = "kubernetes-pods"
# Short, so a test sees traffic in Prometheus a second or two after it happened.
SCRAPE_INTERVAL = "1s"
RETENTION = "1d"  # a sandbox lives minutes; its data dir goes with it at `down`
CONFIG_FILE = "prometheus.yml"
DATA_DIR = "data"

# Where the DaemonSet's agents run and what their pods are called in the sandbox
# (manager._agent_specs sets POD_NAME to the same).
AGENT_NAMESPACE = "istio-system"
AGENT_POD_PREFIX = "nodeagent-"
# The agent pods' labels, as daemonset/kustomize/base/daemonset.yaml's pod template
# has them (a unit test holds the two equal).
AGENT_POD_LABELS: dict[str, str] = {
    "app": "ztunnel",
    "app.kubernetes.io/name": "nodeagent",
    DATAPLANE_MODE_LABEL: DATAPLANE_MODE_NONE,
    "sidecar.istio.io/inject": "false",
}
AGENT_METRICS_PATH = "/metrics"
# As Istio's waypoints (Envoy) are annotated, and as daemonset/kustomize/waypoint is.
WAYPOINT_METRICS_PATH = "/stats/prometheus"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def label_name(kubernetes_label: str) -> str:
    """The Prometheus label a Kubernetes pod label becomes through the addon's labelmap
    (service discovery replaces every character outside [a-zA-Z0-9_] with `_`)."""
    return _INVALID_LABEL_CHARS.sub("_", kubernetes_label)


@dataclass(frozen=True, kw_only=True)
class ScrapeTarget:
    """One pod Prometheus scrapes, with the labels the addon's relabelling gives it."""

    address: str
    metrics_path: str
    namespace: str
    pod: str
    node: str
    pod_labels: dict[str, str]

    def static_config(self) -> dict[str, Any]:
        labels = {label_name(k): v for k, v in sorted(self.pod_labels.items())}
        # The addon's own target labels come after the labelmap and win over it.
        labels.update(
            {
                "__metrics_path__": self.metrics_path,
                "namespace": self.namespace,
                "pod": self.pod,
                "node": self.node,
            }
        )
        return {"targets": [self.address], "labels": labels}


def scrape_targets(plan: SandboxPlan) -> list[ScrapeTarget]:
    """Every agent of the sandbox, then its waypoint (if it has one)."""
    targets = [
        ScrapeTarget(
            address=f"{node.ip}:{METRICS_PORT}",
            metrics_path=AGENT_METRICS_PATH,
            namespace=AGENT_NAMESPACE,
            pod=f"{AGENT_POD_PREFIX}{node.name}",
            node=node.name,
            pod_labels=dict(AGENT_POD_LABELS),
        )
        for node in plan.nodes
    ]
    wp = plan.waypoint
    if wp is not None:
        targets.append(
            ScrapeTarget(
                address=f"{wp.ip}:{METRICS_PORT}",
                metrics_path=WAYPOINT_METRICS_PATH,
                namespace=wp.namespace,
                pod=wp.name,
                node=wp.node,
                pod_labels={
                    **wp.labels(plan.name),
                    DATAPLANE_MODE_LABEL: DATAPLANE_MODE_NONE,
                    GATEWAY_NAME_LABEL: wp.name,
                },
            )
        )
    return targets


def build_config(plan: SandboxPlan) -> dict[str, Any]:
    """prometheus.yml for sandbox `plan`, as a dict."""
    return {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "scrape_configs": [
            # As in Istio's addon: Prometheus scrapes itself.
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"localhost:{PROMETHEUS_PORT}"]}],
            },
            {
                "job_name": JOB,
                # As the addon: a label the target exposes wins over the target's.
                "honor_labels": True,
                "static_configs": [t.static_config() for t in scrape_targets(plan)],
            },
        ],
    }


def render_config(plan: SandboxPlan) -> str:
    header = (
        f"# Sandbox {plan.name}'s Prometheus (nodeagent sandbox up --prometheus): Istio's\n"
        f"# addon job {JOB!r}, with static targets labelled as its relabelling would.\n"
    )
    return header + yaml.safe_dump(build_config(plan), sort_keys=False)


def find_binary() -> str | None:
    return shutil.which(PROMETHEUS_BINARY)


def argv(binary: str, directory: Path) -> tuple[str, ...]:
    """The command line: config and data in `directory` (under the sandbox's state
    dir), listening on every address of the underlay namespace."""
    return (
        binary,
        f"--config.file={directory / CONFIG_FILE}",
        f"--storage.tsdb.path={directory / DATA_DIR}",
        f"--storage.tsdb.retention.time={RETENTION}",
        f"--web.listen-address=0.0.0.0:{PROMETHEUS_PORT}",
    )
