"""The inotify adapter: records parsed, a non-blocking fd drained, and the real inotify
(no root needed) handing a read's events to the callback."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from nodeagent.datapath.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_IGNORED,
    IN_MODIFY,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyEvent,
    drain,
    parse_events,
)

E = InotifyEvent


def record(wd: int, mask: int, name: bytes = b"", pad: int = 0) -> bytes:
    raw = name + b"\0" * pad
    return struct.pack("=iIII", wd, mask, 0, len(raw)) + raw


@pytest.mark.parametrize(
    ("data", "events"),
    [
        (b"", []),
        (record(1, IN_CREATE, b"cni-1234", pad=8), [E(wd=1, mask=IN_CREATE, name="cni-1234")]),
        (
            record(1, IN_CREATE, b"a", pad=3) + record(2, IN_DELETE, b"bb", pad=14),
            [E(wd=1, mask=IN_CREATE, name="a"), E(wd=2, mask=IN_DELETE, name="bb")],
        ),
        (record(1, IN_IGNORED), [E(wd=1, mask=IN_IGNORED, name="")]),
        (record(-1, IN_Q_OVERFLOW), [E(wd=-1, mask=IN_Q_OVERFLOW, name="")]),
    ],
)  # fmt: skip
def test_inotify_records_are_parsed(data: bytes, events: list[InotifyEvent]) -> None:
    assert parse_events(data) == events


def test_drain_reads_everything_queued_on_a_non_blocking_fd() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        os.write(w, record(1, IN_MODIFY, b"mesh.yaml", pad=7) + record(1, IN_CLOSE_WRITE))
        events = parse_events(drain(r))
        assert [e.mask for e in events] == [IN_MODIFY, IN_CLOSE_WRITE]
        assert drain(r) == b""
    finally:
        os.close(r)
        os.close(w)


async def test_real_inotify_hands_events_to_the_callback_and_names_a_refused_path(
    tmp_path: Path,
) -> None:
    got: asyncio.Queue[list[InotifyEvent]] = asyncio.Queue()
    inotify = Inotify()
    inotify.start(got.put_nowait, lambda exc: None)
    try:
        wd = inotify.add_watch(tmp_path, IN_CREATE | IN_CLOSE_WRITE)
        (tmp_path / "a").write_text("x")
        seen: list[InotifyEvent] = []
        async with asyncio.timeout(5):
            while not any(e.mask & IN_CLOSE_WRITE for e in seen):
                seen += await got.get()
        assert {(e.wd, e.name) for e in seen} == {(wd, "a")}
        with pytest.raises(OSError, match=f"inotify_add_watch {tmp_path / 'missing'}"):
            inotify.add_watch(tmp_path / "missing", IN_CREATE)
    finally:
        inotify.close()
    assert not inotify.open
    inotify.close()  # twice is harmless
