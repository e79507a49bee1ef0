"""Give memory back to the kernel after a burst of connections has closed.

CPython frees a connection's objects into its own pools and glibc's heap, and the agent
keeps glibc from trimming on every free (app.tune_allocator: bulk relaying would refault
its buffers). So after thousands of connections close, the freed heap stays resident
until something asks glibc to return it. `BurstTrim` decides when (pure); `trim_heap`
asks (malloc_trim(0), which also releases free pages inside the heap, not only its top);
`trim_after_bursts` polls the live connection count and does both, first asking the
connection pool to release what the burst made it open (`release`).

What keeps a burst's memory is less the freed objects than the few that outlive it: CPython
returns one of its 1 MiB arenas only when no object at all is left in it, and the objects a
burst allocates are spread over every arena it made. The HBONE connections a burst of 5000
tunnels opens (about 50, 100 streams each; each with its TLS object, HPACK tables and
buffers, a few hundred objects) pinned all of them: released as the burst ends, the arenas
empty as the connections close (issue 21). Even then a few dozen objects made during the
burst and kept (spare sockets, cache entries, timers, the event loop's free lists) hold
13-23% of RSS in arenas. So the agent and the waypoint run on glibc's malloc
(PYTHONMALLOC=malloc, set by nodeagent.cli.interpreter), where malloc_trim(0) gives back
every free page, whatever still lives beside it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

TRIM_DROP = 256  # connections closed since the peak that make a trim worth its ~ms
TRIM_INTERVAL = 2.0  # seconds between looks at the live count


@dataclass
class BurstTrim:
    """Trim once the live count has fallen `drop` below the highest count seen since the
    last trim (a burst ended), not on every close: a trim walks the whole heap."""

    drop: int = TRIM_DROP
    peak: int = 0
    # After a trim during a burst's close, one more once the count stops falling (the
    # close has ended): what the last closes freed, and what the release let go since.
    settling: bool = False
    last: int = 0

    def observe(self, live: int) -> bool:
        """Take the current live count; True when memory should be trimmed now."""
        falling, self.last = live < self.last, live
        self.peak = max(self.peak, live)
        if self.peak - live >= self.drop:
            self.peak = live
            self.settling = True
            return True
        if self.settling and not falling:
            self.settling = False
            return True
        return False


def trim_heap() -> bool:
    """glibc's malloc_trim(0): return free heap pages to the kernel. False where the C
    library has none (not glibc)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(0)
    return True


async def trim_after_bursts(
    live: Callable[[], int],
    *,
    policy: BurstTrim | None = None,
    interval: float = TRIM_INTERVAL,
    trim: Callable[[], bool] = trim_heap,
    release: Callable[[], object] | None = None,
) -> None:
    """Run until cancelled: whenever `policy` says a burst has ended, `release` (the pool's
    idle connections the burst opened), then trim the heap."""
    policy = policy or BurstTrim()
    while True:
        await asyncio.sleep(interval)
        if not policy.observe(live()):
            continue
        if release is not None:
            release()
        # CPython's attribute-lookup cache holds a reference to each name it caches: names
        # built at run time (pyroute2's f'get_{key}' lookups, say) stay alive in it, each
        # keeping the pool and so the arena it was allocated in.
        sys._clear_type_cache()
        gc.collect()  # cycles among the closed connections' objects, before the heap walk
        if not trim():
            log.debug("no malloc_trim in this C library: memory after bursts stays")
            return
