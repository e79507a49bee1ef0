"""Wake the namespace scan when a pod namespace appears or goes: inotify on the netns dirs.

Container runtimes (containerd, CRI-O, `ip netns`) pin every pod sandbox's network
namespace as a bind mount in /var/run/netns (the agent's `netns_dir`): the file is
created, then the namespace is mounted on it. `NetnsWatcher` watches that directory
with inotify (datapath.inotify, read by the asyncio loop) and calls back on every entry
created, moved in, deleted or moved out. The callback only asks for a scan: what the
namespace is, and whose, is still decided by the scan, so a lost or coalesced event
costs nothing but time, and the periodic scan stays the safety net.

A directory that does not exist yet (`ip netns` makes /var/run/netns on first use) is
waited for by watching its nearest existing parent; a watched directory that is removed
is waited for again. Namespaces held only by a process (no bind mount; /proc/<pid>/ns/net)
raise no inotify event: /proc is not inotify-able, and the netlink proc connector would
wake the agent on every fork on the node. Kubernetes pods always have the bind mount;
the rest are found by the CNI plugin's ADD or the periodic scan.

The fd, its reads and the record parsing are datapath.inotify's; the libc is injected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from nodeagent.datapath.inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyEvent,
    InotifyLib,
)

log = logging.getLogger(__name__)

# Entries of a netns dir coming and going; the dir itself going (to wait for it again).
DIR_MASK = IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF
DIR_MASK |= IN_ONLYDIR
# A parent of a netns dir that does not exist yet: only entries appearing matter.
PARENT_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR


class NetnsWatcher:
    """Calls `on_change()` when an entry appears in or leaves one of `dirs`."""

    def __init__(self, dirs: Iterable[Path], *, libc: InotifyLib | None = None) -> None:
        # One directory seen under two names (/var/run -> /run) is watched once.
        self._dirs = list(dict.fromkeys(Path(os.path.realpath(d)) for d in dirs))
        self._inotify = Inotify(libc=libc)
        self._watching: dict[int, Path] = {}  # wd -> the netns dir it watches
        self._on_change: Callable[[], None] | None = None

    @property
    def dirs(self) -> Sequence[Path]:
        return tuple(self._dirs)

    def start(self, on_change: Callable[[], None]) -> None:
        """Watch (from the running loop). Raises OSError when inotify is unavailable."""
        if self._inotify.open:
            return
        self._inotify.start(self._on_events, self._on_error)
        self._on_change = on_change
        try:
            self._arm()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._inotify.close()
        self._watching.clear()

    def _on_error(self, exc: OSError) -> None:
        log.warning("namespace watch: read failed (%s); scans stay periodic", exc)
        self._watching.clear()

    def _arm(self) -> bool:
        """Watch each netns dir, or, while it does not exist, its nearest parent.
        True when a netns dir is watched that was not before (it may hold entries)."""
        armed = False
        for target in self._dirs:
            if target in self._watching.values():
                continue
            place = target
            while True:
                try:
                    mask = DIR_MASK if place == target else PARENT_MASK
                    wd = self._inotify.add_watch(place, mask)
                    break
                except OSError:
                    if place == place.parent:
                        raise
                    place = place.parent
            if place == target:
                self._watching[wd] = target
                armed = True
                log.debug("watching %s for pod namespaces", target)
            else:
                log.info("%s does not exist yet: watching %s for it", target, place)
        return armed

    def _on_events(self, events: list[InotifyEvent]) -> None:
        changed = rearm = False
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                changed = True  # events were lost: a scan sees what they said
            elif event.wd not in self._watching:
                rearm = True  # in a parent: the netns dir may exist now
            elif event.mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                self._watching.pop(event.wd, None)
                changed = rearm = True
            else:
                changed = True
        if rearm:
            try:
                changed = self._arm() or changed
            except OSError as exc:
                log.warning("namespace watch: %s; scans stay periodic", exc)
        if changed and self._on_change is not None:
            self._on_change()
