"""The kustomize overlays render, validate offline, and say what the agent needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from nodeagent import config as agent_config
from nodeagent.kube.client import DEFAULT_TIMEOUT as KUBE_TIMEOUT
from nodeagent.model import constants

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "validate_manifests.py"

Objects = list[dict[str, Any]]


def one(objs: Objects, kind: str) -> dict[str, Any]:
    found = [o for o in objs if o.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def agent_container(objs: Objects) -> dict[str, Any]:
    containers = one(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["nodeagent"]
    return containers[0]


def settings(objs: Objects) -> dict[str, str]:
    maps = [o for o in objs if o["kind"] == "ConfigMap"]
    assert [m["metadata"]["name"].startswith("nodeagent-config-") for m in maps] == [True]
    return dict(maps[0]["data"])


def run_validator(*dirs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, dirs)],
        capture_output=True,
        text=True,
        check=False,
    )


# ---- every overlay renders and validates ------------------------------------------


def test_default_targets_cover_the_overlays_the_ebpf_component_and_the_waypoint(
    validator: ModuleType,
) -> None:
    names = [t.name for t in validator.default_targets()]
    assert names == [
        "overlay kind",
        "overlay production",
        "component ebpf (on production)",
        "kustomization waypoint",
    ]


def test_every_overlay_renders_and_validates_against_kubernetes_schemas() -> None:
    result = run_validator()
    assert result.returncode == 0, result.stderr
    assert "overlay kind" in result.stdout and "overlay production" in result.stdout


# ---- a broken manifest fails, naming where ---------------------------------------


def test_unknown_field_fails_naming_overlay_object_and_field(kustomize_copy: Path) -> None:
    ds = kustomize_copy / "base" / "daemonset.yaml"
    ds.write_text(ds.read_text().replace("hostNetwork: true", "hostNetwrok: true", 1))
    result = run_validator(kustomize_copy / "overlays" / "kind")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "overlays/kind" in line
    assert "DaemonSet istio-system/nodeagent" in line
    assert "spec.template.spec" in line and "'hostNetwrok' was unexpected" in line


def test_wrong_field_type_fails_naming_the_field_path(kustomize_copy: Path) -> None:
    ds = kustomize_copy / "base" / "daemonset.yaml"
    text = ds.read_text().replace("containerPort: 15021", "containerPort: fifteen", 1)
    ds.write_text(text)
    result = run_validator(kustomize_copy / "overlays" / "production")
    assert result.returncode == 1
    assert "DaemonSet istio-system/nodeagent" in result.stderr
    assert "spec.template.spec.containers[0].ports[1].containerPort" in result.stderr
    assert "'fifteen' is not of type 'integer'" in result.stderr


def test_setting_the_agent_refuses_fails_naming_the_setting(kustomize_copy: Path) -> None:
    env = kustomize_copy / "base" / "settings.env"
    text = env.read_text().replace("REDIRECT_BACKEND=iptables", "REDIRECT_BACKEND=nftables")
    env.write_text(text)
    result = run_validator(kustomize_copy / "overlays" / "production")
    assert result.returncode == 1
    assert "ConfigMap istio-system/nodeagent-config-" in result.stderr
    assert "'redirect_backend'" in result.stderr and "nftables" in result.stderr


def test_unknown_setting_name_fails(kustomize_copy: Path) -> None:
    env = kustomize_copy / "base" / "settings.env"
    env.write_text(env.read_text() + "XDS_ADRESS=https://istiod.istio-system.svc:15012\n")
    result = run_validator(kustomize_copy / "overlays" / "kind")
    assert result.returncode == 1
    assert "data.XDS_ADRESS: not a nodeagent setting" in result.stderr


def test_kustomization_that_does_not_render_fails_naming_it(kustomize_copy: Path) -> None:
    (kustomize_copy / "base" / "rbac.yaml").unlink()
    result = run_validator(kustomize_copy / "overlays" / "kind")
    assert result.returncode == 1
    assert "overlays/kind: render:" in result.stderr


# ---- what the rendered DaemonSet must carry ---------------------------------------


@pytest.mark.parametrize("target", ["overlay kind", "overlay production"])
def test_daemonset_runs_on_every_node_in_the_host_network(
    rendered: dict[str, Objects], target: str
) -> None:
    spec = one(rendered[target], "DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == "ztunnel"


@pytest.mark.parametrize("target", ["overlay kind", "overlay production"])
def test_rolling_update_gives_the_old_agent_time_to_drain(
    rendered: dict[str, Objects], target: str
) -> None:
    ds = one(rendered[target], "DaemonSet")
    strategy = ds["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # At SIGTERM the agent first reads its DaemonSet (bounded by the client's
    # timeout), then drains.
    assert float(settings(rendered[target])["DRAIN_SECONDS"]) + KUBE_TIMEOUT < grace


@pytest.mark.parametrize("target", ["overlay kind", "overlay production"])
def test_the_agent_reads_the_daemonset_its_rbac_names(
    rendered: dict[str, Objects], target: str
) -> None:
    objs = rendered[target]
    env = settings(objs)
    assert env["KUBE_API"] == "on"  # in a cluster an unusable API server is an error
    name = one(objs, "DaemonSet")["metadata"]["name"]
    assert env["DAEMONSET_NAME"] == name
    assert one(objs, "Role")["rules"][0]["resourceNames"] == [name]
    fields = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent_container(objs)["env"]
    }
    assert fields["POD_NAMESPACE"] == "metadata.namespace"  # where the DaemonSet is looked up


@pytest.mark.parametrize("target", ["overlay kind", "overlay production"])
def test_settings_build_a_valid_agent_config(rendered: dict[str, Objects], target: str) -> None:
    objs = rendered[target]
    env = settings(objs)
    downward = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent_container(objs)["env"]
    }
    assert downward == {
        "NODE_NAME": "spec.nodeName",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "INSTANCE_IP": "status.podIP",
    }
    stand_ins = {"NODE_NAME": "node-1", "POD_NAME": "nodeagent-x", "POD_NAMESPACE": "istio-system"}
    cfg = agent_config.build_config(env={**env, **stand_ins, "INSTANCE_IP": "10.0.0.1"})
    assert cfg.xds_address == "https://istiod.istio-system.svc:15012"
    assert cfg.effective_ca_address == cfg.xds_address
    assert cfg.proc_root == "/host/proc"
    assert cfg.redirect_backend == "iptables"
    assert cfg.xds_node_id.startswith("ztunnel~10.0.0.1~nodeagent-x.istio-system~")


def test_ebpf_component_switches_backend_and_adds_only_bpf_privileges(
    rendered: dict[str, Objects],
) -> None:
    base = rendered["overlay production"]
    ebpf = rendered["component ebpf (on production)"]
    assert settings(ebpf)["REDIRECT_BACKEND"] == "ebpf"
    caps = agent_container(base)["securityContext"]["capabilities"]
    ebpf_caps = agent_container(ebpf)["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert set(caps["add"]) == {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"}
    assert set(ebpf_caps["add"]) - set(caps["add"]) == {"BPF", "PERFMON"}
    mounts = {m["mountPath"] for m in agent_container(ebpf)["volumeMounts"]}
    assert {"/sys/fs/bpf", "/lib/modules", "/usr/src", "/host/sys/fs/cgroup"} <= mounts
    assert settings(ebpf)["CGROUP2_PATH"] == "/host/sys/fs/cgroup"


def test_pod_discovery_and_control_plane_mounts(rendered: dict[str, Objects]) -> None:
    objs = rendered["overlay kind"]
    container = agent_container(objs)
    env = settings(objs)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in one(objs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]}

    def volume_of(path: str) -> dict[str, Any]:
        return volumes[mounts[path]["name"]]

    assert volume_of(env["PROC_ROOT"])["hostPath"]["path"] == "/proc"
    assert volume_of(env["NETNS_DIR"])["hostPath"]["path"] == "/var/run/netns"
    assert mounts[env["NETNS_DIR"]]["mountPropagation"] == "HostToContainer"
    assert volume_of(env["STATE_DIR"])["hostPath"]["path"] == "/var/run/nodeagent"

    token_dir, token_file = env["AUTH_TOKEN"].rsplit("/", 1)
    token = volume_of(token_dir)["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "istio-ca" and token["path"] == token_file
    root_dir, root_file = env["XDS_ROOT_CA"].rsplit("/", 1)
    assert volume_of(root_dir)["configMap"]["name"] == "istio-ca-root-cert"
    assert root_file == "root-cert.pem"


def test_readiness_probe_and_metrics_annotations_use_the_agent_ports(
    rendered: dict[str, Objects],
) -> None:
    objs = rendered["overlay production"]
    template = one(objs, "DaemonSet")["spec"]["template"]
    probe = agent_container(objs)["readinessProbe"]["httpGet"]
    assert probe == {"path": "/healthz/ready", "port": constants.READINESS_PORT}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(constants.METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in agent_container(objs)["ports"]}
    assert ports == {"metrics": constants.METRICS_PORT, "readiness": constants.READINESS_PORT}
    assert "cpu" not in agent_container(objs)["resources"]["limits"]


@pytest.mark.parametrize("target", ["overlay kind", "overlay production"])
def test_daemonset_carries_the_labels_istio_tools_select_ztunnel_by(
    rendered: dict[str, Objects], target: str
) -> None:
    ds = one(rendered[target], "DaemonSet")
    # Kiali finds the ambient data plane by the DaemonSet's name label; ours says whose.
    assert ds["metadata"]["labels"] == {
        "app.kubernetes.io/name": "ztunnel",
        "app.kubernetes.io/part-of": "nodeagent",
    }
    template = ds["spec"]["template"]["metadata"]
    # istioctl and the dashboards: app=ztunnel; the selector keeps our immutable label.
    assert template["labels"] == {
        "app.kubernetes.io/name": "nodeagent",
        "app": "ztunnel",
        "istio.io/dataplane-mode": "none",
        "sidecar.istio.io/inject": "false",
    }
    assert ds["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "nodeagent"}
    # As ztunnel's chart: scraped on 15020, at /metrics (served beside /stats/prometheus).
    assert template["annotations"]["prometheus.io/path"] == "/metrics"


def test_installs_into_istio_system_as_the_trusted_ztunnel_account_without_owning_it(
    rendered: dict[str, Objects],
) -> None:
    objs = rendered["overlay production"]
    # Never a Namespace object: `kubectl delete -k` would take istiod with it.
    assert not [o for o in objs if o["kind"] == "Namespace"]
    assert one(objs, "ServiceAccount")["metadata"] == {
        "name": "ztunnel",
        "namespace": "istio-system",
        "labels": {"app.kubernetes.io/name": "nodeagent", "app.kubernetes.io/part-of": "nodeagent"},
    }
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        subjects = one(objs, kind)["subjects"]
        assert subjects == [
            {"kind": "ServiceAccount", "name": "ztunnel", "namespace": "istio-system"}
        ]


def test_rbac_grants_exactly_the_calls_the_agent_makes(
    rendered: dict[str, Objects],
) -> None:
    objs = rendered["overlay production"]
    cluster_rules = one(objs, "ClusterRole")["rules"]
    granted = {
        (group, res, verb)
        for rule in cluster_rules
        for group in rule["apiGroups"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    # nodeagent.kube.client: get_pod, patch_pod (cluster-wide); get_daemonset (below);
    # nodeagent.kube.watch: list and watch of pods (own node) and namespaces.
    assert granted == {
        ("", "pods", "get"),
        ("", "pods", "patch"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }
    role_rules = one(objs, "Role")["rules"]
    assert role_rules == [
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": [one(objs, "DaemonSet")["metadata"]["name"]],
            "verbs": ["get"],
        }
    ]


def test_kind_overlay_uses_the_locally_loaded_image(rendered: dict[str, Objects]) -> None:
    container = agent_container(rendered["overlay kind"])
    assert container["image"] == "nodeagent:dev"
    assert container["imagePullPolicy"] == "Never"


# ---- the waypoint ---------------------------------------------------------------


def test_waypoint_runs_nodeagent_waypoint_unprivileged(rendered: dict[str, Objects]) -> None:
    objs = rendered["kustomization waypoint"]
    assert {o["kind"] for o in objs} == {"ServiceAccount", "Service", "Deployment", "ConfigMap"}
    pod = one(objs, "Deployment")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert labels["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert labels["istio.io/dataplane-mode"] == "none"
    spec = pod["spec"]
    assert spec["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert "hostNetwork" not in spec
    (container,) = spec["containers"]
    assert container["args"] == [
        "waypoint", "--name", "waypoint", "--namespace", "$(POD_NAMESPACE)",
    ]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["XDS_ADDRESS"]["value"] == "https://istiod.istio-system.svc:15012"
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15020}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    (token,) = [v for v in spec["volumes"] if v["name"] == "istio-token"]
    (source,) = token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "istio-ca"
    service = one(objs, "Service")
    assert service["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"mesh": constants.INBOUND_HBONE_PORT, "metrics": 15020}


def test_waypoint_settings_build_a_valid_config(rendered: dict[str, Objects]) -> None:
    objs = rendered["kustomization waypoint"]
    env = settings(objs)
    cfg = agent_config.build_config(env={**env, "NODE_NAME": "node-1", "POD_NAMESPACE": "demo"})
    assert cfg.xds_address == "https://istiod.istio-system.svc:15012"
    assert cfg.auth_token_path == "/var/run/secrets/tokens/istio-token"
    assert cfg.metrics_address.endswith(":15020")


# ---- the kind test apps are valid too ----------------------------------------------


def test_kind_test_apps_render_and_validate(validator: ModuleType) -> None:
    target = validator.Target("kind test apps", REPO / "tests" / "kind" / "apps")
    assert validator.validate_target(target, "1.32") == []
    objs = validator.render(target)
    ns = one(objs, "Namespace")
    assert ns["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    deployments = {d["metadata"]["name"] for d in objs if d["kind"] == "Deployment"}
    assert deployments == {"client-a", "client-b", "server-a", "server-b"}


# ---- the install guide documents every setting ------------------------------------


def test_install_guide_documents_every_setting() -> None:
    guide = (REPO / "docs" / "install.md").read_text()
    table_names = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", guide, flags=re.MULTILINE))
    assert table_names == set(agent_config.ENV_NAMES)
