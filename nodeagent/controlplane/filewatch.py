"""Wake the mesh-file watcher the moment its file is written: inotify on the file's directory.

Polling the file every 0.5 s (and waiting 0.1 s for it to hold still) put up to 0.6 s
between an edit and its push, a third of the 200 ms budget at the fastest poll a
server can afford. `FileEvents` watches the directory holding the file (so an editor's
save-by-rename and a Kubernetes ConfigMap's `..data` swap are seen too) through
datapath.inotify (read by the asyncio loop) and reports, per read, whether the file was
finished (closed after a write, or moved or created in place) or only changed (a writer
still at it).

The watcher still polls, slowly, as the safety net: a lost event (queue overflow, a
file system without inotify, a bind-mounted file replaced underneath) costs time, not
the edit. The libc is injected for tests.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from nodeagent.datapath.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyEvent,
    InotifyLib,
)

log = logging.getLogger(__name__)

# Complete now: closed after writing, or put in place whole (an editor's or a ConfigMap's
# rename). Created (still empty), removed or written to: wait for it to hold still.
FINISHED = IN_CLOSE_WRITE | IN_MOVED_TO
WATCH_MASK = FINISHED | IN_MODIFY | IN_CREATE | IN_DELETE | IN_MOVED_FROM


class Change(enum.IntEnum):
    """What one read of the events says about the file (the larger wins)."""

    NONE = 0
    WRITING = 1
    """Written to, created or removed, not closed yet: wait for it to hold still."""
    FINISHED = 2
    """Closed after a write, or renamed into place: read it now."""


def classify(events: Sequence[InotifyEvent], name: str) -> Change:
    """The change to `name` in one read's events. Entries named `..*` count as the file
    (a ConfigMap's atomic writer swaps `..data`)."""
    change = Change.NONE
    for event in events:
        if event.mask & IN_Q_OVERFLOW:
            change = Change.FINISHED  # events were lost: read the file to be sure
        elif event.name == name or event.name.startswith(".."):
            change = max(change, Change.FINISHED if event.mask & FINISHED else Change.WRITING)
    return change


class FileEvents:
    """Calls `on_change(Change)` when the watched file is written, replaced or removed."""

    def __init__(self, path: Path, *, libc: InotifyLib | None = None) -> None:
        self._path = Path(path).absolute()
        self._inotify = Inotify(libc=libc)
        self._on_change: Callable[[Change], None] | None = None

    def start(self, on_change: Callable[[Change], None]) -> None:
        """Watch, from the running loop; OSError when inotify is not available."""
        self._inotify.start(self._on_events, self._on_error)
        try:
            self._inotify.add_watch(self._path.parent, WATCH_MASK)
        except BaseException:
            self.close()
            raise
        self._on_change = on_change

    def close(self) -> None:
        self._inotify.close()

    def _on_error(self, exc: OSError) -> None:
        log.warning("mesh file watch: read failed (%s); polling only", exc)

    def _on_events(self, events: list[InotifyEvent]) -> None:
        change = classify(events, self._path.name)
        if change and self._on_change is not None:
            self._on_change(change)
