"""`nodeagent run`'s allocator choice: when the agent executes itself again, and with what."""

from __future__ import annotations

from nodeagent.cli.allocator import AGENT_ALLOCATOR, restart_plan

ARGV = ["/usr/bin/python3", "-X", "dev", "-m", "nodeagent.cli.main", "run", "--config", "a.yaml"]


def test_without_a_choice_it_restarts_with_the_same_command_line_under_malloc() -> None:
    plan = restart_plan({"PATH": "/bin", "NODE_NAME": "n1"}, ARGV)
    assert plan is not None
    argv, env = plan
    assert argv == ARGV  # interpreter options and the agent's flags, all kept
    assert env == {"PATH": "/bin", "NODE_NAME": "n1", "PYTHONMALLOC": AGENT_ALLOCATOR}
    assert AGENT_ALLOCATOR == "malloc"


def test_once_chosen_it_goes_on_which_also_ends_the_restart() -> None:
    assert restart_plan({"PYTHONMALLOC": "malloc"}, ARGV) is None


def test_an_operators_choice_is_kept() -> None:
    assert restart_plan({"PYTHONMALLOC": "pymalloc"}, ARGV) is None
    assert restart_plan({"PYTHONMALLOC": ""}, ARGV) is None  # set, even if empty


def test_no_command_line_to_repeat_means_no_restart() -> None:
    assert restart_plan({}, []) is None
