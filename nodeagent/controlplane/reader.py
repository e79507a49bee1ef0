"""Re-reading a mesh file after an edit without parsing all of it again.

A 10,000-workload mesh file is 1.3 MB; composing it with PyYAML's C loader takes
about 1.3 s and validating every entry 0.9 s more, so a whole re-read cannot bring
an edit to the agents in 200 ms. `MeshFileReader` keeps the text and node tree of
the last file it composed and the validated value of every entry. When the new
text differs from the old inside one entry of a top-level block list (`- {name:
pod7, ...}` under `workloads:`), only that entry's lines are composed again, at
their own line numbers, and spliced into a copy of the old tree; every other entry
keeps its node, so its validated value is reused. The checks across entries (unique
names and IPs, references, waypoints) still run over the whole mesh, so the result,
and any refusal with its file, line and field, is what a full read gives.

Anything the splice cannot prove equivalent falls back to a full read: an edit
across entries or outside a block list, a change in the entry's line count (the
lines after it would move), anchors, aliases, tags or directives, a line of the
entry at or left of its dash, a composed piece that is not exactly one entry.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import yaml

from nodeagent.controlplane.mesh import EntryMemo, MeshConfig, MeshError, mesh_from_tree
from nodeagent.model.yamlfile import YamlSyntaxError, compose_yaml, decode_yaml_bytes

# A piece holding any of these could refer to (or be referred to by) another part of
# the file, or be typed by a directive: only a full read gets it right.
_CONTEXT_CHARS = ("&", "*", "!")


@dataclass(frozen=True, slots=True)
class Splice:
    """One entry of a top-level list recomposed: where, and its new node."""

    key_index: int
    """Index of the top-level key (in the root mapping) whose list holds the entry."""
    entry_index: int
    node: yaml.Node


def common_ends(old: str, new: str) -> tuple[int, int]:
    """Lengths of the longest common prefix and suffix, not overlapping in either text.

    Halving on slices compares in C (memcmp), so 1.3 MB costs a few milliseconds."""
    limit = min(len(old), len(new))
    lo, hi = 0, limit
    while lo < hi:  # largest p with old[:p] == new[:p]
        mid = (lo + hi + 1) // 2
        if old[:mid] == new[:mid]:
            lo = mid
        else:
            hi = mid - 1
    prefix = lo
    lo, hi = 0, limit - prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if old[len(old) - mid :] == new[len(new) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return prefix, lo


def _line_start(text: str, offset: int) -> int:
    return text.rfind("\n", 0, offset) + 1


def _nth_line_start(text: str, offset: int, lines: int) -> int:
    """The offset of the start of the line `lines` lines before (<0) or after (>0) the
    line holding `offset`."""
    start = _line_start(text, offset)
    for _ in range(-lines):
        start = _line_start(text, start - 1)
    for _ in range(lines):
        nl = text.find("\n", start)
        start = len(text) if nl < 0 else nl + 1
    return start


def _dash_column(piece: str) -> int | None:
    """The column of the `- ` that opens the piece's first line, if it opens with one."""
    first = piece.split("\n", 1)[0]
    body = first.lstrip(" ")
    if body != "-" and not body.startswith("- "):
        return None
    return len(first) - len(body)


