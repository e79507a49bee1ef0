"""`nodeagent run`: run the node agent in the foreground.

Settings come from defaults, `--config FILE`, the environment (NODE_NAME,
XDS_ADDRESS, ...) and these flags, in that order of precedence (flags win). A
bad setting is refused in one line naming the field. SIGTERM / SIGINT shut
down gracefully: listeners close (live connections get `drain_seconds`). In a
cluster the agent then reads its own DaemonSet: still there means an upgrade,
and the in-pod capture rules stay, so the next agent adopts them and traffic
is never leaked uncaptured meanwhile; gone or being deleted means an
uninstall, and the rules and the pods' `ambient.istio.io/redirection`
annotations are removed. `--cleanup` (alias `--cleanup-on-exit`) forces the
uninstall, whatever the DaemonSet's state.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

from nodeagent.admin.accesslog import SecondText
from nodeagent.cli.errors import CliError
from nodeagent.config import Config, ConfigError, build_config

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# flag dest -> Config field
_FLAG_FIELDS = {
    "node_name": "node_name",
    "xds_address": "xds_address",
    "xds_root_ca": "xds_root_ca",
    "ca_address": "ca_address",
    "trust_domain": "trust_domain",
    "netns_dir": "netns_dir",
    "proc_root": "proc_root",
    "redirect_backend": "redirect_backend",
    "log_level": "log_level",
    "drain_seconds": "drain_seconds",
    "auth_token_path": "auth_token_path",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the node agent (capture, listeners, xDS, certificates)",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    p.add_argument("--config", metavar="FILE", help="YAML settings file")
    p.add_argument("--node-name", help="node this agent serves (env NODE_NAME)")
    p.add_argument("--xds-address", help="control plane, http(s)://host:port (env XDS_ADDRESS)")
    p.add_argument("--xds-root-ca", metavar="FILE", help="root CA of the control plane")
    p.add_argument("--ca-address", help="certificate authority (default: the xDS address)")
    p.add_argument("--auth-token-path", metavar="FILE", help="bearer token file")
    p.add_argument("--trust-domain", help="SPIFFE trust domain")
    p.add_argument("--netns-dir", metavar="DIR", help="named network namespaces to scan")
    p.add_argument("--proc-root", metavar="DIR", help="/proc to scan for pod namespaces")
    p.add_argument("--redirect-backend", help="capture backend: iptables (default) or ebpf")
    p.add_argument("--log-level", help="trace, debug, info (default), warning, error")
    p.add_argument("--drain-seconds", help="grace for live connections at shutdown")
    p.add_argument(
        "--cleanup",
        "--cleanup-on-exit",
        dest="cleanup",
        action="store_true",
        help="on exit, remove capture and annotations from every local pod (uninstall), "
        "whatever the DaemonSet's state",
    )
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """The Config from file, environment and flags; CliError naming the field if bad."""
    overrides = {field: getattr(args, dest, None) for dest, field in _FLAG_FIELDS.items()}
    try:
        config = build_config(
            env=os.environ if env is None else env,
            file=args.config,
            overrides={k: v for k, v in overrides.items() if v is not None},
        )
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if not config.node_name:
        raise CliError("field 'node_name' is required (--node-name or NODE_NAME)")
    return config


class SecondCachedFormatter(logging.Formatter):
    """logging.Formatter's default time text, made once per second instead of per record
    (localtime and strftime on every access log line were a visible part of a connection)."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = SecondText(
            lambda s: time.strftime(self.default_time_format, self.converter(s))
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        # default_msec_format's text
        return f"{self._second(int(record.created))},{int(record.msecs):03d}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SecondCachedFormatter(LOG_FORMAT))
    logging.basicConfig(level=_LEVELS.get(level, logging.INFO), handlers=[handler])
    # LOG_FORMAT names no thread or process: do not look them up for every record (the
    # access log writes one per connection).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # grpc and asyncio are chatty at debug; keep them at warning unless tracing.
    if level != "trace":
        for name in ("asyncio", "grpc"):
            logging.getLogger(name).setLevel(max(logging.WARNING, _LEVELS.get(level, 0)))


def tune_data_path() -> None:
    """Memory settings of a data-path process (the agent, the waypoint), logged."""
    from nodeagent import app

    # Keep glibc from trimming and refaulting the heap around every large relay buffer
    # (see app.tune_allocator).
    app.tune_allocator()
    # malloc unless the operator chose otherwise (nodeagent.cli.interpreter): say which.
    logging.getLogger("nodeagent").info(
        "memory allocator: PYTHONMALLOC=%s", os.environ.get("PYTHONMALLOC", "(default)")
    )


async def serve(config: Config, *, cleanup: bool = False) -> None:
    """Build the agent, run it until SIGTERM/SIGINT, shut it down."""
    # Imported here: the whole agent is heavy to import, and every other
    # command shares this module list.
    from nodeagent import app

    tune_data_path()
    agent = await app.build(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run(cleanup=cleanup)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    setup_logging(config.log_level)
    try:
        with event_loop_runner() as runner:
            runner.run(serve(config, cleanup=args.cleanup))
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # a listener's port in use, an address not on this host
        raise CliError(f"agent on node {config.node_name}: {exc.strerror or exc}") from None
    return 0
