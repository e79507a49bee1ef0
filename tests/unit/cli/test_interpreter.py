"""`nodeagent run`'s interpreter settings: when the agent executes itself again, and with what."""

from __future__ import annotations

import os
import subprocess
import sys

from nodeagent.cli.interpreter import AGENT_ENVIRONMENT, restart_plan

ARGV = ["/usr/bin/python3", "-X", "dev", "-m", "nodeagent.cli.main", "run", "--config", "a.yaml"]


def test_without_its_settings_it_restarts_with_the_same_command_line_and_them_set() -> None:
    plan = restart_plan({"PATH": "/bin", "NODE_NAME": "n1"}, ARGV)
    assert plan is not None
    argv, env = plan
    assert argv == ARGV  # interpreter options and the agent's flags, all kept
    assert env == {"PATH": "/bin", "NODE_NAME": "n1", "SETUPTOOLS_USE_DISTUTILS": "stdlib"}


def test_once_set_it_goes_on_which_also_ends_the_restart() -> None:
    assert restart_plan({"SETUPTOOLS_USE_DISTUTILS": "stdlib"}, ARGV) is None


def test_an_operators_values_are_kept() -> None:
    assert restart_plan({"SETUPTOOLS_USE_DISTUTILS": "local"}, ARGV) is None
    assert restart_plan({"SETUPTOOLS_USE_DISTUTILS": ""}, ARGV) is None  # set, even if empty


def test_the_allocator_is_the_operators_choice() -> None:
    # PYTHONMALLOC is not among the settings: glibc's malloc costs a third more CPU per
    # new connection (the module's docstring), so only an operator's value applies.
    assert "PYTHONMALLOC" not in AGENT_ENVIRONMENT
    plan = restart_plan({"PYTHONMALLOC": "malloc"}, ARGV)
    assert plan is not None
    assert plan[1]["PYTHONMALLOC"] == "malloc"


def test_no_command_line_to_repeat_means_no_restart() -> None:
    assert restart_plan({}, []) is None


def test_under_the_agents_settings_python_iptables_does_not_pull_in_setuptools() -> None:
    # iptc imports distutils.sysconfig, which setuptools' import hook would answer by
    # importing all of setuptools.
    probe = "import sys, iptc; print('setuptools' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in AGENT_ENVIRONMENT}
    run = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, **AGENT_ENVIRONMENT},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert run.stdout.split() == ["False"], run.stderr
