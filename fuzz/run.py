"""Run the fuzz targets under atheris/libFuzzer for a while each; report and keep crashes.

    python -m fuzz.run [TARGET ...] [--seconds 60] [--jobs 1] [--seed 1] [--fresh]
    python -m fuzz.run --replay TARGET FILE ...    # one input through a target, traceback shown

Each target runs in its own process (libFuzzer owns the process and exits on the first
crash) on two corpus directories: a working one that keeps what earlier runs learnt
(.cache/fuzz/corpus/TARGET, or a temporary one with --fresh, as CI uses) and the committed
seeds in fuzz/corpus/TARGET, which are only read. A crash input is written to
fuzz/crashes/TARGET/ (where it becomes a regression input once committed) and the run fails.
The report gives, per target, executions, coverage (instrumented edges, "cov") and
features ("ft", edges refined by hit counts: what libFuzzer maximizes) and the corpus size.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuzz.targets import TARGETS, load

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "fuzz" / "corpus"
CRASHES = ROOT / "fuzz" / "crashes"
WORK = ROOT / ".cache" / "fuzz"
# Packages atheris instruments: the project, and the HPACK decoder the HBONE core wraps (pure
# Python; its branches guide the fuzzer towards header blocks that decode). Protobuf (upb) and
# libyaml are C, invisible to atheris either way.
INSTRUMENT = ("nodeagent", "hpack")
# One input taking longer than this is a finding too (a peer could stall a thread with it).
INPUT_TIMEOUT_S = 20
# Beyond --seconds: process start, loading the corpus, and writing the final report.
GRACE_S = 120

_STATUS = re.compile(
    r"^#(\d+)\s+(INITED|NEW|REDUCE|pulse|DONE|RELOAD)\s+cov: (\d+) ft: (\d+) corp: (\d+)/"
)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class TargetResult:
    """One target's run, as read from libFuzzer's output."""

    target: str
    seconds: float = 0.0
    executions: int = 0
    exec_per_sec: int = 0
    coverage: int = 0  # "cov": instrumented edges reached
    features: int = 0  # "ft": coverage features (edges x hit-count buckets, comparisons)
    initial_coverage: int = 0  # at INITED: what the corpus reached before any mutation
    corpus: int = 0
    new_units: int = 0
    peak_rss_mb: int = 0
    crashes: list[str] = field(default_factory=list)
    exit_code: int = 0
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.crashes


def parse_output(target: str, text: str) -> TargetResult:
    """Read libFuzzer's stderr: the last status line, the final stats, the crash artifacts."""
    result = TargetResult(target)
    for line in text.splitlines():
        if m := _STATUS.match(line):
            result.coverage, result.features = int(m[3]), int(m[4])
            result.corpus = int(m[5])
            result.executions = max(result.executions, int(m[1]))
            if m[2] == "INITED":
                result.initial_coverage = int(m[3])
        elif m := _STAT.match(line):
            name, value = m[1], int(m[2])
            if name == "number_of_executed_units":
                result.executions = value
            elif name == "average_exec_per_sec":
                result.exec_per_sec = value
            elif name == "new_units_added":
                result.new_units = value
            elif name == "peak_rss_mb":
                result.peak_rss_mb = value
        elif m := _ARTIFACT.search(line):
            result.crashes.append(m[1])
    return result


def _command(
    target: str, seconds: int, seed: int, work: Path, crashes: Path, max_len: int
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fuzz.run",
        "--child",
        target,
        "--",
        str(work),
        str(SEEDS / target),
        f"-max_total_time={seconds}",
        f"-seed={seed}",
        f"-max_len={max_len}",
        f"-timeout={INPUT_TIMEOUT_S}",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
    ]


@dataclass
class _Running:
    target: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float


