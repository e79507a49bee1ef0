"""Table rendering: unchanged without a width, wrapped to fit with one."""

from __future__ import annotations

from nodeagent.cli.output import render, table

COLUMNS = [("name", "NAME"), ("id", "IDENTITY"), ("state", "STATE")]
ROWS = [
    {
        "name": "client-1",
        "id": "spiffe://cluster.local/ns/default/sa/" + "x" * 80,
        "state": "ready",
    },
    {"name": "server-1", "id": "spiffe://cluster.local/ns/default/sa/server", "state": "failed"},
]


def test_plain_table_is_unchanged_without_width() -> None:
    assert table([{"a": 1, "b": None}], None) == "A  B\n1"
    assert render([{"k": "v"}], "table", [("k", "KEY")]) == "KEY\nv"


def test_wide_table_wraps_within_width_and_keeps_every_character() -> None:
    out = table(ROWS, COLUMNS, max_width=60)
    lines = out.splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert lines[0].split() == ["NAME", "IDENTITY", "STATE"]
    # Short columns keep their width; the long identity wraps on continuation lines.
    assert lines[1].split()[0] == "client-1" and lines[1].split()[-1] == "ready"
    second = next(i for i, line in enumerate(lines) if line.startswith("server-1"))
    # The NAME column is 8 wide plus a 2-space gap: identity text starts at 10.
    ids = "".join(line[10:].split()[0] for line in lines[1:second])
    assert ids == ROWS[0]["id"]


def test_table_that_fits_is_not_wrapped() -> None:
    assert table(ROWS[1:], COLUMNS, max_width=200) == table(ROWS[1:], COLUMNS)
