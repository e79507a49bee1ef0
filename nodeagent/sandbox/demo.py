"""The newcomer's tour of the mesh: a 2x2 sandbox, calls across nodes, a policy, tear-down.

Steps: build the sandbox (control plane + one agent per node); say who is who
(each pod's SPIFFE identity, confirmed by the certificates its node's agent
holds); call pods across nodes and through a service VIP, showing the caller's
address as the server saw it; capture one call on the receiving node to show
the wire carries only TLS to 15008 (skipped without tcpdump); apply a DENY
policy for the `frontend` service account and show its call refused while the
`backend` caller still gets through, with the agent's log line naming the
refused identity; then make an operator's slip, removing a pod's workload
record from the control plane, and show the pod's calls refused (held by its
agent, never sent in plaintext) until the record is restored; through the
waypoint, routing by header and an automatic fallback (v2 fails every request,
retries and outlier detection serve every user from v1); last, a canary:
a VirtualService sends 10% of the backend's connections to v2, and when v2's
app dies every call is still answered, by v1 (the agent retries the refused
connect on v1 and ejects v2).

The caller supplies how to print lines and the status (rendering belongs to the
CLI), and the validator for the policy file (the control plane's parser, which
this package may not import). The sandbox is always removed, also on failure
or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from nodeagent.model.constants import INBOUND_HBONE_PORT, METRICS_PORT
from nodeagent.model.identity import Identity
from nodeagent.sandbox import probe
from nodeagent.sandbox.manager import MeshValidator, SandboxError, SandboxManager
from nodeagent.sandbox.mesh import (
    TRUST_DOMAIN,
    waypoint_namespace,
    waypoint_resources,
    workload_entry,
)
from nodeagent.sandbox.netns import netns_path
from nodeagent.sandbox.plan import ECHO_PORT, HTTP_PORT, PodPlan, SandboxPlan
from nodeagent.sandbox.processes import NSENTER

DEMO_NAME = "demo"
POLICY_WAIT = 10.0  # the control plane polls its file every 0.5 s, then pushes to the agents
BACKEND_VIP = "10.96.0.10"

DENY_FRONTEND = """\
authorizationPolicies:
- metadata: {name: deny-frontend, namespace: demo}
  spec:
    action: DENY
    selector:
      matchLabels: {app: backend}
    rules:
    - from: [{source: {principals: ["cluster.local/ns/demo/sa/frontend"]}}]
"""

CANARY = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: demo}
spec:
  host: backend
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 30s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend-canary, namespace: demo}
spec:
  hosts: [backend]
  tcp:
  - route:
    - {destination: {host: backend, subset: v1}, weight: 90}
    - {destination: {host: backend, subset: v2}, weight: 10}
"""
CANARY_CALLS = 300

Say = Callable[[str], None]


HEADER_ROUTES = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend-versions, namespace: demo}
spec:
  host: backend
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend-by-user, namespace: demo}
spec:
  hosts: [backend]
  http:
  - match: [{headers: {x-user: {exact: ios}}}]
    route: [{destination: {host: backend, subset: v2}}]
  - route: [{destination: {host: backend, subset: v1}}]
"""

# v2 fails every request (`sandbox behave`): the waypoint retries each 5xx on another
# endpoint and ejects v2 after its second 5xx in a row, so every user is served by v1.
FALLBACK = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend-fallback, namespace: demo}
spec:
  host: backend
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 30s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend-fallback, namespace: demo}
spec:
  hosts: [backend]
  http:
  - route:
    - {destination: {host: backend, subset: v1}, weight: 50}
    - {destination: {host: backend, subset: v2}, weight: 50}
    retries: {attempts: 3, retryOn: 5xx}
"""
FALLBACK_CALLS = 50


def _accept_any(text: str, source: str) -> None:
    """Stand-in validator: the demo's policy is fixed, and the control plane checks the file."""


