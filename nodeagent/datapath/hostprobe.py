"""The one host-level rule: kubelet's probes reach meshed pods past STRICT mTLS.

Inside every meshed pod, inbound TCP is REDIRECTed to the agent (15006), which
under STRICT mTLS refuses plaintext from a peer without an identity; kubelet's
HTTP/TCP probes are such plaintext. So on the node, probes are given a source
the pod recognises: this module SNATs node-local TCP to the node's meshed pod
IPs to 169.254.7.127 (IPv6: fd16:9254:7127:1337:ffff:ffff:ffff:ffff), and the
in-pod plan (datapath/plan.py) ACCEPTs that source uncaptured; the eBPF
backend's connect redirect skips it too (ebpf.py `skip_ip`).

What goes in the node's network namespace, per address family:

* an ipset `istio-inpod-probes-v4` / `-v6`, type hash:ip (with comment
  support, like istio-cni's, so either agent adopts the other's set), holding
  the IPs of this node's meshed pods;
* in the nat table, the agent-owned chain ISTIO_POSTRT with one rule

      -A ISTIO_POSTRT -p tcp -m owner --socket-exists
         -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127

  reached by one jump inserted *first* in POSTROUTING: the first NAT rule a
  new connection matches decides its source, so a CNI's MASQUERADE placed
  earlier would win and the probe would arrive captured.

Why `--socket-exists`: in POSTROUTING a packet that a local process sent still
carries its socket, a forwarded packet has none. That separates node-local
clients (kubelet) from traffic only routed through the node to the pod
(kube-proxy'd Service traffic, load balancers, other nodes' pods), which must
stay captured: SNATing it would turn any forwarded connection into an
anonymous "probe" that bypasses the mesh and its policy. Only connections
from the node's own processes are exempt (as in Istio); note that this
includes hostNetwork pods on the node, which reach meshed pods unauthenticated.

`build_host_probe_plan` is the pure part (rules as data, iptables-save text);
`HostProbeRules` the adapter. It works in the network namespace it is given
(a path or a NetnsHandle), or, given none, in the one its worker thread started
in: the agent's, which is the node's. Rules go in with one
`iptables-legacy-restore --noflush` per family (one atomic commit; the same
iptables variant as the in-pod backend), sets and members via netlink
(pyroute2's IPSet, so no `ipset` binary is needed). `install` is idempotent and
adopts what a previous agent (or istio-cni) left; `uninstall` leaves nothing.
Failures raise HostProbeError naming the namespace and what failed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nodeagent.datapath.iptables import CaptureError, remove_owned, restore_tables, save_tables
from nodeagent.datapath.netns import (
    NetnsError,
    NetnsHandle,
    NetnsWorker,
    ipv6_enabled,
    resolve,
)
from nodeagent.datapath.plan import (
    Drift,
    Family,
    Match,
    PlanError,
    Rule,
    SavedTable,
    TablePlan,
    line_drift,
    owned_view,
    parse_iptables_save,
)
from nodeagent.model.constants import (
    CHAIN_HOST_POSTROUTING,
    PROBE_SET_IPV4,
    PROBE_SET_IPV6,
    PROBE_SNAT_IPV4,
    PROBE_SNAT_IPV6,
)

NAT = "nat"
OWNED: tuple[str, ...] = (CHAIN_HOST_POSTROUTING,)
JUMP_FROM = "POSTROUTING"
SET_TYPE = "hash:ip"
_AF: dict[int, socket.AddressFamily] = {4: socket.AF_INET, 6: socket.AF_INET6}
# ipset's netlink error codes (IPSET_ERR_PRIVATE + n, linux/netfilter/ipset/ip_set.h).
_IPSET_ERR_EXIST = 4096 + 7  # element already added / not added
_EEXIST = 17


class HostProbeError(CaptureError):
    """The host probe rule or its sets could not be installed, changed, read or
    removed; names the namespace and what failed."""


# -- the plan (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HostProbeFamilyPlan:
    """One address family: the set and the nat table content that SNATs to it."""

    family: Family
    set_name: str
    snat_to: str
    table: TablePlan

    def render(self) -> str:
        """The nat table as iptables-save text (`-A` for the jump, as save prints it)."""
        lines = [f"*{self.table.name}", f":{CHAIN_HOST_POSTROUTING} - [0:0]"]
        lines += [r.render() for r in (*self.table.jumps, *self.table.rules)]
        return "\n".join([*lines, "COMMIT"]) + "\n"

    def restore_text(self, installed_jumps: Iterable[str] = ()) -> str:
        """`iptables-restore --noflush` input that makes the table match in one commit:
        declaring the chain creates or flushes it, old jumps are deleted, ours is
        inserted first in POSTROUTING."""
        lines = [f"*{self.table.name}", f":{CHAIN_HOST_POSTROUTING} - [0:0]"]
        lines += ["-D" + jump[2:] for jump in installed_jumps]
        lines.append(f"-I {JUMP_FROM} 1 -j {CHAIN_HOST_POSTROUTING}")
        lines += [r.render() for r in self.table.rules]
        return "\n".join([*lines, "COMMIT"]) + "\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostProbePlan:
    """The node's probe SNAT: IPv4 always, IPv6 when the node has it."""

    ipv4: HostProbeFamilyPlan
    ipv6: HostProbeFamilyPlan | None

    @property
    def families(self) -> tuple[HostProbeFamilyPlan, ...]:
        return (self.ipv4,) if self.ipv6 is None else (self.ipv4, self.ipv6)

    def family(self, family: int) -> HostProbeFamilyPlan | None:
        return next((f for f in self.families if f.family == family), None)


