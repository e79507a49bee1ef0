"""Rendering of command results as table, JSON or YAML."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import yaml


def render(
    data: Any,
    fmt: str,
    columns: Sequence[tuple[str, str]] | None = None,
    max_width: int | None = None,
) -> str:
    """Render `data` (a list of dicts for tables) as `table`, `json` or `yaml`."""
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False, default=str)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()
    if fmt == "table":
        rows = data if isinstance(data, list) else [data]
        return table(rows, columns, max_width=max_width)
    raise ValueError(f"unknown output format {fmt!r}")


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]] | None,
    max_width: int | None = None,
) -> str:
    """A plain aligned table; `columns` is (key, HEADER) pairs.

    With `max_width`, the widest columns shrink until a line fits, and cells
    longer than their column wrap at spaces onto continuation lines. A word (an
    identity, a serial) is never broken: its line overflows instead.
    """
    if columns is None:
        keys = list(rows[0].keys()) if rows else []
        columns = [(k, k.upper()) for k in keys]
    cells = [[h for _, h in columns]]
    for row in rows:
        cells.append(["" if row.get(k) is None else str(row.get(k)) for k, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    if max_width is not None and _line_width(widths) > max_width:
        return _wrapped_table(cells, _shrink(widths, max_width))
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


MIN_COLUMN_WIDTH = 8
COLUMN_GAP = 2


def _line_width(widths: Sequence[int]) -> int:
    return sum(widths) + COLUMN_GAP * max(len(widths) - 1, 0)


def _shrink(widths: Sequence[int], max_width: int) -> list[int]:
    """Fair shares: narrow columns keep their width, the wide ones split the rest."""
    room = max_width - COLUMN_GAP * max(len(widths) - 1, 0)
    out = list(widths)
    order = sorted(range(len(widths)), key=lambda j: widths[j])
    for n, i in enumerate(order):
        share = room // (len(order) - n)
        out[i] = min(widths[i], max(share, MIN_COLUMN_WIDTH))
        room -= out[i]
    return out


def _wrap(cell: str, width: int) -> list[str]:
    """Wrap at spaces only: a SPIFFE id split over lines cannot be copied or grepped."""
    return textwrap.wrap(cell, width, break_long_words=False, break_on_hyphens=False) or [""]


def _wrapped_table(cells: Sequence[Sequence[str]], widths: Sequence[int]) -> str:
    lines: list[str] = []
    for row in cells:
        parts = [_wrap(c, w) for c, w in zip(row, widths, strict=True)]
        for k in range(max(len(p) for p in parts)):
            line = "  ".join(
                (p[k] if k < len(p) else "").ljust(w) for p, w in zip(parts, widths, strict=True)
            )
            lines.append(line.rstrip())
    return "\n".join(lines)
