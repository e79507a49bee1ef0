"""The mesh file's inotify events, classified: read now, wait for the writer, or ignore."""

from __future__ import annotations

import os
import struct

import pytest

from nodeagent.controlplane import filewatch as fw


def record(mask: int, name: str, wd: int = 1) -> bytes:
    raw = os.fsencode(name)
    size = (len(raw) // 16 + 1) * 16  # the kernel pads names with NULs
    return struct.pack("=iIII", wd, mask, 0, size) + raw.ljust(size, b"\0")


@pytest.mark.parametrize(
    ("events", "change"),
    [
        ([(fw.IN_CLOSE_WRITE, "mesh.yaml")], fw.Change.FINISHED),
        ([(fw.IN_MOVED_TO, "mesh.yaml")], fw.Change.FINISHED),
        ([(fw.IN_MODIFY, "mesh.yaml")], fw.Change.WRITING),
        ([(fw.IN_CREATE, "mesh.yaml")], fw.Change.WRITING),
        ([(fw.IN_DELETE, "mesh.yaml")], fw.Change.WRITING),
        ([(fw.IN_MODIFY, "mesh.yaml"), (fw.IN_CLOSE_WRITE, "mesh.yaml")], fw.Change.FINISHED),
        ([(fw.IN_CLOSE_WRITE, "other.yaml"), (fw.IN_MOVED_TO, ".mesh.yaml.swp")], fw.Change.NONE),
        ([(fw.IN_MOVED_TO, "..data")], fw.Change.FINISHED),  # a ConfigMap's atomic swap
        ([(fw.IN_Q_OVERFLOW, "")], fw.Change.FINISHED),  # events lost: read to be sure
    ],
)
def test_events_say_whether_to_read_the_file_now(
    events: list[tuple[int, str]], change: fw.Change
) -> None:
    data = b"".join(record(mask, name) for mask, name in events)
    assert fw.classify(data, "mesh.yaml") is change


def test_drain_reads_everything_queued_on_a_non_blocking_fd() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        os.write(w, record(fw.IN_MODIFY, "mesh.yaml") + record(fw.IN_CLOSE_WRITE, "mesh.yaml"))
        data = fw.drain(r)
        assert fw.classify(data, "mesh.yaml") is fw.Change.FINISHED
        assert fw.drain(r) == b""
    finally:
        os.close(r)
        os.close(w)
