"""The node-level CLI against real agents in a sandbox (2 nodes x 2 pods).

Every command runs as a subprocess (`nodeagent ... --sandbox NAME --node
node2`), and asks node2's real agent over its admin socket. Traffic is real:
clients run inside pod namespaces (nsenter) and go through capture, HBONE and
the other node's agent. Metrics are scraped from inside a node's namespace and
parsed with prometheus_client's parser.

Tests share one sandbox and run in file order: the DENY policy and the deleted
capture rule come last, so earlier tests see a clean mesh.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.cli.interpreter import DATA_PATH_ENVIRONMENT
from nodeagent.sandbox.processes import NSENTER

from .e2e_harness import DENY_FRONTEND, wait_until

NODEAGENT = str(Path(sys.executable).parent / "nodeagent")
NODE = "node2"
CALLER = "node1-pod1"  # sa frontend
ECHO_PORT = 9000
HTTP_PORT = 8080

# Sends a payload (argv[3] bytes of "x", or an HTTP request when argv[3] is
# "http"), half-closes, reads to EOF; prints {"sent": n, "received": m}.
# With argv[4] == "hold" it waits for stdin to close before half-closing.
CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    host, port, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if what == "http":
        pad = "a" * 3000
        payload = (f"GET /hello HTTP/1.1\\r\\nHost: {host}\\r\\nX-Pad: {pad}\\r\\n"
                   "Connection: close\\r\\n\\r\\n").encode()
    else:
        payload = b"x" * int(what)
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(payload)
    if sys.argv[4:] == ["hold"]:
        print("open", flush=True)
        sys.stdin.read()
    s.shutdown(socket.SHUT_WR)
    got = 0
    while chunk := s.recv(65536):
        got += len(chunk)
    print(json.dumps({"sent": len(payload), "received": got}))
    """
)

SCRAPE = (
    "import urllib.request, sys; "
    "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:15020/metrics', timeout=10)"
    ".read().decode())"
)


@pytest.fixture(scope="module")
def sandbox(sandbox_2x2: dict[str, Any]) -> dict[str, Any]:
    return sandbox_2x2


def cli(sandbox: dict[str, Any], *args: str, node: str = NODE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NODEAGENT, *args, "--sandbox", sandbox["name"], "--node", node],
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(sandbox: dict[str, Any], *args: str, node: str = NODE) -> str:
    done = cli(sandbox, *args, node=node)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ask_json(sandbox: dict[str, Any], *args: str, node: str = NODE) -> Any:
    return json.loads(ok(sandbox, *args, "-o", "json", node=node))


def pod(sandbox: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in sandbox["pods"] if p["name"] == name)


def netns_of(sandbox: dict[str, Any], name: str) -> str:
    nodes = {n["name"]: n["netns"] for n in sandbox["nodes"]}
    return f"/var/run/netns/{nodes.get(name) or pod(sandbox, name)['netns']}"


def in_netns(netns: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NSENTER, f"--net={netns}", "--", *argv], capture_output=True, text=True, timeout=30, **kw
    )


def transfer(
    sandbox: dict[str, Any], src: str, dst_ip: str, port: int, what: str
) -> dict[str, int]:
    done = in_netns(netns_of(sandbox, src), sys.executable, "-c", CLIENT, dst_ip, str(port), what)
    assert done.returncode == 0, done.stderr
    result: dict[str, int] = json.loads(done.stdout)
    return result


