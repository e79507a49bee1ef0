"""The agent honours waypoints and fails closed (issue 18, point 1), in a 2x2 sandbox.

`sandbox apply` declares a waypoint for `demo` the way Istio lays one out (a workload
with its own service account, labelled gateway-name, and a service with port 15008)
and labels the `echo` service `istio.io/use-waypoint: waypoint`. The waypoint's address
is node2's pod gateway, 10.10.2.1, where nothing listens on 15008, so every tunnel to
it is refused. Then:

* a connection from node1-pod1 to echo's VIP never reaches echo: the caller's agent
  opens HBONE to the waypoint (tcpdump on node1: every SYN to 15008 goes to 10.10.2.1,
  none to a backend pod), the tunnel fails, and the app gets no byte back;
* with the waypoint's service selecting no workload (no ready endpoint), the caller's
  connection is reset at once, counted with `UH`, and `explain` says why;
* with the label removed, echo answers again directly (HBONE to the pod).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from .e2e_harness import ECHO_VIP, Capture, Mesh, _cli, sandbox, wait_until

pytestmark = pytest.mark.timeout(300)

CALLER = "node1-pod1"
WAYPOINT_IP = "10.10.2.1"  # node2's pod gateway: routed, in node2's pod range, no 15008
WAYPOINT_VIP = "10.96.0.20"
ECHO_PORT = 9000
WAYPOINT_WAIT = 20.0

# Connect, send, read until EOF; report what came back and how it ended.
CLIENT = textwrap.dedent(
    """\
    import json, socket, sys
    out = {"got": 0, "end": "eof"}
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=8)
        s.sendall(b"ping-through-waypoint\\n")
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            out["got"] += len(chunk)
            if out["got"] >= 22:
                out["end"] = "answered"
                break
    except ConnectionResetError:
        out["end"] = "reset"
    except OSError as e:
        out["end"] = type(e).__name__
    print(json.dumps(out))
    """
)


def waypoint_file(*, selector: str = "waypoint", echo_label: str = "waypoint") -> str:
    echo_labels = f"{{istio.io/use-waypoint: {echo_label}}}" if echo_label else "{}"
    return textwrap.dedent(
        f"""\
        workloads:
        - name: waypoint-0
          namespace: demo
          node: node2
          ip: {WAYPOINT_IP}
          serviceAccount: waypoint
          labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
        services:
        - name: waypoint
          namespace: demo
          vip: {WAYPOINT_VIP}
          ports: [{{port: 15008}}, {{port: 15021}}]
          selector: {{gateway.networking.k8s.io/gateway-name: {selector}}}
        - name: echo
          namespace: demo
          vip: {ECHO_VIP}
          ports: [{{port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}]
          selector: {{sandbox: SANDBOX}}
          labels: {echo_labels}
        """
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox(tmp_path_factory.mktemp("waypoint"), "iptables") as running:
        yield running


def apply(mesh: Mesh, text: str) -> None:
    mesh.apply(text.replace("SANDBOX", mesh.name))


def call_echo(mesh: Mesh) -> dict[str, Any]:
    done = mesh.python_in(CALLER, CLIENT, ECHO_VIP, str(ECHO_PORT))
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def explain(mesh: Mesh) -> dict[str, Any]:
    done = _cli(
        "explain", "--from", CALLER, "--to", f"{ECHO_VIP}:{ECHO_PORT}",
        "--sandbox", mesh.name, "--node", "node1", "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_echo_answers_before_any_waypoint(mesh: Mesh) -> None:
    assert call_echo(mesh)["end"] == "answered"


def test_a_waypoint_with_no_listener_refuses_and_nothing_goes_to_the_backend(mesh: Mesh) -> None:
    apply(mesh, waypoint_file())
    wait_until(
        "explain routes echo through the waypoint",
        lambda: "waypoint" in explain(mesh),
        timeout=WAYPOINT_WAIT,
    )
    through = explain(mesh)
    assert through["waypoint"]["endpoint"] == f"{WAYPOINT_IP}:15008", through
    assert through["waypoint"]["authority"] == f"{ECHO_VIP}:{ECHO_PORT}"

    capture = Capture(mesh.netns("node1"), mesh.tmp / "waypoint.pcap", "tcp and port 15008")
    try:
        results = [call_echo(mesh) for _ in range(3)]
        capture.await_segments(lambda seen: any(s.flags & 0x02 for s in seen))  # a SYN
    finally:
        segments = capture.stop()
    assert all(r["got"] == 0 and r["end"] != "answered" for r in results), results
    syns = {s.dst for s in segments if s.flags & 0x02 and not s.flags & 0x10}  # SYN, no ACK
    assert syns, f"no HBONE connection attempt seen ({capture.stats})"
    assert {ip for ip, _ in syns} == {WAYPOINT_IP}, syns  # never to a backend pod
    log = mesh.agent_log("node1")
    assert f"via {WAYPOINT_IP}:15008 (waypoint demo/waypoint.demo.svc.cluster.local)" in log


def test_a_waypoint_without_a_ready_endpoint_resets_and_explain_says_why(mesh: Mesh) -> None:
    apply(mesh, waypoint_file(selector="nobody"))
    wait_until(
        "explain refuses echo for its waypoint",
        lambda: explain(mesh)["route"]["kind"] == "refuse",
        timeout=WAYPOINT_WAIT,
    )
    refused = explain(mesh)
    assert refused["verdict"] == "deny"
    assert any("has waypoint demo/waypoint.demo.svc.cluster.local" in s for s in refused["steps"])
    result = call_echo(mesh)
    assert result["got"] == 0 and result["end"] in ("reset", "eof"), result
    log = mesh.agent_log("node1")
    assert "has waypoint demo/waypoint.demo.svc.cluster.local: service demo/waypoint" in log


def test_without_the_label_echo_answers_directly_again(mesh: Mesh) -> None:
    apply(mesh, waypoint_file(echo_label=""))
    wait_until(
        "echo answers again", lambda: call_echo(mesh)["end"] == "answered", timeout=WAYPOINT_WAIT
    )
    assert explain(mesh)["route"]["kind"] == "hbone"
