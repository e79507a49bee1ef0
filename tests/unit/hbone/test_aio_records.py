"""Output regrouping for TLS records and read-buffer reuse (and sharing) in the asyncio adapter."""

from __future__ import annotations

import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.hbone.aio import (
    HboneConnection,
    SharedReadBuffer,
    coalesce_records,
    shared_read_buffer,
)
from nodeagent.hbone.frames import PingFrame, SettingsFrame, serialize

RECORD = 16384
SIZES = [0, 1, 9, 100, RECORD - 9, RECORD, RECORD + 1, 40_000, 300_000]


def _pieces(sizes: list[int], kinds: list[int]) -> list[bytes | bytearray | memoryview]:
    out: list[bytes | bytearray | memoryview] = []
    for i, (size, kind) in enumerate(zip(sizes, kinds, strict=True)):
        data = bytes((i * 7 + j) % 251 for j in range(min(size, 251))) * (size // 251 + 1)
        data = data[:size]
        out.append((data, bytearray(data), memoryview(data))[kind % 3])
    return out


@given(
    st.lists(st.sampled_from(SIZES), min_size=1, max_size=6).flatmap(
        lambda sizes: st.tuples(
            st.just(sizes), st.lists(st.integers(0, 2), min_size=len(sizes), max_size=len(sizes))
        )
    )
)
def test_coalesced_output_is_the_same_byte_stream_without_small_records(
    case: tuple[list[int], list[int]],
) -> None:
    pieces = _pieces(*case)
    out = coalesce_records(pieces)
    assert b"".join(out) == b"".join(pieces)
    sizes = [memoryview(b).nbytes for b in out]
    # Only the last buffer may be shorter than a full TLS record.
    assert all(size >= RECORD for size in sizes[:-1]), sizes


def test_frame_header_rides_in_the_first_record_of_its_payload() -> None:
    header, payload = b"H" * 9, bytes(range(256)) * 1024  # a DATA frame of 256 KiB
    out = coalesce_records([header, payload])
    assert [memoryview(b).nbytes for b in out] == [RECORD, len(payload) + 9 - RECORD]
    assert bytes(out[0][:9]) == header


@pytest.mark.parametrize("pieces", [[b"a", b"b", b"c"], [b"x" * 10, memoryview(b"y" * 20)]])
def test_small_pieces_are_joined_into_one_write(pieces: list[bytes | memoryview]) -> None:
    assert coalesce_records(list(pieces)) == [b"".join(pieces)]


async def test_reads_through_a_reused_buffer_survive_frames_split_across_reads() -> None:
    """Bytes arrive a few at a time through the read buffer, which is scribbled over after each
    read as the TLS layer would: frames held across reads must still decode intact."""
    conn = HboneConnection(client_side=True)  # no transport: output stays queued
    conn.conn.data_to_send()  # our preface and SETTINGS
    wire = serialize(SettingsFrame(settings=())) + b"".join(
        serialize(PingFrame(data=bytes([i]) * 8)) for i in range(1, 4)
    )
    for start in range(0, len(wire), 5):
        piece = wire[start : start + 5]
        buf = conn.get_buffer(len(piece))
        buf[: len(piece)] = piece
        conn.buffer_updated(len(piece))
        scribble = conn.get_buffer(-1)
        scribble[:] = b"\xff" * len(scribble)  # a reused buffer must be free to overwrite
        conn.buffer_updated(0)
    out = conn.conn.data_to_send_bytes()
    for i in range(1, 4):
        assert serialize(PingFrame(data=bytes([i]) * 8, ack=True)) in out
    conn.close()


async def test_connections_of_one_thread_read_into_one_buffer() -> None:
    """Fifty idle pooled connections used to hold fifty resident 256 KiB buffers."""
    first, second = HboneConnection(client_side=True), HboneConnection(client_side=False)
    buffer = first.get_buffer(-1).obj
    first.buffer_updated(0)
    assert second.get_buffer(-1).obj is buffer
    second.buffer_updated(0)
    first.close()
    second.close()


def test_a_buffer_a_view_survived_in_goes_to_its_holders() -> None:
    buffers = SharedReadBuffer(64)
    view = buffers.view()
    view[:5] = b"hello"
    kept = view[:5]  # what a frame reader keeps of a partial frame
    buffers.give_back(buffers.lend(view), view)
    fresh = buffers.view()
    assert fresh.obj is not kept.obj
    fresh[:5] = b"xxxxx"
    assert bytes(kept) == b"hello"


def test_a_buffer_is_taken_back_once_the_views_that_survived_its_read_are_gone() -> None:
    # uvloop holds a relayed DATA payload (a view) until the end of the loop's iteration, so
    # nearly every read of a bulk transfer leaves a view behind for a moment.
    buffers = SharedReadBuffer(64)
    view = buffers.view()
    buffer = view.obj
    queued = view[:5]  # a payload a transport has not written yet
    buffers.give_back(buffers.lend(view), view)
    while_held = buffers.view()
    other = while_held.obj
    assert other is not buffer  # never read into bytes someone still holds
    buffers.give_back(buffers.lend(while_held), while_held)
    del queued
    second = buffers.view()
    assert second.obj is other
    kept = second[:1]
    buffers.give_back(buffers.lend(second), second)
    # The next read that needs a buffer takes the set-aside, now free one back, not a new one.
    assert buffers.view().obj is buffer
    del kept


def test_of_many_buffers_set_aside_one_is_taken_back_and_the_rest_let_go() -> None:
    buffers = SharedReadBuffer(64)
    held, made = [], []
    for _ in range(20):  # twenty reads each leaving a view behind
        view = buffers.view()
        made.append(view.obj)
        held.append(view[:1])
        buffers.give_back(buffers.lend(view), view)
    held.clear()
    taken_back = buffers.view().obj
    assert any(taken_back is buffer for buffer in made)
    # The pool references that one alone: the others it set aside were dropped, not kept
    # resident. (References to each: `made`, the loop's name, getrefcount's argument.)
    assert [sys.getrefcount(b) > 3 for b in made].count(True) == 1


def test_a_buffer_nobody_kept_is_reused_without_growing() -> None:
    buffers = SharedReadBuffer(64)
    view = buffers.view()
    buffer = view.obj
    buffers.give_back(buffers.lend(view), view)
    again = buffers.view()
    assert again.obj is buffer and len(again) == 64


def test_a_read_started_while_another_is_processed_gets_a_buffer_of_its_own() -> None:
    buffers = SharedReadBuffer(64)
    outer = buffers.view()
    lent = buffers.lend(outer)
    inner = buffers.view()  # an in-memory transport delivering to another connection
    kept = inner.obj
    assert kept is not lent
    buffers.give_back(buffers.lend(inner), inner)
    buffers.give_back(lent, outer)  # the pool keeps one buffer, the one it has
    assert buffers.view().obj is kept


def test_each_thread_has_its_own_shared_buffer() -> None:
    seen: list[SharedReadBuffer] = []
    worker = threading.Thread(target=lambda: seen.append(shared_read_buffer()))
    worker.start()
    worker.join()
    assert seen[0] is not shared_read_buffer()
    assert shared_read_buffer() is shared_read_buffer()
