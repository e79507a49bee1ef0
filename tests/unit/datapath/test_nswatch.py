"""The netns-directory watch: the real inotify (no root needed) waking its callback as
pod namespace entries come and go."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodeagent.datapath.nswatch import NetnsWatcher

WAIT = 5.0


def test_one_directory_under_two_names_is_watched_once(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to(tmp_path / "run")
    watcher = NetnsWatcher([tmp_path / "run", tmp_path / "var" / "run", tmp_path / "run" / "."])
    assert watcher.dirs == ((tmp_path / "run").resolve(),)


class Calls:
    """The watcher's callback: each call is queued, so a test waits for the next one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[None] = asyncio.Queue()

    def __call__(self) -> None:
        self.queue.put_nowait(None)

    @property
    def count(self) -> int:
        return self.queue.qsize()

    async def settle(self) -> None:
        """Let events of earlier steps arrive, so the next wait is for the next step's."""
        await asyncio.sleep(0.05)
        while not self.queue.empty():
            self.queue.get_nowait()

    async def next(self) -> None:
        async with asyncio.timeout(WAIT):
            await self.queue.get()


async def test_entry_created_or_removed_in_the_netns_dir_wakes_the_callback(
    tmp_path: Path,
) -> None:
    calls = Calls()
    watcher = NetnsWatcher([tmp_path])
    watcher.start(calls)
    try:
        (tmp_path / "cni-1").touch()
        await calls.next()
        await calls.settle()
        (tmp_path / "cni-1").unlink()
        await calls.next()
        await calls.settle()
        (tmp_path / "cni-2").symlink_to("/var/run/netns/x")
        await calls.next()
    finally:
        watcher.close()


async def test_netns_dir_made_after_the_watch_starts_is_watched_once_it_exists(
    tmp_path: Path,
) -> None:
    calls = Calls()
    target = tmp_path / "run" / "netns"
    watcher = NetnsWatcher([target])
    watcher.start(calls)
    try:
        (tmp_path / "unrelated").touch()
        await asyncio.sleep(0.05)
        assert calls.count == 0  # the parent's other entries are no pod namespaces
        target.mkdir(parents=True)
        await calls.next()  # the directory may already hold entries: scan
        await calls.settle()
        (target / "cni-1").touch()
        await calls.next()
        await calls.settle()
        # Removed and made again (an `ip netns` reset): watched again.
        (target / "cni-1").unlink()
        target.rmdir()
        await calls.next()
        target.mkdir()
        await calls.next()
        await calls.settle()
        (target / "cni-2").touch()
        await calls.next()
    finally:
        watcher.close()


class NoInotify:
    def inotify_init1(self, flags: int) -> int:
        return -1

    def inotify_add_watch(self, fd: int, path: bytes, mask: int) -> int:
        raise AssertionError("never called")


async def test_unavailable_inotify_is_an_oserror(tmp_path: Path) -> None:
    watcher = NetnsWatcher([tmp_path], libc=NoInotify())
    with pytest.raises(OSError, match="inotify_init1"):
        watcher.start(lambda: None)
    watcher.close()  # harmless when never started
