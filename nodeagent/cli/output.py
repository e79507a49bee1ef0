"""Rendering of command results as table, JSON or YAML."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml


def render(data: Any, fmt: str, columns: Sequence[tuple[str, str]] | None = None) -> str:
    """Render `data` (a list of dicts for tables) as `table`, `json` or `yaml`."""
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False, default=str)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()
    if fmt == "table":
        rows = data if isinstance(data, list) else [data]
        return table(rows, columns)
    raise ValueError(f"unknown output format {fmt!r}")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]] | None) -> str:
    """A plain aligned table; `columns` is (key, HEADER) pairs."""
    if columns is None:
        keys = list(rows[0].keys()) if rows else []
        columns = [(k, k.upper()) for k in keys]
    cells = [[h for _, h in columns]]
    for row in rows:
        cells.append(["" if row.get(k) is None else str(row.get(k)) for k, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )
