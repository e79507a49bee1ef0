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

    python -m bench.capture_cost [--rounds 5] [--seconds 4] [--pings 5000]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys

from bench import harness
from bench.harness import ECHO_PORT, HTTP_PORT, IPERF_PORT, Figures
from bench.report import emit

CGROUP2 = "/sys/fs/cgroup/unified"
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
EBPF_PORTS = {
    IPERF_PORT: (27201, 37201),
    ECHO_PORT: (27900, 37900),
    HTTP_PORT: (27080, 37080),
}


class EbpfStunnel(harness.Stunnel):
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
    if not harness.require_root("bench.capture_cost"):
        return 2
    # bcc compiles against kernel headers; `make setup` puts matching ones here.
    headers = harness.ROOT / ".cache" / "kheaders"
    if headers.is_dir():
        os.environ.setdefault("BCC_KERNEL_SOURCE", str(headers))
    from bcc import BPF, BPFAttachType

    attached = None
    with harness.Session("capture-cost") as session:
        try:
            procs, workdir = session.procs, session.workdir
            box = session.sandbox("cc", agents=False, pods_per_node=3)
            clients = [box.pods[f"node1-pod{i}"]["netns"] for i in (1, 2, 3)]
            server_ns, server_ip = box.server["netns"], box.server["ip"]
            variants = [
                harness.Stunnel(procs, workdir, clients[0], server_ns, server_ip),
                EbpfStunnel(procs, workdir, clients[1], server_ns, server_ip),
                harness.CapturedStunnel(procs, workdir, clients[2], server_ns, server_ip),
            ]
            program = BPF(text=connect4_source(netns_cookie(clients[1]), server_ip))
            fn = program.load_func(
                "connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT
            )
            cgroup = os.open(CGROUP2, os.O_RDONLY)
            BPF.attach_func(fn, cgroup, BPFAttachType.CGROUP_INET4_CONNECT)
            attached = (fn, cgroup)

            def one_round() -> Figures:
                rnd = {}
                for variant, client in zip(variants, clients, strict=True):
                    before = program["rewrites"][0].value
                    host, port = variant.target(IPERF_PORT)
                    out = harness.iperf(client, host, port, args.seconds)
                    gbps, error = harness.iperf_gbps(out)
                    if error is not None:
                        raise RuntimeError(f"{variant.name}: iperf3 failed: {error}")
                    host, port = variant.target(ECHO_PORT)
                    argv = harness.in_ns(client)
                    samples = sorted(harness.ping_block(argv, host, port, args.pings))
                    rewritten = program["rewrites"][0].value - before
                    if isinstance(variant, EbpfStunnel) and rewritten < 3:
                        # iperf3's control and data connections and the ping-pong's: without
                        # them the "eBPF" figures would be the app talking to the server directly.
                        raise RuntimeError(f"stunnel_ebpf: only {rewritten} connects rewritten")
                    p50 = harness.percentile(samples, 0.5) / 1000
                    rnd[variant.name] = {"gbps_1_stream": round(gbps, 3), "p50_us": p50}
                return rnd

            rounds, median = harness.interleaved(args.rounds, one_round)
            emit({"median": median, "rounds": rounds})
            return 0
        finally:
            if attached is not None:
                BPF.detach_func(attached[0], attached[1], BPFAttachType.CGROUP_INET4_CONNECT)
                os.close(attached[1])


if __name__ == "__main__":
    sys.exit(main())
