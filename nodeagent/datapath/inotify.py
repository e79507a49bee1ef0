"""inotify for the asyncio loop: the one adapter behind the agent's and the server's watches.

`Inotify` owns one non-blocking inotify fd (libc's inotify_init1/inotify_add_watch through
ctypes; the libc is injected for tests), reads it from the loop's `add_reader`, never
blocking, and hands each read's events, parsed by `parse_events` (pure), to a callback.
Users decide what an event means: the netns-directory watch (datapath.nswatch) and the
mesh-file watch (controlplane.filewatch). A failed read closes the fd and is reported to
`on_error`; both users keep a periodic fallback, so a lost watch costs time, never state.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# linux/inotify.h
IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000

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


def drain(fd: int) -> bytes:
    """Everything readable now from a non-blocking fd."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class InotifyLib(Protocol):
    """The two libc calls used (ctypes.CDLL(None, use_errno=True) provides them)."""

    def inotify_init1(self, flags: int) -> int: ...

    def inotify_add_watch(self, fd: int, path: bytes, mask: int) -> int: ...


class Inotify:
    """One inotify instance read by the running loop."""

    def __init__(self, *, libc: InotifyLib | None = None) -> None:
        self._libc = libc
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def open(self) -> bool:
        return self._fd >= 0

    def start(
        self,
        on_events: Callable[[list[InotifyEvent]], None],
        on_error: Callable[[OSError], None],
    ) -> None:
        """Open the fd and read it from the running loop; OSError when inotify is unavailable.
        Watches are added with `add_watch`, before or after."""
        if self._fd >= 0:
            return
        libc = self._libc = self._libc or ctypes.CDLL(None, use_errno=True)  # type: ignore[assignment]
        assert libc is not None
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd

        def readable() -> None:
            try:
                data = drain(self._fd)
            except OSError as exc:
                self.close()
                on_error(exc)
                return
            if data:
                on_events(parse_events(data))

        try:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(fd, readable)
        except BaseException:
            self.close()
            raise

    def add_watch(self, path: Path, mask: int) -> int:
        """The watch descriptor for `path`; OSError naming the path when refused."""
        assert self._libc is not None and self._fd >= 0, "start() first"
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        loop, self._loop = self._loop, None
        if fd >= 0:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(fd)
            os.close(fd)
