"""The sandbox topology as pure data: names, addresses, routes and sysctls from N and M.

Addressing (deterministic; every sandbox lives in its own namespaces, so two
sandboxes reuse the same addresses without clashing):

* underlay namespace ``NAME-underlay``: bridge ``br0`` with 172.30.0.1/16 and one
  port ``vnode<i>`` per node; routes each node's pod range via that node.
* node ``node<i>`` (i = 1..N), namespace ``NAME-node<i>``: ``eth0`` =
  172.30.0.(10+i)/16 on the underlay; pod range 10.10.<i>.0/24 with gateway
  10.10.<i>.1; ip_forward on, rp_filter off; one ``vpod<j>`` veth per pod carrying
  the gateway address (/32) and a /32 route to that pod; other nodes' pod ranges
  routed via their underlay IPs (like a host-network Kubernetes node with a
  routed CNI).
* pod ``node<i>-pod<j>`` (j = 1..M), namespace ``NAME-node<i>-pod<j>``: ``eth0`` =
  10.10.<i>.(10+j)/32, an on-link route to the gateway and a default route via it.

Who wires the pods (``pod_network``): with ``"cni"`` the real CNI plugins do, as a
container runtime would (see cni.py): the plan keeps each pod namespace's sysctls
and the nodes' underlay side, and leaves out the ``vpod`` veths, their addresses and
routes, and the pods' own ``eth0`` and routes. ptp then makes the same shape, except
that its host-side veth is named ``veth<random>`` and the pod's address carries the
pod range's prefix (10.10.<i>.(10+j)/24) with the connected route replaced by one via
the gateway, so traffic still leaves through the node. With ``"veth"`` (no plugins
installed) the plan makes all of it itself, as above.

Kubernetes metadata: every pod is in namespace ``demo``; odd-numbered pods run the
app ``frontend`` as service account ``frontend``, even-numbered ones the app
``backend`` as ``backend`` (so a 2x2 sandbox has both on every node, and a policy
can deny one caller). Each app's pods, in pod order (node by node), alternate
version ``v1`` and ``v2``, so a subset can pick half of a service's endpoints.

With ``shadow`` (``up --shadow``, for mirroring tests) one more pod, ``node2-shadow``
(namespace ``NAME-node2-shadow``, 10.10.2.251: pod index SHADOW_POD_INDEX), runs
the demo app as app ``backend``, version ``v3``, service account ``backend``: an
endpoint of the backend service like the others, captured and meshed like them,
and the only member of a DestinationRule subset ``version: v3``.

Interface names are fixed and short because they are only ever created inside
the sandbox's own namespaces, never in the root namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

MAX_NAME_LEN = 20
MAX_NODES = 64
MAX_PODS_PER_NODE = 128

UNDERLAY_PREFIXLEN = 16
UNDERLAY_GATEWAY = "172.30.0.1"
POD_NAMESPACE = "demo"
SERVICE_ACCOUNTS = ("frontend", "backend")
# Each app's pods take these in turn, in pod order (a canary needs two versions).
VERSIONS = ("v1", "v2")
BRIDGE = "br0"
UPLINK = "eth0"

HTTP_PORT = 8080
ECHO_PORT = 9000

# `up --waypoint`: one waypoint pod for POD_NAMESPACE on node1 (not captured: it
# terminates HBONE itself), at a fixed address above the demo pods' range.
WAYPOINT_NAME = "waypoint"
WAYPOINT_POD_INDEX = 240
# `up --shadow`: one more backend pod on SHADOW_NODE_INDEX, as the only v3, to mirror to.
SHADOW_SUFFIX = "shadow"
SHADOW_NODE_INDEX = 2
SHADOW_POD_INDEX = 241
SHADOW_APP = "backend"
SHADOW_VERSION = "v3"

_NAME_RE = re.compile(r"^[a-z]([a-z0-9-]*[a-z0-9])?$")

Role = Literal["underlay", "node", "pod"]
# Who makes the pods' links: the sandbox itself ("veth") or the CNI plugins ("cni").
PodNetwork = Literal["veth", "cni"]
POD_NETWORKS: tuple[PodNetwork, ...] = ("veth", "cni")


class PlanError(ValueError):
    """Invalid sandbox parameters; the message names the parameter."""


def validate_name(name: str) -> str:
    """Return `name` if it is a valid sandbox name, else raise PlanError."""
    if not name or len(name) > MAX_NAME_LEN or not _NAME_RE.match(name):
        raise PlanError(
            f"invalid sandbox name {name!r}: use 1-{MAX_NAME_LEN} lowercase letters, digits "
            "or '-', starting with a letter and not ending with '-'"
        )
    return name


def netns_pattern(name: str) -> re.Pattern[str]:
    """The exact names of namespaces sandbox `name` can make (for sweeping)."""
    return re.compile(rf"^{re.escape(name)}-(underlay|node[0-9]+(-pod[0-9]+|-waypoint|-shadow)?)$")


def underlay_netns(name: str) -> str:
    return f"{name}-underlay"


def node_ip(index: int) -> str:
    return f"172.30.0.{10 + index}"


def pod_cidr(node_index: int) -> str:
    return f"10.10.{node_index}.0/24"


def pod_gateway(node_index: int) -> str:
    return f"10.10.{node_index}.1"


def pod_ip(node_index: int, pod_index: int) -> str:
    return f"10.10.{node_index}.{10 + pod_index}"


def service_account(pod_index: int) -> str:
    return SERVICE_ACCOUNTS[(pod_index - 1) % len(SERVICE_ACCOUNTS)]


def alternate_versions(apps: list[str]) -> list[str]:
    """The version of each pod, given its app in pod order: each app's pods take
    VERSIONS in turn (v1, v2, v1, ...), whatever the other apps' pods between them."""
    seen: dict[str, int] = {}
    out = []
    for app in apps:
        out.append(VERSIONS[seen.get(app, 0) % len(VERSIONS)])
        seen[app] = seen.get(app, 0) + 1
    return out


@dataclass(frozen=True, kw_only=True)
class Route:
    """One IPv4 route. `gateway` None means on-link via `dev`."""

    dst: str  # "a.b.c.d/len" or "default"
    gateway: str | None = None
    dev: str | None = None


@dataclass(frozen=True, kw_only=True)
class Veth:
    """A veth pair created from `netns` with its peer placed straight into `peer_netns`."""

    netns: str
    ifname: str
    peer_netns: str
    peer_ifname: str


@dataclass(frozen=True, kw_only=True)
class Interface:
    """How one interface is configured: addresses (with prefix), bridge master, up."""

    ifname: str
    addresses: tuple[str, ...] = ()
    master: str | None = None


@dataclass(frozen=True, kw_only=True)
class NamespacePlan:
    """Everything done inside one namespace, in apply order."""

    name: str
    role: Role
    sysctls: tuple[tuple[str, str], ...] = ()
    bridges: tuple[str, ...] = ()
    veths: tuple[Veth, ...] = ()  # created from this namespace
    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True, kw_only=True)
class NodePlan:
    name: str
    index: int
    ip: str
    netns: str
    pod_cidr: str
    gateway: str


@dataclass(frozen=True, kw_only=True)
class PodPlan:
    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    netns: str
    index: int
    app: str
    """The service the pod serves (its app's name, like a Deployment's `app` label)."""
    version: str

    def labels(self, sandbox: str) -> dict[str, str]:
        """The pod's Kubernetes labels. `role` (its service account) is kept for the
        selectors written before `app` named the service; `sandbox` selects every pod."""
        return {
            "app": self.app,
            "version": self.version,
            "role": self.service_account,
            "sandbox": sandbox,
        }


