"""Re-reading an edited mesh file: only the edited entry is parsed again, and the result,
or the refusal with its file, line and field, is exactly what a full read gives."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from nodeagent.controlplane.mesh import MeshConfig, MeshError, parse_mesh
from nodeagent.controlplane.reader import MeshFileReader, common_ends

MESH = """\
meshConfig: {trustDomain: cluster.local}
nodes:
- {name: node1, token: tok-1, podCIDRs: [10.10.1.0/24]}
- {name: node2, token: tok-2}
workloads:
- {name: a, namespace: shop, node: node1, ip: 10.10.1.11, labels: {app: web}}
- name: b
  namespace: shop
  node: node2
  ip: 10.10.2.11
  labels: {app: db}
- {name: c, namespace: shop, node: node2, ip: 10.10.2.12}
# the services
services:
  - {name: web, namespace: shop, vip: 10.96.0.1, ports: [{port: 80}], selector: {app: web}}
  - {name: db, namespace: shop, vip: 10.96.0.2, ports: [{port: 5432}], selector: {app: db}}
"""
SOURCE = "mesh.yaml"


def read_twice(before: str, after: str) -> tuple[MeshFileReader, MeshConfig]:
    reader = MeshFileReader(Path(SOURCE))
    reader.parse(before)
    return reader, reader.parse(after)


def full(text: str) -> MeshConfig:
    return parse_mesh(text, SOURCE)


# {case: (text replaced, replacement)}: edits inside one entry of a block list.
SPLICED = {
    "flow-entry-value": ("ip: 10.10.1.11", "ip: 10.10.1.99"),
    "block-entry-value": ("  ip: 10.10.2.11", "  ip: 10.10.2.99"),
    "label-moves-selection": ("labels: {app: db}", "labels: {app: web}"),
    "moved": ("  node: node2\n  ip: 10.10.2.11", "  node: node1\n  ip: 10.10.1.77"),
    "indented-list": ("vip: 10.96.0.2", "vip: 10.96.0.3"),
    "renamed": ("{name: a,", "{name: a2,"),
    # Entries added or removed: the lines after them move (and are not read again).
    "line-added": ("  labels: {app: db}\n", "  labels: {app: db}\n  uid: x\n"),
    "entry-added": (
        "10.10.1.11, labels",
        "10.10.1.11}\n- {name: x, node: node1, ip: 10.10.1.5, labels",
    ),
    "entry-added-last": ("{app: db}}\n", "{app: db}}\n  - {name: api, namespace: shop}\n"),
    "entry-removed": (
        "- {name: a, namespace: shop, node: node1, ip: 10.10.1.11, labels: {app: web}}\n",
        "",
    ),
    "service-removed": (MESH[MESH.index("  - {name: web") : MESH.index("  - {name: db")], ""),
}


@pytest.mark.parametrize(("old", "new"), list(SPLICED.values()), ids=list(SPLICED))
def test_an_edit_inside_one_entry_is_spliced_and_reads_as_a_full_read(old: str, new: str) -> None:
    edited = MESH.replace(old, new, 1)
    reader, mesh = read_twice(MESH, edited)
    assert reader.last.spliced
    expected = full(edited)
    assert mesh == expected
    assert mesh.where == expected.where
    assert [n.where for n in mesh.nodes] == [n.where for n in expected.nodes]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("- {name: c,", "- {name: c, network: n1,\n ", id="last-entry-grows-a-line"),
        pytest.param("ip: 10.10.1.11", "ip: &x 10.10.1.11", id="anchor"),
        pytest.param("{trustDomain: cluster.local}", "{trustDomain: example.org}", id="mapping"),
        pytest.param("  - {name: web,", "- {name: web,", id="dash-moved-left"),
        pytest.param("nodes:\n", "nodes:  \n", id="key-line"),
        # The last entry's lines run to the next key, and a comment at the dash's column
        # could be read in either place.
        pytest.param("10.10.2.12}", "10.10.2.13}", id="last-entry-before-a-comment"),
    ],
)
def test_an_edit_the_splice_cannot_prove_is_read_in_full(old: str, new: str) -> None:
    edited = MESH.replace(old, new, 1)
    assert edited != MESH
    reader = MeshFileReader(Path(SOURCE))
    reader.parse(MESH)
    try:
        expected: MeshConfig | str = full(edited)
    except MeshError as e:
        expected = str(e)
    try:
        got: MeshConfig | str = reader.parse(edited)
    except MeshError as e:
        got = str(e)
    assert not reader.last.spliced
    assert got == expected


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        pytest.param("ip: 10.10.1.11", "ip: 10.10.9.11", "mesh.yaml:6:", id="outside-pod-range"),
        pytest.param("ip: 10.10.2.12}", "ip: 10.10.2.11}", "mesh.yaml:12:", id="ip-taken"),
        pytest.param("  ip: 10.10.2.11", "  ip: 10.10.2.x", "mesh.yaml:10:7", id="not-an-ip"),
        pytest.param("  node: node2", "  node: node9", "mesh.yaml:7:3", id="unknown-node"),
        pytest.param("{name: a,", "{name: a, colour: red,", "mesh.yaml:6:13", id="unknown-field"),
        pytest.param("ip: 10.10.1.11,", "ip: [10.10.1.11,", "mesh.yaml:6:", id="yaml-syntax"),
    ],
)
def test_a_malformed_edit_is_refused_with_the_full_reads_line_and_field(
    old: str, new: str, where: str
) -> None:
    edited = MESH.replace(old, new, 1)
    with pytest.raises(MeshError) as full_error:
        full(edited)
    reader = MeshFileReader(Path(SOURCE))
    reader.parse(MESH)
    with pytest.raises(MeshError) as error:
        reader.parse(edited)
    assert str(error.value) == str(full_error.value)
    assert str(error.value).startswith(where), error.value
    # The file put right again reads as before, with the edit after it spliced.
    assert reader.parse(MESH) == full(MESH)
    fixed = MESH.replace("ip: 10.10.1.11", "ip: 10.10.1.50", 1)
    assert reader.parse(fixed) == full(fixed)
    assert reader.last.spliced


def test_unchanged_entries_keep_their_values_across_edits() -> None:
    reader, mesh = read_twice(MESH, MESH.replace("ip: 10.10.1.11", "ip: 10.10.1.12"))
    again = reader.parse(MESH.replace("ip: 10.10.1.11", "ip: 10.10.1.13"))
    assert reader.last.spliced
    assert again.workloads[2] is mesh.workloads[2]
    assert again.workloads[0] is not mesh.workloads[0]
    assert again.workloads[0].ips == ("10.10.1.13",)


@pytest.mark.parametrize(
    ("old", "new", "ends"),
    [
        ("abcdef", "abcdef", (6, 0)),
        ("abcdef", "abXdef", (2, 3)),
        ("abcdef", "abcXdef", (3, 3)),
        ("aaaa", "aa", (2, 0)),
        ("", "x", (0, 0)),
        ("xa", "a", (0, 1)),
    ],
)
def test_common_ends_never_overlap(old: str, new: str, ends: tuple[int, int]) -> None:
    assert common_ends(old, new) == ends


def test_the_same_text_again_is_not_composed_again() -> None:
    reader, mesh = read_twice(MESH, MESH)
    assert reader.last.spliced and mesh == full(MESH)
    assert mesh.workloads[0] is reader.parse(MESH).workloads[0]


def test_lines_moved_by_an_added_entry_are_placed_right_in_later_errors() -> None:
    """Nodes after the workloads: their positions move with the added entry, and an
    error found later in a moved entry names its new line."""
    text = """\
