"""`nodeagent sandbox up|down|status|exec|demo`: a local cluster of network namespaces."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nodeagent.cli.errors import CliError
from nodeagent.cli.output import render, table
from nodeagent.sandbox.demo import run_demo
from nodeagent.sandbox.manager import SandboxError, SandboxManager

NODE_COLUMNS = [("name", "NODE"), ("ip", "IP"), ("pod_cidr", "POD CIDR"), ("netns", "NETNS")]
POD_COLUMNS = [
    ("name", "POD"),
    ("namespace", "NAMESPACE"),
    ("service_account", "SERVICE ACCOUNT"),
    ("node", "NODE"),
    ("ip", "IP"),
    ("app_pid", "APP PID"),
    ("netns", "NETNS"),
]
PROC_COLUMNS = [("name", "NAME"), ("netns", "NETNS"), ("pid", "PID"), ("log", "LOG")]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sandbox",
        help="a local cluster of network namespaces (nodes, pods, demo apps)",
        description="Build, inspect and remove a local cluster of network namespaces.",
    )
    sub = p.add_subparsers(dest="sandbox_command", metavar="ACTION")
    sub.required = True

    up = sub.add_parser("up", help="create a sandbox")
    up.add_argument("--name", required=True, help="sandbox name (prefix of its namespaces)")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument("--pods-per-node", type=int, default=2, help="pods per node (default 2)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove a sandbox and everything it made")
    down.add_argument("name")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="show a sandbox's nodes, pods and processes")
    status.add_argument("name")
    status.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    status.set_defaults(func=cmd_status)

    ex = sub.add_parser(
        "exec",
        help="run a command in a pod's (or node's) namespace",
        description="Run CMD in the network namespace of TARGET: a pod (node1-pod1), "
        "a node (node1) or `underlay`. Exits with CMD's exit code.",
    )
    ex.add_argument("name")
    ex.add_argument("target", metavar="TARGET")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    ex.set_defaults(func=cmd_exec)

    demo = sub.add_parser("demo", help="build a 2x2 sandbox, call pods across nodes, remove it")
    demo.set_defaults(func=cmd_demo)


def _manager() -> SandboxManager:
    return SandboxManager()


def cmd_up(args: argparse.Namespace) -> int:
    with _manager() as m:
        try:
            plan = m.up(args.name, args.nodes, args.pods_per_node)
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    print(
        f"sandbox {plan.name} up: {plan.node_count} nodes x {plan.pods_per_node} pods "
        f"(`nodeagent sandbox status {plan.name}`)"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    with _manager() as m:
        try:
            report = m.down(args.name)
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    if report.existed:
        print(
            f"sandbox {args.name} removed ({report.namespaces} namespaces, "
            f"{report.processes} processes)"
        )
    else:
        print(f"sandbox {args.name}: nothing to remove")
    return 0


def format_status(status: dict[str, Any]) -> str:
    parts = [
        f"sandbox {status['name']} ({status['phase']}), underlay {status['underlay']['ip']} "
        f"in {status['underlay']['netns']}",
        "",
        table(status["nodes"], NODE_COLUMNS),
        "",
        table(status["pods"], POD_COLUMNS),
    ]
    if status["agents"]:
        parts += ["", table(status["agents"], PROC_COLUMNS)]
    if status["controlplane"]:
        parts += ["", table([status["controlplane"]], PROC_COLUMNS)]
    return "\n".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    with _manager() as m:
        try:
            status = m.status(args.name)
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    print(format_status(status) if args.output == "table" else render(status, args.output))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    with _manager() as m:
        try:
            return m.exec(args.name, args.target, cmd)
        except SandboxError as exc:
            raise CliError(str(exc)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    with _manager() as m:
        try:
            ok = run_demo(m, say, lambda s: say(format_status(s)))
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    if not ok:
        print("nodeagent: demo failed", file=sys.stderr)
    return 0 if ok else 1
