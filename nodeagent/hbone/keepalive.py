"""When an HBONE connection is pinged and when it is closed for idleness: a pure schedule.

Both ends of HBONE use the same schedule. The client pool PINGs each connection every
`ping_interval` and closes it once it has carried no stream for `idle_timeout` (ztunnel's
10 s and POOL_UNUSED_RELEASE_TIMEOUT 5 min); the 15008 server closes connections left
idle by their client (no PINGs of its own). The schedule never sleeps and never reads a
clock: the driver (`nodeagent.hbone.aio.keep_alive`) passes the time and the number of
open streams to `due()`, acts on the answer, and waits `wait()` seconds before asking
again.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# While streams are open nothing tells the schedule when the last one ends, so it looks
# again this often (as a fraction of idle_timeout): the idle close then comes within a
# quarter of idle_timeout of the exact moment, for one wake-up per quarter.
_IDLE_CHECKS = 4


class KeepaliveAction(enum.Enum):
    NOTHING = "nothing"
    PING = "ping"  # send a PING; the driver drops the connection if no ACK comes in time
    CLOSE_IDLE = "close_idle"  # no stream for idle_timeout: close (GOAWAY)


@dataclass(slots=True)
class KeepaliveSchedule:
    """The keep-alive decisions of one connection, from its start time `started`."""

    idle_timeout: float
    ping_interval: float | None  # None: never PING (the server side)
    started: float
    last_used: float = field(init=False)
    """When the connection last carried a stream (or opened)."""
    next_ping: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive, got {self.idle_timeout}")
        if self.ping_interval is not None and not self.ping_interval > 0:
            raise ValueError(f"ping_interval must be positive, got {self.ping_interval}")
        self.last_used = self.started
        self.next_ping = (
            math.inf if self.ping_interval is None else self.started + self.ping_interval
        )

    def touch(self, now: float) -> None:
        """A stream was opened (or is about to be): the connection is in use."""
        self.last_used = max(self.last_used, now)

    def idle_for(self, now: float, open_streams: int) -> float:
        return 0.0 if open_streams else max(0.0, now - self.last_used)

    def due(self, now: float, open_streams: int) -> KeepaliveAction:
        """What to do at `now`; a PING answer also schedules the next one."""
        if open_streams:
            self.last_used = max(self.last_used, now)
        elif now - self.last_used >= self.idle_timeout:
            return KeepaliveAction.CLOSE_IDLE
        if now >= self.next_ping:
            assert self.ping_interval is not None  # next_ping is finite only with PINGs
            self.next_ping = now + self.ping_interval
            return KeepaliveAction.PING
        return KeepaliveAction.NOTHING

    def wait(self, now: float, open_streams: int) -> float:
        """Seconds until `due` may answer something else than NOTHING."""
        if open_streams:
            idle_check = now + self.idle_timeout / _IDLE_CHECKS
        else:
            idle_check = self.last_used + self.idle_timeout
        return max(0.0, min(idle_check, self.next_ping) - now)
