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
    rows = [*ROWS, {"name": "a b c d e f g h i j k l m n o p", "id": "x", "state": "s"}]
    out = table(rows, COLUMNS, max_width=60)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "IDENTITY", "STATE"]
    # Short columns keep their width; an identity is never broken (issue 16):
    # its line overflows rather than split a SPIFFE id over lines.
    assert lines[1].split() == ["client-1", ROWS[0]["id"], "ready"]
    assert all(len(line) <= 60 for line in lines if "spiffe://" not in line)
    # Text with spaces still wraps onto continuation lines, keeping every word.
    third = next(i for i, line in enumerate(lines) if line.startswith("a b"))
    tokens = [t for line in lines[third:] for t in line.split()]
    assert len(lines) - third > 1 and set("abcdefghijklmnop") <= set(tokens)


def test_table_that_fits_is_not_wrapped() -> None:
    assert table(ROWS[1:], COLUMNS, max_width=200) == table(ROWS[1:], COLUMNS)