def build_host_family_plan(
    family: Family, *, snat_to: str | None = None, set_name: str | None = None
) -> HostProbeFamilyPlan:
    """The set name and nat rules for one family (see the module doc)."""
    if family not in (4, 6):
        raise PlanError(f"address family must be 4 or 6, not {family!r}")
    snat = snat_to or (PROBE_SNAT_IPV4 if family == 4 else PROBE_SNAT_IPV6)
    try:
        version = ipaddress.ip_address(snat).version
    except ValueError:
        raise PlanError(f"probe SNAT address {snat!r} is not an IP address") from None
    if version != family:
        raise PlanError(f"probe SNAT address {snat} is not an IPv{family} address")
    name = set_name or (PROBE_SET_IPV4 if family == 4 else PROBE_SET_IPV6)
    if not name or len(name) > 31 or any(c.isspace() for c in name):
        raise PlanError(f"ipset name {name!r}: 1-31 characters, no spaces")
    rule = Rule(
        chain=CHAIN_HOST_POSTROUTING,
        protocol="tcp",
        matches=(
            # Only packets sent by a local process (kubelet), never forwarded ones.
            Match("owner", (("socket_exists", ""),)),
            Match("set", (("match_set", f"{name} dst"),)),
        ),
        target="SNAT",
        target_params=(("to_source", str(ipaddress.ip_address(snat))),),
    )
    table = TablePlan(
        name=NAT,
        chains=OWNED,
        jumps=(Rule(chain=JUMP_FROM, target=CHAIN_HOST_POSTROUTING),),
        rules=(rule,),
    )
    return HostProbeFamilyPlan(
        family=family, set_name=name, snat_to=str(ipaddress.ip_address(snat)), table=table
    )


def build_host_probe_plan(
    *,
    ipv6: bool = True,
    snat_ipv4: str = PROBE_SNAT_IPV4,
    snat_ipv6: str = PROBE_SNAT_IPV6,
    set_ipv4: str = PROBE_SET_IPV4,
    set_ipv6: str = PROBE_SET_IPV6,
) -> HostProbePlan:
    """The node's probe SNAT rules and sets; the SNAT addresses must be the ones the
    in-pod plan accepts (`build_plan(probe_ipv4=..., probe_ipv6=...)`)."""
    return HostProbePlan(
        ipv4=build_host_family_plan(4, snat_to=snat_ipv4, set_name=set_ipv4),
        ipv6=build_host_family_plan(6, snat_to=snat_ipv6, set_name=set_ipv6) if ipv6 else None,
    )


def split_by_family(ips: Iterable[str]) -> dict[int, frozenset[str]]:
    """Pod IPs by address family, in canonical text (as the kernel lists them back);
    IPv4-mapped IPv6 counts as IPv4. A bad address is a PlanError naming it."""
    found: dict[int, set[str]] = {4: set(), 6: set()}
    for text in ips:
        try:
            ip = ipaddress.ip_address(text.strip())
        except (ValueError, AttributeError):
            raise PlanError(f"not an IP address: {text!r}") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        found[ip.version].add(str(ip))
    return {family: frozenset(members) for family, members in found.items()}