def run_demo(
    manager: SandboxManager,
    say: Say,
    show_status: Callable[[dict[str, Any]], None],
    name: str = DEMO_NAME,
    validate: MeshValidator | None = None,
) -> bool:
    """Run the tour; True if every step showed what it should."""
    if manager.exists(name):
        say(f"removing sandbox {name!r} left over from an earlier run")
        manager.down(name)
    started = time.monotonic()
    try:
        # The waypoint pod runs from the start; the demo namespace is sent through it
        # only in the header-routing scene.
        plan = manager.up(name, 2, 2, waypoint=True, use_waypoint=False)
        say(
            f"sandbox {name!r} up in {time.monotonic() - started:.1f}s: 2 nodes x 2 pods, "
            "one agent per node, a waypoint for the demo namespace (idle until used)\n"
        )
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
        logs = {a["name"].removeprefix("agent-"): Path(a["log"]) for a in status["agents"]}
        pods = {p.name: p for p in plan.pods}

        ok = _identities(plan, logs, say)

        say("\n== calls through the mesh (HBONE: HTTP/2 CONNECT over mutual TLS to port 15008)")
        calls = [
            (pods["node1-pod1"], pods["node2-pod2"]),  # across nodes
            (pods["node2-pod1"], pods["node1-pod2"]),  # across nodes, the other way
            (pods["node1-pod1"], pods["node1-pod2"]),  # same node
        ]
        ok = all([_http(manager, src, dst, say) for src, dst in calls]) and ok
        ok = _http_vip(manager, pods["node2-pod1"], say) and ok
        ok = _echo(manager, pods["node1-pod2"], pods["node2-pod1"], say) and ok

        ok = _wire(manager, plan, pods["node1-pod1"], pods["node2-pod2"], say) and ok
        ok = _policy(manager, name, validate, pods, logs["node2"], say) and ok
        forgotten, target = pods["node1-pod2"], pods["node2-pod1"]
        ok = _fail_closed(manager, name, validate, forgotten, target, logs["node1"], say) and ok
        # To node1-pod1: the policy scene left frontend -> backend denied.
        ok = _enrollment(manager, name, pods["node2-pod1"], pods["node1-pod1"], logs, say) and ok
        ok = _header_routing(manager, name, validate, plan, pods["node2-pod1"], say) and ok
        ok = _fallback(manager, name, validate, plan, pods["node2-pod1"], say) and ok
        ok = _canary(manager, name, validate, plan, pods["node2-pod1"], say) and ok
        say("\nevery step showed what it should" if ok else "\nsome steps FAILED")
        return ok
    finally:
        manager.down(name)
        say(f"sandbox {name!r} removed")
        say("see the metrics in Prometheus: `sandbox up NAME --prometheus` (docs/observability.md)")


def _identity(pod: PodPlan) -> Identity:
    return Identity(TRUST_DOMAIN, pod.namespace, pod.service_account)


def _identities(plan: SandboxPlan, logs: dict[str, Path], say: Say) -> bool:
    say("\n== who is who: each pod's SPIFFE identity comes from its service account")
    for pod in plan.pods:
        say(f"  {pod.name:<11} {pod.ip:<11} {pod.node}  {_identity(pod)}")
    ok = True
    for node in plan.nodes:
        wanted = {str(_identity(p)) for p in plan.pods if p.node == node.name}
        held: set[str] = set()
        deadline = time.monotonic() + 5
        while not wanted <= held and time.monotonic() < deadline:
            held = set(re.findall(r"certificate for (spiffe://\S+) issued", _read(logs[node.name])))
            if not wanted <= held:
                time.sleep(0.1)
        if wanted <= held:
            say(f"  the agent of {node.name} holds certificates for {', '.join(sorted(wanted))}")
        else:
            say(f"  FAILED: the agent of {node.name} logged no certificate for {wanted - held}")
            ok = False
    return ok


def _http(manager: SandboxManager, src: PodPlan, dst: PodPlan, say: Say) -> bool:
    say(
        f"\nHTTP  {src.name} ({src.ip}, sa {src.service_account}) -> "
        f"{dst.name} http://{dst.ip}:{HTTP_PORT}/hello"
    )
    try:
        answer = probe.http_get(manager.adapter, src.netns, dst.ip, HTTP_PORT, "/hello")
    except probe.ProbeError as exc:
        say(f"  FAILED: {exc}")
        return False
    say(f"  {_shown(answer)}")
    if answer.get("pod") != dst.name or answer.get("client_ip") != src.ip:
        say(f"  FAILED: expected pod {dst.name} to see caller {src.ip}")
        return False
    return True


def _http_vip(manager: SandboxManager, src: PodPlan, say: Say) -> bool:
    say(f"\nHTTP  {src.name} ({src.ip}) -> service backend http://{BACKEND_VIP}:{HTTP_PORT}/")
    try:
        answer = probe.http_get(manager.adapter, src.netns, BACKEND_VIP, HTTP_PORT, "/")
    except probe.ProbeError as exc:
        say(f"  FAILED: {exc}")
        return False
    say(f"  {_shown(answer)}  (an endpoint chosen by the caller's agent)")
    if answer.get("service_account") != "backend" or answer.get("client_ip") != src.ip:
        say(f"  FAILED: expected a backend pod to see caller {src.ip}")
        return False
    return True


def _shown(answer: dict[str, Any]) -> str:
    keys = ("pod", "node", "service_account", "client_ip", "client_port")
    return json.dumps({k: answer.get(k) for k in keys})


def _echo(manager: SandboxManager, src: PodPlan, dst: PodPlan, say: Say) -> bool:
    payload = f"hello from {src.name}".encode()
    say(f"\nECHO  {src.name} ({src.ip}) -> {dst.name} tcp://{dst.ip}:{ECHO_PORT}")
    try:
        reply = probe.echo(manager.adapter, src.netns, dst.ip, ECHO_PORT, payload)
    except probe.ProbeError as exc:
        say(f"  FAILED: {exc}")
        return False
    say(f"  sent {payload.decode()!r}, half-closed, got back {reply.decode(errors='replace')!r}")
    return reply == payload


# A packet line of `tcpdump -nn`: "... IP 10.10.1.11.53612 > 10.10.2.12.15008: ..."
_PACKET = re.compile(r" IP (\d+\.\d+\.\d+\.\d+)\.(\d+) > (\d+\.\d+\.\d+\.\d+)\.(\d+): ")


