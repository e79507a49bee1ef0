#!/usr/bin/env python3
"""Check the import layers of DESIGN.md §3 by reading every module's imports.

A module may import from its own layer's package, or from any lower layer;
never from a higher one or a sibling package in its layer. Pure packages may
not import I/O frameworks (asyncio, grpc, sockets, kernel libraries).
Exits non-zero listing every violation as FILE:LINE.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Highest first; packages on one line are siblings and may not import each other.
LAYERS: list[list[str]] = [
    ["cli"],
    ["app"],
    # The waypoint reuses the agent's data path (pool, relay, endpoint picking) and admin.
    ["waypoint"],
    # cni is the CNI plugin executable: it uses only the pure plan (datapath.plan) and model.
    ["admin", "node", "proxy", "controlplane", "sandbox", "cni"],
    ["hbone", "xds", "identity", "datapath", "kube"],
    ["state", "policy", "traffic"],
    # config sits just above model: it reads the port and mark constants.
    ["config"],
    ["model", "pb"],
]
PURE = {"model", "config", "state", "policy", "traffic"}
# Pure modules inside otherwise I/O-touching packages.
PURE_MODULES = {
    "nodeagent.hbone.frames",
    "nodeagent.hbone.connection",
    "nodeagent.hbone.events",
    "nodeagent.hbone.stream",
    "nodeagent.hbone.windows",
    "nodeagent.hbone.settings",
    "nodeagent.hbone.headers",
    "nodeagent.hbone.hpack_plain",
    "nodeagent.xds.protocol",
    "nodeagent.datapath.plan",
    "nodeagent.identity.csr",
    "nodeagent.node.lifecycle",
    "nodeagent.node.scan",
    "nodeagent.hbone.keepalive",
    "nodeagent.hbone.limits",
    "nodeagent.kube.api",
    "nodeagent.kube.shutdown",
    "nodeagent.cni.protocol",
    "nodeagent.cni.hold",
}
# Packages a package may not import although the layers would allow it.
# hbone is a transport: it knows nothing of policy, identity or state (DESIGN.md §3).
FORBIDDEN: dict[str, set[str]] = {
    "hbone": {"policy", "proxy", "state", "identity"},
    # Only app and cli may import the CNI plugin package.
    "waypoint": {"cni"},
}
IO_MODULES = {
    "asyncio",
    "grpc",
    "socket",
    "ssl",
    "selectors",
    "pyroute2",
    "iptc",
    "bcc",
    "psutil",
    "uvloop",
    "subprocess",
    "threading",
}

LEVEL = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}


def top_package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "nodeagent" or len(parts) < 2:
        return None
    return parts[1]


def imports_of(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found.extend((node.lineno, f"{name}.{a.name}") for a in node.names)
    return found


def check(root: Path) -> list[str]:
    errors: list[str] = []
    for path in sorted((root / "nodeagent").rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        own = top_package(module)
        if own is None or own == "__main__":
            continue
        if own not in LEVEL:
            errors.append(f"{rel}:1: package {own!r} is not in any layer (add it to LAYERS)")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(rel))
        pure = own in PURE or module in PURE_MODULES
        seen: set[tuple[int, str | None]] = set()
        for lineno, name in imports_of(tree, module):
            target = top_package(name)
            if pure and name.split(".")[0] in IO_MODULES:
                errors.append(f"{rel}:{lineno}: pure module imports I/O module {name!r}")
            if target is None or target == own or target not in LEVEL or (lineno, target) in seen:
                continue
            seen.add((lineno, target))
            if target in FORBIDDEN.get(own, set()):
                errors.append(f"{rel}:{lineno}: {own!r} may not import {target!r} (forbidden)")
            elif LEVEL[target] <= LEVEL[own]:
                errors.append(
                    f"{rel}:{lineno}: {own!r} may not import {target!r} "
                    f"({'same' if LEVEL[target] == LEVEL[own] else 'higher'} layer)"
                )
    return errors


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    errors = check(root)
    for e in errors:
        print(e)
    if errors:
        print(f"layers: {len(errors)} violation(s)")
        return 1
    print("layers: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
