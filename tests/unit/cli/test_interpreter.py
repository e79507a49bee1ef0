"""`nodeagent run`'s interpreter settings: when the agent executes itself again, and with what."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nodeagent.cli.interpreter import AGENT_ENVIRONMENT, restart_plan

ARGV = ["/usr/bin/python3", "-X", "dev", "-m", "nodeagent.cli.main", "run", "--config", "a.yaml"]
BOTH = {"PYTHONMALLOC": "malloc", "SETUPTOOLS_USE_DISTUTILS": "stdlib"}


def test_without_settings_it_restarts_with_the_same_command_line_and_both_set() -> None:
    plan = restart_plan({"PATH": "/bin", "NODE_NAME": "n1"}, ARGV)
    assert plan is not None
    argv, env = plan
    assert argv == ARGV  # interpreter options and the agent's flags, all kept
    assert env == {"PATH": "/bin", "NODE_NAME": "n1", **BOTH}
    assert dict(AGENT_ENVIRONMENT) == BOTH


def test_once_set_it_goes_on_which_also_ends_the_restart() -> None:
    assert restart_plan(BOTH, ARGV) is None


@pytest.mark.parametrize("given", ["PYTHONMALLOC", "SETUPTOOLS_USE_DISTUTILS"])
def test_one_missing_is_set_and_the_other_kept(given: str) -> None:
    plan = restart_plan({given: "operator"}, ARGV)
    assert plan is not None
    _, env = plan
    assert env[given] == "operator"
    (other,) = set(BOTH) - {given}
    assert env[other] == BOTH[other]


def test_an_operators_values_are_kept() -> None:
    mine = {"PYTHONMALLOC": "pymalloc", "SETUPTOOLS_USE_DISTUTILS": "local"}
    assert restart_plan(mine, ARGV) is None
    assert restart_plan({"PYTHONMALLOC": "", "SETUPTOOLS_USE_DISTUTILS": ""}, ARGV) is None


def test_no_command_line_to_repeat_means_no_restart() -> None:
    assert restart_plan({}, []) is None


def test_under_the_agents_settings_python_iptables_does_not_pull_in_setuptools() -> None:
    # The SETUPTOOLS_USE_DISTUTILS half: iptc imports distutils.sysconfig, which setuptools'
    # import hook would answer by importing all of setuptools.
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
