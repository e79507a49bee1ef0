"""The sandbox's Prometheus config: Istio's addon job, one target per agent and the
waypoint, labelled as the addon's relabelling labels the cluster's pods."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.sandbox import prometheus as prom
from nodeagent.sandbox.manager import SandboxError, SandboxManager
from nodeagent.sandbox.plan import build_plan
from nodeagent.sandbox.state import SandboxState, StateStore

REPO = Path(__file__).resolve().parents[3]
DAEMONSET = REPO / "daemonset" / "kustomize" / "base" / "daemonset.yaml"
WAYPOINT_DEPLOYMENT = REPO / "daemonset" / "kustomize" / "waypoint" / "deployment.yaml"


def pods_job(config: dict[str, Any]) -> dict[str, Any]:
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == prom.JOB]
    return job


def by_address(config: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        target: sc["labels"]
        for sc in pods_job(config)["static_configs"]
        for target in sc["targets"]
    }


def test_every_agent_is_scraped_at_its_node_ip_as_the_daemonsets_pod() -> None:
    config = prom.build_config(build_plan("s", 3, 2))
    job = pods_job(config)
    assert job["honor_labels"] is True  # as Istio's addon
    targets = by_address(config)
    assert sorted(targets) == ["172.30.0.11:15020", "172.30.0.12:15020", "172.30.0.13:15020"]
    assert targets["172.30.0.12:15020"] == {
        "__metrics_path__": "/metrics",
        "namespace": "istio-system",
        "pod": "nodeagent-node2",
        "node": "node2",
        "app": "ztunnel",
        "app_kubernetes_io_name": "nodeagent",
        "istio_io_dataplane_mode": "none",
        "sidecar_istio_io_inject": "false",
    }


def test_scrapes_every_second() -> None:
    config = prom.build_config(build_plan("s", 2, 2))
    assert config["global"]["scrape_interval"] == "1s"
    assert config["global"]["scrape_timeout"] == "1s"


def test_the_waypoint_is_scraped_at_its_pod_ip_when_there_is_one() -> None:
    assert len(by_address(prom.build_config(build_plan("s", 2, 2)))) == 2
    plan = build_plan("s", 2, 2, waypoint=True)
    assert plan.waypoint is not None
    labels = by_address(prom.build_config(plan))[f"{plan.waypoint.ip}:15020"]
    assert labels["__metrics_path__"] == "/stats/prometheus"
    assert (labels["namespace"], labels["pod"], labels["node"]) == ("demo", "waypoint", "node1")
    assert labels["gateway_networking_k8s_io_gateway_name"] == "waypoint"
    assert labels["istio_io_dataplane_mode"] == "none"


def test_agent_labels_are_the_daemonset_pod_templates() -> None:
    template = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["metadata"]
    assert template["labels"] == prom.AGENT_POD_LABELS
    annotations = template["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15020"
    assert annotations["prometheus.io/path"] == prom.AGENT_METRICS_PATH


def test_waypoint_path_is_the_waypoint_manifests() -> None:
    template = yaml.safe_load(WAYPOINT_DEPLOYMENT.read_text())["spec"]["template"]["metadata"]
    assert template["annotations"]["prometheus.io/path"] == prom.WAYPOINT_METRICS_PATH


def test_agent_pod_name_is_the_one_the_sandbox_gives_the_agent(tmp_path: Path) -> None:
    plan = build_plan("s", 2, 1)
    manager = SandboxManager(store=StateStore(tmp_path))
    specs = manager._agent_specs(plan, {})
    pods = {t.node: t.pod for t in prom.scrape_targets(plan)}
    assert {s.env["NODE_NAME"]: s.env["POD_NAME"] for s in specs if s.env} == pods


@pytest.mark.parametrize(
    ("kube", "prometheus"),
    [
        ("app", "app"),
        ("app.kubernetes.io/name", "app_kubernetes_io_name"),
        ("gateway.networking.k8s.io/gateway-name", "gateway_networking_k8s_io_gateway_name"),
    ],
)
def test_label_names_are_sanitized_as_kubernetes_sd_does(kube: str, prometheus: str) -> None:
    assert prom.label_name(kube) == prometheus


def test_rendered_file_is_the_config_and_promtool_accepts_it(tmp_path: Path) -> None:
    plan = build_plan("s", 2, 2, waypoint=True)
    text = prom.render_config(plan)
    assert yaml.safe_load(text) == prom.build_config(plan)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's prometheus package brings it)")
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_argv_keeps_config_and_data_in_the_given_dir() -> None:
    argv = prom.argv("/usr/bin/prometheus", Path("/state/s/prometheus"))
    assert argv[0] == "/usr/bin/prometheus"
    assert "--config.file=/state/s/prometheus/prometheus.yml" in argv
    assert "--storage.tsdb.path=/state/s/prometheus/data" in argv
    assert "--web.listen-address=0.0.0.0:9090" in argv


def test_prometheus_spec_runs_in_the_underlay_and_records_its_address(tmp_path: Path) -> None:
    plan = build_plan("s", 2, 2)
    store = StateStore(tmp_path)
    assert store.claim(SandboxState(name="s", nodes=2, pods_per_node=2))
    spec = SandboxManager(store=store)._prometheus_spec(plan, "/usr/bin/prometheus")
    assert (spec.kind, spec.name, spec.netns) == ("prometheus", "prometheus", "s-underlay")
    config = tmp_path / "s" / "prometheus" / "prometheus.yml"
    assert yaml.safe_load(config.read_text()) == prom.build_config(plan)
    assert (tmp_path / "s" / "prometheus" / "data").is_dir()  # under the state dir: `down` rm's it
    state = store.load("s")
    assert state is not None
    assert state.extra["prometheus"] == {"address": "172.30.0.1:9090", "config": str(config)}


def test_prometheus_needs_the_agents() -> None:
    with pytest.raises(SandboxError, match="--no-agents"):
        SandboxManager._prometheus_binary(prometheus=True, agents=False)
    assert SandboxManager._prometheus_binary(prometheus=False, agents=False) is None
