"""Fail-closed capture for a pod the agent could not take (pure: no I/O).

When the agent does not answer an ADD, the plugin installs the agent's own capture plan
(`nodeagent.datapath.plan.build_plan`, default options) in the pod's namespace. The
REDIRECTs to 15001/15006 then find no listener and every connection is refused, which is
exactly how the agent holds a pod whose proxy is down. Because the text is the agent's
plan rendered the way the agent renders it, the agent's idempotent apply later finds no
drift in these tables and adopts them unchanged (it adds the policy rule and local route,
which the hold does not need: they only serve the agent's spoofed-source replies).

The text is for `iptables-legacy-restore --noflush`, the variant the agent reads and writes
(nodeagent.datapath.iptables); declaring our chains flushes them, and jumps already present
are deleted first, so holding twice leaves one jump each.
"""

from __future__ import annotations

from nodeagent.datapath.plan import (
    OWNED_CHAINS,
    Family,
    build_family_plan,
    owned_view,
    parse_iptables_save,
    render_family,
)

# The agent's variant (nodeagent.datapath.iptables reads and writes iptables-legacy).
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
RESTORE = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}


def is_held(saved: str) -> bool:
    """Whether iptables-save text shows the pod captured: both agent chains in nat, each
    reached from its built-in chain. True for the plugin's hold and for any agent plan."""
    nat = owned_view(parse_iptables_save(saved)).get("nat")
    if nat is None:
        return False
    jumped = {rule.split()[-1] for rule in nat.jumps}
    return set(nat.chains) == set(OWNED_CHAINS) and jumped >= set(OWNED_CHAINS)


def hold_text(family: Family, saved: str) -> str | None:
    """The restore text that holds the pod, given its current iptables-save text;
    None when it is already held (by an earlier hold or by the agent: leave that alone)."""
    if is_held(saved):
        return None
    installed = owned_view(parse_iptables_save(saved))
    lines: list[str] = []
    for line in render_family(build_family_plan(family)).splitlines():
        lines.append(line)
        if line.startswith("*") and line[1:] in installed:
            # Stale jumps (a half-removed capture): delete them so ours is the only one.
            lines += ["-D" + jump[2:] for jump in installed[line[1:]].jumps]
    return "\n".join(lines) + "\n"