# -- what is installed (pure views) ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HostProbeFamilyState:
    """One family in the node namespace: the nat table, and the probe set."""

    family: Family
    nat: SavedTable | None
    set_name: str
    set_type: str | None  # None: no such set
    members: frozenset[str] = frozenset()

    @property
    def owned_lines(self) -> list[str]:
        """Our chain, its rules and the jumps to it, as iptables-save lines."""
        view = owned_view({NAT: self.nat}, OWNED).get(NAT) if self.nat else None
        if view is None:
            return []
        return [f":{c}" for c in view.chains] + list(view.rules) + list(view.jumps)

    @property
    def jump_first(self) -> bool:
        """Our jump is the first rule of POSTROUTING (module doc: why)."""
        rules = [r for r in (self.nat.rules if self.nat else ()) if r.split()[1] == JUMP_FROM]
        return bool(rules) and rules[0] == f"-A {JUMP_FROM} -j {CHAIN_HOST_POSTROUTING}"

    @property
    def has_owned(self) -> bool:
        return bool(self.owned_lines) or self.set_type is not None

    def drift(self, plan: HostProbeFamilyPlan) -> Drift:
        """How chain, jump and set differ from `plan` (membership is not drift:
        `HostProbeRules.sync` owns it)."""
        want = parse_iptables_save(plan.render())
        wanted = owned_view(want, OWNED)[NAT]
        lines = [f":{c}" for c in wanted.chains] + list(wanted.rules) + list(wanted.jumps)
        missing, unexpected = line_drift(lines, self.owned_lines)
        extra_missing: list[str] = []
        extra_unexpected: list[str] = []
        jump = wanted.jumps[0]
        if jump not in missing and not self.jump_first:
            extra_missing.append(f"{jump} (first in {JUMP_FROM})")
        if self.set_type is None:
            extra_missing.append(f"ipset {plan.set_name} ({SET_TYPE})")
        elif self.set_type != SET_TYPE:
            extra_unexpected.append(f"ipset {plan.set_name} of type {self.set_type}")
        return Drift((*missing, *extra_missing), (*unexpected, *extra_unexpected))


@dataclass(frozen=True, slots=True, kw_only=True)
class InstalledHostProbe:
    """The probe rule as found in one namespace, per family (the drift/report view)."""

    netns: str
    families: dict[int, HostProbeFamilyState] = field(default_factory=dict)

    @property
    def members(self) -> frozenset[str]:
        """Every pod IP in the probe sets, both families."""
        return frozenset().union(*(s.members for s in self.families.values()))

    @property
    def empty(self) -> bool:
        """No chain, jump or set of ours is left."""
        return not any(s.has_owned for s in self.families.values())

    def drift(self, plan: HostProbePlan) -> dict[int, Drift]:
        """Per family, what differs from `plan`; a family the plan leaves out must be empty."""
        result: dict[int, Drift] = {}
        for family, state in sorted(self.families.items()):
            fplan = plan.family(family)
            if fplan is None:
                if state.has_owned:
                    result[family] = Drift((), ("host probe rule present",))
                continue
            diff = state.drift(fplan)
            if not diff.clean:
                result[family] = diff
        for fplan in plan.families:
            if fplan.family not in self.families:
                result[fplan.family] = Drift(("not read",), ())
        return result

    def matches(self, plan: HostProbePlan) -> bool:
        return not self.drift(plan)


# -- the adapter --------------------------------------------------------------------------