@dataclass(frozen=True, kw_only=True)
class SandboxPlan:
    name: str
    node_count: int
    pods_per_node: int
    underlay_netns: str
    underlay_ip: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    namespaces: tuple[NamespacePlan, ...] = field(repr=False)
    waypoint: PodPlan | None = None  # the demo namespace's waypoint pod (`up --waypoint`)
    shadow: PodPlan | None = None  # the extra v3 backend pod (`up --shadow`), also in `pods`
    pod_network: PodNetwork = "veth"  # who wires the pods (see the module docstring)

    def wired_pods(self) -> tuple[PodPlan, ...]:
        """Every pod with a network of its own: the demo pods, then the waypoint pod."""
        return (*self.pods, *((self.waypoint,) if self.waypoint is not None else ()))

    def pod(self, name: str) -> PodPlan | None:
        return next((p for p in self.pods if p.name == name or p.netns == name), None)

    def node(self, name: str) -> NodePlan | None:
        return next((n for n in self.nodes if n.name == name or n.netns == name), None)


# Sysctls are written relative to /proc/sys/net.
_FORWARDING = (("ipv4/ip_forward", "1"),)
_NO_RP_FILTER = (("ipv4/conf/all/rp_filter", "0"), ("ipv4/conf/default/rp_filter", "0"))


def _check_count(what: str, value: int, limit: int) -> None:
    if not 1 <= value <= limit:
        raise PlanError(f"{what} must be between 1 and {limit}, got {value}")


