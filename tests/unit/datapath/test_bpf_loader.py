"""The loader child's failures reach the agent as a CaptureError carrying its stderr; the
agent side imports no bcc."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.datapath.ebpf import load_objects, prog_pin
from nodeagent.datapath.iptables import CaptureError


def fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_a_failing_child_is_a_capture_error_with_its_stderr(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path, "echo '/virtual/main.c:12:5: error: use of undeclared x' >&2\nexit 1"
    )
    with pytest.raises(CaptureError) as raised:
        load_objects("int x;", pin_dir=None, digest="0", python=python)
    message = str(raised.value)
    assert "exited 1" in message
    assert "use of undeclared x" in message


def test_a_child_that_hands_nothing_back_is_a_capture_error(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "cat >/dev/null\nexit 0")
    with pytest.raises(CaptureError, match="loader exited 0"):
        load_objects("int x;", pin_dir=None, digest="0", python=python)


def test_programs_are_pinned_under_a_digest_of_their_text() -> None:
    assert prog_pin(Path("/p"), "connect4", "ab12") == Path("/p/connect4_prog_ab12")


def test_the_agent_side_of_the_backend_does_not_import_bcc() -> None:
    code = (
        "import sys, nodeagent.datapath.ebpf, nodeagent.datapath.bpfsys, nodeagent.app\n"
        "print('bcc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
