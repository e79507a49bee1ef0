"""What the benchmark families that drive pods share: processes in pods, sandboxes,
interleaved rounds, the stunnel, Python relay and Node.js http2 references, certificates
(the report and `emit` are in `bench.report`, which in-process families import without all
of this).

Pods are the sandbox's own (`nodeagent sandbox up/status/down`, the command a user runs), and
a program runs inside one the way the sandbox starts its processes: `nsenter --net=` on the
pod's namespace (`nodeagent.sandbox.processes.NSENTER`; not `ip netns exec`, which remounts
/sys). The programs started there are modules of this package (`bench.probe`,
`bench.tls_relay`) run with `python -m` from the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from bench.report import ROOT
from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.identity import csr
from nodeagent.model.constants import OUTBOUND_PORT
from nodeagent.model.identity import Identity
from nodeagent.sandbox.netns import netns_path
from nodeagent.sandbox.processes import NSENTER

NODEAGENT = str(Path(sys.executable).parent / "nodeagent")
IPERF_PORT, ECHO_PORT, HTTP_PORT = 5201, 9000, 8080
# Each reference pair's ports per app port: (client side on loopback in the client pod,
# server side on the server pod). Distinct, since one sandbox holds every pair.
STUNNEL = {IPERF_PORT: (25201, 35201), ECHO_PORT: (29000, 39000), HTTP_PORT: (28080, 38080)}
PY_RELAY = {IPERF_PORT: (24201, 34201), ECHO_PORT: (24900, 34900), HTTP_PORT: (24080, 34080)}
STUNNEL_CAPTURED = {
    IPERF_PORT: (26201, 36201),
    ECHO_PORT: (26900, 36900),
    HTTP_PORT: (26080, 36080),
}
# The Node.js pair: one client port per app port, one http2 server port for them all.
NODE_H2 = {IPERF_PORT: (27201, 37008), ECHO_PORT: (27900, 37008), HTTP_PORT: (27080, 37008)}
# The bare Python HTTP/2 pair (`bench.py_h2_pair`), laid out as the Node one.
PY_H2 = {IPERF_PORT: (23201, 33008), ECHO_PORT: (23900, 33008), HTTP_PORT: (23080, 33008)}
Figures = dict[str, dict[str, float]]  # variant -> figure name -> value


# -- processes -------------------------------------------------------------------------------


def sh(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root (so `python -m bench.*` finds this package);
    `env` adds variables to ours (a sandbox's agents inherit them)."""
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        input=input,
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )


def in_ns(netns: str, *cmd: str) -> list[str]:
    """`cmd` run inside the named network namespace, as the sandbox runs its processes."""
    return [NSENTER, f"--net={netns_path(netns)}", *cmd]


def program(module: str, *args: str) -> list[str]:
    """argv of one of this package's programs (`bench.probe`, `bench.tls_relay`)."""
    return [sys.executable, "-m", f"bench.{module}", *args]


def require_root(name: str) -> bool:
    if os.geteuid() != 0:
        print(f"{name}: needs root (network namespaces)", file=sys.stderr)
        return False
    return True


class Procs:
    """Processes a benchmark started, stopped by PID at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=ROOT,
        )
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of the processes (exited threads included)."""
    user = system = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
        except (OSError, IndexError, ValueError):
            pass
    return user, system


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_split(pids))


MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def memory_kib(pids: list[int]) -> dict[str, int]:
    """The processes' resident memory from /proc/PID/status, summed: VmRSS and its split into
    anonymous memory, file mappings (shared libraries) and shared memory, in KiB."""
    total = dict.fromkeys(MEMORY_FIELDS, 0)
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value.split()[0])
        except OSError:
            pass
    return total


def rss_kib(pids: list[int]) -> int:
    return memory_kib(pids)["VmRSS"]


def with_children(pids: list[int]) -> list[int]:
    """The processes and their descendants (an agent may run data-path workers)."""
    out: list[int] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out += [pid, *(c.pid for c in proc.children(recursive=True))]
        except psutil.Error:
            pass
    return out


def wait_port(netns: str, host: str, port: int, timeout: float = 10) -> None:
    wait = in_ns(netns, *program("probe", "wait", host, str(port), str(timeout)))
    if sh(*wait, check=False).returncode != 0:
        raise RuntimeError(f"{host}:{port} not reachable from {netns}")


