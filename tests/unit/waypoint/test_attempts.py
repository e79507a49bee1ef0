"""RequestClock: timeouts that start when the downstream request has ended (Envoy's router
starts the route timeout and a try's per-try timeout there), on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.waypoint.attempts import RequestClock


async def test_a_timeout_waits_for_the_request_to_end() -> None:
    clock = RequestClock()
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with clock.after_request(0.05) as timer:
            await asyncio.sleep(0.15)  # a slow upload: three times the timeout, not counted
            assert timer.when() is None
            clock.request_ended()
            ended = loop.time()
            when = timer.when()
            assert when is not None and ended <= when + 1e-6 <= ended + 0.05 + 2e-6
            await asyncio.sleep(5)


async def test_it_fires_after_the_request_ended_and_is_a_timeout_error() -> None:
    clock = RequestClock()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        async with clock.after_request(0.05):
            await asyncio.sleep(0.1)
            clock.request_ended()
            await asyncio.sleep(5)
    assert 0.15 - 0.01 <= loop.time() - start < 2


async def test_entered_after_the_end_it_starts_at_once() -> None:
    clock = RequestClock()
    clock.request_ended()
    loop = asyncio.get_running_loop()
    async with clock.after_request(0.05) as timer:
        when = timer.when()
        assert when is not None and when <= loop.time() + 0.05


async def test_none_never_fires_and_a_left_timeout_is_not_started() -> None:
    clock = RequestClock()
    async with clock.after_request(None) as timer:
        clock.request_ended()
        await asyncio.sleep(0.02)
        assert timer.when() is None
    clock = RequestClock()
    async with clock.after_request(0.01) as left:
        pass
    clock.request_ended()  # the exited timeout is not rescheduled (that would raise)
    assert left.when() is None


async def test_a_try_starts_at_its_connection_when_the_request_ended_first() -> None:
    clock = RequestClock()
    clock.request_ended()
    loop = asyncio.get_running_loop()
    async with clock.after_request(0.05, connecting=True) as timer:
        await asyncio.sleep(0.1)  # connecting: Envoy's connect timeout, not the try's
        assert timer.when() is None
        timer.connected()
        when = timer.when()
        assert when is not None and loop.time() - 0.01 <= when - 0.05 <= loop.time()


async def test_a_connected_try_starts_at_the_request_end() -> None:
    clock = RequestClock()
    async with clock.after_request(0.05, connecting=True) as timer:
        timer.connected()
        await asyncio.sleep(0.1)  # the upload
        assert timer.when() is None
        clock.request_ended()
        assert timer.when() is not None
