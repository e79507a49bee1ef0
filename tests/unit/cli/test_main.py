"""The `nodeagent` entry point: behaviour common to every command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nodeagent.cli.main import EXIT_BROKEN_PIPE

# A command whose output is `size` bytes, with no agent needed.
_PROGRAM = """
import sys
from nodeagent.cli import agent, main
agent.cmd_pods = lambda args: print("x" * {size}) or 0
sys.exit(main.main(["pods"]))
"""


@pytest.mark.parametrize("size", [10, 1_000_000], ids=["buffered", "large"])
def test_a_command_survives_a_closed_pipe(size: int) -> None:
    # `nodeagent rules POD | head -1`: the reader is gone before the command writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROGRAM.format(size=size)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr
    assert "BrokenPipeError" not in proc.stderr
    assert proc.returncode == EXIT_BROKEN_PIPE
