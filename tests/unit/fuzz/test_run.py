"""The fuzz runner's reading of libFuzzer's output, and its replay mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.run import main, parse_output, report

CLEAN = """\
INFO: Seed: 1
#9	INITED cov: 610 ft: 1430 corp: 8/4878b exec/s: 0 rss: 50Mb
#11	NEW    cov: 611 ft: 1433 corp: 9/4934b lim: 2146 exec/s: 0 rss: 50Mb L: 56/2146 MS: 2 x-
#262144	pulse  cov: 700 ft: 2400 corp: 120/20Kb lim: 4096 exec/s: 1000 rss: 60Mb
#300000	DONE   cov: 737 ft: 3027 corp: 220/30Kb lim: 4096 exec/s: 1000 rss: 60Mb
Done 300000 runs in 300 second(s)
stat::number_of_executed_units: 300012
stat::average_exec_per_sec:     1000
stat::new_units_added:          139
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              61
"""

CRASHED = """\
#9	INITED cov: 446 ft: 648 corp: 7/2398b exec/s: 0 rss: 52Mb
#35	NEW    cov: 473 ft: 716 corp: 13/2862b lim: 1632 exec/s: 0 rss: 52Mb L: 43/1632 MS: 5 x-

 === Uncaught Python exception: ===
UnicodeDecodeError: 'utf-8' codec can't decode byte 0x90 in position 23: invalid start byte
==23714== ERROR: libFuzzer: fuzz target exited
artifact_prefix='/tmp/c/mesh_file/'; Test unit written to /tmp/c/mesh_file/crash-5154
Base64: bm9kZXM6
stat::number_of_executed_units: 41
"""


def test_a_clean_run_reports_executions_coverage_and_corpus() -> None:
    r = parse_output("hbone_client", CLEAN)
    assert (r.executions, r.exec_per_sec, r.new_units, r.peak_rss_mb) == (300012, 1000, 139, 61)
    assert (r.initial_coverage, r.coverage, r.features, r.corpus) == (610, 737, 3027, 220)
    assert r.crashes == [] and r.ok


def test_a_crash_names_its_input_and_fails_the_run() -> None:
    r = parse_output("mesh_file", CRASHED)
    assert r.crashes == ["/tmp/c/mesh_file/crash-5154"]
    assert not r.ok
    assert r.executions == 41 and r.coverage == 473
    text = report([r])
    assert "mesh_file           CRASH" in text
    assert "python -m fuzz.run --replay mesh_file /tmp/c/mesh_file/crash-5154" in text


def test_replay_runs_inputs_through_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good"
    good.write_bytes(b"nodes: []\n")
    assert main(["--replay", "mesh_file", str(good)]) == 0
    assert f"{good}: ok" in capsys.readouterr().out


def test_unknown_targets_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["nope", "--seconds", "1"])
    assert "unknown target(s) nope" in capsys.readouterr().err
