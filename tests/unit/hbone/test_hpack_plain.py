"""HPACK without the dynamic table, held to the reference codec (python-hpack) both ways."""

from __future__ import annotations

import hpack
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.hbone.hpack_plain import (
    decode_plain,
    encode_block,
    encode_field,
    encode_int,
    header_list_size,
)

CONNECT = [
    (":method", "CONNECT"),
    (":authority", "10.10.2.11:8080"),
    ("forwarded", 'for="10.10.1.11"'),
    ("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"),
    ("baggage", "k8s.namespace.name=demo,service.name=frontend"),
]

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-:", min_size=1, max_size=40)
values = st.text(max_size=300)  # any text, UTF-8 on the wire
fields = st.lists(st.tuples(names, values), max_size=12)


def reference_decode(block: bytes) -> list[tuple[str, str]]:
    return [(n, v) for n, v in hpack.Decoder().decode(block)]


def test_a_connect_request_round_trips_through_the_reference_decoder() -> None:
    block = encode_block(CONNECT)
    assert reference_decode(block) == CONNECT
    decoded = decode_plain(block)
    assert decoded is not None
    assert [(n.decode(), v.decode()) for n, v in decoded] == CONNECT


def test_static_fields_are_one_byte_and_names_come_from_the_static_table() -> None:
    assert encode_block([(":status", "200")]) == b"\x88"  # index 8, §6.1
    assert encode_block([(":method", "CONNECT")])[:1] == b"\x02"  # name index 2, no indexing
    assert encode_block([(":authority", "a:1")]) == b"\x01\x03a:1"


def test_a_table_size_update_leads_the_block() -> None:
    block = encode_block([(":status", "200")], table_size_update=0)
    assert block == b"\x20\x88"
    decoder = hpack.Decoder()
    assert decoder.decode(block) == [(":status", "200")]
    assert decode_plain(block) is None  # an update is the full decoder's to apply


@given(fields)
def test_any_fields_decode_the_same_in_the_reference_decoder_and_here(
    given_fields: list[tuple[str, str]],
) -> None:
    block = encode_block(given_fields)
    assert reference_decode(block) == given_fields
    plain = decode_plain(block)
    assert plain is not None
    assert [(n.decode(), v.decode()) for n, v in plain] == given_fields
    assert header_list_size(plain) == sum(
        len(n.encode()) + len(v.encode()) + 32 for n, v in given_fields
    )


@given(fields)
def test_blocks_that_index_into_the_dynamic_table_are_left_to_the_full_decoder(
    given_fields: list[tuple[str, str]],
) -> None:
    block = hpack.Encoder().encode(given_fields)  # incremental indexing, Huffman
    plain = decode_plain(block)
    if plain is None:
        return
    # Only a block of static table entries is read here, and then it must agree.
    assert [(n.decode(), v.decode()) for n, v in plain] == reference_decode(block)


@given(st.binary(max_size=64))
def test_whatever_is_read_here_the_reference_decoder_reads_alike(block: bytes) -> None:
    plain = decode_plain(block)
    if plain is not None:
        assert hpack.Decoder().decode(block, raw=True) == plain


def test_integers_use_the_prefix_then_seven_bit_groups() -> None:
    assert encode_int(10, 5, 0) == b"\x0a"  # RFC 7541 C.1.1
    assert encode_int(1337, 5, 0) == b"\x1f\x9a\x0a"  # C.1.2
    assert encode_int(42, 8, 0) == b"\x2a"  # C.1.3


def test_fields_new_on_every_connect_take_no_cache_entry() -> None:
    """A fresh traceparent and the client's port per CONNECT would fill the field cache with
    entries used once (and push out the fields that repeat)."""
    encode_block(CONNECT)  # the repeating fields are cached now
    before = encode_field.cache_info().currsize
    for port in range(1000, 1050):
        block = encode_block(
            [
                ("forwarded", f'for="10.10.1.11:{port}"'),
                ("traceparent", f"00-{port:032x}-{port:016x}-00"),
                *CONNECT[:2],
            ]
        )
        assert reference_decode(block)[0] == ("forwarded", f'for="10.10.1.11:{port}"')
    assert encode_field.cache_info().currsize == before
