"""`make bench`'s driver reads each family's result from the end of its output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.report import goal, goals_table, run_family, to_markdown, trailing_json

RESULT = {"runs": [1.5, 2.0], "nested": {"a": [1, {"b": 2}]}}


@pytest.mark.parametrize(
    "stdout",
    [
        json.dumps(RESULT) + "\n",
        "progress 1\nprogress 2\n" + json.dumps(RESULT, indent=2) + "\n",
        "{not json\n" + json.dumps(RESULT, indent=2),
    ],
    ids=["one-line", "indented-after-progress", "after-a-brace-line"],
)
def test_result_is_found_one_line_or_indented(stdout: str) -> None:
    assert trailing_json(stdout) == RESULT


@pytest.mark.parametrize(
    "stdout",
    ["", "just text\n", json.dumps(RESULT) + "\ntrailing words\n", '{"cut": '],
    ids=["empty", "no-json", "json-not-last", "truncated"],
)
def test_output_without_a_trailing_object_is_an_error(stdout: str) -> None:
    assert trailing_json(stdout) is None


def test_a_failing_family_is_reported_with_its_output(tmp_path: Path) -> None:
    script = tmp_path / "bench_fail.py"
    script.write_text("import sys\nprint('broke here', file=sys.stderr)\nsys.exit(3)\n")
    entry = run_family([sys.executable, str(script)])
    assert entry["error"] == "exit 3"
    assert entry["detail"] == ["broke here"]


def test_a_pretty_printing_family_yields_its_result(tmp_path: Path) -> None:
    script = tmp_path / "bench_ok.py"
    script.write_text(
        f"import json\nprint('warming up')\nprint(json.dumps({RESULT!r}, indent=2))\n"
    )
    entry = run_family([sys.executable, str(script)])
    assert entry["result"] == RESULT, entry


def test_the_markdown_report_shows_results_and_failures() -> None:
    text = to_markdown(
        {
            "state": {"result": RESULT, "seconds": 1.5},
            "mesh": {"error": "exit 1", "detail": ["boom"], "seconds": 2.0},
        }
    )
    assert "## state (1.5 s)" in text and '"runs": [' in text
    assert "## mesh (2.0 s)" in text and "**failed**: exit 1" in text and "    boom" in text


def test_an_unknown_family_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.__main__ import main

    assert main(["nosuch"]) == 2
    assert "unknown families ['nosuch']" in capsys.readouterr().err


def test_every_module_but_the_shared_ones_is_a_family_in_report_order() -> None:
    from bench.__main__ import ORDER, families

    found = families()
    assert found[: len(ORDER)] == ORDER  # today's report order first, new families after
    assert not {"harness", "report", "probe", "tls_relay", "__main__"} & set(found)


def test_a_goal_says_whether_the_run_met_it() -> None:
    assert goal("conn/s ratio", 4.25, ">=", 4) == {
        "figure": "conn/s ratio",
        "value": 4.25,
        "goal": ">= 4",
        "met": True,
    }
    assert goal("idle RSS", 40.01, "<=", 40, " MiB")["met"] is False
    assert goal("idle RSS", 40.0, "<=", 40, " MiB")["goal"] == "<= 40 MiB"
    assert goal("idle RSS", 50.0, "<=", 40, context="imports 60")["context"] == "imports 60"
    with pytest.raises(ValueError):
        goal("x", 1.0, "==", 1.0)


def test_the_goals_of_every_family_head_the_markdown_report() -> None:
    report = {
        "mesh": {
            "result": {"goals": [goal("p50 ratio", 0.9, "<=", 1.0, context="py_relay's 1.2")]},
            "seconds": 1.0,
        },
        "state": {"result": RESULT, "seconds": 1.0},
        "connections": {
            "result": {"goals": [goal("per conn", 7.5, "<=", 6, " KiB")]},
            "seconds": 2.0,
        },
        "xds": {"error": "exit 1", "detail": [], "seconds": 0.5},
    }
    text = to_markdown(report)
    assert text.index("## Goals (issue 21)") < text.index("## mesh (1.0 s)")
    assert goals_table(report)[2:] == [
        "| family | figure | value | goal | met | in the same run, for scale |",
        "|---|---|---:|---|---|---|",
        "| mesh | p50 ratio | 0.9 | <= 1 | yes | py_relay's 1.2 |",
        "| connections | per conn | 7.5 | <= 6 KiB | **no** |  |",
        "",
    ]


def test_no_goals_no_goals_table() -> None:
    assert goals_table({"state": {"result": RESULT, "seconds": 1.0}}) == []
    assert "Goals" not in to_markdown({"state": {"result": RESULT, "seconds": 1.0}})
