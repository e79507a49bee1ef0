"""Node-level debugging commands that ask a running agent over its admin API.

`nodeagent workloads | services | policies | certs | connections | pods`,
`nodeagent routes [SERVICE]`, `nodeagent rules POD`, `nodeagent explain --from POD --to ADDR:PORT`,
`nodeagent log [--level LEVEL | --reset]`. The agent is chosen by `--agent`
(Unix socket path or http://host:port), or `--sandbox NAME --node NODE`,
else $ADMIN_SOCKET, else the default admin socket (Config.admin_socket).
`nodeagent routes --waypoint HOST:PORT` asks a waypoint instead (its :15020), and
`--sandbox NAME --waypoint` the sandbox's waypoint, inside its network namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from nodeagent.admin import views
from nodeagent.admin.client import WAYPOINT_ADMIN_PORT, AdminClient, AdminError
from nodeagent.cli.errors import CliError
from nodeagent.cli.output import render
from nodeagent.config import Config
from nodeagent.sandbox.manager import SandboxError, SandboxManager

TABLE_WIDTH = 100


def _add_target_flags(p: argparse.ArgumentParser, output: bool = True) -> None:
    g = p.add_argument_group("agent")
    g.add_argument("--agent", help="admin Unix socket path or http://HOST:PORT URL")
    g.add_argument("--sandbox", metavar="NAME", help="sandbox name (with --node)")
    g.add_argument("--node", metavar="NODE", help="sandbox node whose agent to ask")
    if output:
        p.add_argument(
            "-o",
            "--output",
            choices=("table", "json", "yaml"),
            default="table",
            help="output format",
        )


def client_for(args: argparse.Namespace) -> AdminClient:
    """The admin client for --agent, or --sandbox/--node, or the default socket."""
    if args.agent and (args.sandbox or args.node):
        raise CliError("use either --agent or --sandbox/--node, not both")
    try:
        if args.agent:
            return AdminClient(args.agent)
        if args.sandbox or args.node:
            if not (args.sandbox and args.node):
                raise CliError("--sandbox and --node go together")
            return AdminClient(_sandbox_socket(args.sandbox, args.node))
        return AdminClient(os.environ.get("ADMIN_SOCKET") or Config().admin_socket)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _sandbox_socket(sandbox: str, node: str) -> str:
    # Resolved through the sandbox's state, so a typo names the sandbox or node,
    # not a socket that is not there.
    try:
        with SandboxManager() as manager:
            return manager.admin_socket(sandbox, node)
    except SandboxError as exc:
        raise CliError(str(exc)) from None


def _ask(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except AdminError as exc:
        raise CliError(str(exc)) from None


def _width() -> int:
    # The terminal's width when there is one; piped, a fixed width (words never break).
    if sys.stdout.isatty():
        return shutil.get_terminal_size((TABLE_WIDTH, 24)).columns
    return TABLE_WIDTH


def _print_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    print(render(rows, "table", columns, max_width=_width()))


def _print_data(data: Any, fmt: str) -> None:
    print(render(data, fmt))


# Commands over the config dump -----------------------------------------------

_DUMP_VIEWS: dict[str, tuple[str, Callable[[Mapping[str, Any]], list[dict[str, Any]]], Any]] = {
    "workloads": ("workloads", views.workload_rows, views.WORKLOAD_COLUMNS),
    "services": ("services", views.service_rows, views.SERVICE_COLUMNS),
    "policies": ("policies", views.policy_rows, views.POLICY_COLUMNS),
    "certs": ("certificates", views.cert_rows, views.CERT_COLUMNS),
}


def cmd_dump_view(args: argparse.Namespace) -> int:
    section, to_rows, columns = _DUMP_VIEWS[args.view]
    client = client_for(args)
    dump = _ask(client.config_dump)
    if args.output == "table":
        _print_table(to_rows(dump), columns)
    else:
        _print_data(dump.get(section) or [], args.output)
    return 0


def cmd_connections(args: argparse.Namespace) -> int:
    conns = _ask(client_for(args).connections)
    if args.output == "table":
        _print_table(views.connection_rows(conns), views.CONNECTION_COLUMNS)
    else:
        _print_data(views.connection_data(conns), args.output)
    return 0


def cmd_pods(args: argparse.Namespace) -> int:
    pods = _ask(client_for(args).pods)
    if args.output == "table":
        _print_table(views.pod_rows(pods), views.POD_COLUMNS)
    else:
        _print_data(pods, args.output)
    return 0


def _elsewhere(args: argparse.Namespace) -> str:
    """A hint naming the pod's node, when asked of the wrong sandbox node."""
    if not (args.sandbox and args.node):
        return ""
    try:
        with SandboxManager() as manager:
            node = manager.pod_node(args.sandbox, args.pod)
    except SandboxError:
        return ""
    if node is None or node == args.node:
        return ""
    return f" (pod {args.pod} is on {node}: use --node {node})"


