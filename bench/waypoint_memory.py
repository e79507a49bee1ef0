"""The waypoint's memory after a burst of tunnels (issue 21's burst row, for the waypoint).

A sandbox with a waypoint (`sandbox up --waypoint`): the demo namespace's services go through
it. A client in node1-pod1 (`bench.connections`' `Held`) opens BURST connections at once to
the `echo` service, each echoing one message, holds them, then closes them all; the
waypoint's RSS is read before, at the peak and AFTER_CLOSE seconds after. Two bursts per
sandbox (the second shows whether what stays keeps growing), a fresh sandbox per round.

The path is checked every round: the client-side agent's access log must show each burst's
connections answered by the waypoint's identity.

    python -m bench.waypoint_memory [--rounds 2] [--burst 3000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.connections import MIB, Held
from bench.harness import NODEAGENT, Session, memory_kib, require_root, sh
from bench.report import emit, goal

AFTER_CLOSE = 6.0  # seconds between a burst's close and the "after" reading (trim looks every 2)
SETTLE = 1.0
BURSTS = 2  # per sandbox
ECHO_SERVICE = "echo"


def echo_target(mesh_file: str) -> tuple[str, int]:
    """The echo service's VIP and port, as the sandbox wrote them in its mesh file."""
    mesh = yaml.safe_load(Path(mesh_file).read_text())
    for service in mesh.get("services") or []:
        if service.get("name") == ECHO_SERVICE:
            return service["vip"], int(service["ports"][0]["port"])
    raise RuntimeError(f"{mesh_file}: no service {ECHO_SERVICE!r}")


def tunnelled_to(log: str, namespace: str, account: str) -> int:
    """Access log lines of connections the client-side agent tunnelled to the waypoint: the
    peer that answered is the waypoint's identity (the CONNECT itself names the service)."""
    needle = f'/ns/{namespace}/sa/{account}","bytes_sent"'
    return sum(
        '"dst.identity":"spiffe://' in line and needle in line
        for line in Path(log).read_text().splitlines()
    )


def one_round(session: Session, number: int, burst: int) -> dict[str, float]:
    box = session.sandbox(f"wm{number}", agents=True, waypoint=True)
    waypoint = box.status["waypoint"]
    client = box.client
    agent_log = next(a["log"] for a in box.status["agents"] if a["name"] == "agent-node1")
    host, port = echo_target(box.status["controlplane"]["mesh_file"])

    def rss() -> float:
        return memory_kib([waypoint["pid"]])["VmRSS"] / MIB

    warm = Held(client["netns"], host, port, 20)  # first tunnels: pool, caches, certificates
    warm.open()
    warm.close()
    warm.stop()
    time.sleep(AFTER_CLOSE)
    out: dict[str, float] = {"before_mib": round(rss(), 1)}
    identity = (waypoint["namespace"], waypoint["name"])  # the sandbox's waypoint runs as its name
    seen = tunnelled_to(agent_log, *identity)
    for b in range(BURSTS):
        held = Held(client["netns"], host, port, burst)
        try:
            held.open()
            time.sleep(SETTLE)
            out[f"peak_{b + 1}_mib"] = round(rss(), 1)
            held.close()
        finally:
            held.stop()
        time.sleep(AFTER_CLOSE)
        out[f"after_{b + 1}_mib"] = round(rss(), 1)
        out[f"after_{b + 1}_ratio"] = round(out[f"after_{b + 1}_mib"] / out["before_mib"], 3)
    tunnelled = tunnelled_to(agent_log, *identity) - seen
    if tunnelled < BURSTS * burst:
        raise RuntimeError(
            f"only {tunnelled} of {BURSTS * burst} connections went through the waypoint"
        )
    sh(NODEAGENT, "sandbox", "down", box.name, check=False)
    return out


def goals(median: dict[str, float], burst: int) -> list[dict[str, Any]]:
    """The burst row for the waypoint, from the medians: the larger after / before ratio of
    the bursts, against the agents' goal (within 10% of before)."""
    ratios = [v for k, v in median.items() if k.startswith("after_") and k.endswith("_ratio")]
    figure = f"waypoint RSS after a {burst}-tunnel burst closed / before (the larger of {BURSTS})"
    return [goal(figure, max(ratios), "<=", 1.1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--burst", type=int, default=3000)
    args = ap.parse_args()
    if not require_root("bench.waypoint_memory"):
        return 2
    with Session("wpmem") as session:
        rounds = []
        for number in range(args.rounds):
            rounds.append(one_round(session, number, args.burst))
            print(f"round {number + 1}: {rounds[-1]}", file=sys.stderr, flush=True)
    median = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
    result: dict[str, Any] = {
        "setup": f"a fresh sandbox with a waypoint per round, {args.rounds} rounds; "
        f"{BURSTS} bursts of {args.burst} connections to the echo service through the "
        f"waypoint, each held open, closed, then {AFTER_CLOSE}s",
        "median": median,
        "goals": goals(median, args.burst),
        "rounds": rounds,
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
