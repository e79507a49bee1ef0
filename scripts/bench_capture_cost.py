"""What transparent capture costs a native TLS proxy: stunnel reached three ways, interleaved.

* `stunnel`: the app connects to stunnel on loopback (no capture);
* `stunnel_ebpf`: the app connects to the server pod, and a cgroup/connect4 BPF program
  (attached to the cgroup2 root, acting only in that pod's network namespace) rewrites the
  destination to the local stunnel once, at connect time;
* `stunnel_captured`: the app connects to the server pod, and the agent's iptables capture
  plan redirects it (conntrack and NAT on every packet), as in `make bench`.

Each gets its own client pod in one 2-node sandbox without agents. This is the measurement
behind the eBPF backend in docs/performance.md; `make bench` runs it too (`capture_cost`).
Needs root, bcc, and cgroup2 at /sys/fs/cgroup/unified. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mesh as mesh

CGROUP2 = "/sys/fs/cgroup/unified"
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
EBPF_PORTS = {
    mesh.IPERF_PORT: (27201, 37201),
    mesh.ECHO_PORT: (27900, 37900),
    mesh.HTTP_PORT: (27080, 37080),
}


class EbpfStunnel(mesh.Stunnel):
    name = "stunnel_ebpf"
    ports = EBPF_PORTS

    def target(self, port: int) -> tuple[str, int]:
        return self.server_ip, port  # the app dials the server pod; the program redirects it


def netns_cookie(netns: str) -> int:
    """The kernel's cookie for a named network namespace (what bpf_get_netns_cookie returns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            with socket.socket() as s:
                return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        finally:
            libc.setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


def connect4_source(cookie: int, server_ip: str) -> str:
    """A connect4 program: in the namespace `cookie`, each app port of the server pod goes to
    its local stunnel port; everything else is left alone."""
    ip = int.from_bytes(socket.inet_aton(server_ip), "little")  # user_ip4 is network order
    rules = "".join(
        f"    if (ctx->user_ip4 == {ip}u && ctx->user_port == bpf_htons({app})) {{\n"
        f"        ctx->user_ip4 = bpf_htonl(0x7f000001);\n"
        f"        ctx->user_port = bpf_htons({local});\n"
        f"        rewrites.atomic_increment(0);\n"
        f"        return 1;\n"
        f"    }}\n"
        for app, (local, _) in EBPF_PORTS.items()
    )
    return (
        "#include <uapi/linux/bpf.h>\n"
        "BPF_ARRAY(rewrites, u64, 1);\n"
        "int connect4(struct bpf_sock_addr *ctx) {\n"
        f"    if (bpf_get_netns_cookie(ctx) != {cookie}ull) return 1;\n"
        f"{rules}"
        "    return 1;\n"
        "}\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--pings", type=int, default=5000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_capture_cost: needs root", file=sys.stderr)
        return 2
    # bcc compiles against kernel headers; `make setup` puts matching ones here.
    headers = Path(__file__).resolve().parent.parent / ".cache" / "kheaders"
    if headers.is_dir():
        os.environ.setdefault("BCC_KERNEL_SOURCE", str(headers))
    from bcc import BPF, BPFAttachType

    procs = mesh.Procs()
    workdir = Path(tempfile.mkdtemp(prefix="bench-capture-cost-"))
    name = f"cc{os.getpid() % 100000}"
    attached = None
    try:
        box = mesh.Sandbox(name, procs, agents=False, pods_per_node=3)
        status = json.loads(mesh.sh(mesh.NODEAGENT, "sandbox", "status", name, "-o", "json").stdout)
        pods = {p["name"]: p["netns"] for p in status["pods"]}
        server_ns, server_ip = box.server["netns"], box.server["ip"]
        variants = [
            mesh.Stunnel(procs, workdir, pods["node1-pod1"], server_ns, server_ip),
            EbpfStunnel(procs, workdir, pods["node1-pod2"], server_ns, server_ip),
            mesh.CapturedStunnel(procs, workdir, pods["node1-pod3"], server_ns, server_ip),
        ]
        clients = [pods["node1-pod1"], pods["node1-pod2"], pods["node1-pod3"]]
        program = BPF(text=connect4_source(netns_cookie(pods["node1-pod2"]), server_ip))
        fn = program.load_func(
            "connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT
        )
        cgroup = os.open(CGROUP2, os.O_RDONLY)
        BPF.attach_func(fn, cgroup, BPFAttachType.CGROUP_INET4_CONNECT)
        attached = (fn, cgroup)
        rounds = []
        for i in range(args.rounds):
            rnd = {}
            for variant, client in zip(variants, clients, strict=True):
                before = program["rewrites"][0].value
                host, port = variant.target(mesh.IPERF_PORT)
                run = mesh.sh(
                    *mesh.in_ns(client, "iperf3", "-c", host, "-p", str(port), "-t",
                                str(args.seconds), "-J"),
                    check=False,
                    timeout=args.seconds + 30,
                )  # fmt: skip
                gbps, error = mesh.iperf_gbps(run.stdout)
                if error is not None:
                    raise RuntimeError(f"{variant.name}: iperf3 failed: {error}")
                host, port = variant.target(mesh.ECHO_PORT)
                samples = sorted(mesh.ping_block(mesh.in_ns(client), host, port, args.pings))
                rewritten = program["rewrites"][0].value - before
                if isinstance(variant, EbpfStunnel) and rewritten < 3:
                    # iperf3's control and data connections and the ping-pong's: without
                    # them the "eBPF" figures would be the app talking to the server directly.
                    raise RuntimeError(f"stunnel_ebpf: only {rewritten} connects rewritten")
                p50 = mesh.percentile(samples, 0.5) / 1000
                rnd[variant.name] = {"gbps_1_stream": round(gbps, 3), "p50_us": p50}
                print(f"round {i + 1} {variant.name}: {rnd[variant.name]}", file=sys.stderr)
            rounds.append(rnd)
        median = {
            v: {k: statistics.median(r[v][k] for r in rounds) for k in rounds[0][v]}
            for v in rounds[0]
        }
        print(json.dumps({"median": median, "rounds": rounds}))
        return 0
    finally:
        if attached is not None:
            BPF.detach_func(attached[0], attached[1], BPFAttachType.CGROUP_INET4_CONNECT)
            os.close(attached[1])
        procs.stop()
        mesh.sh(mesh.NODEAGENT, "sandbox", "down", name, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