def scrape(sandbox: dict[str, Any], node: str) -> dict[str, list[Any]]:
    """Samples by name, parsed by prometheus_client."""
    done = in_netns(netns_of(sandbox, node), sys.executable, "-c", SCRAPE)
    assert done.returncode == 0, done.stderr
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(done.stdout):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def total(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


# -- config dump views -------------------------------------------------------------------


def test_agents_run_with_their_interpreter_settings_under_the_pid_they_started_with(
    sandbox: dict[str, Any],
) -> None:
    # nodeagent.cli.interpreter: `run` executes itself again with SETUPTOOLS_USE_DISTUTILS
    # and PYTHONMALLOC set, keeping its PID (the sandbox, like a kubelet, knows the agent by
    # it). An operator's value wins, and the log says which allocator it runs on.
    want = {k: os.environ.get(k, v) for k, v in DATA_PATH_ENVIRONMENT.items()}
    allocator = want["PYTHONMALLOC"]
    for agent in sandbox["agents"]:
        environ = Path(f"/proc/{agent['pid']}/environ").read_bytes().split(b"\0")
        for key, value in want.items():
            assert f"{key}={value}".encode() in environ, (agent["name"], key)
        log = Path(agent["log"]).read_text()
        assert f"memory allocator: PYTHONMALLOC={allocator}" in log


def test_workloads_lists_every_pod_with_address_and_node(sandbox: dict[str, Any]) -> None:
    table = ok(sandbox, "workloads").splitlines()
    assert table[0].split() == [
        "NAMESPACE",
        "POD",
        "NAME",
        "ADDRESS",
        "NODE",
        "WAYPOINT",
        "PROTOCOL",
    ]
    rows = {line.split()[1]: line.split() for line in table[1:]}
    for p in sandbox["pods"]:
        assert rows[p["name"]] == ["demo", p["name"], p["ip"], p["node"], "None", "HBONE"]
    assert all(len(line) <= 100 for line in table)

    dump = ask_json(sandbox, "workloads")
    by_name = {w["name"]: w for w in dump}
    assert set(by_name) == {p["name"] for p in sandbox["pods"]}
    for p in sandbox["pods"]:
        assert by_name[p["name"]]["workloadIps"] == [p["ip"]]
        assert by_name[p["name"]]["node"] == p["node"]
        assert by_name[p["name"]]["serviceAccount"] == p["service_account"]


def test_services_shows_vips_and_endpoints(sandbox: dict[str, Any]) -> None:
    table = ok(sandbox, "services")
    backend = next(line.split() for line in table.splitlines() if "backend." in line)
    assert backend[2] == "10.96.0.10" and backend[-1] == "2/2"

    services = {s["name"]: s for s in ask_json(sandbox, "services")}
    assert services["backend"]["vips"] == ["/10.96.0.10"]
    assert services["echo"]["vips"] == ["/10.96.0.11"]
    assert len(services["backend"]["endpoints"]) == 2
    assert len(services["echo"]["endpoints"]) == 4


def test_certs_shows_valid_leaf_and_root_for_each_local_identity(sandbox: dict[str, Any]) -> None:
    local_sas = {p["service_account"] for p in sandbox["pods"] if p["node"] == NODE}
    certs = ask_json(sandbox, "certs")
    assert {c["identity"] for c in certs} == {
        f"spiffe://cluster.local/ns/demo/sa/{sa}" for sa in local_sas
    }
    assert all(c["state"] == "Available" and c["certChain"] and c["rootCerts"] for c in certs)

    table = ok(sandbox, "certs").splitlines()
    assert table[0].split()[:2] == ["CERTIFICATE", "NAME"]
    kinds = [line.split()[1] for line in table[1:] if line.split()[1:2] in (["Leaf"], ["Root"])]
    assert kinds.count("Leaf") == len(local_sas) and kinds.count("Root") == len(local_sas)
    assert all("Available  true" in line for line in table[1:] if line.split()[1:2] == ["Leaf"])


def test_pods_shows_the_nodes_pods_captured_with_their_listeners(sandbox: dict[str, Any]) -> None:
    local = {p["name"]: p for p in sandbox["pods"] if p["node"] == NODE}
    pods = {p["name"]: p for p in ask_json(sandbox, "pods")}
    assert set(pods) == set(local)
    for name, p in pods.items():
        assert p["capture_state"] == "ready" and p["last_error"] == ""
        ip = local[name]["ip"]
        assert [x.split(" ")[0] for x in p["listeners"]] == [
            f"{ip}:15001",
            f"{ip}:15006",
            f"{ip}:15008",
        ]
    table = ok(sandbox, "pods")
    assert all(f"{name}  ready  namespace labelled  iptables" in table for name in local)
    ready = in_netns(
        netns_of(sandbox, NODE),
        sys.executable,
        "-c",
        SCRAPE.replace("15020/metrics", "15021/healthz/ready"),
    )
    assert ready.stdout == "ready\n"


# -- live connections, log level -----------------------------------------------------------


def test_connections_shows_a_connection_while_it_is_open(sandbox: dict[str, Any]) -> None:
    dst = pod(sandbox, "node2-pod1")
    series = {
        "reporter": "destination",
        "source_workload": CALLER,
        "destination_workload": dst["name"],
    }
    received_before = total(scrape(sandbox, NODE), "istio_tcp_received_bytes_total", **series)
    client = subprocess.Popen(
        [NSENTER, f"--net={netns_of(sandbox, CALLER)}", "--",
         sys.executable, "-c", CLIENT, dst["ip"], str(ECHO_PORT), "1000", "hold"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "open"
        conns = ask_json(sandbox, "connections")
        mine = [
            c
            for c in conns
            if c["direction"] == "inbound" and c["remote"].startswith(pod(sandbox, CALLER)["ip"])
        ]
        assert len(mine) == 1, conns
        assert mine[0]["workload"] == "demo/node2-pod1"
        assert mine[0]["local"] == f"{dst['ip']}:{ECHO_PORT}"
        assert mine[0]["protocol"] == "HBONE"
        assert mine[0]["src_identity"] == "spiffe://cluster.local/ns/demo/sa/frontend"
        table = ok(sandbox, "connections")
        assert "demo/node2-pod1  inbound" in table
        # Bytes of a connection still open are counted at each scrape.
        received = total(scrape(sandbox, NODE), "istio_tcp_received_bytes_total", **series)
        assert received - received_before == 1000
    finally:
        out, _ = client.communicate(timeout=30)
    assert json.loads(out.splitlines()[-1]) == {"sent": 1000, "received": 1000}
    # Gone once the relay has finished both ways (moments after the client's close).
    for _ in range(20):
        if not any(c["workload"] == "demo/node2-pod1" for c in ask_json(sandbox, "connections")):
            break
    else:
        raise AssertionError("the closed connection is still listed")


def test_log_changes_the_agents_level(sandbox: dict[str, Any]) -> None:
    assert ok(sandbox, "log", "--level", "debug").strip() == "current log level is debug"
    assert ok(sandbox, "log").strip() == "current log level is debug"
    assert ok(sandbox, "log", "--reset").strip() == "current log level is info"
    bad = cli(sandbox, "log", "--level", "loud")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


# -- metrics --------------------------------------------------------------------------------


def test_byte_counters_grow_by_the_bytes_of_a_transfer(sandbox: dict[str, Any]) -> None:
    dst = pod(sandbox, "node2-pod1")
    server_side = {
        "reporter": "destination",
        "source_workload": CALLER,
        "destination_workload": dst["name"],
        "connection_security_policy": "mutual_tls",
    }
    client_side = {**server_side, "reporter": "source"}
    names = [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
    ]
    before = {n: scrape(sandbox, n) for n in ("node1", NODE)}

    echo = transfer(sandbox, CALLER, dst["ip"], ECHO_PORT, "65536")  # same size both ways
    http = transfer(sandbox, CALLER, dst["ip"], HTTP_PORT, "http")  # small answer, big request
    assert echo == {"sent": 65536, "received": 65536}
    assert http["received"] > 0 and http["received"] != http["sent"]

    def closed(node: str, labels: dict[str, str]) -> float:
        now = scrape(sandbox, node)
        name = "istio_tcp_connections_closed_total"
        return total(now, name, **labels) - total(before[node], name, **labels)

    # A close is counted when the agent's relay ends, which may trail the client's last read.
    wait_until(
        "both connections' closes in the metrics",
        lambda: closed("node1", client_side) >= 2 and closed(NODE, server_side) >= 2,
    )
    after = {n: scrape(sandbox, n) for n in ("node1", NODE)}
    for node, labels in (("node1", client_side), (NODE, server_side)):
        delta = {
            n: total(after[node], n, **labels) - total(before[node], n, **labels) for n in names
        }
        # Istio's naming for both reporters: received = from the client, sent = back to it.
        assert delta == {
            "istio_tcp_received_bytes_total": echo["sent"] + http["sent"],
            "istio_tcp_sent_bytes_total": echo["received"] + http["received"],
            "istio_tcp_connections_opened_total": 2,
            "istio_tcp_connections_closed_total": 2,
        }, node
    own = after[NODE]
    assert total(own, "nodeagent_xds_connection_state", state="connected") == 1
    assert total(own, "nodeagent_pods", state="ready") == 2
    assert len(own["nodeagent_certificate_expiration_timestamp_seconds"]) == 2
    assert total(own, "nodeagent_policy_decisions_total", result="allow") >= 2
    assert total(own, "istio_build") == 1


# -- explain vs reality, policies ------------------------------------------------------------


def _curl(sandbox: dict[str, Any], target: str) -> bool:
    done = in_netns(
        netns_of(sandbox, CALLER), "curl", "-sS", "-o", "/dev/null", "-m", "5", f"http://{target}/"
    )
    return done.returncode == 0


def apply_file(sandbox: dict[str, Any], path: Path, *extra: str) -> None:
    """`sandbox apply NAME FILE [extra...]`, which must succeed."""
    done = subprocess.run(
        [NODEAGENT, "sandbox", "apply", sandbox["name"], str(path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_policy_example() -> str:
    """The `authorizationPolicies` of the README's mesh-file example, as an apply file:
    read from the README itself, so this test fails when the README drifts."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    example = next(yaml.safe_load(b) for b in blocks if "authorizationPolicies:" in b)
    return yaml.safe_dump({"authorizationPolicies": example["authorizationPolicies"]})


def test_the_readme_policy_example_works_as_written(
    sandbox: dict[str, Any], tmp_path: Path
) -> None:
    labels = {p["name"]: p["labels"] for p in sandbox["pods"]}
    assert {n for n, lb in labels.items() if lb["app"] == "backend"} == {"node1-pod2", "node2-pod2"}
    assert [labels[n]["version"] for n in ("node1-pod2", "node2-pod2")] == ["v1", "v2"]
    target = f"{pod(sandbox, 'node2-pod2')['ip']}:{HTTP_PORT}"
    assert _curl(sandbox, target)

    policy = tmp_path / "readme-policy.yaml"
    policy.write_text(readme_policy_example())

    apply_file(sandbox, policy)
    try:
        # The README's selector {app: backend} selects the backend pods: the frontend's
        # calls to port 8080 are refused, its echo (9000, not in the rule) still answered.
        wait_until(
            "the README's policy refuses frontend -> backend:8080",
            lambda: "deny-frontend" in ok(sandbox, "policies") and not _curl(sandbox, target),
        )
        verdict = ask_json(sandbox, "explain", "--from", CALLER, "--to", target)
        assert (verdict["verdict"], verdict["policy"]["policy"]) == ("deny", "demo/deny-frontend")
        echo = transfer(sandbox, CALLER, pod(sandbox, "node2-pod2")["ip"], ECHO_PORT, "100")
        assert echo == {"sent": 100, "received": 100}
    finally:
        apply_file(sandbox, policy, "--delete")
    wait_until("backend:8080 answers the frontend again", lambda: _curl(sandbox, target))
    wait_until(
        "the policy is gone from node2", lambda: "deny-frontend" not in ok(sandbox, "policies")
    )


def test_explain_says_when_a_policys_selector_matches_no_workload(
    sandbox: dict[str, Any], tmp_path: Path
) -> None:
    # A typo in matchLabels: the policy reaches the agent, but selects nothing.
    policy = tmp_path / "typo.yaml"
    policy.write_text(
        readme_policy_example()
        .replace("name: deny-frontend", "name: deny-typo")
        .replace("app: backend", "app: backnd")
    )

    target = f"{pod(sandbox, 'node2-pod2')['ip']}:{HTTP_PORT}"
    apply_file(sandbox, policy)
    try:
        wait_until(
            "node1 has the policy", lambda: "deny-typo" in ok(sandbox, "policies", node="node1")
        )
        result = ask_json(sandbox, "explain", "--from", CALLER, "--to", target, node="node1")
        assert result["verdict"] == "allow"
        assert result["policy"]["selects_nothing"] == ["demo/deny-typo"]
        text = ok(sandbox, "explain", "--from", CALLER, "--to", target, node="node1")
        assert "policy demo/deny-typo is in the destination's namespace but its selector " in text
        assert _curl(sandbox, target)
    finally:
        apply_file(sandbox, policy, "--delete")
    wait_until(
        "the policy is gone", lambda: "deny-typo" not in ok(sandbox, "policies", node="node1")
    )


def test_explain_agrees_with_the_real_outcome(sandbox: dict[str, Any], tmp_path: Path) -> None:
    target = f"{pod(sandbox, 'node2-pod2')['ip']}:{HTTP_PORT}"  # sa backend, role backend
    allowed = ask_json(sandbox, "explain", "--from", CALLER, "--to", target)
    assert allowed["verdict"] == "allow"
    assert allowed["destination"]["workload"] == "demo/node2-pod2"
    assert allowed["route"]["kind"] == "hbone"
    assert _curl(sandbox, target)

    policy = tmp_path / "deny.yaml"
    policy.write_text(DENY_FRONTEND)
    apply_file(sandbox, policy)
    try:
        wait_until("the agent has the policy", lambda: "deny-frontend" in ok(sandbox, "policies"))
        table = ok(sandbox, "policies")
        assert "demo       deny-frontend  Deny    WorkloadSelector" in table

        denied = ask_json(sandbox, "explain", "--from", CALLER, "--to", target)
        assert denied["verdict"] == "deny"
        assert denied["policy"]["policy"] == "demo/deny-frontend"
        assert not _curl(sandbox, target)
        # A caller the policy does not name is still allowed, in both views.
        other = ask_json(sandbox, "explain", "--from", "node1-pod2", "--to", target)
        assert other["verdict"] == "allow"
        text = ok(sandbox, "explain", "--from", CALLER, "--to", target)
        assert text.startswith("verdict: DENY") and "denied by demo/deny-frontend rule 0" in text

        samples = scrape(sandbox, NODE)
        assert total(samples, "istio_tcp_connections_closed_total", response_flags="DENY") >= 1
    finally:  # the module's later tests start without it
        apply_file(sandbox, policy, "--delete")
    wait_until("the policy is gone", lambda: "deny-frontend" not in ok(sandbox, "policies"))


# -- rules and drift ----------------------------------------------------------------------------


def _installed_output_rule(netns: str) -> str:
    saved = in_netns(netns, "iptables-legacy-save", "-t", "nat")
    assert saved.returncode == 0, saved.stderr
    return next(line for line in saved.stdout.splitlines() if line.startswith("-A ISTIO_OUTPUT "))


def test_rules_report_drift_after_a_rule_is_deleted_by_hand(sandbox: dict[str, Any]) -> None:
    target = "node2-pod1"
    clean = ask_json(sandbox, "rules", target)
    assert clean["drift"] is False and clean["error"] == ""
    assert ok(sandbox, "rules", target).startswith(
        f"pod demo/{target} (iptables): installed rules match the plan"
    )

    netns = netns_of(sandbox, target)
    for _ in range(5):
        # The agent's periodic drift repair (every 10 s) may put the rule back between the
        # delete and either question (the JSON and the table view); then delete it again.
        rule = _installed_output_rule(netns)
        deleted = in_netns(netns, "iptables-legacy", "-t", "nat", "-D", *rule.split()[1:])
        assert deleted.returncode == 0, deleted.stderr
        drifted = ask_json(sandbox, "rules", target)
        table = ok(sandbox, "rules", target)
        if drifted["drift"] and "DRIFT" in table.splitlines()[0]:
            break
    assert drifted["drift"] is True
    missing = [line["rule"] for line in drifted["lines"] if line["status"] == "missing"]
    assert missing == [rule]
    assert "DRIFT: 1 missing (-), 0 extra (+)" in table.splitlines()[0]
    assert any(
        line.startswith("-") and rule in " ".join(line.split()) for line in table.splitlines()
    )


# -- errors -------------------------------------------------------------------------------------


def test_unknown_pod_and_unreachable_agent_give_one_line(sandbox: dict[str, Any]) -> None:
    unknown = cli(sandbox, "rules", "no-such-pod")
    assert unknown.returncode != 0
    assert unknown.stderr.strip().splitlines() == ["nodeagent: unknown pod 'no-such-pod'"]
    unknown_src = cli(sandbox, "explain", "--from", "no-such-pod", "--to", "10.10.2.11:80")
    assert unknown_src.returncode != 0 and len(unknown_src.stderr.strip().splitlines()) == 1
    assert "unknown pod" in unknown_src.stderr

    gone = cli(sandbox, "workloads", node="node9")
    assert gone.returncode != 0
    assert len(gone.stderr.strip().splitlines()) == 1
    assert "has no node 'node9' (nodes: node1, node2)" in gone.stderr


@pytest.fixture(autouse=True)
def _no_stray_output() -> Iterator[None]:
    yield
