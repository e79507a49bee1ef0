"""Re-check live connections after a policy change.

The proxy tracks every inbound connection with its `ConnectionAttributes`. When
the policy set changes it hands them to `PolicyChecker.recheck`, which returns the
ones now denied; the proxy closes those ("connection closed due to policy change").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nodeagent.model.policy import Authorization, ConnectionAttributes
from nodeagent.policy.engine import Decision, evaluate

H = TypeVar("H")

# Given a connection, the policy set of its destination workload (the state
# layer knows which workload owns the destination and which keys it lists).
PolicyLookup = Callable[[ConnectionAttributes], Iterable[Authorization]]


@dataclass(frozen=True, slots=True)
class Revocation(Generic[H]):
    """A live connection the new policies deny."""

    handle: H  # whatever the caller uses to find and close the connection
    attributes: ConnectionAttributes
    decision: Decision

    @property
    def message(self) -> str:
        return f"connection closed due to policy change: {self.decision.error_message}"


class PolicyChecker:
    """Authorizes connections against the current policies; re-checks live ones."""

    def __init__(self, lookup: PolicyLookup) -> None:
        self._lookup = lookup

    def check(self, conn: ConnectionAttributes) -> Decision:
        return evaluate(self._lookup(conn), conn)

    def recheck(self, live: Iterable[tuple[H, ConnectionAttributes]]) -> list[Revocation[H]]:
        """The connections in `live` that the current policies deny, in input order."""
        revoked: list[Revocation[H]] = []
        for handle, conn in live:
            decision = self.check(conn)
            if not decision.allowed:
                revoked.append(Revocation(handle, conn, decision))
        return revoked
