"""CI's fuzzing: every target under atheris for a short while, from the committed seeds only.

Fixed libFuzzer seed and a fresh working corpus, so each run starts from the same place; two
targets at a time (CI has two cores). A crash fails the test with the input in base64 and the
command that replays it; `make fuzz` is the long run that finds new things.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 30  # per target; with 6 targets two at a time, about 100 s in all
JOBS = 2


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris has wheels for x86_64 only"
)
@pytest.mark.timeout(SECONDS * len(TARGETS) + 240)
def test_every_target_runs_clean_from_the_seed_corpus(tmp_path: Path) -> None:
    summary = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            "--seconds",
            str(SECONDS),
            "--jobs",
            str(JOBS),
            "--seed",
            "1",
            "--fresh",
            "--crashes",
            str(tmp_path / "crashes"),
            "--json",
            str(summary),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS * len(TARGETS) + 200,
    )
    assert proc.returncode == 0, f"fuzzing failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results = json.loads(summary.read_text())
    assert set(results) == set(TARGETS)
    for name, r in results.items():
        # The target really ran: past the seeds, and its coverage came from our code.
        assert r["executions"] > 200, f"{name} ran only {r['executions']} inputs"
        assert r["coverage"] >= r["initial_coverage"] > 0, f"{name}: no coverage reported"
        assert r["crashes"] == []
