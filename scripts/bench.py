#!/usr/bin/env python3
"""`make bench`: run every benchmark script present and write one report.

Each scripts/bench_<area>.py ends its standard output with one JSON object (on one line
or indented).
The results go to reports/bench.json and reports/bench.md. Benchmarks are
figures to read and compare, never pass/fail tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["sandbox", "state", "xds", "hbone", "capture", "mesh"]


def run(script: Path) -> dict[str, object]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    elapsed = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}", "detail": tail, "seconds": elapsed}
    result = trailing_json(proc.stdout)
    if result is None:
        return {"error": "no JSON object at the end of its output", "seconds": elapsed}
    return {"result": result, "seconds": elapsed}


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


def to_markdown(report: dict[str, dict[str, object]]) -> str:
    out = ["# nodeagent benchmark report", ""]
    for area, entry in report.items():
        out.append(f"## {area} ({entry.get('seconds')} s)")
        out.append("")
        if "error" in entry:
            out.append(f"**failed**: {entry['error']}")
            out.extend(f"    {line}" for line in entry.get("detail", []))  # type: ignore[union-attr]
        else:
            out.append("```json")
            out.append(json.dumps(entry["result"], indent=2))
            out.append("```")
        out.append("")
    return "\n".join(out)


def main() -> int:
    only = set(sys.argv[1:])
    scripts = {p.stem.removeprefix("bench_"): p for p in (ROOT / "scripts").glob("bench_*.py")}
    areas = [a for a in ORDER if a in scripts] + sorted(set(scripts) - set(ORDER))
    report: dict[str, dict[str, object]] = {}
    for area in areas:
        if only and area not in only:
            continue
        print(f"bench: {area} ...", flush=True)
        report[area] = run(scripts[area])
        print(f"bench: {area}: {json.dumps(report[area])[:300]}", flush=True)
    outdir = ROOT / "reports"
    outdir.mkdir(exist_ok=True)
    (outdir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (outdir / "bench.md").write_text(to_markdown(report))
    print(f"bench: wrote {outdir / 'bench.json'} and {outdir / 'bench.md'}")
    return 1 if any("error" in e for e in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
