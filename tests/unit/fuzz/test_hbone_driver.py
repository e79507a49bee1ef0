"""The HBONE fuzz driver's own checks: each one catches the fault it is there for."""

from __future__ import annotations

import pytest

from fuzz.hbone_driver import FEED_PREAMBLE, HboneDriver, Plan, _App, flags
from nodeagent.hbone.connection import DataReceived, StreamEnded, StreamReset
from nodeagent.hbone.frames import (
    PREFACE,
    DataFrame,
    WindowUpdateFrame,
    frame_header,
    serialize,
)


def test_plan_encodes_and_decodes_flags_schedule_and_wire() -> None:
    plan = Plan(flags(config=2, tunnels=3, sinks=True), b"\x01\x02", b"wire")
    assert Plan.decode(plan.encode()) == plan
    assert Plan.decode(b"") == Plan(FEED_PREAMBLE, b"", b"")  # short inputs still run
    assert Plan.decode(b"\x00\x09ab") == Plan(0, b"ab", b"")  # a schedule cut short


def _server() -> HboneDriver:
    driver = HboneDriver(Plan(flags(sinks=False), b"", b"").encode(), client_side=False)
    driver.conn.initiate_connection()
    driver._flush()
    return driver


def _data(size: int) -> list[bytes]:
    """`size` DATA bytes on stream 1, in frames the default max frame size allows."""
    return [
        serialize(DataFrame(stream_id=1, data=b"x" * min(16_384, size - off)))
        for off in range(0, size, 16_384)
    ]


def test_data_beyond_the_peers_connection_window_is_a_crash() -> None:
    driver = _server()
    driver.out.feed(_data(65_535))
    driver._flush()  # exactly the default window: fine
    driver.out.feed(_data(1))
    with pytest.raises(AssertionError, match="connection window allowed 65535"):
        driver._flush()


def test_a_window_update_from_the_peer_allows_more() -> None:
    driver = _server()
    driver.peer.feed(PREFACE + serialize(WindowUpdateFrame(stream_id=0, increment=10)))
    driver.out.feed(_data(65_545))
    driver._flush()


def test_a_malformed_frame_we_write_is_a_crash() -> None:
    driver = _server()
    zero_increment = frame_header(4, 0x8, 0, 1) + bytes(4)
    with pytest.raises(AssertionError, match="we wrote a malformed frame"):
        driver.out.feed([zero_increment])


def test_a_frame_over_the_peers_max_frame_size_is_a_crash() -> None:
    driver = _server()
    with pytest.raises(AssertionError, match="allowed at most 16384"):
        driver.out.feed([serialize(DataFrame(stream_id=1, data=b"x" * 16_385))])


def test_data_after_the_peer_ended_the_stream_is_a_crash() -> None:
    driver = _server()
    driver.apps[1] = _App(ours=False)
    data = DataReceived(stream_id=1, data=memoryview(b"x"), flow_controlled_length=1)
    driver._check_events([data, StreamEnded(stream_id=1)])
    with pytest.raises(AssertionError, match="DataReceived on stream 1 after its end"):
        driver._check_events([data])


def test_a_second_reset_of_one_stream_is_a_crash() -> None:
    driver = _server()
    driver.apps[1] = _App(ours=False)
    driver._check_events([StreamReset(stream_id=1, error_code=8)])
    with pytest.raises(AssertionError, match="stream 1 reset twice"):
        driver._check_events([StreamReset(stream_id=1, error_code=8)])


def test_a_seed_reaches_requests_data_and_the_end_of_a_stream() -> None:
    from fuzz.targets.hbone_server import seeds

    seen: list[str] = []

    class Recording(HboneDriver):
        def _check_events(self, events: list) -> None:  # type: ignore[type-arg]
            seen.extend(type(e).__name__ for e in events)
            super()._check_events(events)

    Recording(seeds()["connect-data-end"], client_side=False).run()
    assert {"RequestReceived", "DataReceived", "StreamEnded"} <= set(seen)
    seen.clear()
    Recording(seeds()["sink-fails"], client_side=False).run()
    assert "DataSinkFailed" in seen  # the direct path's failure, which the fuzzer missed alone
