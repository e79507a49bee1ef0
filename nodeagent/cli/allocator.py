"""The agent's memory allocator: glibc's malloc, chosen by executing the agent once more.

CPython's small-object allocator (pymalloc) gives a 1 MiB arena back to the kernel only when
every object in it is gone, and a burst of connections spreads its objects over all the
arenas it made. The few objects that outlive the burst keep every one of those arenas:
a spare socket, a cache entry, a timer, something allocated while the burst was on.
Measured: 12-15% of the agent's RSS stayed after 5,000 connections had closed. With
PYTHONMALLOC=malloc every object lives in glibc's heap, and the trim at the end of a burst
(nodeagent.admin.memory) returns every free page of it, not only whole arenas: the same
burst left 0.98x. What it costs: about 3-4% more CPU per new connection, with throughput
and latency unchanged (an interleaved A/B, issue 21). The interpreter reads PYTHONMALLOC
only when it starts, so `nodeagent run` executes itself once more with the variable set.
A value the operator set is kept (PYTHONMALLOC=pymalloc restores CPython's default).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

AGENT_ALLOCATOR = "malloc"


def restart_plan(
    env: Mapping[str, str], argv: Sequence[str]
) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment to execute again with, or None to go on as is
    (the allocator is chosen already, by us or by the operator)."""
    if "PYTHONMALLOC" in env or not argv:
        return None
    return list(argv), {**env, "PYTHONMALLOC": AGENT_ALLOCATOR}


def use_agent_allocator() -> None:
    """Execute this process again, same PID and command line (interpreter options
    included: `sys.orig_argv`), under the agent's allocator; return if it is in place."""
    plan = restart_plan(os.environ, sys.orig_argv)
    if plan is None or not sys.executable:
        return
    argv, env = plan
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
