"""Fail closed: an operator's mistake in the control plane's file never puts a pod's
traffic on the wire in plaintext (issue 15's acceptance), checked with tcpdump.

A 2x2 sandbox per capture backend. The caller, node1-pod1 (10.10.1.11), calls
node2-pod2 (10.10.2.12:8080) in a loop on a thread, a new connection each time. Each
test breaks the control plane's mesh file the way an operator would, bypassing
`sandbox apply` (which refuses these edits), keeps it broken with traffic running,
restores it, and checks on the wire and in the agents:

* tcpdump in both nodes' namespaces, on every interface (the underlay and the pods'
  veths), for the app ports: nothing, from the first call to the last;
* the affected pod's calls are refused while its record is missing or wrong, it is
  listed `held` with the reason, and the agent logs why;
* once the file is restored the calls succeed again, over HBONE (port 15008 on the wire).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .e2e_harness import Capture, Mesh, Segment, _cli, sandbox, wait_until

pytestmark = pytest.mark.timeout(300)

CALLER, CALLER_IP = "node1-pod1", "10.10.1.11"
SERVER, SERVER_IP = "node2-pod2", "10.10.2.12"
URL = f"http://{SERVER_IP}:8080/"
APP_PORTS = "tcp and net 10.10.0.0/16 and (port 8080 or port 9000)"
HOLD_WAIT = 20.0  # file poll (0.5 s) + xDS push + the agent's next namespace scan (1 s)
CALLS_PER_PHASE = 8
# curl's exit codes for a refused or reset connection: couldn't connect, empty reply,
# receive failure. Anything else (a timeout, a wrong answer) is not a refusal.
# 55 is the reset arriving between connect() and curl asking for the peer (getpeername:
# ENOTCONN): a refusal that came very fast.
REFUSED_CODES = (7, 52, 55, 56)


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    with sandbox(tmp_path_factory.mktemp("failclosed"), request.param) as running:
        yield running


@dataclass
class Calls:
    ok: int = 0
    refused: int = 0
    other: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + self.refused + len(self.other)


class Traffic:
    """Calls from `src` to `url` in a loop; each is counted in the phase it started in, and
    a new phase begins only once the last call of the one before has ended (so a call
    counted in a phase never sees what the test does after it)."""

    def __init__(self, mesh: Mesh, src: str, url: str) -> None:
        self.mesh, self.src, self.url = mesh, src, url
        self.phase = "before"
        self.calls: dict[str, Calls] = {}
        self._lock = threading.Lock()
        self._in_flight: str | None = None  # the phase of the call running now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                phase = self._in_flight = self.phase
            result = self.mesh.run_in(
                self.src,
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "8",  # a loaded machine's slow answer is no failure; a stall still is
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    self.url,
                ],
                timeout=20,
            )
            calls = self.calls.setdefault(phase, Calls())
            if result.returncode == 0 and result.stdout == "200":
                calls.ok += 1
            elif result.returncode in REFUSED_CODES:
                calls.refused += 1
            else:
                calls.other.append(f"rc={result.returncode} {result.stderr.strip()[:120]}")
            self._in_flight = None
            self._stop.wait(0.05)

    def enter(self, phase: str, *, calls: int = 0) -> None:
        """Start counting in `phase` once the previous phase's last call has ended, then
        wait for `calls` calls made in it. (With edits pushed in about 50 ms, a call still
        running from the phase before could otherwise meet the state the test sets next.)"""
        with self._lock:
            self.phase = phase
        wait_until(
            f"the last call before phase {phase} to end",
            lambda: self._in_flight in (None, phase),
            timeout=15,
        )
        wait_until(
            f"{calls} calls in phase {phase}",
            lambda: self.calls.get(phase, Calls()).total >= calls,
            timeout=60,
        )

    def get(self, phase: str) -> Calls:
        return self.calls.get(phase, Calls())


def mesh_file(mesh: Mesh) -> Path:
    return Path(mesh.status["controlplane"]["mesh_file"])


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".edit")
    tmp.write_text(text)
    tmp.replace(path)


def edit_workloads(mesh: Mesh, change: Callable[[list[dict[str, Any]]], None]) -> None:
    path = mesh_file(mesh)
    data = yaml.safe_load(path.read_text())
    change(data["workloads"])
    write_atomically(path, yaml.safe_dump(data, sort_keys=False))


def pod_view(mesh: Mesh, node: str, pod: str) -> dict[str, Any]:
    result = _cli("pods", "--sandbox", mesh.name, "--node", node, "-o", "json")
    assert result.returncode == 0, result.stderr
    views = [p for p in json.loads(result.stdout) if p["name"] == pod]
    return views[0] if views else {}


def wait_pod_state(mesh: Mesh, node: str, pod: str, state: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(pod_view(mesh, node, pod))
        return seen.get("capture_state") == state

    wait_until(f"{pod} on {node} {state} (last seen {seen})", reached, timeout=HOLD_WAIT)
    return seen


def app_port_captures(mesh: Mesh, tag: str) -> list[Capture]:
    return [
        Capture(mesh.netns(node), mesh.tmp / f"{tag}-{node}.pcap", APP_PORTS)
        for node in ("node1", "node2")
    ]


def stop_all(captures: list[Capture]) -> list[Segment]:
    # The kernel hands packets over in blocks retired at most 1 s later.
    time.sleep(1.5)
    return [s for c in captures for s in c.stop()]


def assert_hbone_again(mesh: Mesh, tag: str) -> None:
    """A call after the restore succeeds and crosses node2 as HBONE, from the caller."""
    capture = Capture(mesh.netns("node2"), mesh.tmp / f"{tag}-hbone.pcap", "tcp port 15008")
    try:
        answer = mesh.get_json(CALLER, URL)
        time.sleep(1.5)
    finally:
        segments = capture.stop()
    assert answer["pod"] == SERVER and answer["client_ip"] == CALLER_IP
    assert any(s.src[0] == CALLER_IP and s.dst == (SERVER_IP, 15008) for s in segments), (
        f"the call after the restore did not cross as HBONE ({capture.stats})"
    )


def break_and_restore(
    mesh: Mesh, tag: str, change: Callable[[list[dict[str, Any]]], None], held: tuple[str, str]
) -> tuple[Traffic, dict[str, Any], list[Segment]]:
    """Apply `change` to the file with traffic running until `held` = (node, pod) is held,
    then restore the file and wait until the pod is ready again. Returns the traffic,
    the held pod's view and every app-port segment seen on either node."""
    path = mesh_file(mesh)
    original = path.read_text()
    captures = app_port_captures(mesh, tag)
    view: dict[str, Any] = {}
    try:
        with Traffic(mesh, CALLER, URL) as traffic:
            traffic.enter("before", calls=CALLS_PER_PHASE)
            traffic.enter("breaking")
            edit_workloads(mesh, change)
            view = wait_pod_state(mesh, *held, "held")
            traffic.enter("broken", calls=CALLS_PER_PHASE)
            traffic.enter("restoring")
            write_atomically(path, original)
            wait_pod_state(mesh, *held, "ready")
            wait_until("a call succeeds again", lambda: mesh.curl(CALLER, URL).returncode == 0)
            traffic.enter("after", calls=CALLS_PER_PHASE)
    finally:
        if path.read_text() != original:
            write_atomically(path, original)
        segments = stop_all(captures)
    return traffic, view, segments