class HostProbeRules:
    """Installs, fills and removes the probe SNAT rule and its sets in one namespace.

    `netns`: a /var/run/netns name, a path or a NetnsHandle; None means the
    namespace the worker thread started in (the agent's own, i.e. the node's).
    `ipv6`: None detects it (in that namespace) on first use; without IPv6 only
    the IPv4 half is installed and IPv6 pod addresses are ignored.
    Calls run one at a time on the worker thread and block until done (from the
    event loop, call them through `asyncio.to_thread`).
    """

    def __init__(
        self,
        netns: NetnsHandle | str | None = None,
        *,
        worker: NetnsWorker | None = None,
        ipv6: bool | None = None,
        snat_ipv4: str = PROBE_SNAT_IPV4,
        snat_ipv6: str = PROBE_SNAT_IPV6,
    ) -> None:
        self._handle: NetnsHandle | None = None
        if netns is not None:
            try:
                self._handle = resolve(netns)
            except NetnsError as exc:
                raise HostProbeError(f"host probe rule: {exc}") from exc
        self._own_worker = worker is None
        self._worker = worker or NetnsWorker("hostprobe")
        self._ipv6 = ipv6
        self._snat = (snat_ipv4, snat_ipv6)
        self._plan: HostProbePlan | None = None

    @property
    def where(self) -> str:
        return f"netns {self._handle}" if self._handle else "the agent's netns"

    def close(self) -> None:
        if self._own_worker:
            self._worker.close()

    def __enter__(self) -> HostProbeRules:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def plan(self) -> HostProbePlan:
        """The plan for this namespace (IPv6 detected there on first use)."""
        if self._plan is None:
            ipv6 = self._ipv6
            if ipv6 is None:
                ipv6 = self._call("detect IPv6", ipv6_enabled)
            self._plan = build_host_probe_plan(
                ipv6=ipv6, snat_ipv4=self._snat[0], snat_ipv6=self._snat[1]
            )
        return self._plan

    def _call(self, action: str, fn: Any, *args: Any) -> Any:
        try:
            return self._worker.call(self._handle, fn, *args)
        except Exception as exc:  # ours, netns, netlink, subprocess: name the namespace
            raise HostProbeError(f"{action} in {self.where}: {exc}") from exc

    def install(self) -> bool:
        """Create the sets and the chain/jump/rule where missing or different; True if
        anything changed. What already matches (a previous agent's, istio-cni's) is
        adopted untouched, members included."""
        plan = self.plan
        return bool(self._call("install host probe rule", _install, plan))

    def add(self, ips: Iterable[str]) -> bool:
        """Put pod IPs in the sets (by family); True if any was new."""
        return self._change("add", ips)

    def remove(self, ips: Iterable[str]) -> bool:
        """Take pod IPs out of the sets; absent ones (or sets) are fine. True if any was there."""
        return self._change("remove", ips)

    def sync(self, ips: Iterable[str]) -> bool:
        """Make the sets hold exactly `ips`; True if anything changed."""
        return self._change("sync", ips)

    def _change(self, op: str, ips: Iterable[str]) -> bool:
        plan = self.plan
        try:
            wanted = split_by_family(ips)
        except PlanError as exc:
            raise HostProbeError(f"{op} probe set members: {exc}") from exc
        names = {f.family: f.set_name for f in plan.families}
        return bool(self._call(f"{op} probe set members", _change_members, op, names, wanted))

    def installed(self) -> InstalledHostProbe:
        """What is there now (chains, jumps, sets and members), for drift and reports."""
        plan = self.plan
        families = tuple(f.family for f in plan.families)
        names = {4: plan.ipv4.set_name, 6: (plan.ipv6 or build_host_family_plan(6)).set_name}
        states = self._call("read host probe rule", _read, families, names)
        return InstalledHostProbe(netns=self.where, families=states)

    def uninstall(self) -> None:
        """Remove jump, chain and sets of both families; whatever is missing is fine."""
        plan = self.plan
        names = {4: plan.ipv4.set_name, 6: (plan.ipv6 or build_host_family_plan(6)).set_name}
        families = (4, 6) if plan.ipv6 is not None else (4,)
        self._call("uninstall host probe rule", _uninstall, families, names)


# -- worker-side functions (run inside the namespace) -------------------------------------


def _ipset() -> Any:
    from pyroute2 import IPSet  # slow import: only when used

    return IPSet()


def _netlink_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _set_header(ips: Any, name: str) -> tuple[str, int] | None:
    """(type, family) of set `name`, or None if there is none."""
    for msg in ips.list():
        if msg.get_attr("IPSET_ATTR_SETNAME") == name:
            return msg.get_attr("IPSET_ATTR_TYPENAME"), msg.get_attr("IPSET_ATTR_FAMILY")
    return None


def _members(ips: Any, name: str) -> frozenset[str]:
    found: set[str] = set()
    for msg in ips.list(name):
        adt = msg.get_attr("IPSET_ATTR_ADT")
        if not adt:
            continue
        for data in adt.get_attrs("IPSET_ATTR_DATA"):
            ip = data.get_attr("IPSET_ATTR_IP_FROM")
            if ip is None:
                continue
            text = ip.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip.get_attr("IPSET_ATTR_IPADDR_IPV6")
            if text:
                found.add(str(ipaddress.ip_address(text)))
    return frozenset(found)


def _save_nat(family: int) -> SavedTable | None:
    try:
        return save_tables(family).get(NAT)
    except CaptureError as exc:
        raise HostProbeError(str(exc)) from exc


def _restore(family: int, text: str) -> None:
    try:
        restore_tables(family, text)
    except CaptureError as exc:
        raise HostProbeError(str(exc)) from exc


def _state(ips: Any, family: Family, name: str) -> HostProbeFamilyState:
    header = _set_header(ips, name)
    return HostProbeFamilyState(
        family=family,
        nat=_save_nat(family),
        set_name=name,
        set_type=header[0] if header else None,
        members=_members(ips, name) if header else frozenset(),
    )


