"""Where an idle tunnelled connection's bytes go (issue 21): tracemalloc inside real agents.

`bench.connections` says how much RSS each idle connection costs an agent; this says what the
bytes are. It brings up a sandbox whose agents start through a small wrapper (the sandbox
runs agents with the Python it was started with: here a script that runs the agent with a
thread of ours beside it), holds HOLD echoed connections from the client pod to the server
pod, and takes, in both agents, a tracemalloc snapshot, the smaps rollup and the count of
objects by type before and while they are held. Tracing starts only after warm-up: from
the first import it makes an agent's start take about 25 s.

It prints, per side, RSS and traced bytes per connection, the objects per connection by
type, and the traced bytes per connection by where they were allocated: the innermost frame
in nodeagent (what to change) and the innermost frame of all (what made the bytes: a
uvloop transport shows as the `connect_accepted_socket` line, C allocations made with no
Python frame as the event loop's line). Traced bytes miss what C libraries allocate with
malloc (OpenSSL, libuv's buffers); RSS per connection minus traced per connection bounds it.

    python -m bench.conn_memory [--hold 1000] [--frames 12] [--top 40]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import pickle
import runpy
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.connections import Held
from bench.harness import ECHO_PORT, ROOT, require_root, with_children

AGENT = ("-m", "nodeagent.cli.main", "run")
POLL = 0.2  # seconds between the agent thread's looks for a request


# -- inside the agent --------------------------------------------------------------------------


def _serve_requests(workdir: Path, frames: int) -> None:
    """The agent's thread: `start` starts tracing; any other TAG writes snapshot-PID-TAG."""
    pid = os.getpid()
    while True:
        time.sleep(POLL)
        request = workdir / f"request-{pid}"
        if not request.exists():
            continue
        tag = request.read_text().strip()
        request.unlink()
        if tag == "start":
            tracemalloc.start(frames)
        else:
            gc.collect()
            data = {
                "snapshot": tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None,
                "types": collections.Counter(type(o).__qualname__ for o in gc.get_objects()),
                "rollup": Path(f"/proc/{pid}/smaps_rollup").read_text(),
            }
            (workdir / f"snapshot-{pid}-{tag}").write_bytes(pickle.dumps(data))
        (workdir / f"done-{pid}-{tag}").touch()


def run_agent(workdir: Path, frames: int, argv: list[str]) -> None:
    """`python -m bench.conn_memory agent WORKDIR FRAMES -m nodeagent.cli.main run ...`."""
    threading.Thread(target=_serve_requests, args=(workdir, frames), daemon=True).start()
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


# -- the driver --------------------------------------------------------------------------------


