"""`nodeagent controlplane`: serve workloads, services and policies from a mesh file."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from nodeagent.cli.errors import CliError
from nodeagent.cli.output import render
from nodeagent.controlplane.mesh import MeshError, load_mesh
from nodeagent.controlplane.run import ControlPlaneOptions, serve
from nodeagent.model.constants import CONTROLPLANE_XDS_PORT


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "controlplane",
        help="a small delta-xDS control plane (and CA) fed by a YAML mesh file",
        description="Serve the workloads, services and authorization policies of a mesh "
        "file over delta xDS (Istio's workload API). The file is watched: edits are "
        "pushed to connected agents. A bad edit, an empty file, one without nodes, or "
        "an edit that leaves a connected node without workloads (unless the file says "
        "so: `nodes: []`, `workloads: []`, a node's `allowEmpty: true`) is refused and "
        "the last good one kept. Schema: docs/mesh-file.md.",
    )
    p.add_argument("--mesh", required=True, metavar="FILE", help="the mesh file (YAML)")
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{CONTROLPLANE_XDS_PORT}",
        metavar="ADDR",
        help="HOST:PORT (default %(default)s; port 0 picks one)",
    )
    p.add_argument("--ca-dir", metavar="DIR", help="also serve the CA, keeping its root in DIR")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--require-token", action="store_true", help="refuse xDS streams whose token names no node"
    )
    p.add_argument(
        "--check", action="store_true", help="validate the mesh file, print a summary and exit"
    )
    p.add_argument(
        "-o", "--output", choices=("table", "json", "yaml"), default="table", help="--check output"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_controlplane)


def cmd_controlplane(args: Any) -> int:
    if args.check:
        try:
            mesh = load_mesh(args.mesh)
        except MeshError as e:
            raise CliError(str(e)) from None
        for note in mesh.notes:
            print(f"note: {note}", file=sys.stderr)
        summary = {
            "trustDomain": mesh.trust_domain,
            "nodes": len(mesh.nodes),
            "workloads": len(mesh.workloads),
            "services": len(mesh.services),
            "authorizationPolicies": len(mesh.policies),
        }
        print(render(summary, args.output))
        return 0
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    opts = ControlPlaneOptions(
        mesh=Path(args.mesh),
        listen=args.listen,
        ca_dir=Path(args.ca_dir) if args.ca_dir else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        require_token=args.require_token,
    )
    try:
        asyncio.run(serve(opts))
    except MeshError as e:
        raise CliError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CliError(f"controlplane: {e}") from None
    return 0
