"""The capture-cost measurement's BPF program text: right cookie, address order and ports."""

from __future__ import annotations

import re
import socket

from bench import harness
from bench.capture_cost import EBPF_PORTS, connect4_source


def test_connect4_rewrites_each_app_port_of_the_server_pod_only_in_its_namespace() -> None:
    source = connect4_source(1234567890123, "10.10.2.11")
    assert "bpf_get_netns_cookie(ctx) != 1234567890123ull) return 1;" in source
    # user_ip4 holds the address in network byte order: read as a little-endian u32 here.
    ip = int.from_bytes(socket.inet_aton("10.10.2.11"), "little")
    rewrites = re.findall(
        rf"ctx->user_ip4 == {ip}u && ctx->user_port == bpf_htons\((\d+)\)\) \{{\s*"
        r"ctx->user_ip4 = bpf_htonl\(0x7f000001\);\s*ctx->user_port = bpf_htons\((\d+)\);",
        source,
    )
    assert {int(app): int(local) for app, local in rewrites} == {
        app: local for app, (local, _) in EBPF_PORTS.items()
    }
    # its ports must not collide with the other stunnel pairs' (one sandbox holds all three)
    used = {
        p
        for ports in (harness.STUNNEL, harness.STUNNEL_CAPTURED)
        for pair in ports.values()
        for p in pair
    }
    assert not used & {p for pair in EBPF_PORTS.values() for p in pair}
