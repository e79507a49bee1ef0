"""The report: each family's result read from the end of its output, and the files
`make bench` writes (reports/bench.json and reports/bench.md).

Standard library only: the in-process families (state, xds, hbone) import `emit` from here,
and their memory figures must not include the harness's imports (gRPC, cryptography, psutil).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def emit(result: object, indent: int | None = None) -> None:
    """A family's result: one JSON object ending its standard output (`trailing_json`)."""
    print(json.dumps(result, indent=indent))


def trailing_json(stdout: str) -> object | None:
    """The JSON object a benchmark printed last, on one line or indented over several.

    Progress lines may come before it; it must end the output.
    """
    lines = stdout.rstrip().splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].startswith("{"):
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue  # an inner line of an indented object; keep looking upwards
    return None


def run_family(argv: list[str]) -> dict[str, object]:
    """Run one family's process; its result (the JSON object ending its output) or its error
    (the last lines it wrote), and how long it took."""
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}", "detail": tail, "seconds": elapsed}
    result = trailing_json(proc.stdout)
    if result is None:
        return {"error": "no JSON object at the end of its output", "seconds": elapsed}
    return {"result": result, "seconds": elapsed}


def goal(
    figure: str, value: float, op: str, bound: float, unit: str = "", *, context: str = ""
) -> dict[str, Any]:
    """One entry of a family's `goals` list: a figure of this run against its goal (`op` is
    ">=" or "<="), and whether the run met it. `context`: a figure of the same run that
    bounds what the goal can reach (a reference's own ratio, what the imports alone cost)."""
    if op not in (">=", "<="):
        raise ValueError(f"goal operator {op!r}: use >= or <=")
    met = value >= bound if op == ">=" else value <= bound
    entry = {"figure": figure, "value": round(value, 3), "goal": f"{op} {bound:g}{unit}"}
    entry["met"] = met
    if context:
        entry["context"] = context
    return entry


def goals_table(report: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every family's `goals` as one Markdown table (family, figure, value, goal, met); no
    lines when no family has goals."""
    rows = []
    for family, entry in report.items():
        result = entry.get("result")
        listed = result.get("goals") if isinstance(result, Mapping) else None
        for g in listed or []:
            met = "yes" if g.get("met") else "**no**"
            context = g.get("context", "")
            rows.append(
                f"| {family} | {g['figure']} | {g['value']} | {g['goal']} | {met} | {context} |"
            )
    if not rows:
        return []
    head = [
        "| family | figure | value | goal | met | in the same run, for scale |",
        "|---|---|---:|---|---|---|",
    ]
    return ["## Goals (issue 21)", "", *head, *rows, ""]


def to_markdown(report: Mapping[str, Mapping[str, Any]]) -> str:
    out = ["# nodeagent benchmark report", "", *goals_table(report)]
    for area, entry in report.items():
        out.append(f"## {area} ({entry.get('seconds')} s)")
        out.append("")
        if "error" in entry:
            out.append(f"**failed**: {entry['error']}")
            out.extend(f"    {line}" for line in entry.get("detail", []))
        else:
            out.append("```json")
            out.append(json.dumps(entry["result"], indent=2))
            out.append("```")
        out.append("")
    return "\n".join(out)


def write_report(report: Mapping[str, Mapping[str, Any]], outdir: Path) -> None:
    outdir.mkdir(exist_ok=True)
    (outdir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (outdir / "bench.md").write_text(to_markdown(report))
    print(f"bench: wrote {outdir / 'bench.json'} and {outdir / 'bench.md'}")
