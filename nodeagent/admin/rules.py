"""Drift between the capture rules the agent intends and the ones the kernel holds.

Both sides are `iptables-save` text. Lines are compared per table after
dropping what legitimately differs between a plan and a dump (comments,
COMMIT, packet counters on chain declarations), so only real drift shows:
an intended line the kernel lacks is `missing`, a kernel line the plan does
not have is `extra`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from nodeagent.datapath.plan import line_drift

_COUNTERS = re.compile(r"\s*\[\d+:\d+\]\s*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleLine:
    table: str
    rule: str
    status: str  # ok | missing | extra


def normalized_rules(text: str) -> list[tuple[str, str]]:
    """(table, rule) pairs in order, without comments, COMMIT or counters."""
    out: list[tuple[str, str]] = []
    table = ""
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        if line.startswith(":"):
            line = _COUNTERS.sub("", line)
        out.append((table, line))
    return out


def rule_drift(intended: str, installed: str) -> list[RuleLine]:
    """Intended lines in order (ok or missing), then installed lines the plan lacks (extra).

    Missing and extra are decided per table by `line_drift`, the same rule the
    agent's adoption uses, so this view and the agent never disagree.
    """
    want, have = normalized_rules(intended), normalized_rules(installed)
    missing: Counter[tuple[str, str]] = Counter()
    extra: Counter[tuple[str, str]] = Counter()
    for table in {t for t, _ in want} | {t for t, _ in have}:
        gone, more = line_drift(
            [rule for t, rule in want if t == table], [rule for t, rule in have if t == table]
        )
        missing.update((table, rule) for rule in gone)
        extra.update((table, rule) for rule in more)
    lines: list[RuleLine] = []
    for table, rule in want:
        status = "missing" if missing[(table, rule)] > 0 else "ok"
        missing[(table, rule)] -= 1
        lines.append(RuleLine(table=table, rule=rule, status=status))
    for table, rule in have:
        if extra[(table, rule)] > 0:
            extra[(table, rule)] -= 1
            lines.append(RuleLine(table=table, rule=rule, status="extra"))
    return lines


def has_drift(lines: list[RuleLine]) -> bool:
    return any(line.status != "ok" for line in lines)
