"""Fixtures for root tests: sandboxes with unique names that are always removed.

* `sandbox_name`: a short unique name for this test; `nodeagent sandbox down`
  runs at teardown whatever the test did with it.
* `sandbox_names`: a factory of such names, all removed at teardown.
* `nodeagent_cli`: runs the real CLI (`.venv/bin/nodeagent ...`) as a subprocess.
* `sandbox_2x2`: one 2-node x 2-pod sandbox shared by a test module, as its
  `status -o json` dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

NODEAGENT = str(Path(sys.executable).parent / "nodeagent")

CliRunner = Callable[..., subprocess.CompletedProcess[str]]


def run_nodeagent(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NODEAGENT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def new_sandbox_name() -> str:
    # Short (namespace names carry it) and unique across concurrent test runs.
    return f"t{uuid.uuid4().hex[:7]}"


def _down(name: str) -> None:
    result = run_nodeagent("sandbox", "down", name)
    if result.returncode != 0:
        print(f"sandbox down {name} failed: {result.stderr.strip()}", file=sys.stderr)


@pytest.fixture
def nodeagent_cli() -> CliRunner:
    return run_nodeagent


@pytest.fixture
def sandbox_name() -> Iterator[str]:
    name = new_sandbox_name()
    try:
        yield name
    finally:
        _down(name)


@pytest.fixture
def sandbox_names() -> Iterator[Callable[[], str]]:
    """A factory of unique names (for tests that need several sandboxes)."""
    made: list[str] = []

    def make() -> str:
        made.append(new_sandbox_name())
        return made[-1]

    try:
        yield make
    finally:
        for name in made:
            _down(name)


@pytest.fixture(scope="module")
def sandbox_2x2() -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("netns tests need root and the real kernel")
    name = new_sandbox_name()
    try:
        up = run_nodeagent("sandbox", "up", "--name", name, "--nodes", "2", "--pods-per-node", "2")
        assert up.returncode == 0, up.stderr
        status = run_nodeagent("sandbox", "status", name, "-o", "json")
        assert status.returncode == 0, status.stderr
        yield json.loads(status.stdout)
    finally:
        _down(name)
