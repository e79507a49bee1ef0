"""Bad input to `nodeagent sandbox` gets one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from nodeagent.sandbox.state import DEFAULT_STATE_ROOT


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nodeagent: ")
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["up", "--name", "Bad_Name"], ["invalid sandbox name"]),
        (["up", "--name", "x" * 21], ["invalid sandbox name"]),
        (["up", "--name", "ends-"], ["invalid sandbox name"]),
        (["up", "--name", "zz", "--nodes", "0"], ["--nodes"]),
        (["up", "--name", "zz", "--pods-per-node", "500"], ["--pods-per-node"]),
        (["status", "nosuchbox"], ["unknown sandbox", "nosuchbox"]),
        (["exec", "nosuchbox", "node1-pod1", "--", "true"], ["unknown sandbox"]),
        (["down", "Bad_Name"], ["invalid sandbox name"]),
        (["apply", "nosuchbox", "/nonexistent.yaml"], ["cannot read", "/nonexistent.yaml"]),
        (["apply", "nosuchbox", "/dev/null"], ["unknown sandbox", "nosuchbox"]),
    ],
)
def test_bad_arguments_are_refused_in_one_line(
    nodeagent_cli: Any, args: list[str], words: list[str]
) -> None:
    assert_one_line_error(nodeagent_cli("sandbox", *args), *words)
    assert not (DEFAULT_STATE_ROOT / "zz").exists()


def test_name_in_use_and_unknown_pod_are_refused(sandbox_name: str, nodeagent_cli: Any) -> None:
    up = ["sandbox", "up", "--name", sandbox_name, "--nodes", "1", "--pods-per-node", "1"]
    assert nodeagent_cli(*up, "--no-controlplane").returncode == 0
    assert_one_line_error(
        nodeagent_cli("sandbox", "apply", sandbox_name, "/dev/null"), "no control plane"
    )
    assert_one_line_error(nodeagent_cli(*up), "already exists", sandbox_name)
    assert_one_line_error(
        nodeagent_cli("sandbox", "exec", sandbox_name, "node9-pod9", "--", "true"),
        "unknown pod or node",
    )
    assert_one_line_error(nodeagent_cli("sandbox", "exec", sandbox_name, "node1-pod1"), "command")
    # The refused second `up` did not damage the first sandbox.
    ok = nodeagent_cli("sandbox", "exec", sandbox_name, "node1-pod1", "--", "true")
    assert ok.returncode == 0, ok.stderr


def test_missing_tool_is_named_up_front(sandbox_name: str, nodeagent_cli: Any) -> None:
    result = nodeagent_cli("sandbox", "up", "--name", sandbox_name, env={"PATH": "/nonexistent"})
    assert_one_line_error(result, "nsenter")
    assert not (DEFAULT_STATE_ROOT / sandbox_name).exists()


def test_not_root_is_refused(sandbox_name: str) -> None:
    # The interpreter lives under /root here, so an unprivileged user cannot start
    # the CLI; instead a forked child drops its effective uid and runs the CLI's main.
    from nodeagent.cli.main import build_parser, main

    build_parser()  # import every command module while still root
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        sys.stderr = os.fdopen(write_end, "w")
        os.seteuid(65534)
        rc = main(["sandbox", "up", "--name", sandbox_name])
        sys.stderr.flush()
        os._exit(rc)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        stderr = f.read()
    _, status = os.waitpid(pid, 0)
    result = subprocess.CompletedProcess([], os.waitstatus_to_exitcode(status), "", stderr)
    assert_one_line_error(result, "root")
    assert not (DEFAULT_STATE_ROOT / sandbox_name).exists()