# -- sandboxes -------------------------------------------------------------------------------


class Sandbox:
    """One 2-node sandbox (client pod node1-pod1, server pod node2-pod1) with iperf3 serving."""

    def __init__(
        self,
        name: str,
        procs: Procs,
        *,
        agents: bool,
        pods_per_node: int = 1,
        redirect_backend: str = "iptables",
        waypoint: bool = False,
    ) -> None:
        self.name = name
        flags = [] if agents else ["--no-controlplane"]
        if waypoint:
            flags.append("--waypoint")  # the demo namespace's services go through it
        up = sh(
            NODEAGENT,
            "sandbox",
            "up",
            "--name",
            name,
            "--nodes",
            "2",
            "--pods-per-node",
            str(pods_per_node),
            *flags,
            check=False,
            timeout=180,
            env={"REDIRECT_BACKEND": redirect_backend},
        )
        if up.returncode != 0:
            raise RuntimeError(f"sandbox up {name} failed: {up.stderr.strip()}")
        status = json.loads(sh(NODEAGENT, "sandbox", "status", name, "-o", "json").stdout)
        self.status: dict[str, Any] = status
        self.pods: dict[str, dict[str, Any]] = {p["name"]: p for p in status["pods"]}
        self.client, self.server = self.pods["node1-pod1"], self.pods["node2-pod1"]
        # A second client pod, for a variant that installs capture rules of its own.
        self.client2 = self.pods.get("node1-pod2")
        # Node name -> its agent's PID (agents are named "agent-NODE").
        self.agents: dict[str, int] = {
            a["name"].removeprefix("agent-"): a["pid"]
            for a in status.get("agents") or []
            if a.get("pid")
        }
        self.agent_pids = list(self.agents.values())
        if agents and len(self.agent_pids) != 2:
            raise RuntimeError(f"sandbox {name}: expected 2 running agents, got {status['agents']}")
        procs.start(in_ns(self.server["netns"], "iperf3", "-s", "-p", str(IPERF_PORT)))
        wait_port(self.client["netns"], self.server["ip"], IPERF_PORT)


class Session:
    """A benchmark's sandboxes, processes and scratch directory, all removed on exit."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tag = os.getpid() % 100000
        self.procs = Procs()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
        self.names: list[str] = []

    def sandbox(self, letter: str, **kw: Any) -> Sandbox:
        """A sandbox named from `letter` and this process (removed at exit, whatever happens)."""
        self.names.append(f"{letter}{self.tag}")
        return Sandbox(self.names[-1], self.procs, **kw)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.stop()
        for name in self.names:
            sh(NODEAGENT, "sandbox", "down", name, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- measurements ----------------------------------------------------------------------------


def iperf(client_ns: str, host: str, port: int, seconds: float, streams: int = 1) -> str:
    """`iperf3 -J` from the client pod; its JSON report (read it with `iperf_gbps`)."""
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]
    return sh(*in_ns(client_ns, *argv), check=False, timeout=seconds + 30).stdout


def iperf_gbps(stdout: str) -> tuple[float, str | None]:
    """Received Gbit/s from `iperf3 -J` output, or the reason there is none."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return 0.0, f"no JSON output: {stdout.strip()[:200]!r}"
    if report.get("error"):
        return 0.0, str(report["error"])
    try:
        return report["end"]["sum_received"]["bits_per_second"] / 1e9, None
    except (KeyError, TypeError):
        return 0.0, "no received total in the report"


def ping_block(argv: list[str], host: str, port: int, count: int) -> list[int]:
    """`count` 64-byte round trips to host:port from a client run as `argv` + python; their
    times in nanoseconds."""
    run = sh(*argv, *program("probe", "ping", host, str(port), str(count)), check=False)
    if run.returncode != 0:
        raise RuntimeError(f"ping-pong to {host}:{port} failed: {run.stderr.strip()[-300:]}")
    samples = [int(x) for x in run.stdout.split()]
    if len(samples) != count:
        raise RuntimeError(f"asked for {count} round trips to {host}:{port}, got {len(samples)}")
    return samples


def percentile(sorted_samples: list[int], fraction: float) -> float:
    return float(sorted_samples[min(len(sorted_samples) - 1, int(len(sorted_samples) * fraction))])