def run_targets(
    targets: Sequence[str],
    *,
    seconds: int,
    jobs: int,
    seed: int,
    work_root: Path,
    crash_root: Path,
    log_root: Path,
    echo: bool = True,
) -> list[TargetResult]:
    """Fuzz each target for `seconds`, at most `jobs` at a time; results in `targets` order."""
    pending = list(targets)
    running: list[_Running] = []
    results: dict[str, TargetResult] = {}
    env = dict(os.environ, PYTHONHASHSEED="0")  # the same seed means the same run, near enough
    while pending or running:
        while pending and len(running) < jobs:
            target = pending.pop(0)
            work = work_root / target
            crashes = crash_root / target
            for d in (work, crashes, log_root):
                d.mkdir(parents=True, exist_ok=True)
            log_path = log_root / f"{target}.log"
            max_len = load(target).MAX_LEN
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    _command(target, seconds, seed, work, crashes, max_len),
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            running.append(_Running(target, proc, log_path, time.monotonic()))
            if echo:
                print(f"fuzz: {target}: running for {seconds}s (log {log_path})", flush=True)
        time.sleep(0.2)
        for r in list(running):
            code = r.proc.poll()
            overdue = time.monotonic() - r.started > seconds + GRACE_S
            if code is None and not overdue:
                continue
            if code is None:
                r.proc.kill()
                code = r.proc.wait()
            running.remove(r)
            text = r.log_path.read_text(errors="replace")
            result = parse_output(r.target, text)
            result.exit_code = code if not overdue else -9
            result.seconds = round(time.monotonic() - r.started, 1)
            result.log = "\n".join(text.splitlines()[-60:])
            results[r.target] = result
            if echo:
                print(_line(result), flush=True)
    return [results[t] for t in targets]


def _line(r: TargetResult) -> str:
    status = "ok" if r.ok else ("CRASH" if r.crashes else f"FAILED (exit {r.exit_code})")
    return (
        f"fuzz: {r.target:<18} {status:<6} {r.executions:>10} execs {r.exec_per_sec:>6}/s"
        f"  cov {r.coverage:>5} (seeds {r.initial_coverage:>5})  ft {r.features:>6}"
        f"  corpus {r.corpus:>5}  new {r.new_units:>4}  {r.seconds:>6}s"
    )


def report(results: Sequence[TargetResult]) -> str:
    lines = [
        "target              result   executions  exec/s   cov  cov@seeds     ft  corpus",
    ]
    for r in results:
        status = "ok" if r.ok else ("CRASH" if r.crashes else "FAILED")
        lines.append(
            f"{r.target:<19} {status:<6} {r.executions:>12} {r.exec_per_sec:>7} {r.coverage:>5}"
            f" {r.initial_coverage:>10} {r.features:>6} {r.corpus:>7}"
        )
    for r in results:
        for path in r.crashes:
            lines.append(f"{r.target}: crash input {path}")
            with contextlib.suppress(OSError):
                data = Path(path).read_bytes()
                lines.append(f"  base64: {base64.b64encode(data).decode()}")
            lines.append(f"  replay: python -m fuzz.run --replay {r.target} {path}")
        if not r.ok:
            lines.append(f"{r.target}: last lines of libFuzzer's output:\n{r.log}")
    return "\n".join(lines)


def replay(target: str, paths: Sequence[str]) -> int:
    """Run inputs through a target in this process, without libFuzzer; 1 if any raised."""
    entry = load(target).fuzz_one
    failed = 0
    for p in paths:
        try:
            entry(Path(p).read_bytes())
        except Exception:
            failed += 1
            print(f"{p}: CRASH", file=sys.stderr)
            traceback.print_exc()
        else:
            print(f"{p}: ok")
    return 1 if failed else 0


def child(target: str, libfuzzer_args: Sequence[str]) -> None:
    """Inside the fuzzing process: import the target under instrumentation and hand over."""
    import atheris

    with atheris.instrument_imports(include=list(INSTRUMENT)):
        entry = load(target).fuzz_one
    atheris.Setup([sys.argv[0], *libfuzzer_args], entry)
    atheris.Fuzz()


@contextlib.contextmanager
def _work_root(fresh: bool) -> Iterator[Path]:
    """Where working corpora (corpus/TARGET) and libFuzzer logs (logs/TARGET.log) go."""
    if not fresh:
        yield WORK
        return
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--child"]:
        sep = args_list.index("--")
        child(args_list[1], args_list[sep + 1 :])
        return 0
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help=f"default: all ({', '.join(TARGETS)})")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument(
        "--fresh", action="store_true", help="start from the seed corpus only (as CI does)"
    )
    parser.add_argument("--crashes", type=Path, default=CRASHES, help="where crash inputs go")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--replay", action="store_true", help="TARGET FILE...: run inputs")
    args = parser.parse_args(args_list)
    if args.replay:
        if len(args.targets) < 2:
            parser.error("--replay takes a target and at least one file")
        return replay(args.targets[0], args.targets[1:])
    targets = args.targets or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)} (known: {', '.join(TARGETS)})")
    with _work_root(args.fresh) as work_root:
        results = run_targets(
            targets,
            seconds=args.seconds,
            jobs=max(1, args.jobs),
            seed=args.seed,
            work_root=work_root / "corpus",
            crash_root=args.crashes.resolve(),
            log_root=work_root / "logs",
        )
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({r.target: {**asdict(r), "ok": r.ok} for r in results}, indent=2) + "\n"
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