def splice_entry(old: str, root: yaml.Node, new: str, source: str) -> Splice | None:
    """The one list entry whose lines hold every difference between `old` (composed into
    `root`) and `new`, composed again from `new`; None when only a full read is sure."""
    if not isinstance(root, yaml.MappingNode) or old == new:
        return None
    if new.startswith("%") or "\n%" in new:
        return None  # a directive (%TAG) could change how any entry reads
    prefix, suffix = common_ends(old, new)
    first_line = old.count("\n", 0, prefix)
    last_line = old.count("\n", 0, max(prefix, len(old) - suffix - 1))
    keys = root.value
    key_lines = [k.start_mark.line for k, _ in keys]
    ki = bisect.bisect_right(key_lines, first_line) - 1
    if ki < 0:
        return None
    seq = keys[ki][1]
    if not isinstance(seq, yaml.SequenceNode) or seq.flow_style or not seq.value:
        return None
    starts = [e.start_mark.line for e in seq.value]
    ei = bisect.bisect_right(starts, first_line) - 1
    if ei < 0:
        return None
    begin = starts[ei]
    end = starts[ei + 1] if ei + 1 < len(starts) else None
    if end is None and ki + 1 < len(keys):
        end = key_lines[ki + 1]
    if end is not None and last_line >= end:
        return None
    # The entry's lines in both texts: [begin, end) in old; the same lines, moved by the
    # length difference, in new (its line count must not change: see the docstring).
    old_begin = _nth_line_start(old, prefix, begin - first_line)
    old_end = len(old) if end is None else _nth_line_start(old, prefix, end - first_line)
    new_begin = old_begin
    new_end = old_end + len(new) - len(old)
    old_piece, piece = old[old_begin:old_end], new[new_begin:new_end]
    if old_piece.count("\n") != piece.count("\n"):
        return None
    if any(c in old_piece or c in piece for c in _CONTEXT_CHARS):
        return None
    dash = _dash_column(old_piece)
    if dash is None or _dash_column(piece) != dash:
        return None
    for line in piece.split("\n")[1:]:
        body = line.lstrip(" ")
        # Every further line is inside the entry: blank, or right of the dash.
        if body and len(line) - len(body) <= dash:
            return None
    try:
        # Leading newlines put the piece's nodes on their lines in the file.
        composed = compose_yaml("\n" * begin + piece, source)
    except YamlSyntaxError:
        return None
    if (
        not isinstance(composed, yaml.SequenceNode)
        or composed.flow_style
        or len(composed.value) != 1
        or composed.start_mark.column != dash
    ):
        return None
    return Splice(ki, ei, composed.value[0])


def spliced(root: yaml.MappingNode, splice: Splice) -> yaml.MappingNode:
    """A copy of `root` with the entry replaced; the old tree is left as it was."""
    key, seq = root.value[splice.key_index]
    entries = list(seq.value)
    entries[splice.entry_index] = splice.node
    new_seq = yaml.SequenceNode(
        seq.tag, entries, seq.start_mark, seq.end_mark, flow_style=seq.flow_style
    )
    pairs = list(root.value)
    pairs[splice.key_index] = (key, new_seq)
    return yaml.MappingNode(
        root.tag, pairs, root.start_mark, root.end_mark, flow_style=root.flow_style
    )


@dataclass(frozen=True, slots=True)
class ReadStats:
    """How the last read went (for tests and the bench)."""

    spliced: bool
    """Only the edited entry was composed and validated again (none, for the same text)."""


class MeshFileReader:
    """Reads one mesh file again and again, composing and validating only what changed.

    Not thread-safe: one reader per watcher, called from one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._text: str | None = None
        self._root: yaml.Node | None = None
        self._memo: EntryMemo = {}
        self.last = ReadStats(spliced=False)

    def read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as e:
            raise MeshError(f"{self.path}: cannot read: {e.strerror or e}") from None

    def load(self, raw: bytes | None = None) -> MeshConfig:
        """The file (or `raw`, its bytes) validated; MeshError naming file, line and field."""
        source = str(self.path)
        try:
            text = decode_yaml_bytes(self.read_bytes() if raw is None else raw, source)
        except YamlSyntaxError as e:
            raise MeshError(str(e)) from None
        return self.parse(text)

    def parse(self, text: str) -> MeshConfig:
        source = str(self.path)
        splice = None
        same = text == self._text
        if self._text is not None and self._root is not None:
            splice = splice_entry(self._text, self._root, text, source)
        if same:
            root: yaml.Node | None = self._root  # touched, or written back as it was
        elif splice is not None and isinstance(self._root, yaml.MappingNode):
            replaced = self._root.value[splice.key_index][1].value[splice.entry_index]
            self._memo.pop(id(replaced), None)
            root = spliced(self._root, splice)
        else:
            try:
                root = compose_yaml(text, source)
            except YamlSyntaxError as e:
                raise MeshError(str(e)) from None
            self._memo = {}
        # The tree stands for the text whether or not it validates: the next edit is
        # compared with this text.
        self._text, self._root = text, root
        self.last = ReadStats(spliced=splice is not None or same)
        return mesh_from_tree(root, source, self._memo)
