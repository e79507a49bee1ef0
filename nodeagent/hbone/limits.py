"""How many inbound HBONE connections the 15008 server holds: in total and per peer identity.

A pure counter, shared by every pod's 15008 listener of the agent. A connection takes a
`ConnectionSlot` at accept, before anything is spent on it (`admit`); once TLS has told
who the peer is, the slot claims a place for that identity (`claim`); closing the
connection releases both. Over either limit the connection is refused: closed with no
HTTP/2 sent, as Envoy's connection limit filter closes a connection over its limit
"without further filter iteration", and counted by reason.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field


class Refusal(enum.Enum):
    CONNECTION_LIMIT = "connection_limit"  # max_connections reached (all peers together)
    IDENTITY_LIMIT = "identity_limit"  # max_per_identity reached for this peer identity


@dataclass(eq=False)
class ConnectionSlot:
    """One admitted connection's place; release() is idempotent."""

    limits: ConnectionLimits
    identity: Hashable | None = None
    released: bool = False

    def claim(self, identity: Hashable) -> bool:
        """Count this connection against `identity`; False (counted as refused) if that
        identity already holds max_per_identity connections."""
        if self.released or self.identity is not None:
            raise ValueError("a slot claims one identity, before it is released")
        limits = self.limits
        held = limits._by_identity.get(identity, 0)
        if held >= limits.max_per_identity:
            limits.refused[Refusal.IDENTITY_LIMIT] += 1
            return False
        limits._by_identity[identity] = held + 1
        self.identity = identity
        return True

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        limits = self.limits
        limits._open -= 1
        if self.identity is not None:
            left = limits._by_identity[self.identity] - 1
            if left:
                limits._by_identity[self.identity] = left
            else:
                del limits._by_identity[self.identity]


@dataclass
class ConnectionLimits:
    max_connections: int
    max_per_identity: int
    refused: dict[Refusal, int] = field(default_factory=lambda: dict.fromkeys(Refusal, 0))
    _open: int = field(default=0, init=False)
    _by_identity: dict[Hashable, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if not 1 <= self.max_per_identity <= self.max_connections:
            raise ValueError(
                f"max_per_identity must be between 1 and max_connections "
                f"({self.max_connections}), got {self.max_per_identity}"
            )

    def admit(self) -> ConnectionSlot | None:
        """A slot for a just-accepted connection, or None (counted) when all are taken."""
        if self._open >= self.max_connections:
            self.refused[Refusal.CONNECTION_LIMIT] += 1
            return None
        self._open += 1
        return ConnectionSlot(self)

    @property
    def open(self) -> int:
        return self._open

    def held_by(self, identity: Hashable) -> int:
        return self._by_identity.get(identity, 0)

    def refused_by_reason(self) -> dict[str, int]:
        return {reason.value: count for reason, count in self.refused.items()}
