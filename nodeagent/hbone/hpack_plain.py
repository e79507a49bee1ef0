"""HPACK without the dynamic table (RFC 7541), for the header blocks a tunnel sends per connection.

Why: a CONNECT's fields (authority, forwarded, baggage, a fresh traceparent) were encoded
with Huffman and indexed into the dynamic table, where each new traceparent evicted the
stable fields again; encoding and decoding them was about a seventh of an agent's CPU per
new connection.

Encoding: every field is an indexed static field (§6.1) or a literal without indexing
(§6.2.2, the name by static index where the static table has it), never Huffman. Such a
block leaves both sides' dynamic tables alone, so a field always encodes to the same bytes:
they are cached. `table_size_update` prefixes a dynamic table size update (§6.3), which an
encoder owes its peer after the peer lowers SETTINGS_HEADER_TABLE_SIZE.

Decoding: `decode_plain` reads a block made only of those representations (and literals
never indexed); for anything else (a dynamic index, incremental indexing, a size update,
Huffman) it returns None and the caller decodes the whole block with the full decoder, which
alone keeps the dynamic table: this path never changes it, so falling back is always safe.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from hpack.hpack import encode_integer
from hpack.table import HeaderTable

STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)
_FULL = {entry: i for i, entry in reversed(list(enumerate(STATIC, 1)))}
_NAME = {name: i for i, (name, _) in reversed(list(enumerate(STATIC, 1)))}
_MAX_INT = 1 << 24  # no sane field or index is longer; longer input goes to the full decoder


def encode_int(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """§5.1: `value` in a `prefix_bits` prefix whose other bits are `first_byte`'s (hpack's
    own integer coding; fields are encoded once and cached, so this is off the hot path)."""
    coded = encode_integer(value, prefix_bits)
    coded[0] |= first_byte
    return bytes(coded)


def _literal(raw: bytes) -> bytes:
    return encode_int(len(raw), 7, 0x00) + raw  # H = 0: not Huffman


def _encode_field(name: str, value: str) -> bytes:
    n = name.encode("utf-8", "surrogateescape")
    v = value.encode("utf-8", "surrogateescape")
    full = _FULL.get((n, v))
    if full is not None:
        return encode_int(full, 7, 0x80)
    index = _NAME.get(n)
    if index is not None:
        return encode_int(index, 4, 0x00) + _literal(v)
    return b"\x00" + _literal(n) + _literal(v)


@functools.lru_cache(maxsize=4096)
def encode_field(name: str, value: str) -> bytes:
    """One field's representation: fully indexed if the static table holds it, else a
    literal without indexing. Cached: for fields whose values repeat."""
    return _encode_field(name, value)


# Fields whose value is new on every CONNECT (the client's address and port, a fresh trace
# id): cached, each would take a cache entry (about 0.5 KiB) for nothing and push out the
# fields that do repeat, so they are encoded afresh.
UNCACHED: frozenset[str] = frozenset({"forwarded", "traceparent"})


def encode_block(fields: Sequence[tuple[str, str]], table_size_update: int | None = None) -> bytes:
    """A header block for `fields`, in order."""
    parts = [_encode_field(n, v) if n in UNCACHED else encode_field(n, v) for n, v in fields]
    if table_size_update is not None:
        parts.insert(0, encode_int(table_size_update, 5, 0x20))
    return b"".join(parts)


def _int(block: bytes, at: int, prefix_bits: int) -> tuple[int, int] | None:
    limit = (1 << prefix_bits) - 1
    value = block[at] & limit
    at += 1
    if value < limit:
        return value, at
    shift = 0
    while at < len(block):
        byte = block[at]
        at += 1
        value += (byte & 0x7F) << shift
        if value > _MAX_INT:
            return None
        if not byte & 0x80:
            return value, at
        shift += 7
    return None  # truncated


def _string(block: bytes, at: int) -> tuple[bytes, int] | None:
    if at >= len(block) or block[at] & 0x80:
        return None  # truncated, or Huffman: the full decoder's job
    read = _int(block, at, 7)
    if read is None:
        return None
    length, at = read
    if at + length > len(block):
        return None
    return block[at : at + length], at + length


def decode_plain(block: bytes) -> list[tuple[bytes, bytes]] | None:
    """The fields of a block that uses only static indexes and plain literals without
    indexing; None for any other block (decode it in full)."""
    fields: list[tuple[bytes, bytes]] = []
    at, end = 0, len(block)
    while at < end:
        first = block[at]
        if first & 0x80:  # indexed field
            read = _int(block, at, 7)
            if read is None or not 1 <= read[0] <= len(STATIC):
                return None
            fields.append(STATIC[read[0] - 1])
            at = read[1]
            continue
        if first & 0xE0:  # incremental indexing (01) or a table size update (001)
            return None
        read = _int(block, at, 4)  # literal without indexing (0000) or never indexed (0001)
        if read is None:
            return None
        index, at = read
        if index == 0:
            named = _string(block, at)
            if named is None:
                return None
            name, at = named
        elif index <= len(STATIC):
            name = STATIC[index - 1][0]
        else:
            return None
        valued = _string(block, at)
        if valued is None:
            return None
        value, at = valued
        fields.append((name, value))
    return fields


def header_list_size(fields: Sequence[tuple[bytes, bytes]]) -> int:
    """RFC 7540 §6.5.2's size: each field's name and value plus 32."""
    return sum(len(n) + len(v) + 32 for n, v in fields)
