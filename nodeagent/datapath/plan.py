"""The desired in-pod capture for one pod, as data (pure: no I/O).

`build_plan()` returns what must exist inside a meshed pod's network namespace
for the agent to see its TCP traffic, per address family:

* iptables rules in two agent-owned chains, ISTIO_PRERT and ISTIO_OUTPUT, in
  the mangle and nat tables (and raw, only with DNS capture), each reached by
  exactly one jump from the built-in PREROUTING / OUTPUT chain;
* a policy-routing rule `fwmark 0x111/0xfff priority 32764 lookup 100` and a
  route `local 0.0.0.0/0 dev lo table 100` (`::/0` for IPv6).

What the rules do (nat):

* outbound TCP from the app (not to loopback, not marked 0x539) is REDIRECTed
  to 15001; traffic leaving via `lo` to a non-loopback address (the pod talking
  to its own IP) is accepted uncaptured, as Istio does;
* inbound TCP (not to 15008, not to loopback, not marked) is REDIRECTed to
  15006; 15008 (HBONE) lands directly on the agent's listener;
* every socket the agent makes in the pod carries mark 0x539, so its own
  traffic is never re-captured;
* replies of connections marked 0x111 are accepted uncaptured.

Connmark (mangle): a packet with mark 0x539 arriving through PREROUTING is the
agent's own connection to the app with a spoofed (original client) source; its
connection gets connmark 0x111. The app's replies get that mark restored in
OUTPUT, and the policy rule sends them to table 100, whose `local` route
delivers them back to the agent's transparent socket instead of routing them
out towards the foreign client address.

Kubelet health probes: on the node, kubelet's probe connections to meshed pods
are SNATed to 169.254.7.127 (IPv6: fd16:9254:7127:1337:ffff:ffff:ffff:ffff)
by a host rule that matches only locally generated traffic (`--socket-exists`)
to the set of meshed pod IPs. Inside the pod, `-s 169.254.7.127 -p tcp -j
ACCEPT` at the top of nat ISTIO_PRERT lets those probes reach the app
uncaptured (they carry no identity and must not be refused by policy), and
the matching `-d 169.254.7.127` ACCEPT in ISTIO_OUTPUT keeps the app's replies
uncaptured too. Forwarded traffic (kube-proxy, load balancers) never matches
the host SNAT and stays captured.

The plan renders as `iptables-save` text (`render_iptables_save`) in the exact
canonical form the kernel prints it back in, so that `parse_iptables_save` +
`owned_view` can compare what is installed with what is intended (drift).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from nodeagent.model.constants import (
    CHAIN_OUTPUT,
    CHAIN_PREROUTING,
    CONNMARK,
    CONNMARK_MASK,
    DNS_PORT,
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    PROBE_SNAT_IPV4,
    PROBE_SNAT_IPV6,
    PROXY_MARK,
    PROXY_MASK,
    ROUTE_TABLE,
    RULE_PRIORITY,
)

Family = Literal[4, 6]

# Chains the agent owns, and the built-in chain that jumps to each.
OWNED_CHAINS: tuple[str, ...] = (CHAIN_OUTPUT, CHAIN_PREROUTING)  # save order: sorted
JUMPS: tuple[tuple[str, str], ...] = (("PREROUTING", CHAIN_PREROUTING), ("OUTPUT", CHAIN_OUTPUT))
# Order of built-in chains in iptables-save output, per table.
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
TABLE_ORDER: tuple[str, ...] = ("mangle", "nat", "raw")

_MARK = f"{PROXY_MARK:#x}/{PROXY_MASK:#x}"
_CONNMARK = f"{CONNMARK:#x}/{CONNMARK_MASK:#x}"
_FULL_MASK = "0xffffffff"


class PlanError(ValueError):
    """Bad input to the planner, or iptables-save text that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Match:
    """One `-m NAME --key value ...` match. A value starting with "!" is negated;
    an empty value is a flag without argument. Keys use underscores (as
    python-iptables does); they render as `--key-with-dashes`."""

    name: str
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One iptables rule, structured so it can be rendered and applied.

    Addresses carry their prefix length (iptables-save prints it) and a
    leading "!" for negation, like python-iptables expects.
    """

    chain: str
    target: str
    target_params: tuple[tuple[str, str], ...] = ()
    source: str | None = None
    destination: str | None = None
    in_interface: str | None = None
    out_interface: str | None = None
    protocol: str | None = None
    matches: tuple[Match, ...] = ()

    def render(self) -> str:
        """The rule as iptables-save prints it: `-A CHAIN ...`."""
        parts = [f"-A {self.chain}"]
        for flag, value in (
            ("-s", self.source),
            ("-d", self.destination),
            ("-i", self.in_interface),
            ("-o", self.out_interface),
            ("-p", self.protocol),
        ):
            if value is not None:
                parts.append(_negatable(flag, value))
        for match in self.matches:
            parts.append(f"-m {match.name}")
            parts.extend(_option(key, value) for key, value in match.params)
        parts.append(f"-j {self.target}")
        parts.extend(_option(key, value) for key, value in self.target_params)
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class TablePlan:
    """The agent's content of one table: owned chains, their rules, the jumps."""

    name: str
    chains: tuple[str, ...]
    jumps: tuple[Rule, ...]
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRule:
    """`ip rule add fwmark MARK/MASK priority P lookup TABLE`."""

    fwmark: int
    fwmask: int
    priority: int
    table: int

    def render(self, family: Family) -> str:
        return (
            f"ip -{family} rule add fwmark {self.fwmark:#x}/{self.fwmask:#x} "
            f"priority {self.priority} lookup {self.table}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalRoute:
    """`ip route add local DST dev DEV table TABLE` (scope host)."""

    destination: str
    device: str
    table: int

    def render(self, family: Family) -> str:
        return (
            f"ip -{family} route add local {self.destination} dev {self.device} table {self.table}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FamilyPlan:
    """Everything for one address family inside the pod."""

    family: Family
    tables: tuple[TablePlan, ...]
    policy_rule: PolicyRule
    local_route: LocalRoute

    def table(self, name: str) -> TablePlan | None:
        return next((t for t in self.tables if t.name == name), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class CapturePlan:
    """The desired capture for one pod: IPv4 always, IPv6 when the pod has it."""

    ipv4: FamilyPlan
    ipv6: FamilyPlan | None

    @property
    def families(self) -> tuple[FamilyPlan, ...]:
        return (self.ipv4,) if self.ipv6 is None else (self.ipv4, self.ipv6)


def _negatable(flag: str, value: str) -> str:
    if value.startswith("!"):
        return f"! {flag} {value[1:]}"
    return f"{flag} {value}"


def _option(key: str, value: str) -> str:
    flag = "--" + key.replace("_", "-")
    if value == "":
        return flag
    return _negatable(flag, value)


# -- building ------------------------------------------------------------------


def _jumps() -> tuple[Rule, ...]:
    return tuple(Rule(chain=builtin, target=owned) for builtin, owned in JUMPS)


def _not_marked() -> Match:
    return Match("mark", (("mark", "!" + _MARK),))


def build_family_plan(
    family: Family,
    *,
    dns_capture: bool = False,
    inbound_capture: bool = True,
    probe_source: str | None = None,
    outbound_redirect: bool = True,
) -> FamilyPlan:
    """The rules, policy rule and local route for one family (see module doc).

    outbound_redirect=False leaves out the app's outbound REDIRECT: the eBPF backend
    redirects those connects itself (nodeagent.datapath.ebpf)."""
    if family not in (4, 6):
        raise PlanError(f"address family must be 4 or 6, not {family!r}")
    loopback = "127.0.0.1/32" if family == 4 else "::1/128"
    probe = probe_source or (PROBE_SNAT_IPV4 if family == 4 else PROBE_SNAT_IPV6)
    if "/" not in probe:
        probe += "/32" if family == 4 else "/128"
    if (":" in probe) != (family == 6):
        raise PlanError(f"probe source {probe} is not an IPv{family} address")

    mangle = TablePlan(
        name="mangle",
        chains=OWNED_CHAINS,
        jumps=_jumps(),
        rules=(
            # Sorted by chain, the order iptables-save prints them in.
            Rule(
                chain=CHAIN_OUTPUT,
                matches=(Match("connmark", (("mark", _CONNMARK),)),),
                target="CONNMARK",
                target_params=(
                    ("restore_mark", ""),
                    ("nfmask", _FULL_MASK),
                    ("ctmask", _FULL_MASK),
                ),
            ),
            Rule(
                chain=CHAIN_PREROUTING,
                matches=(Match("mark", (("mark", _MARK),)),),
                target="CONNMARK",
                target_params=(("set_xmark", _CONNMARK),),
            ),
        ),
    )

    output: list[Rule] = []
    if inbound_capture:
        # Replies to kubelet probes (their SYN was accepted uncaptured below).
        output.append(
            Rule(
                chain=CHAIN_OUTPUT,
                destination=probe,
                protocol="tcp",
                matches=(Match("tcp"),),
                target="ACCEPT",
            )
        )
    if dns_capture:
        output += [
            Rule(
                chain=CHAIN_OUTPUT,
                out_interface="!lo",
                protocol="udp",
                matches=(_not_marked(), Match("udp", (("dport", "53"),))),
                target="REDIRECT",
                target_params=(("to_ports", str(DNS_PORT)),),
            ),
            Rule(
                chain=CHAIN_OUTPUT,
                destination="!" + loopback,
                protocol="tcp",
                matches=(Match("tcp", (("dport", "53"),)), _not_marked()),
                target="REDIRECT",
                target_params=(("to_ports", str(DNS_PORT)),),
            ),
        ]
    output += [
        # The app's replies on connections the agent opened with a spoofed source.
        Rule(
            chain=CHAIN_OUTPUT,
            protocol="tcp",
            matches=(Match("mark", (("mark", _CONNMARK),)),),
            target="ACCEPT",
        ),
        # The pod talking to its own (non-loopback) address goes via lo: not captured.
        Rule(chain=CHAIN_OUTPUT, destination="!" + loopback, out_interface="lo", target="ACCEPT"),
    ]
    if outbound_redirect:
        output.append(
            Rule(
                chain=CHAIN_OUTPUT,
                destination="!" + loopback,
                protocol="tcp",
                matches=(_not_marked(),),
                target="REDIRECT",
                target_params=(("to_ports", str(OUTBOUND_PORT)),),
            )
        )
    prerouting: list[Rule] = []
    if inbound_capture:
        prerouting += [
            # Kubelet probes, SNATed to this address on the node (module doc).
            Rule(
                chain=CHAIN_PREROUTING,
                source=probe,
                protocol="tcp",
                matches=(Match("tcp"),),
                target="ACCEPT",
            ),
            Rule(
                chain=CHAIN_PREROUTING,
                destination="!" + loopback,
                protocol="tcp",
                matches=(
                    Match("tcp", (("dport", f"!{INBOUND_HBONE_PORT}"),)),
                    _not_marked(),
                ),
                target="REDIRECT",
                target_params=(("to_ports", str(INBOUND_PLAINTEXT_PORT)),),
            ),
        ]
    nat = TablePlan(
        name="nat", chains=OWNED_CHAINS, jumps=_jumps(), rules=tuple(output + prerouting)
    )
    tables = [mangle, nat]
    if dns_capture:
        # The agent's own upstream DNS goes to conntrack zone 1 so it cannot
        # collide with the app's captured DNS flows.
        tables.append(
            TablePlan(
                name="raw",
                chains=OWNED_CHAINS,
                jumps=_jumps(),
                rules=(
                    Rule(
                        chain=CHAIN_OUTPUT,
                        protocol="udp",
                        matches=(
                            Match("mark", (("mark", _MARK),)),
                            Match("udp", (("dport", "53"),)),
                        ),
                        target="CT",
                        target_params=(("zone", "1"),),
                    ),
                    Rule(
                        chain=CHAIN_PREROUTING,
                        protocol="udp",
                        matches=(_not_marked(), Match("udp", (("sport", "53"),))),
                        target="CT",
                        target_params=(("zone", "1"),),
                    ),
                ),
            )
        )
    return FamilyPlan(
        family=family,
        tables=tuple(tables),
        policy_rule=PolicyRule(
            fwmark=CONNMARK, fwmask=CONNMARK_MASK, priority=RULE_PRIORITY, table=ROUTE_TABLE
        ),
        local_route=LocalRoute(
            destination="0.0.0.0/0" if family == 4 else "::/0", device="lo", table=ROUTE_TABLE
        ),
    )


def build_plan(
    *,
    ipv6: bool = True,
    dns_capture: bool = False,
    inbound_capture: bool = True,
    probe_ipv4: str = PROBE_SNAT_IPV4,
    probe_ipv6: str = PROBE_SNAT_IPV6,
    ebpf_outbound_ipv4: bool = False,
) -> CapturePlan:
    """The desired capture for one pod.

    dns_capture is off by default: there is no DNS proxy on 15053 yet, and a
    REDIRECT to a port nobody listens on would break the pod's name lookups.
    inbound_capture=False is Istio's bypass-inbound variant (no 15006 redirect,
    no probe exemption needed). ebpf_outbound_ipv4: the eBPF backend redirects IPv4
    outbound connects at connect time, so IPv4 has no outbound REDIRECT rule (IPv6 keeps it).
    """
    return CapturePlan(
        ipv4=build_family_plan(
            4,
            dns_capture=dns_capture,
            inbound_capture=inbound_capture,
            probe_source=probe_ipv4,
            outbound_redirect=not ebpf_outbound_ipv4,
        ),
        ipv6=(
            build_family_plan(
                6, dns_capture=dns_capture, inbound_capture=inbound_capture, probe_source=probe_ipv6
            )
            if ipv6
            else None
        ),
    )


# -- rendering -----------------------------------------------------------------


def render_family(plan: FamilyPlan) -> str:
    """One family's tables as iptables-save text (loadable with `-restore --noflush`).

    Built-in chain policy lines are left out on purpose: the agent never
    changes a built-in chain's policy, and `--noflush` must not reset them.
    """
    lines: list[str] = []
    for table in plan.tables:
        lines.append(f"*{table.name}")
        lines += [f":{chain} - [0:0]" for chain in sorted(table.chains)]
        lines += _in_save_order(table.name, table.jumps + table.rules)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_iptables_save(plan: CapturePlan | FamilyPlan, family: Family = 4) -> str:
    """The plan's rules for one family as iptables-save text."""
    if isinstance(plan, FamilyPlan):
        return render_family(plan)
    chosen = plan.ipv4 if family == 4 else plan.ipv6
    if chosen is None:
        raise PlanError("the plan has no IPv6 part (the pod has IPv6 disabled)")
    return render_family(chosen)


def render_netlink(plan: FamilyPlan) -> list[str]:
    """The policy rule and local route as `ip` commands (for humans and the CLI)."""
    return [plan.policy_rule.render(plan.family), plan.local_route.render(plan.family)]


def _in_save_order(table: str, rules: Iterable[Rule]) -> list[str]:
    # iptables-save prints built-in chains in kernel order, then user chains
    # sorted by name; rules keep their order within a chain.
    builtin = BUILTIN_CHAINS.get(table, ())

    def key(chain: str) -> tuple[int, int, str]:
        if chain in builtin:
            return (0, builtin.index(chain), "")
        return (1, 0, chain)

    ordered = sorted(enumerate(rules), key=lambda ir: (key(ir[1].chain), ir[0]))
    return [rule.render() for _, rule in ordered]


# -- parsing and drift ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SavedTable:
    """One table from iptables-save text, normalized (no counters or comments)."""

    name: str
    policies: tuple[tuple[str, str], ...]  # (chain, policy or "-") in file order
    rules: tuple[str, ...]  # "-A CHAIN ..." with single spaces, in file order

    @property
    def chains(self) -> tuple[str, ...]:
        return tuple(chain for chain, _ in self.policies)

    @property
    def is_empty(self) -> bool:
        """Only built-in chains, policy ACCEPT, no rules: what a fresh namespace has."""
        return not self.rules and all(p == "ACCEPT" for _, p in self.policies)


_COUNTERS = re.compile(r"^\[\d+:\d+\]\s*")


def parse_iptables_save(text: str) -> dict[str, SavedTable]:
    """Parse iptables-save (or our rendered) text into normalized tables.

    Comments, counters (`[p:b]` and `-c p b`) and repeated whitespace are
    dropped, so two saves of the same rules compare equal.
    """
    tables: dict[str, SavedTable] = {}
    name: str | None = None
    policies: list[tuple[str, str]] = []
    rules: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if name is not None:
                raise PlanError(f"line {number}: table *{line[1:]} starts before COMMIT of {name}")
            name, policies, rules = line[1:].strip(), [], []
            continue
        if name is None:
            raise PlanError(f"line {number}: {line!r} outside a table")
        if line == "COMMIT":
            tables[name] = SavedTable(name, tuple(policies), tuple(rules))
            name = None
        elif line.startswith(":"):
            fields = line[1:].split()
            if len(fields) < 2:
                raise PlanError(f"line {number}: bad chain line {line!r}")
            policies.append((fields[0], fields[1]))
        elif line.startswith("-A ") or line.startswith("[") or line.startswith("-c "):
            line = _COUNTERS.sub("", line)
            words = line.split()
            if words[:1] == ["-c"]:
                words = words[3:]
            if len(words) < 2 or words[0] != "-A":
                raise PlanError(f"line {number}: bad rule {line!r}")
            rules.append(" ".join(words))
        else:
            raise PlanError(f"line {number}: unexpected {line!r}")
    if name is not None:
        raise PlanError(f"table {name} has no COMMIT")
    return tables


@dataclass(frozen=True, slots=True)
class OwnedTable:
    """The agent-owned part of one table: which owned chains exist, their rules,
    and the jump rules from built-in chains into them (duplicates kept)."""

    chains: tuple[str, ...]
    rules: tuple[str, ...]
    jumps: tuple[str, ...]


def owned_view(
    tables: dict[str, SavedTable], owned: tuple[str, ...] = OWNED_CHAINS
) -> dict[str, OwnedTable]:
    """Reduce parsed tables to what the agent owns; tables with none of it are left out."""
    view: dict[str, OwnedTable] = {}
    for name, table in tables.items():
        chains = tuple(sorted(c for c in table.chains if c in owned))
        rules: list[str] = []
        jumps: list[str] = []
        for rule in table.rules:
            words = rule.split()
            chain = words[1]
            if chain in owned:
                rules.append(rule)
            elif _jumps_to(words, owned):
                jumps.append(rule)
        if chains or rules or jumps:
            view[name] = OwnedTable(chains, tuple(rules), tuple(sorted(jumps)))
    return view


def _jumps_to(words: list[str], owned: tuple[str, ...]) -> bool:
    for flag in ("-j", "-g"):
        if flag in words:
            i = words.index(flag)
            if i + 1 < len(words) and words[i + 1] in owned:
                return True
    return False


def desired_view(plan: FamilyPlan) -> dict[str, OwnedTable]:
    """What `owned_view` of a correctly installed `plan` looks like."""
    return owned_view(parse_iptables_save(render_family(plan)))


@dataclass(frozen=True, slots=True)
class Drift:
    """How the installed owned content differs from the plan, per table."""

    missing: tuple[str, ...]  # lines the plan wants that are not installed
    unexpected: tuple[str, ...]  # installed lines the plan does not want

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected


def _lines(view: OwnedTable | None) -> list[str]:
    if view is None:
        return []
    return [f":{c}" for c in view.chains] + list(view.rules) + list(view.jumps)


def _ordered_chain(line: str) -> str:
    """The chain whose rule order `line` takes part in ('' for declarations and the like)."""
    words = line.split()
    return words[1] if len(words) > 1 and words[0] in ("-A", "-I") else ""


def line_drift(want: Sequence[str], have: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The one drift rule for one table's lines: (missing, unexpected).

    Counts matter (a doubled rule is unexpected once). Order matters inside a
    chain (first match wins), so a chain whose rules are all present but
    reordered has them all both missing and unexpected. Used by the agent's
    adoption/repair (`drift`) and by `nodeagent rules` (admin/rules.py) so the
    two never disagree.
    """
    missing = list(want)
    unexpected: list[str] = []
    for line in have:
        if line in missing:
            missing.remove(line)
        else:
            unexpected.append(line)
    chains = {_ordered_chain(line) for line in (*want, *have)} - {""}
    for chain in sorted(chains):
        w = [line for line in want if _ordered_chain(line) == chain]
        h = [line for line in have if _ordered_chain(line) == chain]
        if w != h and sorted(w) == sorted(h):  # same rules, different order
            missing += w
            unexpected += h
    return tuple(missing), tuple(unexpected)


def drift(plan: FamilyPlan, installed: dict[str, SavedTable]) -> dict[str, Drift]:
    """Per table, what differs between the plan and installed iptables-save text
    (see `line_drift`). Tables without any difference are left out."""
    want = desired_view(plan)
    have = owned_view(installed)
    result: dict[str, Drift] = {}
    for table in sorted(set(want) | set(have)):
        missing, unexpected = line_drift(_lines(want.get(table)), _lines(have.get(table)))
        if missing or unexpected:
            result[table] = Drift(missing, unexpected)
    return result
