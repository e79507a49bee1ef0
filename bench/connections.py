"""What a connection costs (issue 21): how many new connections per second the mesh opens
beside stunnel and a Node.js http2 CONNECT pair, and what the agents hold in memory idle, per
idle tunnelled connection and after a burst of 5,000 connections has closed.

The path is `bench.mesh`'s: a client pod on node1, a server pod on node2. `mesh` is our agents
(iptables capture) in a sandbox with agents; `stunnel`, `node_h2` (`bench/h2_connect_pair.js`:
one pooled mutual TLS 1.3 http2 session, a CONNECT stream per connection) and `py_h2` (the
same shape in bare Python, `bench.py_h2_pair`: the floor under a Python HBONE tunnel) run in a
sandbox without agents. Each round starts a fresh sandbox with agents (so "idle, just after start"
is measured every round) and then, the variants interleaved:

* `conn_per_s`: `bench.probe connrate`, short HTTP/1.1 with `Connection: close`, one
  connection at a time (the figure `bench.mesh` reports), and `cpu_us_per_conn`, the CPU both
  tunnel processes spent per connection meanwhile; `conn_per_s_8`: 8 of them at once;
* `per_conn_client_kib`/`per_conn_server_kib`: RSS growth of the client-side and server-side
  tunnel process per idle connection, with HOLD connections open (each has echoed one
  message), the mesh's agents and the references';
* the mesh only: each agent's RSS (and its anonymous / file split) just after start, and
  both agents' RSS before, at the peak of and 5 s after BURST connections open at once.

Medians of the rounds, and a `goals` list against issue 21's table. Prints one JSON object on
its last line.

    python -m bench.connections [--rounds 3] [--seconds 3] [--hold 1000] [--burst 5000]

(`python -m bench.connections hold HOST PORT COUNT` is the client it starts in the client pod
to hold COUNT connections open.)
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from typing import Any

from bench.harness import (
    ECHO_PORT,
    HTTP_PORT,
    NODEAGENT,
    ROOT,
    Figures,
    NodeH2Pair,
    PyH2Pair,
    RelayPair,
    Sandbox,
    Session,
    Stunnel,
    Variant,
    cpu_seconds,
    in_ns,
    interleaved,
    memory_kib,
    program,
    require_root,
    sh,
    with_children,
)
from bench.mesh import Mesh, check_path, established
from bench.probe import MESSAGE
from bench.report import emit, goal
from nodeagent.cli.interpreter import DATA_PATH_ENVIRONMENT

MIB = 1024
# Connections opened at once while holding many: well under the kernel's listen backlog
# (net.core.somaxconn) and the demo app's (512), so a burst is never refused for lack of it.
BATCH = 200
CONCURRENT = 8  # clients at once for the secondary connection rate
SETTLE = 1.0  # seconds for the agents to finish with connections before RSS is read
AFTER_CLOSE = 5.0  # seconds between a burst's close and the "after" reading


# -- the client held in the client pod -------------------------------------------------------


def open_batch(host: str, port: int, count: int, timeout: float = 30) -> list[socket.socket]:
    """`count` connections opened at once, each having echoed one 64-byte message."""
    sel = selectors.DefaultSelector()
    socks, received = [], {}
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
    pending, deadline = count, time.monotonic() + timeout
    while pending:
        events = sel.select(max(0.0, deadline - time.monotonic()))
        if not events:
            raise TimeoutError(f"{pending} of {count} connections to {host}:{port} not echoed")
        for key, mask in events:
            s = key.fileobj  # type: ignore[assignment]
            if mask & selectors.EVENT_WRITE:
                error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, f"connect to {host}:{port}")
                s.send(MESSAGE)  # 64 bytes into an empty send buffer: all of it
                sel.modify(s, selectors.EVENT_READ)
                received[s] = 0
            else:
                data = s.recv(len(MESSAGE))
                if not data:
                    raise ConnectionError(f"{host}:{port} closed before echoing")
                received[s] += len(data)
                if received[s] >= len(MESSAGE):
                    sel.unregister(s)
                    pending -= 1
    sel.close()
    return socks


def hold(host: str, port: int, count: int) -> None:
    """Open `count` echoed connections in batches, print "ok COUNT", close them all at the
    first line on stdin and print "closed", then exit when stdin ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + 64
    if soft < need:
        top = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    socks: list[socket.socket] = []
    while len(socks) < count:
        socks += open_batch(host, port, min(BATCH, count - len(socks)))
    print(f"ok {len(socks)}", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    print("closed", flush=True)
    sys.stdin.read()


class Held:
    """`hold` run in a pod: `open()` returns once COUNT connections are up, `close()` once
    they are closed, `stop()` ends the process."""

    def __init__(self, netns: str, host: str, port: int, count: int) -> None:
        argv = [sys.executable, "-m", "bench.connections", "hold", host, str(port), str(count)]
        self.count = count
        self.proc = subprocess.Popen(
            in_ns(netns, *argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )

    def expect(self, line: str) -> None:
        assert self.proc.stdout is not None
        got = self.proc.stdout.readline().strip()
        if got != line:
            self.stop()
            raise RuntimeError(f"holding {self.count} connections: expected {line!r}, got {got!r}")

    def open(self) -> None:
        self.expect(f"ok {self.count}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        self.expect("closed")

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- measurements ----------------------------------------------------------------------------


def sides(variant: Variant, box: Sandbox) -> dict[str, list[int]]:
    """The tunnel's client-side and server-side processes (an agent with its children)."""
    if isinstance(variant, Mesh):
        return {
            "client": with_children([box.agents[box.client["node"]]]),
            "server": with_children([box.agents[box.server["node"]]]),
        }
    assert isinstance(variant, RelayPair)  # started server first, then client
    return {"client": variant.pids[1:2], "server": variant.pids[0:1]}


def conn_rate(variant: Variant, client_ns: str, seconds: float, clients: int) -> float:
    """New connections per second, `clients` `probe connrate` processes at once (summed)."""
    host, port = variant.target(HTTP_PORT)
    argv = in_ns(client_ns, *program("probe", "connrate", host, str(port), str(seconds)))
    runs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(clients)
    ]
    total = 0.0
    for run in runs:
        out, err = run.communicate(timeout=seconds + 60)
        if run.returncode != 0:
            raise RuntimeError(f"{variant.name}: connrate failed: {err.strip()[-300:]}")
        total += float(out)
    return round(total, 1)


def per_connection(variant: Variant, box: Sandbox, client_ns: str, count: int) -> dict[str, float]:
    """RSS growth (KiB) per idle connection of the client-side and server-side processes,
    `count` connections held open."""
    procs = sides(variant, box)
    host, port = variant.target(ECHO_PORT)

    def rss() -> dict[str, int]:
        if isinstance(variant, NodeH2Pair):
            variant.collect()  # V8 collects when it likes: let it be now, before reading
        time.sleep(SETTLE)
        return {side: memory_kib(pids)["VmRSS"] for side, pids in procs.items()}

    before = rss()
    held = Held(client_ns, host, port, count)
    try:
        held.open()
        during = rss()
    finally:
        held.stop()
    return {
        f"per_conn_{side}_kib": round((during[side] - before[side]) / count, 2) for side in procs
    }


def idle(box: Sandbox) -> dict[str, float]:
    """Each agent's RSS and its anonymous / file split (MiB), and the larger agent's."""
    out: dict[str, float] = {}
    for node, pid in sorted(box.agents.items()):
        mem = memory_kib(with_children([pid]))
        out[f"{node}_rss_mib"] = round(mem["VmRSS"] / MIB, 1)
        out[f"{node}_anon_mib"] = round(mem["RssAnon"] / MIB, 1)
        out[f"{node}_file_mib"] = round(mem["RssFile"] / MIB, 1)
    out["idle_rss_mib"] = max(v for k, v in out.items() if k.endswith("_rss_mib"))
    out["imports_rss_mib"] = imports_rss_mib()
    return out


# What the agent's modules and their dependencies cost before it does anything: the RSS of
# an interpreter, started with the agent's settings, that imports what `nodeagent run`
# imports (at start, and at its first pod: uvloop, python-iptables, pyroute2), and stops.
_IMPORTS = (
    "import re, nodeagent.app, nodeagent.cli.run, uvloop, iptc, pyroute2; "
    "print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])"
)


def imports_rss_mib() -> float:
    """RSS (MiB) of a Python that imports the agent and stops: the floor under its idle RSS."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **DATA_PATH_ENVIRONMENT},
    )
    return round(int(out.stdout) / MIB, 1)


def burst(variant: Mesh, box: Sandbox, client_ns: str, count: int) -> dict[str, float]:
    """Both agents' RSS (MiB) before, at the peak of `count` connections open at once, and
    AFTER_CLOSE seconds after they closed; after / before per side."""
    procs = sides(variant, box)
    host, port = variant.target(ECHO_PORT)

    def rss() -> dict[str, float]:
        return {side: memory_kib(pids)["VmRSS"] / MIB for side, pids in procs.items()}

    time.sleep(SETTLE)
    before = rss()
    held = Held(client_ns, host, port, count)
    try:
        held.open()
        time.sleep(SETTLE)
        peak = rss()
        held.close()
    finally:
        held.stop()
    time.sleep(AFTER_CLOSE)
    after = rss()
    out: dict[str, float] = {}
    for side in procs:
        out[f"burst_{side}_before_mib"] = round(before[side], 1)
        out[f"burst_{side}_peak_mib"] = round(peak[side], 1)
        out[f"burst_{side}_after_mib"] = round(after[side], 1)
        out[f"burst_{side}_after_ratio"] = round(after[side] / before[side], 3)
    return out


def check_pooled(
    variant: NodeH2Pair | PyH2Pair, client_ns: str, server_ns: str, server_ip: str
) -> str:
    """An HTTP/2 pair's path: two connections held through it arrive at the server pod's echo
    server from the pair's server side, over ONE TLS connection to its http2 port."""
    local, remote = variant.ports[ECHO_PORT]
    held = Held(client_ns, "127.0.0.1", local, 2)
    try:
        held.open()
        client, server = established(client_ns), established(server_ns)
    finally:
        held.stop()
    sessions = [1 for _, ip, port in client if ip == server_ip and port == remote]
    relayed = [1 for lport, ip, _ in server if lport == ECHO_PORT and ip == "127.0.0.1"]
    if len(sessions) != 1 or len(relayed) < 2:
        raise RuntimeError(
            f"{variant.name}: {len(sessions)} connections to {server_ip}:{remote} (expected one "
            f"pooled session), {len(relayed)} arrived on :{ECHO_PORT} from its server side "
            "(expected 2)"
        )
    return f"{variant.name} :{local} -> one pooled session to {server_ip}:{remote}, not captured"


RATES = {"conn_per_s": "sequential", "conn_per_s_8": f"{CONCURRENT} at once"}
RATE_GOALS = {"stunnel": 4.0, "node_h2": 1.0}  # the mesh's rate at least this times theirs
# No goal, a floor: the bare Python HTTP/2 pair (`bench.py_h2_pair`) is what a Python HBONE
# tunnel can reach at all, so mesh / py_h2 is the share of it the agents keep.
RATE_FLOORS = ("py_h2",)


def rate_ratios(rnd: Figures) -> dict[str, float]:
    """One round's connection rates of the mesh over each reference's (a ratio per round, so
    a drift of the machine's speed between rounds cancels out before the median)."""
    mesh = rnd.get("mesh", {})
    return {
        f"{key}_vs_{ref}": round(mesh[key] / rnd[ref][key], 3)
        for key in RATES
        for ref in (*RATE_GOALS, *RATE_FLOORS)
        if key in mesh and rnd.get(ref, {}).get(key)
    }


def goals(med: Figures) -> list[dict[str, Any]]:
    """Issue 21's rows this family measures, from the medians (the rates' ratios are the
    medians of each round's, `rate_ratios`)."""
    out = []
    ratios = med.get("mesh_ratios", {})
    for key, how in RATES.items():
        # For scale: how far a pooled HTTP/2 CONNECT pair in Node gets past stunnel, and
        # where the bare Python pair stands against Node's.
        rates = {name: med.get(name, {}).get(key) for name in ("stunnel", "node_h2", "py_h2")}
        scales = {
            "stunnel": ("node_h2", "stunnel"),
            "node_h2": ("py_h2", "node_h2"),
        }
        for ref, bound in RATE_GOALS.items():
            if f"{key}_vs_{ref}" in ratios:
                value = ratios[f"{key}_vs_{ref}"]
                figure = f"new connections/s ({how}), mesh / {ref}"
                top, bottom = scales[ref]
                a, b = rates[top], rates[bottom]
                context = f"{top} / {bottom} {a / b:.2f}" if a and b else ""
                out.append(goal(figure, value, ">=", bound, context=context))
    mesh = med.get("mesh", {})
    memory = med.get("mesh_memory", {})
    if "idle_rss_mib" in memory:
        value = memory["idle_rss_mib"]
        floor = memory.get("imports_rss_mib")
        out.append(
            goal(
                "agent RSS idle just after start (larger agent)",
                value,
                "<=",
                40,
                " MiB",
                context=f"its imports alone {floor} MiB" if floor else "",
            )
        )
    for side in ("client", "server"):
        if f"per_conn_{side}_kib" in mesh:
            value = mesh[f"per_conn_{side}_kib"]
            out.append(
                goal(f"memory per idle connection, {side}-side agent", value, "<=", 6, " KiB")
            )
        if f"burst_{side}_after_ratio" in memory:
            value = memory[f"burst_{side}_after_ratio"]
            out.append(
                goal(f"{side}-side agent RSS after a burst closed / before", value, "<=", 1.1)
            )
    return out


# -- the benchmark ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="per connection-rate run")
    ap.add_argument("--hold", type=int, default=1000, help="idle connections held open")
    ap.add_argument("--burst", type=int, default=5000, help="connections open at once")
    args = ap.parse_args()
    if not require_root("bench.connections"):
        return 2
    with Session("conn") as session:
        procs, workdir = session.procs, session.workdir
        plain = session.sandbox("cp", agents=False)
        client, server, server_ip = plain.client["netns"], plain.server["netns"], plain.server["ip"]
        stunnel = Stunnel(procs, workdir, client, server, server_ip)
        node = NodeH2Pair(procs, workdir, client, server, server_ip)
        py_h2 = PyH2Pair(procs, workdir, client, server, server_ip)
        paths = {
            "stunnel": check_path(stunnel, client, server, server_ip),
            "node_h2": check_pooled(node, client, server, server_ip),
            "py_h2": check_pooled(py_h2, client, server, server_ip),
        }
        references: list[tuple[Variant, Sandbox]] = [
            (stunnel, plain),
            (node, plain),
            (py_h2, plain),
        ]

        def one_round() -> Figures:
            number = len(session.names)  # this round's sandbox with agents is a fresh one
            box = session.sandbox(f"c{number}", agents=True)
            mesh = Mesh(box.server["ip"], box.agent_pids)
            time.sleep(SETTLE)
            rnd: Figures = {"mesh_memory": idle(box)}
            if "mesh" not in paths:
                paths["mesh"] = check_path(
                    mesh, box.client["netns"], box.server["netns"], mesh.server_ip
                )
            variants = [(mesh, box), *references]
            turn = number % len(variants)  # the first variant rotates from round to round
            variants = variants[turn:] + variants[:turn]
            for v, b in variants:
                pids = v.tunnel_pids()
                cpu = cpu_seconds(pids)
                rate = conn_rate(v, b.client["netns"], args.seconds, 1)
                cpu = cpu_seconds(pids) - cpu
                made = max(1.0, rate * args.seconds)
                rnd[v.name] = {"conn_per_s": rate, "cpu_us_per_conn": round(cpu / made * 1e6, 1)}
            for v, b in variants:
                rate = conn_rate(v, b.client["netns"], args.seconds, CONCURRENT)
                rnd[v.name]["conn_per_s_8"] = rate
            for v, b in variants:
                rnd[v.name].update(per_connection(v, b, b.client["netns"], args.hold))
            rnd["mesh_memory"].update(burst(mesh, box, box.client["netns"], args.burst))
            rnd["mesh_ratios"] = rate_ratios(rnd)
            sh(NODEAGENT, "sandbox", "down", box.name, check=False)
            return rnd

        rounds, med = interleaved(args.rounds, one_round)
        emit(
            {
                "setup": f"client pod on node1, server pod on node2; stunnel, node_h2 and py_h2 "
                f"in a sandbox without agents, mesh (iptables capture) in a fresh sandbox with "
                f"agents each round; {args.rounds} interleaved rounds, {args.seconds}s "
                f"connection-rate runs (1 and {CONCURRENT} clients), {args.hold} idle connections "
                f"held, "
                f"a burst of {args.burst} in batches of {BATCH}",
                "paths": paths,
                "median": med,
                "goals": goals(med),
                "rounds": rounds,
            }
        )
        return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["hold"]:
        hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
