"""Run-time log levels over the stdlib `logging` module, for `POST /logging`.

Specs follow ztunnel's: `info` sets the default level; `access=debug,info`
sets the `access` logger to debug and the default to info. `off` silences a
logger, `trace` is finer than debug. The default level is the agent's own
(the `nodeagent` logger); third-party loggers (pyroute2, grpc, asyncio) stay
at WARNING unless named, so `debug` is not a flood of netlink lines.
"""

from __future__ import annotations

import logging

from nodeagent.admin.accesslog import ACCESS_LOGGER

TRACE = 5
_LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
_NAMES = {
    logging.CRITICAL + 10: "off",
    logging.ERROR: "error",
    logging.WARNING: "warn",
    logging.INFO: "info",
    logging.DEBUG: "debug",
    TRACE: "trace",
}


def _level(name: str) -> int:
    try:
        return _LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}; use one of {', '.join(_LEVELS)}") from None


def parse_spec(spec: str) -> tuple[int | None, dict[str, int]]:
    """`access=debug,info` -> (INFO, {"access": DEBUG}); ValueError on bad input."""
    default: int | None = None
    targets: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty entry in log level spec {spec!r}")
        target, sep, level = part.partition("=")
        if sep:
            if not target.strip():
                raise ValueError(f"missing logger name in {part!r}")
            targets[target.strip()] = _level(level)
        else:
            default = _level(part)
    return default, targets


class StdlibLogLevelControl:
    """LogLevelControl over `logging`: the agent's own logger plus named loggers.

    Built with the starting level (Config.log_level), which it applies at once.
    `root` carries third-party loggers: never finer than WARNING unless named.
    """

    def __init__(
        self,
        default: str = "info",
        root: logging.Logger | None = None,
        own: logging.Logger | None = None,
    ) -> None:
        self._default = _level(default)
        self._root = root or logging.getLogger()
        self._own = own or logging.getLogger("nodeagent")
        # The access log is ours too: one line per connection at info.
        self._access = logging.getLogger(ACCESS_LOGGER)
        self._targets: set[str] = set()
        self._apply_default(self._default)

    def _apply_default(self, level: int) -> None:
        self._own.setLevel(level)
        if ACCESS_LOGGER not in self._targets:
            self._access.setLevel(level)
        # Records of our own loggers still reach the root's handlers: propagation
        # ignores ancestors' levels.
        self._root.setLevel(max(level, logging.WARNING))

    def current(self) -> str:
        own = self._own.getEffectiveLevel()
        parts = [_NAMES.get(own, str(own))]
        for name in sorted(self._targets):
            level = logging.getLogger(name).level
            parts.append(f"{name}={_NAMES.get(level, str(level))}")
        return ",".join(parts)

    def set_level(self, spec: str) -> str:
        default, targets = parse_spec(spec)  # validate all before changing any
        if default is not None:
            self._apply_default(default)
        for name, level in targets.items():
            logging.getLogger(name).setLevel(level)
            self._targets.add(name)
        return self.current()

    def reset(self) -> str:
        for name in self._targets:
            logging.getLogger(name).setLevel(logging.NOTSET)
        self._targets.clear()
        self._apply_default(self._default)
        return self.current()
