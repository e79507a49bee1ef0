"""`nodeagent sandbox up|down|status|exec|apply|behave|demo`: a cluster of network namespaces."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nodeagent.cli.errors import CliError
from nodeagent.cli.output import render, table
from nodeagent.controlplane.mesh import parse_mesh
from nodeagent.sandbox.demo import run_demo
from nodeagent.sandbox.manager import SandboxError, SandboxManager

NODE_COLUMNS = [("name", "NODE"), ("ip", "IP"), ("pod_cidr", "POD CIDR"), ("netns", "NETNS")]
POD_COLUMNS = [
    ("name", "POD"),
    ("namespace", "NAMESPACE"),
    ("service_account", "SERVICE ACCOUNT"),
    ("app", "APP"),
    ("version", "VERSION"),
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
    # NAME is positional like down/status/exec/apply; --name is kept for old scripts.
    up.add_argument("name", nargs="?", help="sandbox name (prefix of its namespaces)")
    up.add_argument("--name", dest="name_flag", metavar="NAME", help="same as NAME")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument("--pods-per-node", type=int, default=2, help="pods per node (default 2)")
    up.add_argument(
        "--no-controlplane",
        dest="controlplane",
        action="store_false",
        help="do not start the control plane nor the agents (faster; for network-only use)",
    )
    up.add_argument(
        "--no-agents",
        dest="agents",
        action="store_false",
        help="do not start the node agents (the control plane still runs)",
    )
    up.add_argument(
        "--waypoint",
        action="store_true",
        help="run a waypoint pod for the demo namespace (its services' HTTP goes through it)",
    )
    up.add_argument(
        "--shadow",
        action="store_true",
        help="add pod node2-shadow: one more backend (version v3, alone in its subset), "
        "for mirroring",
    )
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="run Prometheus in the underlay namespace, scraping every agent and the waypoint "
        "as Istio's addon does (query it with `sandbox exec NAME underlay -- curl ...`)",
    )
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

    apply = sub.add_parser(
        "apply",
        help="add or replace workloads, services and policies in a sandbox's mesh",
        description="Merge FILE (mesh-file YAML with workloads, services and/or "
        "authorizationPolicies; see docs/mesh-file.md) into the sandbox's mesh file: a "
        "resource with the same kind, namespace and name is replaced, others are added. "
        "The file is validated first; a bad one changes nothing. A workload named like "
        "one the sandbox has, at another IP or on another node, is another pod and is "
        "refused unless --replace. A node whose last workload goes is marked "
        "`allowEmpty: true`. The control plane pushes the change to connected agents.",
    )
    apply.add_argument("name")
    apply.add_argument("file", metavar="FILE")
    apply.add_argument(
        "--delete", action="store_true", help="remove FILE's resources (by name) instead"
    )
    apply.add_argument(
        "--replace",
        action="store_true",
        help="let a workload keep its name at another IP or node (replace that pod)",
    )
    apply.set_defaults(func=cmd_apply)

    behave = sub.add_parser(
        "behave",
        help="make a pod's demo app fail or answer slowly (resilience tests)",
        description="Set the switches of POD's demo app, from inside the pod's namespace "
        "(the app obeys only 127.0.0.1): the share --fail of its requests (deterministic: "
        "0.5 fails every second one) answered with --status, and every answer held "
        "--delay. All three are set at once; an option left out takes its default, so "
        "`behave NAME POD` alone resets. Prints the settings the app answered, as JSON.",
    )
    behave.add_argument("name")
    behave.add_argument("pod", metavar="POD", help="a demo pod, e.g. node2-pod2 or node2-shadow")
    behave.add_argument(
        "--fail", default="0", metavar="R", help="share of requests to fail, 0..1 (default 0)"
    )
    behave.add_argument(
        "--status", type=int, default=500, metavar="S", help="status of a failed answer (500)"
    )
    behave.add_argument(
        "--delay",
        type=parse_duration,
        default=0.0,
        metavar="DURATION",
        help="hold every answer this long: 1.5, 1.5s or 300ms (default 0)",
    )
    behave.set_defaults(func=cmd_behave)

    for verb, field in (("label", "labels"), ("annotate", "annotations")):
        edit = sub.add_parser(
            verb,
            help=f"change a namespace's or pod's {field} in the sandbox's Kubernetes API",
            description=f"Like `kubectl {verb}`: KEY=VALUE sets, KEY- removes. The agents "
            "watch the API, so enrollment follows at once: e.g. `label NAME namespace/demo "
            "istio.io/dataplane-mode-` takes every demo pod out of the mesh, "
            "`label NAME pod/node2-pod1 istio.io/dataplane-mode=none` one pod. Prints the "
            "object's labels and annotations after the change.",
        )
        edit.add_argument("name")
        edit.add_argument("target", metavar="TARGET", help="namespace/NS, pod/POD or pod/NS/POD")
        edit.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
        edit.set_defaults(func=cmd_edit_metadata, field=field)

    demo = sub.add_parser("demo", help="build a 2x2 sandbox, call pods across nodes, remove it")
    demo.set_defaults(func=cmd_demo)


def parse_duration(text: str) -> float:
    """Seconds from `1.5`, `1.5s` or `300ms` (argparse names the option on a ValueError)."""
    value = text.strip()
    scale = 1.0
    if value.endswith("ms"):
        value, scale = value[:-2], 0.001
    elif value.endswith("s"):
        value = value[:-1]
    try:
        seconds = float(value) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 1.5, 1.5s or 300ms, got {text!r}"
        ) from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"a duration must be 0 or more, got {text!r}")
    return seconds


def _manager() -> SandboxManager:
    return SandboxManager()


def _up_name(args: argparse.Namespace) -> str:
    if args.name and args.name_flag and args.name != args.name_flag:
        raise CliError(f"two names given: {args.name!r} and --name {args.name_flag!r}")
    name = args.name or args.name_flag
    if not name:
        raise CliError("sandbox up needs a NAME (see --help)", exit_code=2)
    return str(name)


def cmd_up(args: argparse.Namespace) -> int:
    args.name = _up_name(args)
    with _manager() as m:
        try:
            plan = m.up(
                args.name,
                args.nodes,
                args.pods_per_node,
                controlplane=args.controlplane,
                agents=args.agents,
                waypoint=args.waypoint,
                shadow=args.shadow,
                prometheus=args.prometheus,
            )
            # Addresses to print come with the control plane (--prometheus needs it too).
            status = m.status(plan.name) if args.controlplane else {}
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    cp = status.get("controlplane")
    where = f", control plane at {cp['address']}" if cp else ""
    if plan.waypoint is not None:
        where += f", waypoint {plan.waypoint.namespace}/{plan.waypoint.name} at {plan.waypoint.ip}"
    if plan.shadow is not None:
        where += f", shadow pod {plan.shadow.name} ({plan.shadow.version}) at {plan.shadow.ip}"
    print(
        f"sandbox {plan.name} up: {plan.node_count} nodes x {plan.pods_per_node} pods{where} "
        f"(`nodeagent sandbox status {plan.name}`)"
    )
    if status.get("prometheus"):
        print(prometheus_line(status["prometheus"], plan.name))
    return 0


def prometheus_line(prom: dict[str, Any], name: str) -> str:
    pid = prom["pid"] if prom.get("pid") is not None else "NOT RUNNING"
    return (
        f"prometheus http://{prom['address']} (pid {pid}, in {prom['netns']}; scrapes every "
        f"agent and the waypoint each second; e.g. `nodeagent sandbox exec {name} underlay -- "
        f"curl -s 'http://{prom['address']}/api/v1/query?query=istio_build'`); config "
        f"{prom['config']}, log {prom['log']}"
    )


def validate_mesh(text: str, source: str) -> None:
    """The control plane's own validator (raises MeshError: file, line, field)."""
    parse_mesh(text, source)


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{args.file}: not a text (UTF-8) file") from None
    with _manager() as m:
        try:
            summary = m.apply(
                args.name, text, args.file, validate_mesh, delete=args.delete, replace=args.replace
            )
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    print(f"sandbox {args.name}: {args.file}: {summary.describe()}")
    # Deleting what is not there is a failed request (as `kubectl delete` has it).
    return 1 if summary.missing else 0


