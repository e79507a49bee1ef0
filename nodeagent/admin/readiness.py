"""Readiness: the agent is ready when every registered check passes.

Components register a check each (xDS synced, certificates for local pods
held, every local pod captured or reported failed); `/healthz/ready` on 15021
answers 200 only when all pass, and otherwise names the ones that do not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class ReadinessCheck(Protocol):
    @property
    def name(self) -> str: ...

    def is_ready(self) -> bool: ...


@dataclass(frozen=True)
class FunctionCheck:
    """A check backed by a function, e.g. `lambda: lifecycle.all_settled()`."""

    name: str
    fn: Callable[[], bool]

    def is_ready(self) -> bool:
        return bool(self.fn())


class ReadinessFlag:
    """A check a component flips once, e.g. when the first xDS push is applied."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ready = False

    def mark_ready(self) -> None:
        self._ready = True

    def mark_not_ready(self) -> None:
        self._ready = False

    def is_ready(self) -> bool:
        return self._ready


class Readiness:
    """The set of checks behind `/healthz/ready`."""

    def __init__(self) -> None:
        self._checks: list[ReadinessCheck] = []

    def register(self, check: ReadinessCheck) -> ReadinessCheck:
        if any(c.name == check.name for c in self._checks):
            raise ValueError(f"readiness check {check.name!r} is already registered")
        self._checks.append(check)
        return check

    def flag(self, name: str) -> ReadinessFlag:
        flag = ReadinessFlag(name)
        self.register(flag)
        return flag

    def add(self, name: str, fn: Callable[[], bool]) -> None:
        self.register(FunctionCheck(name, fn))

    def not_ready(self) -> list[str]:
        """Names of the checks that do not pass (a check that raises does not pass)."""
        failing: list[str] = []
        for check in self._checks:
            try:
                ok = check.is_ready()
            except Exception:
                log.exception("readiness check %s raised", check.name)
                ok = False
            if not ok:
                failing.append(check.name)
        return failing
