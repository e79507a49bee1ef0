"""What the node manager needs from the datapath: the interface every capture
backend implements (iptables, eBPF), how a pod's capture plan is built, and
whether a pod's namespace still exists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from nodeagent.datapath.iptables import InstalledCapture
from nodeagent.datapath.netns import NetnsError, NetnsHandle, NetnsWorker, ipv6_enabled, resolve
from nodeagent.datapath.plan import CapturePlan, build_plan
from nodeagent.model.workload import Workload


class CaptureBackend(Protocol):
    """What the node manager needs from a capture backend (iptables or eBPF)."""

    def apply(self, netns: NetnsHandle, plan: CapturePlan) -> bool: ...

    def remove(self, netns: NetnsHandle) -> None: ...

    def read_installed(self, netns: NetnsHandle) -> InstalledCapture: ...


PlanBuilder = Callable[[Workload, NetnsHandle], CapturePlan]
"""The capture plan for a pod; runs on a worker thread (it may look into the namespace)."""


def plan_from_addresses(workload: Workload, netns: NetnsHandle) -> CapturePlan:
    """Capture IPv6 too when the workload has an IPv6 address."""
    return build_plan(ipv6=any(a.version == 6 for a in workload.addresses))


def plan_from_namespace(worker: NetnsWorker, *, ebpf_outbound_ipv4: bool = False) -> PlanBuilder:
    """Capture IPv6 whenever the pod's namespace has IPv6 enabled, whatever
    addresses the control plane listed: IPv6 left uncaptured would leak.
    ebpf_outbound_ipv4: the eBPF backend redirects IPv4 outbound connects itself."""

    def plan_for(workload: Workload, netns: NetnsHandle) -> CapturePlan:
        return build_plan(
            ipv6=worker.call(netns, ipv6_enabled), ebpf_outbound_ipv4=ebpf_outbound_ipv4
        )

    return plan_for


def netns_alive(handle: NetnsHandle) -> bool:
    """Whether the namespace still exists (same inode)."""
    try:
        resolve(handle)
    except NetnsError:
        return False
    return True
