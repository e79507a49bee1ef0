"""Wake the namespace scan when a pod namespace appears or goes: inotify on the netns dirs.

Container runtimes (containerd, CRI-O, `ip netns`) pin every pod sandbox's network
namespace as a bind mount in /var/run/netns (the agent's `netns_dir`): the file is
created, then the namespace is mounted on it. `NetnsWatcher` watches that directory
with inotify (libc's inotify_init1/inotify_add_watch through ctypes; the fd is read
by the asyncio loop's `add_reader`, never blocking) and calls back on every entry
created, moved in, deleted or moved out. The callback only asks for a scan: what the
namespace is, and whose, is still decided by the scan, so a lost or coalesced event
costs nothing but time, and the periodic scan stays the safety net.

A directory that does not exist yet (`ip netns` makes /var/run/netns on first use) is
waited for by watching its nearest existing parent; a watched directory that is removed
is waited for again. Namespaces held only by a process (no bind mount; /proc/<pid>/ns/net)
raise no inotify event: /proc is not inotify-able, and the netlink proc connector would
wake the agent on every fork on the node. Kubernetes pods always have the bind mount;
the rest are found by the CNI plugin's ADD or the periodic scan.

The event records are parsed by `parse_events` (pure); the libc is injected.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# linux/inotify.h
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# Entries of a netns dir coming and going; the dir itself going (to wait for it again).
DIR_MASK = IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF
DIR_MASK |= IN_ONLYDIR
# A parent of a netns dir that does not exist yet: only entries appearing matter.
PARENT_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR

_EVENT = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len; then name


@dataclass(frozen=True, slots=True, kw_only=True)
class InotifyEvent:
    wd: int
    mask: int
    name: str


def parse_events(data: bytes) -> list[InotifyEvent]:
    """The events in one read of an inotify fd (the kernel never splits a record)."""
    events = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _, size = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        raw = data[start : start + size].split(b"\0", 1)[0]
        events.append(InotifyEvent(wd=wd, mask=mask, name=os.fsdecode(raw)))
        offset = start + size
    return events


class InotifyLib(Protocol):
    """The two libc calls used (ctypes.CDLL(None, use_errno=True) provides them)."""

    def inotify_init1(self, flags: int) -> int: ...

    def inotify_add_watch(self, fd: int, path: bytes, mask: int) -> int: ...


def _libc() -> InotifyLib:
    return ctypes.CDLL(None, use_errno=True)  # type: ignore[return-value]


class NetnsWatcher:
    """Calls `on_change()` when an entry appears in or leaves one of `dirs`."""

    def __init__(self, dirs: Iterable[Path], *, libc: InotifyLib | None = None) -> None:
        # One directory seen under two names (/var/run -> /run) is watched once.
        self._dirs = list(dict.fromkeys(Path(os.path.realpath(d)) for d in dirs))
        self._libc = libc
        self._fd = -1
        self._watching: dict[int, Path] = {}  # wd -> the netns dir it watches
        self._on_change: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def dirs(self) -> Sequence[Path]:
        return tuple(self._dirs)

    def start(self, on_change: Callable[[], None]) -> None:
        """Watch (from the running loop). Raises OSError when inotify is unavailable."""
        if self._fd >= 0:
            return
        libc = self._libc = self._libc or _libc()
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._on_change = on_change
        try:
            self._arm()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(fd, self._readable)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._loop = None
        self._watching.clear()

    def _add(self, path: Path, mask: int) -> int:
        assert self._libc is not None
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

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
                    wd = self._add(place, DIR_MASK if place == target else PARENT_MASK)
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

    def _readable(self) -> None:
        changed = rearm = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("namespace watch: read failed (%s); scans stay periodic", exc)
                self.close()
                return
            if not data:
                break
            for event in parse_events(data):
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