def _read(families: tuple[Family, ...], names: dict[int, str]) -> dict[int, HostProbeFamilyState]:
    with _ipset() as ips:
        return {family: _state(ips, family, names[family]) for family in families}


def _ensure_set(ips: Any, plan: HostProbeFamilyPlan, state: HostProbeFamilyState) -> bool:
    header = _set_header(ips, plan.set_name)
    if header == (SET_TYPE, _AF[plan.family]):
        return False
    if header is not None:  # wrong type or family: only our own rule can use it
        _remove_rules(plan.family, state)
        try:
            ips.destroy(plan.set_name)
        except Exception as exc:
            raise HostProbeError(
                f"ipset {plan.set_name} is {header[0]}, not {SET_TYPE}, and cannot be replaced: "
                f"{exc}"
            ) from exc
    try:
        ips.create(plan.set_name, stype=SET_TYPE, family=_AF[plan.family], comment=True)
    except Exception as exc:
        if _netlink_code(exc) == _EEXIST:  # made meanwhile (another agent)
            return True
        raise HostProbeError(f"create ipset {plan.set_name} ({SET_TYPE}): {exc}") from exc
    return True


def _install(plan: HostProbePlan) -> bool:
    changed = False
    with _ipset() as ips:
        for fplan in plan.families:
            state = _state(ips, fplan.family, fplan.set_name)
            if _ensure_set(ips, fplan, state):
                changed = True
                state = _state(ips, fplan.family, fplan.set_name)
            if state.drift(fplan).clean:
                continue
            jumps = owned_view({NAT: state.nat}, OWNED).get(NAT) if state.nat else None
            _restore(fplan.family, fplan.restore_text(jumps.jumps if jumps else ()))
            changed = True
        if plan.ipv6 is None:  # the node has no IPv6 (now): leave no IPv6 half behind
            try:
                _uninstall_family(ips, 6, PROBE_SET_IPV6)
            except HostProbeError:
                pass  # no ip6tables or no IPv6 at all: nothing there either
    return changed


def _change_members(op: str, names: dict[int, str], wanted: dict[int, frozenset[str]]) -> bool:
    changed = False
    with _ipset() as ips:
        for family, name in sorted(names.items()):
            want = wanted.get(family, frozenset())
            exists = _set_header(ips, name) is not None
            if not exists:
                if op == "remove" or (op == "sync" and not want):
                    continue
                raise HostProbeError(f"ipset {name} does not exist (install the rule first)")
            have = _members(ips, name) if op == "sync" else frozenset()
            if op == "add":
                additions, removals = want, frozenset[str]()
            elif op == "remove":
                additions, removals = frozenset(), want
            else:
                additions, removals = want - have, have - want
            for ip in sorted(additions):
                changed |= _member(ips, "add", name, family, ip)
            for ip in sorted(removals):
                changed |= _member(ips, "delete", name, family, ip)
    return changed


def _member(ips: Any, op: str, name: str, family: int, ip: str) -> bool:
    """Add or delete one member; False if it already was / was not there."""
    try:
        getattr(ips, op)(name, ip, etype="ip", family=_AF[family])
    except Exception as exc:
        if _netlink_code(exc) == _IPSET_ERR_EXIST:
            return False
        verb = "add" if op == "add" else "delete"
        raise HostProbeError(
            f"{verb} {ip} {'to' if op == 'add' else 'from'} ipset {name}: {exc}"
        ) from exc
    return True


def _remove_rules(family: int, state: HostProbeFamilyState) -> None:
    view = owned_view({NAT: state.nat}, OWNED).get(NAT) if state.nat else None
    if view is None:
        return
    try:
        remove_owned(family, NAT, view)
    except CaptureError as exc:
        raise HostProbeError(str(exc)) from exc


def _uninstall_family(ips: Any, family: Family, name: str) -> None:
    # Rules first: the kernel refuses to destroy a set a rule still references.
    state = _state(ips, family, name)
    _remove_rules(family, state)
    if state.set_type is not None:
        try:
            ips.destroy(name)
        except Exception as exc:
            raise HostProbeError(f"destroy ipset {name}: {exc}") from exc


def _uninstall(families: tuple[Family, ...], names: dict[int, str]) -> None:
    errors: list[str] = []
    with _ipset() as ips:
        for family in families:
            try:
                _uninstall_family(ips, family, names[family])
            except Exception as exc:
                errors.append(f"IPv{family}: {exc}")
    if errors:
        raise HostProbeError("; ".join(errors))
