"""Re-reading a mesh file after an edit without parsing all of it again.

A 10,000-workload mesh file is 1.3 MB; composing it with PyYAML's C loader takes
about 1.3 s and validating every entry 0.9 s more, so a whole re-read cannot bring
an edit to the agents in 200 ms. `MeshFileReader` keeps the text and node tree of
the last file it composed and the validated value of every entry. When the new
text differs from the old only inside entries of one top-level block list (`-
{name: pod7, ...}` under `workloads:`: edited, added or removed), only those
entries' lines are composed again, at their own line numbers, and spliced into a
copy of the old tree; every other entry keeps its node, so its validated value is
reused, and the entries after added or removed lines are moved with them (lazily:
see `MeshFileReader._lag`). The checks across entries (unique names and IPs,
references, waypoints) still run over the whole mesh, so the result, and any
refusal with its file, line and field, is what a full read gives.

Anything the splice cannot prove equivalent falls back to a full read: an edit
outside a block list or across two, anchors, aliases, tags or directives, a line
of the entries at or left of their dash (a comment there too), a composed piece
that is not a list at the same column, a list left empty.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
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
    """Entries of one top-level list composed again: which, and their new nodes."""

    key_index: int
    """Index of the top-level key (in the root mapping) whose list holds the entries."""
    first: int
    stop: int
    """Entries [first, stop) of the old list are replaced by `nodes` (as many or not)."""
    nodes: tuple[yaml.Node, ...]
    lines: int
    """How many lines everything after the replaced entries moved down (up if < 0)."""


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


def _entry_lines(piece: str, dash: int) -> bool:
    """Whether every line after the first is inside an entry (blank, or right of the dash)
    or opens the next one (`- ` at the dash): then composing the piece alone reads its
    entries as the file does."""
    for line in piece.split("\n")[1:]:
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        if body and indent < dash:
            return False
        if body and indent == dash and body != "-" and not body.startswith("- "):
            return False
    return True


Lag = dict[int, tuple[yaml.Node, int]]
"""Entries whose marks are behind by so many lines, by id (see MeshFileReader)."""


def splice_entries(
    old: str, root: yaml.Node, new: str, source: str, lag: Lag | None = None
) -> Splice | None:
    """The entries of one top-level block list whose lines hold every difference between
    `old` (composed into `root`) and `new`, composed again from `new` (an entry edited,
    added or removed); None when only a full read is sure."""
    if not isinstance(root, yaml.MappingNode) or old == new:
        return None
    if new.startswith("%") or "\n%" in new:
        return None  # a directive (%TAG) could change how any entry reads
    prefix, suffix = common_ends(old, new)
    # A change that starts a line (an entry appended before the next key, typically)
    # is taken with the line before it, so it lands in the entry it follows.
    start = prefix - 1 if prefix > 0 and old[prefix - 1] == "\n" else prefix
    first_line = old.count("\n", 0, start)
    last_line = old.count("\n", 0, max(start, len(old) - suffix - 1))
    keys = root.value
    key_lines = [k.start_mark.line for k, _ in keys]
    ki = bisect.bisect_right(key_lines, first_line) - 1
    if ki < 0:
        return None
    seq = keys[ki][1]
    if not isinstance(seq, yaml.SequenceNode) or seq.flow_style or not seq.value:
        return None
    lag = lag or {}
    starts = [e.start_mark.line + lag.get(id(e), (e, 0))[1] for e in seq.value]
    first = bisect.bisect_right(starts, first_line) - 1
    stop = bisect.bisect_right(starts, last_line)
    if first < 0:
        return None
    begin = starts[first]
    end = starts[stop] if stop < len(starts) else None
    if end is None and ki + 1 < len(keys):
        end = key_lines[ki + 1]
    if end is not None and last_line >= end:
        return None
    # The entries' lines: [begin, end) in old; in new, from the same offset to the same
    # end, moved by the difference in length.
    old_begin = _nth_line_start(old, start, begin - first_line)
    old_end = len(old) if end is None else _nth_line_start(old, start, end - first_line)
    chars = len(new) - len(old)
    old_piece, piece = old[old_begin:old_end], new[old_begin : old_end + chars]
    if any(c in old_piece or c in piece for c in _CONTEXT_CHARS):
        return None
    dash = _dash_column(old_piece)
    if dash is None or not _entry_lines(old_piece, dash):
        return None
    nodes: tuple[yaml.Node, ...] = ()
    if piece.strip():
        if _dash_column(piece) != dash or not _entry_lines(piece, dash):
            return None
        try:
            # Leading newlines put the piece's nodes on their lines in the file.
            composed = compose_yaml("\n" * begin + piece, source)
        except YamlSyntaxError:
            return None
        if (
            not isinstance(composed, yaml.SequenceNode)
            or composed.flow_style
            or composed.start_mark.column != dash
        ):
            return None
        nodes = tuple(composed.value)
    elif stop - first == len(seq.value):
        return None  # the list left empty reads as null: a full read says what that means
    lines = piece.count("\n") - old_piece.count("\n")
    return Splice(ki, first, stop, nodes, lines)


def shift(nodes: Iterable[yaml.Node], lines: int) -> None:
    """Move `nodes`, and everything under them, `lines` lines down (the C loader's marks
    are read-only: each node gets new ones)."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        for attr in ("start_mark", "end_mark"):
            setattr(node, attr, _moved_mark(getattr(node, attr), lines))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.append(k)
                stack.append(v)


