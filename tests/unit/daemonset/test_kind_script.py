"""The kind e2e script and test module are sound without a cluster: lint, usage, collection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "kind-e2e.sh"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )


def test_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(
        ["shellcheck", "--severity=style", "-x", str(SCRIPT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_preflight_names_each_missing_tool(tmp_path: Path) -> None:
    # A PATH with bash and coreutils but none of docker, kind, istioctl.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "sleep", "sed", "kubectl"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bindir), "ISTIOCTL": "istioctl"}
    result = run("preflight", env=env)
    assert result.returncode == 1
    for tool in ("docker", "kind", "istioctl"):
        assert f"missing: {tool} not on PATH" in result.stderr


def test_unknown_check_is_refused_with_the_known_ones() -> None:
    result = run("check", "no-such-check")
    assert result.returncode == 1
    assert "unknown check 'no-such-check'" in result.stderr
    for name in (
        "annotation",
        "traffic",
        "mtls",
        "identity",
        "deny",
        "agent",
        "upgrade",
        "uninstall",
    ):
        assert name in result.stderr


def test_kind_tests_are_collected_without_a_cluster() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", str(REPO / "tests" / "kind")],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [ln for ln in result.stdout.splitlines() if "::test_" in ln]
    assert len(collected) == 9
    assert collected[0].endswith("test_agents_annotate_the_pods_they_capture")
    assert collected[-1].endswith("test_uninstall_leaves_no_rules_in_any_pod")