def controlplane_line(cp: dict[str, Any]) -> str:
    serves = cp.get("serves") or {}
    counts = ", ".join(f"{n} {k}" for k, n in serves.items() if k != "nodes")
    pid = cp["pid"] if cp["pid"] is not None else "NOT RUNNING"
    line = (
        f"control plane {cp['address']} (pid {pid}, in {cp['netns']}): "
        f"{counts or 'nothing read from the mesh file'}; mesh file {cp['mesh_file']}, "
        f"log {cp['log']}"
    )
    if cp.get("mesh_error"):
        line += (
            f"\nmesh file refused (the control plane keeps serving its last good one): "
            f"{cp['mesh_error']}"
        )
    return line


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
        # The labels a selector is written against; -o json has them all.
        table([{**p, **(p.get("labels") or {})} for p in status["pods"]], POD_COLUMNS),
    ]
    if status["agents"]:
        parts += ["", table(status["agents"], PROC_COLUMNS)]
    if status["controlplane"]:
        parts += ["", controlplane_line(status["controlplane"])]
    if status.get("prometheus"):
        parts.append(prometheus_line(status["prometheus"], status["name"]))
    wp = status.get("waypoint")
    if wp:
        state = f"pid {wp['pid']}" if wp.get("pid") else "not running"
        parts.append(
            f"waypoint {wp['namespace']}/{wp['name']} at {wp['ip']} on {wp['node']} ({state}; "
            f"the {wp['namespace']} namespace's services go through it; log {wp.get('log', '-')})"
        )
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


def cmd_behave(args: argparse.Namespace) -> int:
    with _manager() as m:
        try:
            answer = m.behave(
                args.name, args.pod, fail=args.fail, status=args.status, delay=args.delay
            )
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    print(json.dumps(answer))
    return 0


def cmd_edit_metadata(args: argparse.Namespace) -> int:
    with _manager() as m:
        try:
            print(m.edit_metadata(args.name, args.target, args.field, args.changes))
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    with _manager() as m:
        try:
            ok = run_demo(m, say, lambda s: say(format_status(s)), validate=validate_mesh)
        except SandboxError as exc:
            raise CliError(str(exc)) from None
    if not ok:
        print("nodeagent: demo failed", file=sys.stderr)
    return 0 if ok else 1
