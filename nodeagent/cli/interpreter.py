"""The agent's interpreter settings, chosen by executing the agent once more.

Two variables the interpreter reads only as it starts, so `nodeagent run` sets whichever is
missing and executes itself again (same PID, same command line):

* PYTHONMALLOC=malloc. CPython's small-object allocator (pymalloc) gives a 1 MiB arena back
  to the kernel only when every object in it is gone, and a burst of connections spreads its
  objects over all the arenas it made; the few that outlive the burst (a spare socket, a
  cache entry, a timer) keep every one of them. Measured: 12-15% of the agent's RSS stayed
  after 5,000 connections had closed. On glibc's malloc the trim at the end of a burst
  (nodeagent.admin.memory) returns every free page, not only whole arenas: 0.98x. The price:
  about 3-4% more CPU per new connection; throughput and latency unchanged (issue 21).
* SETUPTOOLS_USE_DISTUTILS=stdlib. python-iptables imports `distutils.sysconfig`; where
  setuptools is installed, its import hook answers that by importing setuptools itself
  (packaging, its config readers, importlib.metadata: 107 modules, 3.3 MiB the agent kept
  for its whole life). `stdlib` turns the hook off (setuptools' documented switch); Python
  3.11's own distutils answers instead, and from 3.12, which has none, python-iptables
  falls back to sysconfig.

A value the operator set is kept (PYTHONMALLOC=pymalloc restores CPython's default).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

AGENT_ENVIRONMENT: Mapping[str, str] = {
    "PYTHONMALLOC": "malloc",
    "SETUPTOOLS_USE_DISTUTILS": "stdlib",
}


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