def cmd_rules(args: argparse.Namespace) -> int:
    client = client_for(args)
    try:
        rules = client.rules(args.pod)
    except AdminError as exc:
        raise CliError(f"{exc}{_elsewhere(args)}") from None
    if args.output == "table":
        print(views.rules_summary(rules))
        rows = views.rule_rows(rules)
        if rows:
            _print_table(rows, views.RULE_COLUMNS)
    else:
        _print_data(rules, args.output)
    return 0


def _explain_text(result: Mapping[str, Any]) -> str:
    lines = [f"verdict: {str(result.get('verdict', 'unknown')).upper()}"]
    for key, value in result.items():
        if key in ("verdict", "steps"):
            continue
        lines += _explain_field(key, value)
    steps = result.get("steps") or []
    if steps:
        lines.append("steps:")
        lines += [f"  {i}. {step}" for i, step in enumerate(steps, 1)]
    return "\n".join(lines)


def _explain_field(key: str, value: Any, indent: str = "") -> list[str]:
    """`key: value`, a nested mapping as indented lines (no raw JSON in the text)."""
    if isinstance(value, Mapping):
        lines = [f"{indent}{key}:"]
        for sub, inner in value.items():
            lines += _explain_field(str(sub), inner, indent + "  ")
        return lines
    if isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
        lines = [f"{indent}{key}:"]
        for item in value:
            if not isinstance(item, Mapping):
                lines.append(f"{indent}  - {item}")
                continue
            entry: list[str] = []
            for sub, v in item.items():
                entry += _explain_field(str(sub), v, indent + "    ")
            if entry:  # the item's first line carries the list marker
                entry[0] = f"{indent}  - {entry[0].lstrip()}"
            lines += entry
        return lines
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value) or "none"
    return [f"{indent}{key}: {'' if value is None else value}".rstrip()]


def cmd_explain(args: argparse.Namespace) -> int:
    client = client_for(args)
    result = _ask(lambda: client.explain(args.from_pod, args.to))
    if args.output == "table":
        print(_explain_text(result))
    else:
        _print_data(result, args.output)
    return 0


def routes_text(data: Mapping[str, Any], services: list[Mapping[str, Any]], width: int) -> str:
    """Per service: a heading, its routes, its subsets' endpoints and policies, its notes.

    From a waypoint (`proxy: waypoint`) the http routes are the ones it applies itself."""
    at_waypoint = data.get("proxy") == "waypoint"
    blocks = []
    for service in services:
        lines = [views.service_heading(service)]
        routes = views.route_rows(service)
        http = views.http_route_rows(service)
        if routes:
            lines.append(render(routes, "table", views.ROUTE_COLUMNS, max_width=width))
        elif not http:
            what = "request" if at_waypoint else "connection"
            lines.append(f"no route: every {what} goes to the whole service")
        if http:
            lines.append(render(http, "table", views.HTTP_ROUTE_COLUMNS, max_width=width))
        subsets = views.subset_rows(service)
        lines.append(render(subsets, "table", views.SUBSET_COLUMNS, max_width=width))
        lines += [
            textwrap.fill(line, width, subsequent_indent="  ", break_long_words=False)
            for line in views.subset_policy_lines(service)
        ]
        lines += [f"note: {n}" for n in service.get("notes") or []]
        if at_waypoint:
            pass  # the waypoint applies the http routes per request; nothing to point at
        elif service.get("waypoint"):
            lines.append(
                f"behind waypoint {service['waypoint']}: the agent sends this service's "
                "connections there and applies none of its routes; the waypoint applies the "
                "HTTP routes per request"
            )
        if not service.get("waypoint") and not at_waypoint:
            waypoint = service.get("needsWaypoint") or []
            lines += [f"needs a waypoint (not applied): {f}" for f in waypoint]
        blocks.append("\n".join(lines))
    rest = views.routes_unattributed_notes(data)
    if rest:
        blocks.append("\n".join(f"note: {n}" for n in rest))
    where = "this waypoint" if at_waypoint else "this agent"
    return "\n\n".join(blocks) or f"no service has routes, rules or traffic through {where}"


