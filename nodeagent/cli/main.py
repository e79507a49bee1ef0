"""Entry point of the `nodeagent` command."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

import nodeagent
from nodeagent.cli.allocator import use_agent_allocator
from nodeagent.cli.errors import CliError


class OneLineErrorParser(argparse.ArgumentParser):
    """A parser whose errors are one line, like every other user error, not a usage dump.

    Subcommand parsers are made of the same class, so this holds at every level.
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="nodeagent",
        description="Ambient-style service-mesh node agent: capture, HBONE mTLS tunnel, xDS.",
    )
    parser.add_argument("--version", action="version", version=f"nodeagent {nodeagent.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import nodeagent.cli as cli_pkg

    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if info.name in ("main", "errors", "output", "allocator"):
            continue
        module = importlib.import_module(f"nodeagent.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


# What a shell reports for a command killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["run"]:
        # The agent process itself (not a caller handing argv in): before anything else,
        # since choosing the allocator means starting the interpreter again.
        use_agent_allocator()
    try:
        try:
            return _run(argv)
        finally:
            # Flush here, not at interpreter exit, so a closed pipe is caught below.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`nodeagent rules POD | head -1`): stop quietly.
        # stdout now points at /dev/null so the interpreter's last flush is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except CliError as exc:
        print(f"nodeagent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
