"""The eBPF backend's choices that need no kernel: where to pin, where to attach, which
iptables rules it leaves out."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.datapath.ebpf import bpf_pin_dir, cgroup2_root
from nodeagent.datapath.iptables import CaptureError
from nodeagent.datapath.plan import build_plan, render_iptables_save

HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
WITH_BPFFS = HYBRID + "bpf /sys/fs/bpf bpf rw,relatime 0 0\n"


def test_pins_only_where_a_bpffs_is_mounted_per_cluster_and_node():
    auto = bpf_pin_dir("auto", "c1", "node1", mounts=WITH_BPFFS)
    assert auto == Path("/sys/fs/bpf/nodeagent/c1/node1")
    assert bpf_pin_dir("auto", "c2", "node1", mounts=WITH_BPFFS) != auto
    assert bpf_pin_dir("auto", "c1", "node1", mounts=HYBRID) is None
    # a plain directory of that name is not a bpffs
    tmpfs = HYBRID + "tmpfs /sys/fs/bpf tmpfs rw 0 0\n"
    assert bpf_pin_dir("auto", "c1", "node1", mounts=tmpfs) is None
    assert bpf_pin_dir("", "c1", "node1", mounts=WITH_BPFFS) is None  # never pin
    assert bpf_pin_dir("/x/pins", "c1", "node1", mounts=HYBRID) == Path("/x/pins")


def test_attaches_at_the_configured_or_the_first_cgroup2_hierarchy():
    assert cgroup2_root(mounts=HYBRID) == "/sys/fs/cgroup/unified"
    assert cgroup2_root(mounts="cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == "/sys/fs/cgroup"
    assert cgroup2_root("/host/cgroup", mounts=HYBRID) == "/host/cgroup"
    with pytest.raises(CaptureError, match="cgroup2_path"):
        cgroup2_root(mounts="tmpfs /tmp tmpfs rw 0 0\n")


def test_the_ebpf_plan_leaves_out_only_the_ipv4_outbound_redirect():
    plain = build_plan(ipv6=True)
    ebpf = build_plan(ipv6=True, ebpf_outbound_ipv4=True)
    v4_plain = render_iptables_save(plain, 4).splitlines()
    v4_ebpf = render_iptables_save(ebpf, 4).splitlines()
    dropped = [line for line in v4_plain if line not in v4_ebpf]
    assert len(dropped) == 1 and "REDIRECT --to-ports 15001" in dropped[0]
    assert all(line in v4_plain for line in v4_ebpf)
    assert "REDIRECT --to-ports 15006" in "\n".join(v4_ebpf)  # inbound stays
    assert render_iptables_save(ebpf, 6) == render_iptables_save(plain, 6)  # IPv6 keeps it