class Variant:
    """How a client in the client pod reaches the server pod's port."""

    name = ""

    def target(self, port: int) -> tuple[str, int]:
        raise NotImplementedError

    def tunnel_pids(self) -> list[int]:
        return []


def latency_round(variants: list[tuple[Variant, list[str]]], pings: int, blocks: int) -> Figures:
    """Every variant's 64-byte ping-pong, `pings` round trips each in `blocks` alternating
    blocks (the starting variant rotates), the client run as the variant's `argv`: p50/p99,
    and the tunnel's CPU per round trip."""
    per_block = max(1, pings // blocks)
    samples: dict[str, list[int]] = {v.name: [] for v, _ in variants}
    user = {v.name: 0.0 for v, _ in variants}
    system = {v.name: 0.0 for v, _ in variants}
    for b in range(blocks):
        for v, argv in variants[b % len(variants) :] + variants[: b % len(variants)]:
            host, port = v.target(ECHO_PORT)
            pids = v.tunnel_pids()
            user0, system0 = cpu_split(pids)
            samples[v.name] += ping_block(argv, host, port, per_block)
            user1, system1 = cpu_split(pids)
            user[v.name] += user1 - user0
            system[v.name] += system1 - system0
    out: Figures = {}
    for v, _ in variants:
        got = sorted(samples[v.name])
        result = {
            "p50_us": round(percentile(got, 0.5) / 1000, 1),
            "p99_us": round(percentile(got, 0.99) / 1000, 1),
        }
        if v.tunnel_pids():
            # CPU the tunnel spends per 64-byte round trip: steadier than p50, which moves
            # with where the scheduler puts four busy processes on two cores.
            result["cpu_us_per_rtt"] = round((user[v.name] + system[v.name]) / len(got) * 1e6, 1)
            # The user share is where a Python relay differs from stunnel; the kernel's is alike.
            result["user_us_per_rtt"] = round(user[v.name] / len(got) * 1e6, 1)
        out[v.name] = result
    return out


def interleaved(count: int, one_round: Callable[[], Figures]) -> tuple[list[Figures], Figures]:
    """`count` rounds, each measuring every variant in turn (so a drift of the machine's speed
    lands on all of them alike); every round's figures and their medians."""
    rounds: list[Figures] = []
    for i in range(count):
        rnd = one_round()
        for name, figures in rnd.items():
            print(f"round {i + 1} {name}: {figures}", file=sys.stderr, flush=True)
        rounds.append(rnd)
    return rounds, summarize(rounds)


def summarize(rounds: list[Figures]) -> Figures:
    out: Figures = {}
    for variant in rounds[0]:
        keys = rounds[0][variant].keys()
        out[variant] = {
            k: round(statistics.median(r[variant][k] for r in rounds if k in r[variant]), 3)
            for k in keys
        }
    return out


# -- certificates ----------------------------------------------------------------------------


def workload_certs(workdir: Path) -> dict[str, str]:
    """Files for one mutual-TLS pair from the control plane's own CA: `ca` (the root) and
    `client_cert`/`client_key`, `server_cert`/`server_key` (workload certificates, ECDSA P-256
    like the mesh's, for the demo's frontend and backend identities)."""
    ca = CertificateAuthority.create("cluster.local")
    out = {"ca": str(workdir / "ca.pem")}
    (workdir / "ca.pem").write_text(ca.root_pem())
    for role, sa in (("client", "frontend"), ("server", "backend")):
        key = csr.generate_key()
        leaf, _root = ca.sign(csr.build_csr(key, Identity("cluster.local", "demo", sa)), 7200)
        cert_path, key_path = workdir / f"{role}.pem", workdir / f"{role}.key"
        cert_path.write_text(leaf)
        key_path.write_bytes(csr.key_to_pem(key))
        key_path.chmod(0o600)
        out[f"{role}_cert"], out[f"{role}_key"] = str(cert_path), str(key_path)
    return out


# -- references ------------------------------------------------------------------------------


class RelayPair(Variant):
    """A reference: a pair of relay processes, client side on loopback in the client pod,
    server side on the server pod (`ports`: app port -> (client side, server side))."""

    ports: dict[int, tuple[int, int]] = {}
    pids: list[int]

    def target(self, port: int) -> tuple[str, int]:
        return "127.0.0.1", self.ports[port][0]

    def tunnel_pids(self) -> list[int]:
        return self.pids

    def certificates(self, workdir: Path) -> dict[str, str]:
        """This pair's own CA and certificates (`workload_certs`), in its own directory."""
        (workdir / self.name).mkdir(exist_ok=True)
        return workload_certs(workdir / self.name)


class Stunnel(RelayPair):
    """The native reference: an OpenSSL mutual TLS 1.3 stunnel pair."""

    name = "stunnel"
    ports = STUNNEL

    def __init__(self, procs: Procs, workdir: Path, client_ns: str, server_ns: str, server_ip: str):
        self.pids: list[int] = []
        self.server_ip = server_ip
        certs = self.certificates(workdir)
        workdir = workdir / self.name  # each pair its own CA and files
        common = [
            "foreground = yes",
            "pid =",
            "sslVersionMin = TLSv1.3",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
            "debug = 3",
        ]
        client_conf = [*common]
        server_conf = [*common]
        for app_port, (local, remote) in self.ports.items():
            client_conf += [
                f"[c{app_port}]",
                "client = yes",
                f"accept = 127.0.0.1:{local}",
                f"connect = {server_ip}:{remote}",
                f"cert = {certs['client_cert']}",
                f"key = {certs['client_key']}",
                f"CAfile = {certs['ca']}",
                "verifyChain = yes",
            ]
            server_conf += [
                f"[s{app_port}]",
                f"accept = {server_ip}:{remote}",
                f"connect = 127.0.0.1:{app_port}",
                f"cert = {certs['server_cert']}",
                f"key = {certs['server_key']}",
                f"CAfile = {certs['ca']}",
                "verifyChain = yes",
                "requireCert = yes",
            ]
        client_file = workdir / f"{self.name}-client.conf"
        server_file = workdir / f"{self.name}-server.conf"
        client_file.write_text("\n".join(client_conf) + "\n")
        server_file.write_text("\n".join(server_conf) + "\n")
        stunnel = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4"
        self.pids.append(procs.start(in_ns(server_ns, stunnel, str(server_file))).pid)
        self.pids.append(procs.start(in_ns(client_ns, stunnel, str(client_file))).pid)
        for local, _ in self.ports.values():
            wait_port(client_ns, "127.0.0.1", local)


class PyRelay(RelayPair):
    """`bench.tls_relay`, a bare Python mutual-TLS relay pair on stunnel's path: what relaying
    TLS from Python costs before any HTTP/2, capture or policy (the mesh's floor)."""

    name = "py_relay"
    ports = PY_RELAY

    def __init__(self, procs: Procs, workdir: Path, client_ns: str, server_ns: str, server_ip: str):
        certs = self.certificates(workdir)
        pairs = [(app, local, remote) for app, (local, remote) in PY_RELAY.items()]
        server_maps = [f"{server_ip}:{remote}=127.0.0.1:{app}" for app, _, remote in pairs]
        client_maps = [f"127.0.0.1:{local}={server_ip}:{remote}" for _, local, remote in pairs]
        server = [certs["server_cert"], certs["server_key"], certs["ca"]]
        client = [certs["client_cert"], certs["client_key"], certs["ca"]]
        relays = [
            in_ns(server_ns, *program("tls_relay", "server", *server, *server_maps)),
            in_ns(client_ns, *program("tls_relay", "client", *client, *client_maps)),
        ]
        self.pids = [procs.start(argv).pid for argv in relays]
        for _, remote in PY_RELAY.values():
            wait_port(client_ns, server_ip, remote)
        for local, _ in PY_RELAY.values():
            wait_port(client_ns, "127.0.0.1", local)


class CapturedStunnel(Stunnel):
    """The stunnel pair reached the way the mesh is: the client pod gets the agent's own capture
    rules (the plan `nodeagent.datapath.plan` renders, mangle and nat), except that the outbound
    REDIRECT sends each app port to its stunnel client port instead of to 15001 (stunnel cannot
    read the original destination). The app connects straight to the server pod, as with the
    mesh, so this reference pays the same kernel capture cost (conntrack and NAT on every packet
    of the app's connection) and the ratio to it isolates what our user space adds."""

    name = "stunnel_captured"
    ports = STUNNEL_CAPTURED

    def __init__(self, procs: Procs, workdir: Path, client_ns: str, server_ns: str, server_ip: str):
        super().__init__(procs, workdir, client_ns, server_ns, server_ip)
        sh(*in_ns(client_ns, "iptables-legacy-restore", "--noflush"), input=self.rules(server_ip))

    @classmethod
    def rules(cls, server_ip: str) -> str:
        from nodeagent.datapath.plan import build_plan, render_iptables_save

        redirect = f"-j REDIRECT --to-ports {OUTBOUND_PORT}"
        lines, swapped = [], 0
        for line in render_iptables_save(build_plan(ipv6=False)).splitlines():
            if line.startswith("-A ") and line.endswith(redirect):
                # "not to loopback" narrows to "to the server pod" (iptables takes one -d).
                head = line[: -len(redirect)].replace("! -d 127.0.0.1/32", f"-d {server_ip}/32")
                for app_port, (local, _) in cls.ports.items():
                    lines.append(f"{head}-m tcp --dport {app_port} -j REDIRECT --to-ports {local}")
                swapped += 1
            else:
                lines.append(line)
        if swapped != 1:
            raise RuntimeError(f"capture plan has {swapped} outbound REDIRECT rules, expected 1")
        return "\n".join(lines) + "\n"

    def target(self, port: int) -> tuple[str, int]:
        return self.server_ip, port


class NodeH2Pair(RelayPair):
    """A Node.js reference (`bench/h2_connect_pair.js`, Node's own http2 and TLS): each
    connection a CONNECT stream on one pooled mutual TLS 1.3 http2 session, the HBONE shape
    without capture or policy, for the rate of new connections (issue 21)."""

    name = "node_h2"
    ports = NODE_H2

    def __init__(self, procs: Procs, workdir: Path, client_ns: str, server_ns: str, server_ip: str):
        certs = self.certificates(workdir)
        script = str(ROOT / "bench" / "h2_connect_pair.js")
        # --expose-gc: SIGUSR2 then collects garbage (`collect`)
        node = [shutil.which("node") or "node", "--expose-gc"]
        (remote,) = {remote for _, remote in self.ports.values()}
        first, *more = [(str(local), f"127.0.0.1:{app}") for app, (local, _) in self.ports.items()]
        env = ["env", f"H2_CA={certs['ca']}"]
        server = [*env, f"H2_CERT={certs['server_cert']}", f"H2_KEY={certs['server_key']}"]
        client = [*env, f"H2_CERT={certs['client_cert']}", f"H2_KEY={certs['client_key']}"]
        self.pids = [
            procs.start(in_ns(server_ns, *server, *node, script, "server", str(remote))).pid
        ]
        wait_port(client_ns, server_ip, remote)
        pairs = [x for pair in more for x in pair]
        argv = [*node, script, "client", first[0], server_ip, str(remote), first[1], *pairs]
        self.pids.append(procs.start(in_ns(client_ns, *client, *argv)).pid)
        for local, _ in self.ports.values():
            wait_port(client_ns, "127.0.0.1", local)

    def collect(self) -> None:
        """Both sides collect their garbage now, so RSS read next is what they hold."""
        for pid in self.pids:
            os.kill(pid, signal.SIGUSR2)


class PyH2Pair(RelayPair):
    """`bench.py_h2_pair`, the same shape as `NodeH2Pair` in bare Python (uvloop, asyncio's
    TLS, fixed header blocks, no capture, policy or telemetry): the floor under a Python
    HBONE tunnel's rate of new connections (issue 21)."""

    name = "py_h2"
    ports = PY_H2

    def __init__(self, procs: Procs, workdir: Path, client_ns: str, server_ns: str, server_ip: str):
        certs = self.certificates(workdir)
        (remote,) = {remote for _, remote in self.ports.values()}
        server = [certs["server_cert"], certs["server_key"], certs["ca"]]
        client = [certs["client_cert"], certs["client_key"], certs["ca"]]
        self.pids = [
            procs.start(
                in_ns(server_ns, *program("py_h2_pair", "server", *server, f"0.0.0.0:{remote}"))
            ).pid
        ]
        wait_port(client_ns, server_ip, remote)
        maps = [f"{local}=127.0.0.1:{app}" for app, (local, _) in self.ports.items()]
        argv = program("py_h2_pair", "client", *client, f"{server_ip}:{remote}", *maps)
        self.pids.append(procs.start(in_ns(client_ns, *argv)).pid)
        for local, _ in self.ports.values():
            wait_port(client_ns, "127.0.0.1", local)
