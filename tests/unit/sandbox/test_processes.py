"""Process bookkeeping: identity by pid + start time, readiness pipes, termination."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nodeagent.sandbox import processes
from nodeagent.sandbox.processes import ProcessId


def test_a_process_is_known_by_pid_and_start_time(tmp_path: Path) -> None:
    proc = processes.spawn(None, ["sleep", "30"], tmp_path / "sleep.log")
    try:
        assert proc.start_time is not None
        assert processes.is_running(proc)
        # Same pid, different start time: a reused pid, never ours to signal.
        assert not processes.is_running(ProcessId(proc.pid, proc.start_time + 1))
        assert os.getsid(proc.pid) == proc.pid  # detached: its own session
    finally:
        processes.terminate([proc], grace=2.0)
    assert not processes.is_running(proc)


def test_terminate_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    proc = processes.spawn(None, [sys.executable, "-c", code], tmp_path / "stubborn.log")
    processes.terminate([proc], grace=0.3)
    assert not processes.is_running(proc)


def test_wait_ready_reports_processes_that_exit_without_saying_ready(tmp_path: Path) -> None:
    fds = {}
    for name, script in (("good", "import os; os.write(3, b'ready\\n')"), ("bad", "pass")):
        r, w = os.pipe()
        proc = processes.spawn(
            None,
            [sys.executable, "-c", script.replace("3", str(w))],
            tmp_path / f"{name}.log",
            (w,),
        )
        os.close(w)
        fds[r] = name
        assert proc.pid > 0
    assert processes.wait_ready(fds, timeout=10) == ["bad"]


def test_pids_in_netns_finds_processes_by_namespace_inode(tmp_path: Path) -> None:
    proc = processes.spawn(None, ["sleep", "30"], tmp_path / "sleep.log")
    try:
        inode = Path("/proc/self/ns/net").stat().st_ino
        found = {p.pid for p in processes.pids_in_netns({inode})}
        assert proc.pid in found
        assert os.getpid() not in found  # never ourselves
        assert processes.pids_in_netns({inode + 1_000_000_007}) == []
    finally:
        processes.terminate([proc])
