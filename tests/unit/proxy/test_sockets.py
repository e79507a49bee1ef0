"""Holding a relay: the task that holds it ends with it, and a cancelled holder resets both
sides (a drain that ran out), over real loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from nodeagent.proxy.relay import RelayStats
from nodeagent.proxy.sockets import hold
from tests.unit.proxy.test_relay import relay_to, server


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_a_cancelled_holder_resets_both_sides() -> None:
    async with server(echo) as up, relay_to(up) as (addr, relays):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        async def handler() -> None:  # a connection's task, holding its relay
            await hold(relays[0])

        holder = asyncio.create_task(handler())
        await asyncio.sleep(0)
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        # The client sees a reset (or at least the end), never a relay left running.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert relays[0].a.closed and relays[0].b.closed
        writer.close()


async def test_a_holder_returns_the_relays_figures_when_it_ends() -> None:
    async with server(echo) as up, relay_to(up) as (addr, relays):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        writer.write_eof()
        assert await asyncio.wait_for(hold(relays[0]), 5) == RelayStats(4, 4, "")
        writer.close()