def build_plan(
    name: str,
    nodes: int,
    pods_per_node: int,
    *,
    waypoint: bool = False,
    shadow: bool = False,
    pod_network: PodNetwork = "veth",
) -> SandboxPlan:
    """The whole topology of sandbox `name` with `nodes` x `pods_per_node` pods (and the
    waypoint pod, and the shadow pod, when asked); `pod_network` "cni" leaves the pods'
    links to the CNI plugins."""
    validate_name(name)
    if pod_network not in POD_NETWORKS:
        raise PlanError(
            f"pod_network must be one of {', '.join(POD_NETWORKS)}, got {pod_network!r}"
        )
    _check_count("--nodes", nodes, MAX_NODES)
    _check_count("--pods-per-node", pods_per_node, MAX_PODS_PER_NODE)
    if shadow and nodes < SHADOW_NODE_INDEX:
        raise PlanError(
            f"--shadow puts its pod on node{SHADOW_NODE_INDEX}: it needs --nodes of at least "
            f"{SHADOW_NODE_INDEX}, got {nodes}"
        )

    underlay = underlay_netns(name)
    node_plans = tuple(
        NodePlan(
            name=f"node{i}",
            index=i,
            ip=node_ip(i),
            netns=f"{name}-node{i}",
            pod_cidr=pod_cidr(i),
            gateway=pod_gateway(i),
        )
        for i in range(1, nodes + 1)
    )
    slots = [(n, j) for n in node_plans for j in range(1, pods_per_node + 1)]
    apps = [service_account(j) for _, j in slots]  # each app runs as its own account
    pod_plans = tuple(
        PodPlan(
            name=f"{n.name}-pod{j}",
            namespace=POD_NAMESPACE,
            service_account=service_account(j),
            node=n.name,
            ip=pod_ip(n.index, j),
            netns=f"{n.netns}-pod{j}",
            index=j,
            app=app,
            version=version,
        )
        for (n, j), app, version in zip(slots, apps, alternate_versions(apps), strict=True)
    )
    first = node_plans[0]
    waypoint_pod = (
        PodPlan(
            name=WAYPOINT_NAME,
            namespace=POD_NAMESPACE,
            service_account=WAYPOINT_NAME,
            node=first.name,
            ip=pod_ip(first.index, WAYPOINT_POD_INDEX),
            netns=f"{first.netns}-{WAYPOINT_NAME}",
            index=WAYPOINT_POD_INDEX,
            app=WAYPOINT_NAME,
            version="v1",
        )
        if waypoint
        else None
    )
    shadow_pod: PodPlan | None = None
    if shadow:
        host = node_plans[SHADOW_NODE_INDEX - 1]
        shadow_pod = PodPlan(
            name=f"{host.name}-{SHADOW_SUFFIX}",
            namespace=POD_NAMESPACE,
            service_account=SHADOW_APP,
            node=host.name,
            ip=pod_ip(host.index, SHADOW_POD_INDEX),
            netns=f"{host.netns}-{SHADOW_SUFFIX}",
            index=SHADOW_POD_INDEX,
            app=SHADOW_APP,
            version=SHADOW_VERSION,
        )
        # A demo pod like the others (its app, its capture, its workload), listed last.
        pod_plans = (*pod_plans, shadow_pod)

    namespaces: list[NamespacePlan] = [
        NamespacePlan(
            name=underlay,
            role="underlay",
            bridges=(BRIDGE,),
            veths=tuple(
                Veth(
                    netns=underlay, ifname=f"vnode{n.index}", peer_netns=n.netns, peer_ifname=UPLINK
                )
                for n in node_plans
            ),
            interfaces=(
                Interface(ifname=BRIDGE, addresses=(f"{UNDERLAY_GATEWAY}/{UNDERLAY_PREFIXLEN}",)),
                *(Interface(ifname=f"vnode{n.index}", master=BRIDGE) for n in node_plans),
            ),
            # The underlay can reach pods too (a later control plane may live here).
            routes=tuple(Route(dst=n.pod_cidr, gateway=n.ip) for n in node_plans),
        )
    ]
    # The waypoint pod is wired like any pod of its node.
    wired = (*pod_plans, *((waypoint_pod,) if waypoint_pod is not None else ()))
    # With CNI, ptp makes each pod's veth, the gateway /32 on its host side and the
    # /32 route to the pod; the plan then wires only the nodes' underlay side.
    handmade = pod_network == "veth"
    for n in node_plans:
        mine = [p for p in wired if p.node == n.name] if handmade else []
        namespaces.append(
            NamespacePlan(
                name=n.netns,
                role="node",
                # rp_filter off: a node forwards pod traffic whose source it reaches via
                # another interface (and later, agent traffic with spoofed sources).
                sysctls=_FORWARDING + _NO_RP_FILTER,
                veths=tuple(
                    Veth(
                        netns=n.netns,
                        ifname=f"vpod{p.index}",
                        peer_netns=p.netns,
                        peer_ifname=UPLINK,
                    )
                    for p in mine
                ),
                interfaces=(
                    Interface(ifname=UPLINK, addresses=(f"{n.ip}/{UNDERLAY_PREFIXLEN}",)),
                    # Each pod veth carries the gateway /32 so the pod's ARP for it is answered.
                    *(
                        Interface(ifname=f"vpod{p.index}", addresses=(f"{n.gateway}/32",))
                        for p in mine
                    ),
                ),
                routes=(
                    *(Route(dst=f"{p.ip}/32", dev=f"vpod{p.index}") for p in mine),
                    *(Route(dst=o.pod_cidr, gateway=o.ip) for o in node_plans if o is not n),
                ),
            )
        )
    for n in node_plans:
        for p in (p for p in wired if p.node == n.name):
            namespaces.append(
                NamespacePlan(
                    name=p.netns,
                    role="pod",
                    sysctls=_NO_RP_FILTER,
                    interfaces=(
                        (Interface(ifname=UPLINK, addresses=(f"{p.ip}/32",)),) if handmade else ()
                    ),
                    routes=(
                        (
                            Route(dst=f"{n.gateway}/32", dev=UPLINK),
                            Route(dst="default", gateway=n.gateway),
                        )
                        if handmade
                        else ()
                    ),
                )
            )

    return SandboxPlan(
        name=name,
        node_count=nodes,
        pods_per_node=pods_per_node,
        underlay_netns=underlay,
        underlay_ip=UNDERLAY_GATEWAY,
        nodes=node_plans,
        pods=pod_plans,
        namespaces=tuple(namespaces),
        waypoint=waypoint_pod,
        shadow=shadow_pod,
        pod_network=pod_network,
    )
