"""`make bench`'s driver reads each benchmark's result from the end of its output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def driver(scripts):  # type: ignore[no-untyped-def]
    return scripts("bench")


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
def test_result_is_found_one_line_or_indented(driver, stdout: str) -> None:  # type: ignore[no-untyped-def]
    assert driver.trailing_json(stdout) == RESULT


@pytest.mark.parametrize(
    "stdout",
    ["", "just text\n", json.dumps(RESULT) + "\ntrailing words\n", '{"cut": '],
    ids=["empty", "no-json", "json-not-last", "truncated"],
)
def test_output_without_a_trailing_object_is_an_error(driver, stdout: str) -> None:  # type: ignore[no-untyped-def]
    assert driver.trailing_json(stdout) is None


def test_a_failing_script_is_reported_with_its_output(driver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "bench_fail.py"
    script.write_text("import sys\nprint('broke here', file=sys.stderr)\nsys.exit(3)\n")
    entry = driver.run(script)
    assert entry["error"] == "exit 3"
    assert entry["detail"] == ["broke here"]


def test_a_pretty_printing_script_yields_its_result(driver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "bench_ok.py"
    script.write_text(
        f"import json\nprint('warming up')\nprint(json.dumps({RESULT!r}, indent=2))\n"
    )
    entry = driver.run(script)
    assert entry["result"] == RESULT, entry