def check_waypoint_flags(args: argparse.Namespace) -> None:
    """`--waypoint` against the other target flags. With `--sandbox NAME`, `--waypoint` takes
    no value, so a word after it that is no HOST:PORT is the service (`--waypoint backend`)."""
    if args.waypoint is None:
        return
    if args.agent or args.node:
        raise CliError("--waypoint asks a waypoint, not an agent: drop --agent/--node")
    value = args.waypoint
    if args.sandbox:
        if value and (":" in value or value.startswith("http")):
            raise CliError("use either --waypoint HOST:PORT or --sandbox NAME --waypoint, not both")
        if value:
            if args.service:
                raise CliError(f"--sandbox NAME --waypoint takes no address (got {value!r})")
            args.service, args.waypoint = value, ""
    elif not value:
        raise CliError(
            "--waypoint needs HOST:PORT (the waypoint's :15020), or --sandbox NAME for "
            "a sandbox's waypoint"
        )


def waypoint_url(value: str) -> str:
    """`HOST[:PORT]` or `http://HOST[:PORT]` as the URL of the waypoint's :15020."""
    return value if value.startswith(("http://", "https://")) else f"http://{value}"


def _waypoint_client(args: argparse.Namespace) -> AdminClient:
    try:
        return AdminClient(
            waypoint_url(args.waypoint), what="waypoint", default_port=WAYPOINT_ADMIN_PORT
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _sandbox_waypoint_client(manager: SandboxManager, sandbox: str) -> AdminClient:
    """The sandbox's waypoint on :15020 inside its pod namespace (the manager stays open
    while the client is used: its namespace adapter makes the socket)."""
    try:
        status = manager.status(sandbox)
    except SandboxError as exc:
        raise CliError(str(exc)) from None
    waypoint = status.get("waypoint")
    if not waypoint:
        raise CliError(
            f"sandbox {sandbox!r} has no waypoint (it runs one when brought up with"
            f" `nodeagent sandbox up {sandbox} --waypoint`)"
        )
    if not waypoint.get("pid") or not waypoint.get("netns"):
        log = f" (log {waypoint['log']})" if waypoint.get("log") else ""
        raise CliError(
            f"waypoint {waypoint.get('name', '')} of sandbox {sandbox!r} is not running{log}"
        )
    netns = str(waypoint["netns"])
    return AdminClient(
        f"http://127.0.0.1:{WAYPOINT_ADMIN_PORT}",
        what="waypoint",
        label=f"127.0.0.1:{WAYPOINT_ADMIN_PORT} in netns {netns}",
        opener=lambda: manager.adapter.socket(netns),
    )


@contextlib.contextmanager
def routes_client(args: argparse.Namespace) -> Iterator[AdminClient]:
    """The client `nodeagent routes` asks: an agent, a waypoint, or a sandbox's waypoint."""
    check_waypoint_flags(args)
    if args.waypoint is None:
        yield client_for(args)
    elif not args.sandbox:
        yield _waypoint_client(args)
    else:
        with SandboxManager() as manager:
            yield _sandbox_waypoint_client(manager, args.sandbox)


def cmd_routes(args: argparse.Namespace) -> int:
    with routes_client(args) as client:
        data = _ask(client.routes)
    services = views.routes_for(data, args.service)
    if args.service and not services:
        where = "waypoint" if data.get("proxy") == "waypoint" else "agent"
        raise CliError(f"no routes, rules or traffic for service {args.service!r} on this {where}")
    if args.output == "table":
        print(routes_text(data, services, _width()))
    else:
        _print_data({**data, "services": services} if args.service else data, args.output)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    client = client_for(args)
    print(_ask(lambda: client.release(args.pod)))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    if args.level is not None and args.reset:
        raise CliError("use either --level or --reset")
    client = client_for(args)
    answer = _ask(lambda: client.logging(args.level, reset=args.reset))
    if args.output == "table":
        print(answer)
    else:
        _print_data(views.log_level_data(answer), args.output)
    return 0


def register(subparsers: Any) -> None:
    help_texts = {
        "workloads": (
            "workloads the agent knows (like `istioctl zc workloads`)",
            ["workload", "w"],
        ),
        "services": ("services the agent knows", ["service", "svc"]),
        "policies": ("authorization policies the agent knows", ["policy", "pol"]),
        "certs": ("certificates the agent holds", ["certificates", "cert"]),
    }
    for view, (help_text, aliases) in help_texts.items():
        p = subparsers.add_parser(view, aliases=aliases, help=help_text)
        _add_target_flags(p)
        p.set_defaults(func=cmd_dump_view, view=view)

    p = subparsers.add_parser("connections", aliases=["cons"], help="live proxied connections")
    _add_target_flags(p)
    p.set_defaults(func=cmd_connections)

    p = subparsers.add_parser("pods", help="local pods: capture state, listeners, last error")
    _add_target_flags(p)
    p.set_defaults(func=cmd_pods)

    p = subparsers.add_parser(
        "routes",
        help="traffic management per service: routes, subsets, endpoints, ejections, limits",
        description="Per service with a VirtualService, a DestinationRule or traffic through"
        " this agent: its routes (match, destinations with weights, fault, mirror), its"
        " http routes (timeout, retry policy, fault, mirrors), its subsets with their"
        " endpoints (ejected ones with the time left and times ejected, active connections),"
        " connection pools and outlier detection, open connections against maxConnections,"
        " unresolvable references and the fields that need a waypoint. With --waypoint,"
        " the same as a waypoint applies it.",
    )
    p.add_argument(
        "service", nargs="?", help="only this service (namespace/name, name or hostname)"
    )
    _add_target_flags(p)
    p.add_argument(
        "--waypoint",
        nargs="?",
        const="",
        metavar="HOST:PORT",
        help="ask a waypoint instead of an agent: at HOST:PORT (its metrics port, default"
        f" {WAYPOINT_ADMIN_PORT}), or with --sandbox NAME and no value, the sandbox's waypoint",
    )
    p.set_defaults(func=cmd_routes)

    p = subparsers.add_parser(
        "rules",
        help="a pod's capture rules: installed (kernel) vs intended, drift marked",
        description="Lines marked '-' are intended but missing from the kernel; "
        "'+' are in the kernel but not intended.",
    )
    p.add_argument("pod", help="pod as namespace/name, name or uid")
    _add_target_flags(p)
    p.set_defaults(func=cmd_rules)

    p = subparsers.add_parser(
        "explain",
        help="what the agent would do with a connection, and why",
        description="Walks one connection from POD to ADDR:PORT through the agent's"
        " decisions (capture, destination lookup, tunnel or passthrough, authorization)"
        " and prints the verdict with each step that led to it. To a service: the route,"
        " the subsets it could get with their weights and candidate endpoints, and any"
        " fault or mirror it could draw (nothing is consumed by asking).",
    )
    p.add_argument("--from", dest="from_pod", required=True, metavar="POD", help="source pod")
    p.add_argument("--to", required=True, metavar="ADDR:PORT", help="destination")
    _add_target_flags(p)
    p.set_defaults(func=cmd_explain)

    p = subparsers.add_parser(
        "release",
        help="un-mesh a held pod: remove its capture",
        description="A pod whose workload record is gone (or wrong) is held: captured,"
        " its traffic refused. This removes its capture, so it talks in plaintext.",
    )
    p.add_argument("pod", help="pod as uid or namespace/name (see `nodeagent pods`)")
    _add_target_flags(p, output=False)
    p.set_defaults(func=cmd_release)

    p = subparsers.add_parser(
        "log",
        help="show or change the agent's log level",
        description="With no flag, shows the agent's log level. --level sets the default"
        " (the agent's own loggers) and/or named loggers, e.g. `debug` or"
        " `nodeagent.proxy=debug,info`; third-party loggers stay at warn unless named."
        " --reset goes back to the level the agent started with.",
    )
    p.add_argument(
        "--level", help="LEVEL or target=level,... (off, error, warn, info, debug, trace)"
    )
    p.add_argument("--reset", action="store_true", help="back to the starting level")
    _add_target_flags(p)
    p.set_defaults(func=cmd_log)
