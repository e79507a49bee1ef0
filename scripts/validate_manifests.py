#!/usr/bin/env python3
"""Render every kustomize overlay and validate each object offline.

Each overlay under daemonset/kustomize/overlays/ is rendered with
`kubectl kustomize`, and so is each component under components/ composed onto
the production overlay, and each standalone kustomization beside them (the
waypoint's, daemonset/kustomize/waypoint/). Every rendered object is checked against the
Kubernetes JSON schemas shipped in the `kubernetes-validate` package (strict:
unknown fields are errors), and the agent's ConfigMap must hold only settings
nodeagent.config knows, with values it accepts.

Usage:
  scripts/validate_manifests.py                 # every overlay and component
  scripts/validate_manifests.py DIR [DIR ...]   # these kustomization dirs only

Exit status 0 when everything is valid; 1 with one line per problem, naming
the overlay, the object (kind namespace/name) and the field.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
KUSTOMIZE_ROOT = REPO / "daemonset" / "kustomize"
# The schema set to check against: the kubectl on the CI machine is v1.32.
DEFAULT_KUBERNETES_VERSION = "1.32"
AGENT_CONFIGMAP_PREFIX = "nodeagent-config"  # the agent's and the waypoint's settings
# Directories under the root that are not standalone kustomizations.
LAYOUT_DIRS = frozenset({"base", "overlays", "components"})
MAX_MESSAGE = 300


@dataclass(frozen=True)
class Target:
    """One thing to render: a name for messages and a kustomization dir."""

    name: str
    path: Path


@dataclass(frozen=True)
class Problem:
    target: str
    obj: str
    detail: str

    def __str__(self) -> str:
        return f"{self.target}: {self.obj}: {self.detail}"


class RenderError(RuntimeError):
    """kubectl kustomize refused the kustomization."""


def default_targets(root: Path = KUSTOMIZE_ROOT) -> list[Target]:
    """Every overlay, every component composed onto the production overlay, and every
    standalone kustomization directly under the root (the waypoint)."""
    overlays = sorted(p.parent for p in (root / "overlays").glob("*/kustomization.yaml"))
    targets = [Target(f"overlay {p.name}", p) for p in overlays]
    components = sorted(p.parent for p in (root / "components").glob("*/kustomization.yaml"))
    if (root / "overlays" / "production").exists():
        targets += [Target(f"component {c.name} (on production)", c) for c in components]
    standalone = sorted(
        p.parent for p in root.glob("*/kustomization.yaml") if p.parent.name not in LAYOUT_DIRS
    )
    targets += [Target(f"kustomization {p.name}", p) for p in standalone]
    return targets


def render(target: Target, root: Path = KUSTOMIZE_ROOT) -> list[dict[str, Any]]:
    """Render a target with `kubectl kustomize`; components go on the production overlay."""
    if target.name.startswith("component "):
        with tempfile.TemporaryDirectory(prefix="validate-manifests-") as tmp:
            # kustomize wants relative references; it refuses absolute ones.
            overlay = os.path.relpath(root / "overlays" / "production", tmp)
            component = os.path.relpath(target.path, tmp)
            Path(tmp, "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\n"
                "kind: Kustomization\n"
                f"resources:\n  - {overlay}\n"
                f"components:\n  - {component}\n"
            )
            return _kustomize(Path(tmp))
    return _kustomize(target.path)


def _kustomize(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RenderError(lines[-1] if lines else f"kubectl exited {proc.returncode}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "<unnamed>")
    ns = meta.get("namespace")
    return f"{obj.get('kind', '<no kind>')} {ns + '/' if ns else ''}{name}"


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _short(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else message
    return first if len(first) <= MAX_MESSAGE else first[: MAX_MESSAGE - 3] + "..."


def validate_object(obj: dict[str, Any], version: str) -> str | None:
    """Return a one-line error for an invalid object, or None."""
    for key in ("apiVersion", "kind"):
        if not isinstance(obj.get(key), str):
            return f"missing or invalid {key!r}"
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{_json_path(exc.absolute_path)}: {_short(exc.message)}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return _short(exc.message)
    return None


def check_agent_settings(obj: dict[str, Any]) -> list[str]:
    """The agent's ConfigMap: known setting names, values nodeagent.config accepts."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # a checkout without `pip install -e .`
    from nodeagent import config as agent_config

    data = obj.get("data") or {}
    known = agent_config.ENV_NAMES  # env name -> field; the one list the agent reads
    errors = [f"data.{key}: not a nodeagent setting" for key in sorted(data) if key not in known]
    try:
        agent_config.build_config(env={k: str(v) for k, v in data.items()})
    except agent_config.ConfigError as exc:
        errors.append(f"data: {exc}")
    return errors


def validate_target(target: Target, version: str) -> list[Problem]:
    try:
        objs = render(target)
    except RenderError as exc:
        return [Problem(target.name, "render", str(exc))]
    if not objs:
        return [Problem(target.name, "render", "rendered no objects")]
    problems = []
    for obj in objs:
        error = validate_object(obj, version)
        if error:
            problems.append(Problem(target.name, describe(obj), error))
            continue
        name = (obj.get("metadata") or {}).get("name", "")
        if obj.get("kind") == "ConfigMap" and name.startswith(AGENT_CONFIGMAP_PREFIX):
            problems += [Problem(target.name, describe(obj), e) for e in check_agent_settings(obj)]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="kustomization dirs (default: all)")
    parser.add_argument(
        "--kubernetes-version",
        default=DEFAULT_KUBERNETES_VERSION,
        help=f"schema version to validate against (default {DEFAULT_KUBERNETES_VERSION})",
    )
    args = parser.parse_args(argv)
    explicit = [Target(f"overlay {d}", d) for d in args.dirs]
    targets = explicit or default_targets()
    if not targets:
        print("validate_manifests: no kustomizations found", file=sys.stderr)
        return 1
    problems: list[Problem] = []
    for target in targets:
        problems += validate_target(target, args.kubernetes_version)
    for problem in problems:
        print(f"validate_manifests: {problem}", file=sys.stderr)
    if problems:
        return 1
    names = ", ".join(t.name for t in targets)
    print(f"validate_manifests: ok ({names}; Kubernetes {args.kubernetes_version} schemas)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