def _describe(segments: list[Segment]) -> str:
    return ", ".join(
        f"{s.src}->{s.dst} flags={s.flags:#x} {s.payload[:24]!r}" for s in segments[:6]
    )


def test_truncated_mesh_file_is_refused_and_traffic_stays_on_hbone(mesh: Mesh) -> None:
    path = mesh_file(mesh)
    original = path.read_text()
    captures = app_port_captures(mesh, "truncate")
    try:
        with Traffic(mesh, CALLER, URL) as traffic:
            traffic.enter("before", calls=CALLS_PER_PHASE)
            path.write_text("")  # what `: > mesh.yaml` does
            traffic.enter("truncated")
            time.sleep(3.0)
            path.write_text(original)
            traffic.enter("after", calls=CALLS_PER_PHASE)
    finally:
        if path.read_text() != original:
            path.write_text(original)
        segments = stop_all(captures)
    assert segments == [], f"app-port packets crossed a node: {_describe(segments)}"
    for phase in ("before", "truncated", "after"):
        calls = traffic.get(phase)
        assert calls.refused == 0 and not calls.other, f"{phase}: {calls}"
    assert traffic.get("truncated").ok > 0
    for node in ("node1", "node2"):
        assert "left the node" not in mesh.agent_log(node)
        assert pod_view(mesh, node, f"{node}-pod1")["capture_state"] == "ready"
    assert_hbone_again(mesh, "truncate")


