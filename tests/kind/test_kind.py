"""The DaemonSet on a real kind cluster next to istiod, driven through scripts/kind-e2e.sh.

One cluster for the module (`kind-e2e.sh up`), one test per check of the
script, and the cluster deleted at the end (`KEEP_CLUSTER=1` keeps it).
Skips, naming what is missing, where Docker with a running engine, kind or
istioctl are absent, as on the CI machine; the `kind` tier may skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "kind-e2e.sh"
UP_TIMEOUT = 1800  # cluster, istiod, image build: many minutes on a cold machine
CHECK_TIMEOUT = 600


def missing_prerequisites() -> list[str]:
    missing = [
        f"{cmd} not on PATH"
        for cmd in ("docker", "kind", "kubectl", os.environ.get("ISTIOCTL", "istioctl"))
        if shutil.which(cmd) is None
    ]
    if shutil.which("docker"):
        try:
            info = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
            if info.returncode != 0:
                missing.append("no reachable Docker engine (docker info failed)")
        except subprocess.TimeoutExpired:
            missing.append("no reachable Docker engine (docker info timed out)")
    return missing


def run_script(*args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def kind_cluster() -> Iterator[None]:
    missing = missing_prerequisites()
    if missing:
        pytest.skip("kind e2e needs Docker, kind and istioctl: " + "; ".join(missing))
    try:
        up = run_script("up", timeout=UP_TIMEOUT)
        assert up.returncode == 0, f"kind-e2e.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield
    finally:
        run_script("down", timeout=CHECK_TIMEOUT)


def assert_check(name: str) -> None:
    result = run_script("check", name, timeout=CHECK_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"check {name} failed:\n{output}"
    assert f"PASS {name}" in output


@pytest.mark.timeout(UP_TIMEOUT + CHECK_TIMEOUT)
def test_agents_annotate_the_pods_they_capture(kind_cluster: None) -> None:
    assert_check("annotation")


@pytest.mark.timeout(CHECK_TIMEOUT)
def test_every_client_reaches_every_server_across_nodes(kind_cluster: None) -> None:
    assert_check("traffic")


@pytest.mark.timeout(CHECK_TIMEOUT)
def test_cross_node_traffic_is_only_hbone_mtls(kind_cluster: None) -> None:
    assert_check("mtls")


@pytest.mark.timeout(CHECK_TIMEOUT)
def test_server_side_agent_sees_client_spiffe_identity(kind_cluster: None) -> None:
    assert_check("identity")


@pytest.mark.timeout(CHECK_TIMEOUT)
def test_server_sees_client_pod_ip(kind_cluster: None) -> None:
    assert_check("source-ip")


@pytest.mark.timeout(CHECK_TIMEOUT)
def test_deny_authorization_policy_is_enforced(kind_cluster: None) -> None:
    assert_check("deny")


@pytest.mark.timeout(CHECK_TIMEOUT)
def test_agents_serve_readiness_and_metrics(kind_cluster: None) -> None:
    assert_check("agent")


@pytest.mark.timeout(CHECK_TIMEOUT)
def test_upgrade_keeps_rules_and_annotations(kind_cluster: None) -> None:
    assert_check("upgrade")


# Last: it removes the agent.
@pytest.mark.timeout(CHECK_TIMEOUT)
def test_uninstall_leaves_no_rules_in_any_pod(kind_cluster: None) -> None:
    assert_check("uninstall")
