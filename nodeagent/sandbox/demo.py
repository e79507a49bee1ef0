"""The newcomer's tour: build a 2x2 sandbox, call pods across nodes, tear it down.

The caller supplies how to print lines and the status (rendering belongs to the
CLI). The sandbox is always removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from nodeagent.sandbox import probe
from nodeagent.sandbox.manager import SandboxManager
from nodeagent.sandbox.plan import ECHO_PORT, HTTP_PORT, PodPlan

DEMO_NAME = "demo"


def run_demo(
    manager: SandboxManager,
    say: Callable[[str], None],
    show_status: Callable[[dict[str, Any]], None],
    name: str = DEMO_NAME,
) -> bool:
    """Run the tour; True if every call succeeded."""
    if manager.exists(name):
        say(f"removing sandbox {name!r} left over from an earlier run")
        manager.down(name)
    started = time.monotonic()
    try:
        plan = manager.up(name, 2, 2)
        say(f"sandbox {name!r} up in {time.monotonic() - started:.1f}s: 2 nodes x 2 pods\n")
        status = manager.status(name)
        show_status(status)
        cp = status["controlplane"]
        if cp is not None:
            serves = cp.get("serves", {})
            say(
                f"\ncontrol plane at {cp['address']} (in {cp['netns']}) serves "
                f"{serves.get('workloads', 0)} workloads and {serves.get('services', 0)} "
                f"services over delta xDS from {cp['mesh_file']}"
            )
        pods = {p.name: p for p in plan.pods}
        calls = [
            (pods["node1-pod1"], pods["node2-pod2"]),  # across nodes
            (pods["node2-pod1"], pods["node1-pod1"]),  # across nodes, the other way
            (pods["node1-pod1"], pods["node1-pod2"]),  # same node
        ]
        ok = all([_http(manager, src, dst, say) for src, dst in calls])
        ok = _echo(manager, pods["node1-pod2"], pods["node2-pod1"], say) and ok
        say("\nall calls succeeded" if ok else "\nsome calls FAILED")
        return ok
    finally:
        manager.down(name)
        say(f"sandbox {name!r} removed")


def _http(manager: SandboxManager, src: PodPlan, dst: PodPlan, say: Callable[[str], None]) -> bool:
    say(f"\nHTTP  {src.name} ({src.ip}) -> {dst.name} http://{dst.ip}:{HTTP_PORT}/hello")
    try:
        answer = probe.http_get(manager.adapter, src.netns, dst.ip, HTTP_PORT, "/hello")
    except probe.ProbeError as exc:
        say(f"  FAILED: {exc}")
        return False
    shown = {
        k: answer.get(k) for k in ("pod", "node", "service_account", "client_ip", "client_port")
    }
    say(f"  {json.dumps(shown)}")
    if answer.get("pod") != dst.name or answer.get("client_ip") != src.ip:
        say(f"  FAILED: expected pod {dst.name} to see caller {src.ip}")
        return False
    return True


def _echo(manager: SandboxManager, src: PodPlan, dst: PodPlan, say: Callable[[str], None]) -> bool:
    payload = f"hello from {src.name}".encode()
    say(f"\nECHO  {src.name} ({src.ip}) -> {dst.name} tcp://{dst.ip}:{ECHO_PORT}")
    try:
        reply = probe.echo(manager.adapter, src.netns, dst.ip, ECHO_PORT, payload)
    except probe.ProbeError as exc:
        say(f"  FAILED: {exc}")
        return False
    say(f"  sent {payload.decode()!r}, got back {reply.decode(errors='replace')!r}")
    return reply == payload
