"""Entry point of the `nodeagent` command."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Collection, Sequence
from typing import NoReturn

import nodeagent
from nodeagent.cli.errors import CliError
from nodeagent.cli.interpreter import use_data_path_interpreter


class OneLineErrorParser(argparse.ArgumentParser):
    """A parser whose errors are one line, like every other user error, not a usage dump.

    Subcommand parsers are made of the same class, so this holds at every level.
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


# Modules of nodeagent.cli that are not subcommands.
_NOT_COMMANDS = frozenset({"main", "errors", "output", "interpreter"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `nodeagent` parser. Given the command about to run, and a module of that name
    that registers it, only that module is imported: the long-lived processes (`run`,
    `waypoint`, `controlplane`) would otherwise keep every other command's imports for
    their whole life (the sandbox, the admin views: 36 modules, 3.7 MiB of the agent's
    RSS)."""
    modules = _command_modules()
    if command in modules:
        parser, commands = _parser_of((command,))
        if command in commands:
            return parser
    parser, _ = _parser_of(modules)
    return parser


def _command_modules() -> list[str]:
    import nodeagent.cli as cli_pkg

    names = sorted(m.name for m in pkgutil.iter_modules(cli_pkg.__path__))
    return [name for name in names if name not in _NOT_COMMANDS]


def _parser_of(modules: Sequence[str]) -> tuple[argparse.ArgumentParser, Collection[str]]:
    """A parser with the subcommands the modules register, and their names."""
    parser = OneLineErrorParser(
        prog="nodeagent",
        description="Ambient-style service-mesh node agent: capture, HBONE mTLS tunnel, xDS.",
    )
    parser.add_argument("--version", action="version", version=f"nodeagent {nodeagent.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        module = importlib.import_module(f"nodeagent.cli.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser, sub.choices or {}


# What a shell reports for a command killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] in (["run"], ["waypoint"]):
        # A data-path process itself, the agent or the waypoint (not a caller handing argv
        # in): before anything else, since its interpreter settings mean starting the
        # interpreter again.
        use_data_path_interpreter()
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
    given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(given[0] if given and not given[0].startswith("-") else None)
    args = parser.parse_args(given)
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