def spliced(root: yaml.MappingNode, splice: Splice) -> tuple[yaml.MappingNode, list[yaml.Node]]:
    """A new root with the entries replaced, and the list entries after them, which moved
    `splice.lines` lines but whose marks were left as they were (the caller's lag).

    The top-level keys after them, their lists' own nodes and any other value are moved
    here, in place: the tree is shared with the old root, not to be used again."""
    pairs = list(root.value)
    key, seq = pairs[splice.key_index]
    after = list(seq.value[splice.stop :])
    entries = [*seq.value[: splice.first], *splice.nodes, *after]
    moved: list[yaml.Node] = []
    if splice.lines:
        moved = after
        for later_key, value in pairs[splice.key_index + 1 :]:
            shift([later_key], splice.lines)
            if isinstance(value, yaml.SequenceNode):
                moved += value.value
                value.start_mark = _moved_mark(value.start_mark, splice.lines)
                value.end_mark = _moved_mark(value.end_mark, splice.lines)
            else:
                shift([value], splice.lines)
    new_seq = yaml.SequenceNode(
        seq.tag, entries, seq.start_mark, seq.end_mark, flow_style=seq.flow_style
    )
    pairs[splice.key_index] = (key, new_seq)
    new_root = yaml.MappingNode(
        root.tag, pairs, root.start_mark, root.end_mark, flow_style=root.flow_style
    )
    return new_root, moved


def _moved_mark(m: yaml.Mark, lines: int) -> yaml.Mark:
    return yaml.Mark(m.name, m.index, m.line + lines, m.column, None, None)  # type: ignore[arg-type]


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
        self._lag: Lag = {}
        """List entries moved by added or removed lines whose marks are not moved yet:
        moving every node after an edit near the top costs more than the rest of the
        read. Their lines are right where they are needed: a later splice adds the lag,
        a value that records its position is read again, and an error is found again
        once every lagging entry is moved (see _validate)."""
        self.last = ReadStats(spliced=False)
        self.incremental = True
        """False reads every edit in full (the bench's figure before this reader)."""

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
        if self.incremental and self._text is not None and self._root is not None:
            splice = splice_entries(self._text, self._root, text, source, self._lag)
        if same and self.incremental:
            root: yaml.Node | None = self._root  # touched, or written back as it was
        elif splice is not None and isinstance(self._root, yaml.MappingNode):
            entries = self._root.value[splice.key_index][1].value
            for replaced in entries[splice.first : splice.stop]:
                self._memo.pop(id(replaced), None)
                self._lag.pop(id(replaced), None)
            root, moved = spliced(self._root, splice)
            for node in moved:
                lag = self._lag.get(id(node), (node, 0))[1] + splice.lines
                hit = self._memo.get(id(node))
                if hit is None or hasattr(hit[1], "where"):
                    # To be read (again), perhaps recording its position (a node's
                    # `where`): move it now.
                    self._memo.pop(id(node), None)
                    self._lag.pop(id(node), None)
                    shift([node], lag)
                else:
                    self._lag[id(node)] = (node, lag)
        else:
            try:
                root = compose_yaml(text, source)
            except YamlSyntaxError as e:
                raise MeshError(str(e)) from None
            self._memo = {}
            self._lag = {}
        # The tree stands for the text whether or not it validates: the next edit is
        # compared with this text.
        self._text, self._root = text, root
        self.last = ReadStats(spliced=splice is not None or (same and self.incremental))
        return self._validate(root, source)

    def _validate(self, root: yaml.Node | None, source: str) -> MeshConfig:
        try:
            return mesh_from_tree(root, source, self._memo)
        except MeshError:
            if not self._lag:
                raise
        # The error may be placed by a lagging mark: move them all, and find it again.
        for node, lines in self._lag.values():
            shift([node], lines)
        self._lag = {}
        return mesh_from_tree(root, source, self._memo)