def test_workload_ip_replaced_in_the_file_holds_the_pod_and_refuses_its_traffic(
    mesh: Mesh,
) -> None:
    def readdress(workloads: list[dict[str, Any]]) -> None:
        [caller] = [w for w in workloads if w["name"] == CALLER]
        caller["ip"] = "10.10.1.99"  # in node1's range, but not the pod's address

    traffic, view, segments = break_and_restore(mesh, "readdress", readdress, ("node1", CALLER))
    assert segments == [], f"app-port packets crossed a node: {_describe(segments)}"
    assert "10.10.1.99" in view["last_error"] and CALLER_IP in view["last_error"]
    assert view["listeners"] == []
    broken = traffic.get("broken")
    assert broken.refused >= CALLS_PER_PHASE and broken.ok == 0 and not broken.other, broken
    for phase in ("before", "after"):
        calls = traffic.get(phase)
        assert calls.ok >= CALLS_PER_PHASE and calls.refused == 0 and not calls.other, calls
    assert "is not in its namespace" in mesh.agent_log("node1")
    assert_hbone_again(mesh, "readdress")


def test_workload_removed_from_the_file_holds_the_pod_and_refuses_its_traffic(
    mesh: Mesh,
) -> None:
    def remove(workloads: list[dict[str, Any]]) -> None:
        workloads[:] = [w for w in workloads if w["name"] != CALLER]

    traffic, view, segments = break_and_restore(mesh, "remove", remove, ("node1", CALLER))
    assert segments == [], f"app-port packets crossed a node: {_describe(segments)}"
    assert "no workload record" in view["last_error"]
    broken = traffic.get("broken")
    assert broken.refused >= CALLS_PER_PHASE and broken.ok == 0 and not broken.other, broken
    assert traffic.get("after").ok >= CALLS_PER_PHASE and traffic.get("after").refused == 0
    assert "capture kept" in mesh.agent_log("node1")
    assert_hbone_again(mesh, "remove")


def test_server_removed_from_the_file_refuses_inbound_and_no_payload_crosses(
    mesh: Mesh,
) -> None:
    """With the server's record gone, the caller's agent keeps the address on HBONE for a
    short grace (the held server refuses the tunnel), then passes the connection through
    as ztunnel does for an unknown destination: its SYN crosses the underlay. The held
    server refuses it (RST), so no byte of the request ever does."""

    def remove(workloads: list[dict[str, Any]]) -> None:
        workloads[:] = [w for w in workloads if w["name"] != SERVER]

    traffic, view, segments = break_and_restore(mesh, "server", remove, ("node2", SERVER))
    with_payload = [s for s in segments if s.payload]
    assert with_payload == [], f"app data crossed a node in clear: {_describe(with_payload)}"
    assert not any(s.src == (SERVER_IP, 8080) and s.flags & 0x12 == 0x12 for s in segments), (
        "the held server accepted a plaintext connection (SYN-ACK from 8080)"
    )
    assert "no workload record" in view["last_error"]
    broken = traffic.get("broken")
    assert broken.refused >= CALLS_PER_PHASE and broken.ok == 0 and not broken.other, broken
    assert traffic.get("after").ok >= CALLS_PER_PHASE
    assert_hbone_again(mesh, "server")


def _knows(mesh: Mesh, node: str, workload: str) -> bool:
    result = _cli("workloads", "--sandbox", mesh.name, "--node", node, "-o", "json")
    assert result.returncode == 0, result.stderr
    return workload in result.stdout


def test_a_removal_the_caller_sees_before_the_server_s_agent_sends_nothing_in_clear(
    mesh: Mesh,
) -> None:
    """The race behind a CI failure: the removal reached the caller's agent first, it
    passed the call through, and the server's agent had not held the pod yet, so its
    plaintext listener took the request. Made certain here by stopping node2's agent
    (SIGSTOP, by pid) while the file changes: the caller's agent must keep the address
    on HBONE, and no byte of the request may cross in clear."""
    path = mesh_file(mesh)
    original = path.read_text()
    agent = next(a for a in mesh.status["agents"] if a["name"] == "agent-node2")
    captures = app_port_captures(mesh, "race")
    os.kill(agent["pid"], signal.SIGSTOP)
    try:
        edit_workloads(
            mesh, lambda ws: ws.__setitem__(slice(None), [w for w in ws if w["name"] != SERVER])
        )
        wait_until("node1's agent forgets the server", lambda: not _knows(mesh, "node1", SERVER))
        results = [mesh.curl(CALLER, URL, "--max-time", "2") for _ in range(3)]
    finally:
        os.kill(agent["pid"], signal.SIGCONT)
        write_atomically(path, original)
        segments = stop_all(captures)
    assert [r.returncode for r in results if r.returncode == 0] == [], "a call succeeded in clear"
    with_payload = [s for s in segments if s.payload]
    assert with_payload == [], f"app data crossed a node in clear: {_describe(with_payload)}"
    wait_pod_state(mesh, "node2", SERVER, "ready")
    wait_until("a call succeeds again", lambda: mesh.curl(CALLER, URL).returncode == 0)
