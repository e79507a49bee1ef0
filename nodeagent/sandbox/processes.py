"""OS adapter for sandbox processes: start detached inside a namespace, find, stop.

A process is entered into its namespace with `nsenter --net=/var/run/netns/X`
(not `ip netns exec`, which remounts /sys and so hides /sys/fs/bpf). Every
process gets its own session, so it outlives the command that started it and
never receives that terminal's Ctrl-C. A process is identified by pid *and*
start time, so a pid reused by the kernel is never signalled.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.sandbox.netns import netns_path

NSENTER = "nsenter"


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start_time: int | None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces or ')'; fields resume after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def start_time_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of proc(5)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_running(proc: ProcessId) -> bool:
    """True if `proc` is alive and is the same process that was recorded."""
    fields = _stat_fields(proc.pid)
    if fields is None:
        return False
    if fields[0] in ("Z", "X"):
        _reap(proc.pid)  # our own child (e.g. in `demo`): collect it
        return False
    return proc.start_time is None or int(fields[19]) == proc.start_time


def spawn(
    netns: str | None,
    argv: Sequence[str],
    log: Path,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
) -> ProcessId:
    """Start `argv` detached inside `netns` (None: the caller's namespace)."""
    cmd = list(argv)
    if netns is not None:
        cmd = [NSENTER, f"--net={netns_path(netns)}", "--", *cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            env=env,
        )
    # nsenter execs the target, so the pid is the app's own.
    return ProcessId(proc.pid, start_time_of(proc.pid))


def wait_ready(fds: dict[int, str], timeout: float) -> list[str]:
    """Wait until each read fd yields a line (ready) or EOF; return names not ready.

    The fds are closed.
    """
    failed: list[str] = []
    sel = selectors.DefaultSelector()
    for fd in fds:
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    pending = dict(fds)
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in sel.select(remaining):
                fd = int(key.fd)
                data = os.read(fd, 64)
                if not data.startswith(b"ready"):
                    failed.append(pending[fd])
                sel.unregister(fd)
                del pending[fd]
        failed.extend(pending.values())
    finally:
        sel.close()
        for fd in fds:
            os.close(fd)
    return failed


def terminate(procs: Iterable[ProcessId], grace: float = 2.0) -> None:
    """SIGTERM each live process, SIGKILL what is left after `grace` seconds."""
    live = [p for p in procs if is_running(p)]
    for p in live:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(0.02)
        live = [p for p in live if is_running(p)]
    for p in live:
        _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while live and time.monotonic() < deadline:
        time.sleep(0.01)
        live = [p for p in live if is_running(p)]


def _signal(proc: ProcessId, sig: signal.Signals) -> None:
    if not is_running(proc):
        return
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def pids_in_netns(inodes: set[int]) -> list[ProcessId]:
    """Every process whose network namespace is one of `inodes`."""
    wanted = {f"net:[{i}]" for i in inodes}
    found: list[ProcessId] = []
    if not wanted:
        return found
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            link = str((entry / "ns" / "net").readlink())
        except OSError:
            continue
        if link in wanted:
            pid = int(entry.name)
            found.append(ProcessId(pid, start_time_of(pid)))
    return found
