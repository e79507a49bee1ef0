"""The agent's interpreter settings, chosen by executing the agent once more.

SETUPTOOLS_USE_DISTUTILS is read only as the interpreter starts, so `nodeagent run` sets it
when it is missing and executes itself again (same PID, same command line). The value,
`stdlib`, turns off setuptools' import hook for `distutils` (setuptools' documented switch):
python-iptables imports `distutils.sysconfig`, and the hook answers that by importing all
of setuptools (packaging, its config readers, importlib.metadata: 107 modules, 3.3 MiB the
agent kept for its whole life). Python 3.11's own distutils answers instead; from 3.12,
which has none, python-iptables falls back to sysconfig. An operator's value is kept.

The allocator is left to the operator. `PYTHONMALLOC=malloc` (glibc's malloc instead of
pymalloc) makes the trim at the end of a burst (nodeagent.admin.memory) return every free
page: RSS after 5,000 connections had closed went from 1.13-1.15x what it was before to
0.98x. But it costs about a quarter more agent CPU per new connection (an interleaved A/B
of two sandboxes in which only the agents' allocator differed, 3 rounds, medians: 345 vs
441 connections/s, 2,870 vs 2,292 us per connection, slower in every round; issue 21), so the
default stays CPython's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

AGENT_ENVIRONMENT: Mapping[str, str] = {"SETUPTOOLS_USE_DISTUTILS": "stdlib"}


def restart_plan(
    env: Mapping[str, str], argv: Sequence[str]
) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment to execute again with, or None to go on as is
    (every variable is set already, by us or by the operator)."""
    missing = {k: v for k, v in AGENT_ENVIRONMENT.items() if k not in env}
    if not missing or not argv:
        return None
    return list(argv), {**env, **missing}


def use_agent_interpreter() -> None:
    """Execute this process again, same PID and command line (interpreter options
    included: `sys.orig_argv`), with the agent's interpreter settings; return if they are
    in place."""
    plan = restart_plan(os.environ, sys.orig_argv)
    if plan is None or not sys.executable:
        return
    argv, env = plan
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
