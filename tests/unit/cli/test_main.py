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


# Which command modules a parser built for COMMAND imported, in a fresh interpreter.
_LOADED = """
import sys
from nodeagent.cli.main import build_parser
build_parser({command!r})
print(" ".join(m for m in sys.modules if m.startswith(("nodeagent.cli.", "nodeagent.sandbox"))))
"""


@pytest.mark.parametrize("command", ["run", "waypoint", "controlplane"])
def test_a_long_lived_command_keeps_only_its_own_commands_imports(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _LOADED.format(command=command)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert f"nodeagent.cli.{command}" in out
    # The other commands' modules stay out (the waypoint shares `run`'s start-up helpers).
    others = {"agent", "sandbox", "run", "waypoint", "controlplane"} - {command}
    if command == "waypoint":
        others.discard("run")
    assert not {f"nodeagent.cli.{o}" for o in others} & set(out)
    assert "nodeagent.sandbox.manager" not in out


def test_a_parser_for_one_command_knows_only_it_and_any_other_name_gets_them_all() -> None:
    from nodeagent.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser("run").parse_args(["workloads"])
    # `agent` is a module, not a command; `workloads` is one of its commands.
    for name in ("agent", "workloads", "bogus", None):
        assert build_parser(name).parse_args(["workloads"]).command == "workloads"


@pytest.mark.parametrize(
    ("argv", "restarts"),
    [
        (["nodeagent", "run"], True),
        (["nodeagent", "waypoint", "--name", "wp"], True),
        (["nodeagent", "pods"], False),
        (["nodeagent", "controlplane"], False),
    ],
)
def test_only_the_data_path_processes_take_their_interpreter_settings(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], restarts: bool
) -> None:
    # The agent and the waypoint execute themselves again with PYTHONMALLOC=malloc and the
    # rest (nodeagent.cli.interpreter); every other command runs as it was started.
    from nodeagent.cli import main

    calls: list[str] = []
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(main, "use_data_path_interpreter", lambda: calls.append("restart"))
    monkeypatch.setattr(main, "_run", lambda given: 0)
    assert main.main() == 0
    assert bool(calls) is restarts
    # A caller handing argv in (a test, an embedding program) is never restarted.
    calls.clear()
    assert main.main(argv[1:]) == 0
    assert not calls
