"""The data-path processes' interpreter settings, chosen by executing the process once more.

Both are read only as the interpreter starts, so `nodeagent run` (the agent) and `nodeagent
waypoint` set those missing and execute themselves again (same PID, same command line). An
operator's value is kept.

* SETUPTOOLS_USE_DISTUTILS=stdlib turns off setuptools' import hook for `distutils`
  (setuptools' documented switch): python-iptables imports `distutils.sysconfig`, and the
  hook answers that by importing all of setuptools (packaging, its config readers,
  importlib.metadata: 107 modules, 3.3 MiB the agent kept for its whole life). Python
  3.11's own distutils answers instead; from 3.12, which has none, python-iptables falls
  back to sysconfig.
* PYTHONMALLOC=malloc puts Python's objects in glibc's heap instead of pymalloc's arenas,
  so that the trim at the end of a burst (nodeagent.admin.memory) returns every free page:
  pymalloc frees a 1 MiB arena only once nothing at all lives in it, and the few objects
  made during a burst that outlive it are spread over every arena it made. After 5,000
  connections had closed, RSS was 1.19-1.23x what it was before on pymalloc and 1.03-1.04x
  on malloc, in every round; connections/s and CPU per connection were within the noise
  of each other (issue 21: two runs of 6 rounds, fresh sandboxes every round, the two
  allocators measured ABBA; pymalloc vs malloc, medians: 357 vs 348/s and 324 vs 315/s).
  An earlier A/B that kept the same two sandboxes throughout had put malloc a quarter
  slower; fresh sandboxes did not repeat it. `PYTHONMALLOC=pymalloc` restores CPython's
  default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

DATA_PATH_ENVIRONMENT: Mapping[str, str] = {
    "SETUPTOOLS_USE_DISTUTILS": "stdlib",
    "PYTHONMALLOC": "malloc",
}


def restart_plan(
    env: Mapping[str, str], argv: Sequence[str]
) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment to execute again with, or None to go on as is
    (every variable is set already, by us or by the operator)."""
    missing = {k: v for k, v in DATA_PATH_ENVIRONMENT.items() if k not in env}
    if not missing or not argv:
        return None
    return list(argv), {**env, **missing}


def use_data_path_interpreter() -> None:
    """Execute this process again, same PID and command line (interpreter options
    included: `sys.orig_argv`), with the data-path interpreter settings; return if they
    are in place."""
    plan = restart_plan(os.environ, sys.orig_argv)
    if plan is None or not sys.executable:
        return
    argv, env = plan
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
