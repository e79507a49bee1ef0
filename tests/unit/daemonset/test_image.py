"""The image recipe has what the agent needs, checked offline (no Docker here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
IMAGE_DIR = REPO / "daemonset" / "image"
DOCKERFILE = IMAGE_DIR / "Dockerfile"
KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
CAPABILITIES = {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE", "BPF", "PERFMON"}

Instruction = tuple[str, str]


def parse(text: str) -> list[Instruction]:
    """Instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage; only ARG may come before the first FROM."""
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            out.append([])
        if not out:
            assert ins[0] == "ARG", f"{ins[0]} before the first FROM"
            continue
        out[-1].append(ins)
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


def test_only_known_instructions(dockerfile: list[Instruction]) -> None:
    assert {kw for kw, _ in dockerfile} <= KNOWN_INSTRUCTIONS


def test_base_is_debian_12_slim_pinned_by_release(dockerfile: list[Instruction]) -> None:
    args = [a for kw, a in dockerfile if kw == "ARG"]
    assert "DEBIAN_IMAGE=debian:12-slim" in args
    froms = [a for kw, a in dockerfile if kw == "FROM"]
    assert froms == ["${DEBIAN_IMAGE} AS build", "${DEBIAN_IMAGE}"]
    assert ":latest" not in DOCKERFILE.read_text()


def test_runtime_stage_installs_legacy_iptables_iproute2_and_bcc(
    dockerfile: list[Instruction],
) -> None:
    runtime = stages(dockerfile)[-1]
    runs = " && ".join(a for kw, a in runtime if kw == "RUN")
    installed = set(re.findall(r"apt-get install [^&]*", runs)[0].split())
    assert {"python3", "iptables", "iproute2", "python3-bpfcc", "libbpfcc", "tini"} <= installed
    assert "update-alternatives --set iptables /usr/sbin/iptables-legacy" in runs
    assert "update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy" in runs
    # The image proves at build time that bcc, iptc and the agent import.
    assert "import bcc, iptc, nodeagent" in runs


def test_every_apt_install_is_lean_and_cleans_up(dockerfile: list[Instruction]) -> None:
    runs = [a for kw, a in dockerfile if kw == "RUN" and "apt-get install" in a]
    assert len(runs) == 2
    for run in runs:
        assert "apt-get update" in run
        assert "--no-install-recommends" in run
        assert "rm -rf /var/lib/apt/lists/*" in run


def test_agent_is_installed_from_the_repository_into_a_venv(
    dockerfile: list[Instruction],
) -> None:
    build, runtime = stages(dockerfile)
    assert ("COPY", ". /src") in build
    build_runs = " ".join(a for kw, a in build if kw == "RUN")
    assert "pip install --no-cache-dir /src" in build_runs
    assert ("COPY", "--from=build /opt/nodeagent /opt/nodeagent") in runtime


def test_entrypoint_runs_the_agent_under_an_init(dockerfile: list[Instruction]) -> None:
    entry = [a for kw, a in dockerfile if kw == "ENTRYPOINT"]
    cmd = [a for kw, a in dockerfile if kw == "CMD"]
    assert len(entry) == 1 and len(cmd) == 1
    # Exec form, so tini is PID 1 and SIGTERM reaches the agent.
    assert json.loads(entry[0]) == ["/usr/bin/tini", "--", "nodeagent"]
    assert json.loads(cmd[0]) == ["run"]
    users = [a for kw, a in dockerfile if kw == "USER"]
    assert users[-1:] == ["root"]


def test_every_capability_is_explained(dockerfile: list[Instruction]) -> None:
    header = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("#")]
    explained = {m.group(1) for ln in header if (m := re.match(r"#\s+([A-Z_]+)\s{2,}\S", ln))}
    assert explained == CAPABILITIES


def test_build_context_filter_keeps_only_what_the_build_needs() -> None:
    ignore = (IMAGE_DIR / "Dockerfile.dockerignore").read_text().split("\n")
    rules = [ln.strip() for ln in ignore if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!nodeagent", "!README.md"} <= set(rules)
    # pyproject names README.md as the readme; pip install . needs both.
    assert (REPO / "pyproject.toml").exists() and (REPO / "README.md").exists()


def test_filtered_build_context_is_enough_to_build_the_agent(tmp_path: Path) -> None:
    # The image's `pip install /src`, offline: copy what the ignore file lets
    # through, build the wheel without fetching anything.
    ignore = (IMAGE_DIR / "Dockerfile.dockerignore").read_text().splitlines()
    kept = [ln[1:] for ln in ignore if ln.startswith("!")]
    context = tmp_path / "context"
    context.mkdir()
    for name in kept:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, context / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    wheels = list((tmp_path / "wheels").glob("nodeagent-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
    assert {"nodeagent/cli/main.py", "nodeagent/config.py"} <= names