workloads:
- {name: a, namespace: shop, node: node1, ip: 10.10.1.11}
- {name: b, namespace: shop, node: node2, ip: 10.10.2.11}
nodes:
- {name: node1, token: tok-1, podCIDRs: [10.10.1.0/24]}
- {name: node2, token: tok-2, podCIDRs: [10.10.2.0/24]}
"""
    reader = MeshFileReader(Path(SOURCE))
    reader.parse(text)
    added = text.replace(
        "ip: 10.10.1.11}\n", "ip: 10.10.1.11}\n- {name: x, node: node1, ip: 10.10.1.5}\n"
    )
    mesh = reader.parse(added)
    assert reader.last.spliced
    assert [n.where for n in mesh.nodes] == [n.where for n in full(added).nodes]
    assert mesh.nodes[0].where == "mesh.yaml:6:3"
    broken = added.replace("- {name: node1, token: tok-1,", "- {name: node1, token: tok-2,")
    with pytest.raises(MeshError) as error:
        reader.parse(broken)
    assert str(error.value) == outcome(full, broken)
    assert str(error.value).startswith("mesh.yaml:7:3: nodes[1].token: duplicate token")


def outcome(read: Callable[[str], MeshConfig], text: str) -> object:
    try:
        mesh = read(text)
    except MeshError as e:
        return str(e)
    return (mesh, mesh.where, [n.where for n in mesh.nodes])


NODES = MESH[MESH.index("nodes:") : MESH.index("workloads:")]
NODES_LAST = MESH.replace(NODES, "") + NODES


@pytest.mark.parametrize("base", [MESH, NODES_LAST], ids=["nodes-first", "nodes-last"])
def test_a_run_of_random_line_edits_always_reads_as_a_full_read(base: str) -> None:
    """Lines replaced, added, removed, duplicated at random (a seeded run), each edit read
    by one reader that keeps its tree: every outcome, served or refused, equals a full
    read's. A refused edit is taken back (as its author would) before the next one."""
    rng = random.Random(21)
    pool = [line for line in base.splitlines() if line.strip()] + [
        "- {name: n%d, namespace: shop, node: node1, ip: 10.10.1.%d}",
        "- {name: m%d, namespace: shop, node: node2, ip: 10.10.2.%d, labels: {app: db}}",
        "  - {name: s%d, namespace: shop, vip: 10.96.1.%d, selector: {app: web}}",
        "  uid: u%d%d",
        "# note %d %d",
        "",
    ]
    reader = MeshFileReader(Path(SOURCE))
    good = base.splitlines()
    spliced = refused = 0
    for step in range(1000):
        lines = list(good)
        i = rng.randrange(len(lines) + 1)
        new = rng.choice(pool)
        if "%d" in new:
            new = new % (step, rng.randrange(2, 250))
        kind = rng.randrange(4)
        if kind == 0 and i < len(lines):
            lines[i] = new
        elif kind == 1:
            lines.insert(i, new)
        elif kind == 2 and i < len(lines):
            del lines[i]
        elif i < len(lines):
            lines.insert(i, lines[i])
        text = "\n".join(lines) + "\n"
        got = outcome(reader.parse, text)
        assert got == outcome(full, text), (step, text)
        spliced += reader.last.spliced
        if isinstance(got, str):
            refused += 1
        else:
            good = lines
    # The run exercises the splice and refusals, not only full reads.
    assert spliced > 50 and refused > 50, (spliced, refused)