def _wire(manager: SandboxManager, plan: SandboxPlan, src: PodPlan, dst: PodPlan, say: Say) -> bool:
    node = plan.node(dst.node)
    say(f"\n== on the wire: a capture on {dst.node} while {src.name} calls {dst.name}")
    tcpdump = shutil.which("tcpdump")
    if node is None or tcpdump is None:
        say("  (skipped: tcpdump is not installed)")
        return True
    marker = f"marker-{uuid.uuid4().hex[:12]}"
    # -A prints each payload as text, so a plaintext marker would show; the pod
    # ranges only (the node's own xDS traffic is not the point here).
    proc = subprocess.Popen(
        [NSENTER, f"--net={netns_path(node.netns)}", "--", tcpdump, "-i", "any", "-nn",
         "-l", "-A", "tcp and net 10.10.0.0/16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        if not _await_line(proc, b"listening on", 5.0):
            say("  (skipped: tcpdump did not start)")
            return True
        try:
            probe.http_get(manager.adapter, src.netns, dst.ip, HTTP_PORT, f"/{marker}")
        except probe.ProbeError as exc:
            say(f"  FAILED: {exc}")
            return False
        time.sleep(0.3)  # the last segments
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    packets = _PACKET.findall(out.decode("latin-1"))
    ports = sorted({int(p) for _, sport, _, dport in packets for p in (sport, dport)})
    hbone_only = bool(packets) and all(
        INBOUND_HBONE_PORT in (int(s), int(d)) for _, s, _, d in packets
    )
    leaked = marker.encode() in out
    say(
        f"  {len(packets)} packets between pods crossed {dst.node}; "
        f"{'all' if hbone_only else 'NOT all'} to or from port {INBOUND_HBONE_PORT} "
        f"(ports seen: {', '.join(map(str, ports)) or 'none'})"
    )
    say(
        f"  the request path /{marker} "
        + (
            "APPEARED in the clear"
            if leaked
            else "appears in none of them: it travelled inside TLS"
        )
    )
    return hbone_only and not leaked


def _await_line(proc: subprocess.Popen[bytes], text: bytes, timeout: float) -> bool:
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while text not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return False
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                return False
            seen += chunk
    return True


def _policy(
    manager: SandboxManager,
    name: str,
    validate: MeshValidator | None,
    pods: dict[str, PodPlan],
    node2_log: Path,
    say: Say,
) -> bool:
    frontend, backend, target = pods["node1-pod1"], pods["node1-pod2"], pods["node2-pod2"]
    say("\n== policy: deny the frontend service account on the backend pods")
    say("\n".join("  " + line for line in DENY_FRONTEND.splitlines()))
    summary = manager.apply(name, DENY_FRONTEND, "deny-frontend.yaml", validate or _accept_any)
    say(f"  applied ({', '.join(summary.added)}); the control plane pushes it to both agents")

    def call(src: PodPlan) -> dict[str, Any] | probe.ProbeError:
        try:
            return probe.http_get(manager.adapter, src.netns, target.ip, HTTP_PORT, "/")
        except probe.ProbeError as exc:
            return exc

    def rejection() -> str:
        # The refusing agent (the destination's) names the caller's identity and the policy.
        lines = [ln for ln in _read(node2_log).splitlines() if "policy rejection" in ln]
        return next((ln for ln in reversed(lines) if str(_identity(frontend)) in ln), "")

    # Refused, and the agent says why: a failed call alone could be the policy arriving
    # mid-call (the live connection revoked), or anything else; a new call meets the policy
    # at its CONNECT, which the agent logs.
    deadline = time.monotonic() + POLICY_WAIT
    while True:
        denied = call(frontend)
        line = rejection() if isinstance(denied, probe.ProbeError) else ""
        if line or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    allowed = call(backend)
    say(f"\nHTTP  {frontend.name} ({_identity(frontend)}) -> {target.name}")
    if isinstance(denied, probe.ProbeError):
        say(f"  refused, as the policy says: {denied}")
    else:
        say(f"  FAILED: still allowed after {POLICY_WAIT:.0f}s: {_shown(denied)}")
    say(f"\nHTTP  {backend.name} ({_identity(backend)}) -> {target.name}")
    if isinstance(allowed, probe.ProbeError):
        say(f"  FAILED: {allowed}")
    else:
        say(f"  still allowed: {_shown(allowed)}")
    if line:
        say(f"\nthe agent of {target.node} logged:\n  {line.split(': ', 1)[-1]}")
    else:
        say(f"\n  FAILED: the agent of {target.node} logged no policy rejection of the caller")
    return (
        isinstance(denied, probe.ProbeError)
        and not isinstance(allowed, probe.ProbeError)
        and allowed.get("client_ip") == backend.ip
        and str(_identity(frontend)) in line
    )


def _enrollment(
    manager: SandboxManager,
    name: str,
    pod: PodPlan,
    target: PodPlan,
    logs: dict[str, Path],
    say: Say,
) -> bool:
    """A pod leaves the mesh by label and comes back, as in Istio ambient."""
    label = "istio.io/dataplane-mode"
    say(f"\n== enrollment: {pod.name} opts out by label, as in Istio ambient")
    say(f"  nodeagent sandbox label {name} pod/{pod.name} {label}=none")
    manager.edit_metadata(name, f"pod/{pod.name}", "labels", [f"{label}=none"])
    log = logs[pod.node]

    def logged(text: str) -> str:
        deadline = time.monotonic() + POLICY_WAIT
        while time.monotonic() < deadline:
            found = [ln for ln in _read(log).splitlines() if pod.name in ln and text in ln]
            if found:
                return found[-1].split(": ", 1)[-1]
            time.sleep(0.1)
        return ""

    released = logged("left the mesh")
    say(f"  the agent of {pod.node} logged: {released or 'FAILED: nothing'}")
    say(f"  nodeagent sandbox label {name} pod/{pod.name} {label}-")
    before = len(_read(log).splitlines())
    manager.edit_metadata(name, f"pod/{pod.name}", "labels", [f"{label}-"])
    deadline = time.monotonic() + POLICY_WAIT
    back: dict[str, Any] | probe.ProbeError = probe.ProbeError("not tried")
    while time.monotonic() < deadline:
        if any("ready in" in ln for ln in _read(log).splitlines()[before:] if pod.name in ln):
            try:
                back = probe.http_get(manager.adapter, pod.netns, target.ip, HTTP_PORT, "/")
                break
            except probe.ProbeError as exc:
                back = exc
        time.sleep(0.2)
    if isinstance(back, probe.ProbeError):
        say(f"  FAILED: not captured again: {back}")
        return False
    say(f"  captured again (namespace labelled): {_shown(back)}")
    return bool(released) and back.get("client_ip") == pod.ip


def _fail_closed(
    manager: SandboxManager,
    name: str,
    validate: MeshValidator | None,
    pod: PodPlan,
    target: PodPlan,
    log: Path,
    say: Say,
) -> bool:
    say(f"\n== fail closed: the control plane forgets {pod.name} (an operator's slip)")
    record = yaml.safe_dump({"workloads": [workload_entry(pod, name)]}, sort_keys=False)
    check = validate or _accept_any
    manager.apply(name, record, "forget.yaml", check, delete=True)
    say(f"  its workload record is removed from the mesh file; the agent of {pod.node} keeps")
    say("  the pod captured and closes its listeners: nothing may leave it in plaintext")

    def call() -> dict[str, Any] | probe.ProbeError:
        try:
            return probe.http_get(manager.adapter, pod.netns, target.ip, HTTP_PORT, "/")
        except probe.ProbeError as exc:
            return exc

    deadline = time.monotonic() + POLICY_WAIT
    refused = call()
    while not isinstance(refused, probe.ProbeError) and time.monotonic() < deadline:
        time.sleep(0.2)
        refused = call()
    say(f"\nHTTP  {pod.name} ({pod.ip}) -> {target.name}")
    if isinstance(refused, probe.ProbeError):
        say(f"  refused: {refused}")
    else:
        say(f"  FAILED: still answered after {POLICY_WAIT:.0f}s: {_shown(refused)}")
    # Logged once the pod's live connections have drained.
    deadline = time.monotonic() + POLICY_WAIT
    lines: list[str] = []
    while not lines and time.monotonic() < deadline:
        lines = [ln for ln in _read(log).splitlines() if pod.name in ln and "capture kept" in ln]
        if not lines:
            time.sleep(0.1)
    if lines:
        say(f"\nthe agent of {pod.node} logged:\n  {lines[-1].split(': ', 1)[-1]}")
    manager.apply(name, record, "restore.yaml", check)
    deadline = time.monotonic() + POLICY_WAIT
    back = call()
    while isinstance(back, probe.ProbeError) and time.monotonic() < deadline:
        time.sleep(0.2)
        back = call()
    if isinstance(back, probe.ProbeError):
        say(f"\nrecord restored, but the call still fails: FAILED: {back}")
    else:
        say(f"\nrecord restored; over HBONE again: {_shown(back)}")
    return (
        isinstance(refused, probe.ProbeError)
        and bool(lines)
        and not isinstance(back, probe.ProbeError)
        and back.get("client_ip") == pod.ip
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _header_routing(
    manager: SandboxManager,
    name: str,
    validate: MeshValidator | None,
    plan: SandboxPlan,
    client: PodPlan,
    say: Say,
) -> bool:
    """The demo namespace uses its waypoint; `x-user: ios` goes to v2, everything else to v1."""
    backends = {p.version: p for p in plan.pods if p.app == "backend"}
    v1, v2 = backends["v1"], backends["v2"]
    assert plan.waypoint is not None
    say(
        f"\n== header routing: the demo namespace now uses its waypoint ({plan.waypoint.ip}), "
        "which reads each HTTP request"
    )
    manager.apply(name, DENY_FRONTEND, "deny-frontend.yaml", validate or _accept_any, delete=True)
    say("  (the deny-frontend policy is deleted first: the caller is a frontend pod)")
    accept = validate or _accept_any
    # The waypoint as declared (its pod and service are in the mesh already) and the label.
    use_waypoint = yaml.safe_dump(waypoint_resources(plan.waypoint), sort_keys=False)
    added: list[str] = []
    files = ((HEADER_ROUTES, "header-routes.yaml"), (use_waypoint, "use-waypoint.yaml"))
    for text, source in files:
        say("\n".join("  " + line for line in text.splitlines()))
        added += manager.apply(name, text, source, accept).added
    say(f"  applied ({', '.join(added)})")

    def calls(count: int, headers: dict[str, str]) -> dict[str, int]:
        seen: dict[str, int] = {}
        for _ in range(count):
            try:
                answer = probe.http_get(
                    manager.adapter, client.netns, BACKEND_VIP, HTTP_PORT, headers=headers
                )
                pod = str(answer["pod"])
            except probe.ProbeError:
                pod = "failed"
            seen[pod] = seen.get(pod, 0) + 1
        return seen

    waypoint_ip = plan.waypoint.ip

    def through_waypoint() -> bool:
        # v2 alone is no proof: before the caller's agent learns the namespace uses its
        # waypoint it balances over v1 and v2 itself. The backend seeing the waypoint is.
        try:
            answer = probe.http_get(
                manager.adapter, client.netns, BACKEND_VIP, HTTP_PORT, headers={"x-user": "ios"}
            )
        except probe.ProbeError:
            return False
        return answer.get("pod") == v2.name and answer.get("client_ip") == waypoint_ip

    def applied() -> bool:
        # Both halves: the waypoint holds the header routes (before, one v2 answer through
        # it may be its own 50/50 pick) and the caller's agent sends there.
        routes = _waypoint_routes(manager, plan)
        held = (routes.get("virtualService"), routes.get("destinationRule")) == (
            "demo/backend-by-user",
            "demo/backend-versions",
        )
        return held and through_waypoint()

    deadline = time.monotonic() + POLICY_WAIT
    while time.monotonic() < deadline and not applied():
        time.sleep(0.2)
    ios, other = calls(20, {"x-user": "ios"}), calls(20, {"x-user": "android"})
    say(f"\n20 requests with x-user: ios      -> {ios}")
    say(f"20 requests with x-user: android  -> {other}")
    answer = probe.http_get(manager.adapter, client.netns, BACKEND_VIP, HTTP_PORT)
    say(
        f"  the backend saw the waypoint call it ({answer.get('client_ip')}): the caller's "
        "agent tunnels to the waypoint, which tunnels on to the endpoint it picked"
    )
    ok = ios == {v2.name: 20} and other == {v1.name: 20}
    # The namespace keeps its waypoint for the next scene, which removes the label.
    manager.apply(name, HEADER_ROUTES, "header-routes.yaml", accept, delete=True)
    return ok


def _backend_routes(
    open_socket: Callable[[], socket.socket], address: str | tuple[str, int]
) -> dict[str, Any]:
    """The backend's entry in the `/routes` answer at `address`, over a socket `open_socket`
    makes; {} when it cannot be read."""
    try:
        with open_socket() as sock:
            sock.settimeout(2.0)
            sock.connect(address)
            sock.sendall(b"GET /routes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        services = json.loads(raw.partition(b"\r\n\r\n")[2])["services"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return next((s for s in services if s.get("hostname", "").startswith("backend.")), {})


def _waypoint_routes(manager: SandboxManager, plan: SandboxPlan) -> dict[str, Any]:
    """The backend as the waypoint's GET /routes (:15020 in its pod namespace) shows it,
    as `nodeagent routes --sandbox NAME --waypoint` does."""
    waypoint = plan.waypoint
    assert waypoint is not None
    return _backend_routes(
        lambda: manager.adapter.socket(waypoint.netns), ("127.0.0.1", METRICS_PORT)
    )


def _agent_routes(manager: SandboxManager, name: str, node: str) -> dict[str, Any]:
    """The backend as the agent of `node` routes it (its admin socket's GET /routes),
    as `nodeagent routes --sandbox NAME --node NODE` shows it."""
    return _backend_routes(
        lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        manager.admin_socket(name, node),
    )


def _fallback(
    manager: SandboxManager,
    name: str,
    validate: MeshValidator | None,
    plan: SandboxPlan,
    client: PodPlan,
    say: Say,
) -> bool:
    """v2 fails every request; the waypoint retries on v1 and ejects v2: no user sees an error."""
    backends = {p.version: p for p in plan.pods if p.app == "backend"}
    v1, v2 = backends["v1"], backends["v2"]
    assert plan.waypoint is not None
    accept = validate or _accept_any
    say("\n== automatic fallback: v2 answers every request with 500; the waypoint hides it")
    say("\n".join("  " + line for line in FALLBACK.splitlines()))
    summary = manager.apply(name, FALLBACK, "fallback.yaml", accept)
    say(f"  applied ({', '.join(summary.added)})")
    deadline = time.monotonic() + POLICY_WAIT
    while time.monotonic() < deadline:  # until the waypoint applies the new routes
        routes = _waypoint_routes(manager, plan)
        if (routes.get("virtualService"), routes.get("destinationRule")) == (
            "demo/backend-fallback",
            "demo/backend-fallback",
        ):
            break
        time.sleep(0.2)
    try:
        manager.behave(name, v2.name, fail="1", status=500)
    except SandboxError as exc:
        say(f"  FAILED: v2's app did not take the switch: {exc}")
        return False
    say(f"  sandbox behave {name} {v2.name} --fail 1 --status 500: v2 fails every request")

    seen: dict[str, int] = {}
    failed = 0
    for _ in range(FALLBACK_CALLS):
        try:
            pod = str(probe.http_get(manager.adapter, client.netns, BACKEND_VIP, HTTP_PORT)["pod"])
        except probe.ProbeError:
            failed += 1
            continue
        seen[pod] = seen.get(pod, 0) + 1
    say(
        f"\n{FALLBACK_CALLS} requests {client.name} -> backend: v1 ({v1.name}) "
        f"{seen.get(v1.name, 0)}, v2 ({v2.name}) {seen.get(v2.name, 0)}, {failed} failed"
    )
    ejected = [
        e
        for s in _waypoint_routes(manager, plan).get("subsets", [])
        for e in s.get("endpoints", [])
        if e.get("address") == f"{v2.ip}:{HTTP_PORT}" and e.get("ejectedSeconds") is not None
    ]
    if ejected:
        say(
            f"  v2's 500s were retried on v1, and v2 was ejected after 2 in a row "
            f"({ejected[0]['ejectedSeconds']:.0f}s left, `nodeagent routes --sandbox {name} "
            "--waypoint`)"
        )
    else:
        say(f"  FAILED: the waypoint does not show v2 ejected: {_waypoint_routes(manager, plan)}")
    try:
        manager.behave(name, v2.name)  # healthy again, for the canary
    except SandboxError as exc:
        say(f"  FAILED: v2's app did not heal: {exc}")
        ejected = []
    label = yaml.safe_dump({"namespaces": [waypoint_namespace(plan.waypoint)]})
    manager.apply(name, label, "use-waypoint.yaml", accept, delete=True)
    manager.apply(name, FALLBACK, "fallback.yaml", accept, delete=True)
    say(f"  v2 healed (sandbox behave {name} {v2.name}); the namespace leaves its waypoint:")
    say("  the next scene is the agent's own, connection-level routing")
    return failed == 0 and seen == {v1.name: FALLBACK_CALLS} and bool(ejected)


def _canary(
    manager: SandboxManager,
    name: str,
    validate: MeshValidator | None,
    plan: SandboxPlan,
    client: PodPlan,
    say: Say,
) -> bool:
    """A 90/10 split over new connections, then v2's app dies and v1 answers every call."""
    backends = {p.version: p for p in plan.pods if p.app == "backend"}
    v1, v2 = backends["v1"], backends["v2"]
    say("\n== canary: 90% of the backend's connections to v1, 10% to v2, then v2 fails")
    manager.apply(name, DENY_FRONTEND, "deny-frontend.yaml", validate or _accept_any, delete=True)
    say("  (the deny-frontend policy is deleted first: the caller is a frontend pod)")
    say("\n".join("  " + line for line in CANARY.splitlines()))
    summary = manager.apply(name, CANARY, "canary.yaml", validate or _accept_any)
    say(f"  applied ({', '.join(summary.added)})")

    def calls(count: int) -> tuple[dict[str, int], int]:
        seen: dict[str, int] = {}
        failed = 0
        for _ in range(count):
            try:
                pod = str(
                    probe.http_get(manager.adapter, client.netns, BACKEND_VIP, HTTP_PORT)["pod"]
                )
            except probe.ProbeError:
                failed += 1
                continue
            seen[pod] = seen.get(pod, 0) + 1
        return seen, failed

    # Until the caller's agent routes by the split itself: no waypoint any more (the last
    # scene's label is gone), the canary's VirtualService and its DestinationRule (a separate
    # xDS message) in place. A split read off a sample of calls cannot tell a half-applied
    # change (CI once counted 52 of 300 on v2).
    deadline = time.monotonic() + POLICY_WAIT
    while time.monotonic() < deadline:
        routes = _agent_routes(manager, name, client.node)
        applied = (routes.get("virtualService"), routes.get("destinationRule")) == (
            "demo/backend-canary",
            "demo/backend",
        )
        if applied and not routes.get("waypoint"):
            break
        time.sleep(0.2)
    else:
        say(f"  FAILED: the agent of {client.node} does not route by the split: {routes}")
        return False
    seen, failed = calls(CANARY_CALLS)
    share = 100 * seen.get(v2.name, 0) / CANARY_CALLS
    say(
        f"\n{CANARY_CALLS} new connections {client.name} -> backend: v1 ({v1.name}) "
        f"{seen.get(v1.name, 0)}, v2 ({v2.name}) {seen.get(v2.name, 0)} ({share:.0f}%), "
        f"{failed} failed"
    )
    # 99.99% binomial interval around 10% of 300: 30 +- 20 (3.89 sd).
    ok = failed == 0 and abs(seen.get(v2.name, 0) - CANARY_CALLS / 10) <= 20
    status = manager.status(name)["pods"]
    app_pid = next((p.get("app_pid") for p in status if p["name"] == v2.name), None)
    if app_pid:
        os.kill(app_pid, signal.SIGKILL)
    say(f"\nv2's app on {v2.name} is killed (pid {app_pid})")
    seen, failed = calls(CANARY_CALLS)
    say(
        f"{CANARY_CALLS} new connections: v1 {seen.get(v1.name, 0)}, v2 {seen.get(v2.name, 0)}, "
        f"{failed} failed: the agent retried v2's refused connects on v1 and ejected v2"
    )
    return ok and failed == 0 and seen == {v1.name: CANARY_CALLS}
