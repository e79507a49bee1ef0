"""Reading a user's YAML text with a one-line error: `SOURCE:LINE:COL: YAML syntax error: ...`.

Every place that parses YAML someone wrote (the mesh file, an apply file, the
agent's settings file) goes through `compose_yaml` or `load_yaml`, so a broken
file is refused in the same one line everywhere, never as a PyYAML traceback
or its multi-line message.
"""

from __future__ import annotations

from typing import Any

import yaml

# The C loader composes ~5x faster and keeps line marks; the pure one is the fallback.
LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlSyntaxError(ValueError):
    """The text is not YAML; the message is `SOURCE:LINE:COL: YAML syntax error: problem`."""


def yaml_error_line(exc: yaml.YAMLError, source: str, text: str | None = None) -> str:
    """One line naming where `exc` happened in `source` and what is wrong.

    `text` lets a reader error (a byte YAML forbids), which only knows its
    offset, be placed on its line and column.
    """
    if isinstance(exc, yaml.MarkedYAMLError):
        where = _at(source, exc.problem_mark or exc.context_mark)
        problem = exc.problem or exc.context or "invalid YAML"
        ctx, at = exc.context_mark, exc.problem_mark
        moved = ctx is not None and (at is None or (ctx.line, ctx.column) != (at.line, at.column))
        if exc.context and exc.problem and moved and ctx is not None:
            problem += f" ({exc.context} started at {ctx.line + 1}:{ctx.column + 1})"
        return f"{where}: YAML syntax error: {problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        where = source
        if text is not None and 0 <= exc.position <= len(text):
            line = text.count("\n", 0, exc.position)
            column = exc.position - (text.rfind("\n", 0, exc.position) + 1)
            where = f"{source}:{line + 1}:{column + 1}"
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "?")
        return f"{where}: YAML syntax error: character #x{char:04x} is not allowed ({exc.reason})"
    first = str(exc).strip().splitlines()
    return f"{source}: YAML syntax error: {first[0] if first else type(exc).__name__}"


def _at(source: str, mark: yaml.Mark | None) -> str:
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source


def decode_yaml_bytes(raw: bytes, source: str) -> str:
    """A YAML file's bytes as text: UTF-8, whatever the locale; YamlSyntaxError naming the line
    and column of the first byte that is not (a file's bytes are anyone's)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[start : e.start].decode("utf-8")) + 1  # valid up to the bad byte
        raise YamlSyntaxError(
            f"{source}:{line}:{column}: not UTF-8: byte 0x{raw[e.start]:02x} ({e.reason})"
        ) from None


def compose_yaml(text: str, source: str) -> yaml.Node | None:
    """The node tree of `text` (None for an empty document); YamlSyntaxError if broken."""
    try:
        return yaml.compose(text, Loader=LOADER)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(yaml_error_line(exc, source, text)) from None


def compose_yaml_documents(text: str, source: str) -> list[yaml.Node | None]:
    """Every document of a multi-document text (`---` between them); YamlSyntaxError if broken."""
    try:
        return list(yaml.compose_all(text, Loader=LOADER))
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(yaml_error_line(exc, source, text)) from None


def construct(node: yaml.Node, source: str) -> Any:
    """A composed node as plain data (safe types only); YamlSyntaxError if it cannot be
    (a mapping key that is itself a mapping, an unknown tag)."""
    try:
        return LOADER("").construct_document(node)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(yaml_error_line(exc, source)) from None


def load_yaml(text: str, source: str) -> Any:
    """`text` as plain data (safe types only); YamlSyntaxError if broken."""
    try:
        return yaml.load(text, Loader=LOADER)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(yaml_error_line(exc, source, text)) from None


def locate_node(node: yaml.Node, path: str) -> yaml.Node:
    """The deepest node of `path` (`spec.tcp[0].route[1].weight`) that exists under `node`,
    so an error about a field, even a missing one, is placed on the nearest line the user
    wrote."""
    here = node
    for part in path.replace("]", "").replace("[", ".").split("."):
        nxt: yaml.Node | None = None
        if isinstance(here, yaml.MappingNode):
            for key, value in here.value:
                if key.value == part:
                    nxt = value
                    break
        elif isinstance(here, yaml.SequenceNode) and part.isdigit() and int(part) < len(here.value):
            nxt = here.value[int(part)]
        if nxt is None:
            return here
        here = nxt
    return here