def _cli(*args: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
    """`nodeagent ARGS`; with `python`, the sandbox starts its processes with that."""
    code = (
        f"import sys; sys.executable = {python or sys.executable!r}; "
        "from nodeagent.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT
    )


def _wrapper(workdir: Path, frames: int) -> str:
    """A stand-in for the Python the sandbox runs: agents run with our thread, all else as is."""
    path = workdir / "python"
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2 $3" = "{" ".join(AGENT)}" ]; then\n'
        f'  export PYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f'  exec {sys.executable} -m bench.conn_memory agent {workdir} {frames} "$@"\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


def _ask(workdir: Path, pids: list[int], tag: str, timeout: float = 300) -> None:
    for pid in pids:
        (workdir / f"request-{pid}").write_text(tag)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while not (workdir / f"done-{pid}-{tag}").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {pid} did not answer {tag!r}")
            time.sleep(POLL)


def _rss_kib(rollup: str) -> int:
    line = next(x for x in rollup.splitlines() if x.startswith("Rss:"))
    return int(line.split()[1])


def _where(traceback: tracemalloc.Traceback) -> tuple[str, str]:
    def short(frame: tracemalloc.Frame) -> str:
        name = frame.filename
        if "/nodeagent/" in name:
            name = "nodeagent/" + name.split("/nodeagent/", 1)[1]
        else:
            name = Path(name).name
        return f"{name}:{frame.lineno}"

    ours = next((short(f) for f in reversed(traceback) if "/nodeagent/" in f.filename), "-")
    return ours, short(traceback[-1])


def _by_site(snapshot: tracemalloc.Snapshot) -> dict[tuple[str, str], list[int]]:
    sites: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for trace in snapshot.traces:
        site = sites[_where(trace.traceback)]
        site[0] += trace.size
        site[1] += 1
    return sites


def breakdown(before: dict[str, Any], during: dict[str, Any], count: int, top: int) -> str:
    """One side's report: RSS and traced bytes, objects by type and bytes by site, per
    connection."""
    rss = (_rss_kib(during["rollup"]) - _rss_kib(before["rollup"])) / count
    a, b = _by_site(before["snapshot"]), _by_site(during["snapshot"])
    rows = []
    for site in set(a) | set(b):
        size = b.get(site, [0, 0])[0] - a.get(site, [0, 0])[0]
        blocks = b.get(site, [0, 0])[1] - a.get(site, [0, 0])[1]
        rows.append((size / count, blocks / count, site))
    traced = sum(r[0] for r in rows)
    types = {t: n - before["types"].get(t, 0) for t, n in during["types"].items()}
    common = sorted(((n / count, t) for t, n in types.items() if n >= count / 2), reverse=True)
    lines = [
        f"RSS {rss:.2f} KiB/connection (tracemalloc's own included), traced {traced:.0f} B",
        "objects per connection: " + ", ".join(f"{t} {per:.2f}" for per, t in common[:30]),
        f"{'B/conn':>8} {'blocks':>6}  innermost nodeagent frame <- innermost frame",
    ]
    for per_size, per_blocks, (ours, inner) in sorted(rows, key=lambda r: -abs(r[0]))[:top]:
        if abs(per_size) >= 8:
            lines.append(f"{per_size:8.1f} {per_blocks:6.2f}  {ours} <- {inner}")
    return "\n".join(lines)


OPTIONS = (
    ("--hold", 1000, "idle connections held open"),
    ("--frames", 12, "tracemalloc frames per allocation"),
    ("--top", 40, "allocation sites shown per side"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, what in OPTIONS:
        parser.add_argument(flag, type=int, default=default, help=what)
    args = parser.parse_args()
    if not require_root("bench.conn_memory"):
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-cmem-"))
    name = f"cmem{os.getpid() % 100000}"
    up = _cli(
        "sandbox", "up", "--name", name, "--nodes", "2", python=_wrapper(workdir, args.frames)
    )
    if up.returncode != 0:
        print(up.stderr.strip(), file=sys.stderr)
        _cli("sandbox", "down", name)
        return 1
    try:
        status = json.loads(_cli("sandbox", "status", name, "-o", "json").stdout)
        pods = {p["name"]: p for p in status["pods"]}
        client, server = pods["node1-pod1"], pods["node2-pod1"]
        agents = {a["name"].removeprefix("agent-"): a["pid"] for a in status["agents"]}
        sides = {"client": agents[client["node"]], "server": agents[server["node"]]}
        warm = Held(client["netns"], server["ip"], ECHO_PORT, 20)  # pools and TLS up
        warm.open()
        warm.close()
        warm.stop()
        pids = list(sides.values())
        _ask(workdir, pids, "start")
        _ask(workdir, pids, "before")
        held = Held(client["netns"], server["ip"], ECHO_PORT, args.hold)
        try:
            held.open()
            time.sleep(1.0)
            _ask(workdir, pids, "during")
        finally:
            held.stop()
        for side, pid in sides.items():
            before, during = (
                pickle.loads((workdir / f"snapshot-{pid}-{tag}").read_bytes())
                for tag in ("before", "during")
            )
            print(f"== {side}-side agent (pid {pid}, {len(with_children([pid]))} processes)")
            print(breakdown(before, during, args.hold, args.top))
    finally:
        _cli("sandbox", "down", name)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        run_agent(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(main())
