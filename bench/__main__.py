"""`make bench`: run every benchmark family, each in its own process, and write one report.

Each family (`python -m bench.<family>`) ends its standard output with one JSON object (on one
line or indented). The results go to reports/bench.json and reports/bench.md.

    python -m bench [FAMILY ...]    (all of them by default, in the order below)
"""

from __future__ import annotations

import json
import sys

from bench.harness import ROOT, run_family, write_report

FAMILIES = ["sandbox", "state", "xds", "hbone", "capture", "mesh", "capture_cost"]


def main(argv: list[str]) -> int:
    unknown = set(argv) - set(FAMILIES)
    if unknown:
        print(f"bench: unknown families {sorted(unknown)} (known: {FAMILIES})", file=sys.stderr)
        return 2
    report: dict[str, dict[str, object]] = {}
    for family in FAMILIES:
        if argv and family not in argv:
            continue
        print(f"bench: {family} ...", flush=True)
        report[family] = run_family([sys.executable, "-m", f"bench.{family}"])
        print(f"bench: {family}: {json.dumps(report[family])[:300]}", flush=True)
    write_report(report, ROOT / "reports")
    return 1 if any("error" in e for e in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
