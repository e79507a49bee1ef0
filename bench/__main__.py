"""`make bench`: run every benchmark family, each in its own process, and write one report.

A family is any module of this package but the shared ones (`harness`, `report`, and the
programs run inside pods, `probe` and `tls_relay`); `python -m bench.<family>` ends its
standard output with one JSON object (on one line or indented). The results go to
reports/bench.json and reports/bench.md.

    python -m bench [FAMILY ...]    (all of them by default: ORDER first, then the rest)
"""

from __future__ import annotations

import json
import pkgutil
import sys

from bench.report import ROOT, run_family, write_report

ORDER = ["sandbox", "state", "xds", "hbone", "capture", "mesh", "connections", "capture_cost"]
# conn_memory is a diagnosis (where an idle connection's bytes go, as a table to read),
# run by hand: bench.connections measures the figure itself.
SHARED = {"harness", "report", "probe", "tls_relay", "conn_memory"}


def families() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules([str(ROOT / "bench")])} - SHARED - {"__main__"}
    return [f for f in ORDER if f in found] + sorted(found - set(ORDER))


def main(argv: list[str]) -> int:
    known = families()
    unknown = set(argv) - set(known)
    if unknown:
        print(f"bench: unknown families {sorted(unknown)} (known: {known})", file=sys.stderr)
        return 2
    report: dict[str, dict[str, object]] = {}
    for family in known:
        if argv and family not in argv:
            continue
        print(f"bench: {family} ...", flush=True)
        report[family] = run_family([sys.executable, "-m", f"bench.{family}"])
        print(f"bench: {family}: {json.dumps(report[family])[:300]}", flush=True)
    write_report(report, ROOT / "reports")
    return 1 if any("error" in e for e in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
