"""The mesh file's inotify events, classified: read now, wait for the writer, or ignore."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from nodeagent.controlplane import filewatch as fw
from nodeagent.datapath import inotify as ino


def record(mask: int, name: str, wd: int = 1) -> bytes:
    raw = os.fsencode(name)
    size = (len(raw) // 16 + 1) * 16  # the kernel pads names with NULs
    return struct.pack("=iIII", wd, mask, 0, size) + raw.ljust(size, b"\0")


@pytest.mark.parametrize(
    ("events", "change"),
    [
        ([(ino.IN_CLOSE_WRITE, "mesh.yaml")], fw.Change.FINISHED),
        ([(ino.IN_MOVED_TO, "mesh.yaml")], fw.Change.FINISHED),
        ([(ino.IN_MODIFY, "mesh.yaml")], fw.Change.WRITING),
        ([(ino.IN_CREATE, "mesh.yaml")], fw.Change.WRITING),
        ([(ino.IN_DELETE, "mesh.yaml")], fw.Change.WRITING),
        ([(ino.IN_MODIFY, "mesh.yaml"), (ino.IN_CLOSE_WRITE, "mesh.yaml")], fw.Change.FINISHED),
        ([(ino.IN_CLOSE_WRITE, "other.yaml"), (ino.IN_MOVED_TO, ".mesh.yaml.swp")], fw.Change.NONE),
        ([(ino.IN_MOVED_TO, "..data")], fw.Change.FINISHED),  # a ConfigMap's atomic swap
        ([(ino.IN_Q_OVERFLOW, "")], fw.Change.FINISHED),  # events lost: read to be sure
    ],
)
def test_events_say_whether_to_read_the_file_now(
    events: list[tuple[int, str]], change: fw.Change
) -> None:
    data = b"".join(record(mask, name) for mask, name in events)
    assert fw.classify(ino.parse_events(data), "mesh.yaml") is change


async def test_a_save_by_rename_beside_other_files_is_reported_finished(tmp_path: Path) -> None:
    changes: asyncio.Queue[fw.Change] = asyncio.Queue()
    events = fw.FileEvents(tmp_path / "mesh.yaml")
    events.start(changes.put_nowait)
    try:
        (tmp_path / "other.yaml").write_text("x")
        (tmp_path / ".mesh.yaml.tmp").write_text("workloads: []\n")
        (tmp_path / ".mesh.yaml.tmp").rename(tmp_path / "mesh.yaml")
        async with asyncio.timeout(5):
            assert await changes.get() is fw.Change.FINISHED
        await asyncio.sleep(0.05)
        assert changes.empty()  # the other files said nothing
    finally:
        events.close()
