"""`nodeagent run`'s interpreter settings: when the agent executes itself again, and with what."""

from __future__ import annotations

import os
import subprocess
import sys

from nodeagent.cli.interpreter import DATA_PATH_ENVIRONMENT, restart_plan

ARGV = ["/usr/bin/python3", "-X", "dev", "-m", "nodeagent.cli.main", "run", "--config", "a.yaml"]


def test_without_its_settings_it_restarts_with_the_same_command_line_and_them_set() -> None:
    plan = restart_plan({"PATH": "/bin", "NODE_NAME": "n1"}, ARGV)
    assert plan is not None
    argv, env = plan
    assert argv == ARGV  # interpreter options and the agent's flags, all kept
    assert env == {
        "PATH": "/bin",
        "NODE_NAME": "n1",
        "SETUPTOOLS_USE_DISTUTILS": "stdlib",
        "PYTHONMALLOC": "malloc",
    }


def test_once_set_it_goes_on_which_also_ends_the_restart() -> None:
    settled = {"SETUPTOOLS_USE_DISTUTILS": "stdlib", "PYTHONMALLOC": "malloc"}
    assert restart_plan(settled, ARGV) is None


def test_an_operators_values_are_kept() -> None:
    chosen = {"SETUPTOOLS_USE_DISTUTILS": "local", "PYTHONMALLOC": "pymalloc"}
    assert restart_plan(chosen, ARGV) is None
    # set, even if empty
    assert restart_plan({"SETUPTOOLS_USE_DISTUTILS": "", "PYTHONMALLOC": ""}, ARGV) is None


def test_only_what_is_missing_is_added() -> None:
    plan = restart_plan({"PYTHONMALLOC": "pymalloc"}, ARGV)
    assert plan is not None
    assert plan[1]["PYTHONMALLOC"] == "pymalloc"  # the operator's allocator
    assert plan[1]["SETUPTOOLS_USE_DISTUTILS"] == "stdlib"


def test_a_burst_is_given_back_on_the_agents_allocator() -> None:
    # Why PYTHONMALLOC=malloc (issue 21): small objects made, then mostly freed, then
    # trimmed come back to the kernel, which pymalloc's arenas do not do while any object
    # lives in them. 200,000 small objects, all but every 500th freed, then malloc_trim(0).
    probe = (
        "import ctypes, gc\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1])\n"
        "before = rss()\n"
        "objs = [[i] for i in range(200_000)]\n"
        "kept = objs[::500]\n"
        "del objs\n"
        "gc.collect()\n"
        "ctypes.CDLL(None).malloc_trim(0)\n"
        "print(rss() - before)\n"
    )
    grown = {}
    for allocator in ("malloc", "pymalloc"):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
        run = subprocess.run(
            [sys.executable, "-c", probe],
            env={**env, "PYTHONMALLOC": allocator},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        grown[allocator] = int(run.stdout) * os.sysconf("SC_PAGE_SIZE") / 2**20
    assert DATA_PATH_ENVIRONMENT["PYTHONMALLOC"] == "malloc"
    # MiB left resident: about 1.6 against 21 here; pymalloc keeps every arena a survivor is in
    assert grown["malloc"] * 4 < grown["pymalloc"], grown


def test_no_command_line_to_repeat_means_no_restart() -> None:
    assert restart_plan({}, []) is None


def test_under_the_agents_settings_python_iptables_does_not_pull_in_setuptools() -> None:
    # iptc imports distutils.sysconfig, which setuptools' import hook would answer by
    # importing all of setuptools.
    probe = "import sys, iptc; print('setuptools' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in DATA_PATH_ENVIRONMENT}
    run = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, **DATA_PATH_ENVIRONMENT},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert run.stdout.split() == ["False"], run.stderr
