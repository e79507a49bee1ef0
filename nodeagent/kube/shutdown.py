"""Upgrade or uninstall at SIGTERM, decided from the agent's own DaemonSet.

The answer to GET .../daemonsets/NAME decides:

| answer | mode | why |
|---|---|---|
| 200, no `deletionTimestamp` | upgrade | the DaemonSet stays; a new agent replaces this one |
| 200 with `deletionTimestamp` | uninstall | being deleted (`--cascade=foreground`) |
| 404 | uninstall | the DaemonSet is gone |
| 403 | uninstall | our RBAC was deleted with it (`kubectl delete -k`) |
| 401 | uninstall | our ServiceAccount was deleted: its tokens stop authenticating |
| no answer, 5xx, any other status | upgrade | unsure: keep the rules (fail closed) |

Keeping the rules when unsure is the safe error: captured pods then refuse new
connections until the next agent adopts the rules, whereas removing them during
an upgrade would let traffic out in plaintext.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nodeagent.kube.api import ApiResponse


class ShutdownMode(enum.Enum):
    UPGRADE = "upgrade"  # keep the in-pod rules and annotations for the next agent
    UNINSTALL = "uninstall"  # remove both from every local pod


@dataclass(frozen=True, slots=True)
class ShutdownDecision:
    mode: ShutdownMode
    reason: str


_GONE = {
    404: "DaemonSet {ref} not found",
    403: "no longer allowed to read DaemonSet {ref} (RBAC removed)",
    401: "the API server no longer accepts our token (ServiceAccount removed)",
}


def decide_shutdown(
    response: ApiResponse | None, *, ref: str = "", error: str = ""
) -> ShutdownDecision:
    """The mode for `response` (None: no answer, `error` says why); `ref` is NS/NAME."""
    if response is None:
        return ShutdownDecision(
            ShutdownMode.UPGRADE,
            f"API server unreachable ({error or 'no answer'}); keeping the rules (fail closed)",
        )
    if response.status == 200:
        meta = response.body.get("metadata") or {}
        deleted = meta.get("deletionTimestamp")
        if deleted:
            return ShutdownDecision(
                ShutdownMode.UNINSTALL, f"DaemonSet {ref} is being deleted (since {deleted})"
            )
        return ShutdownDecision(ShutdownMode.UPGRADE, f"DaemonSet {ref} still exists")
    gone = _GONE.get(response.status)
    if gone is not None:
        return ShutdownDecision(ShutdownMode.UNINSTALL, gone.format(ref=ref))
    return ShutdownDecision(
        ShutdownMode.UPGRADE,
        f"reading DaemonSet {ref} answered {response.describe()}; keeping the rules (fail closed)",
    )
