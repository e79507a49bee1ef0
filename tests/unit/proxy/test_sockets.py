"""Holding a relay: the task that holds it ends with it, and a holder cancelled meanwhile (a
drain that ran out) has both sides reset as its connection is removed; real loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from nodeagent.proxy.connections import OUTBOUND, TCP, ConnectionRegistry
from nodeagent.proxy.relay import Relay, RelayStats
from nodeagent.proxy.sockets import hold
from tests.unit.proxy.test_relay import relay_to, server


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def echoed_once() -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, Relay]]:
    """A client connection relayed to an echo server, one ping already echoed."""
    async with server(echo) as up, relay_to(up) as (addr, relays):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        try:
            yield reader, writer, relays[0]
        finally:
            writer.close()


async def test_a_cancelled_holder_resets_both_sides_as_its_connection_is_removed() -> None:
    registry = ConnectionRegistry()
    async with echoed_once() as (reader, _writer, relay):

        async def handler() -> None:  # a connection's task, holding its relay
            live = registry.register(
                workload="ns/pod", workload_uid="u", direction=OUTBOUND, protocol=TCP,
                local="a:1", remote="b:2", target="b:2", task=asyncio.current_task(),
            )  # fmt: skip
            live.relay = relay
            try:
                await hold(relay)
            finally:
                registry.remove(live)

        holder = asyncio.create_task(handler())
        await asyncio.sleep(0)
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        # The client sees a reset (or at least the end), never a relay left running.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert relay.a.closed and relay.b.closed
        assert len(registry) == 0


async def test_a_holder_returns_the_relays_figures_when_it_ends() -> None:
    async with echoed_once() as (_reader, writer, relay):
        writer.write_eof()
        assert await asyncio.wait_for(hold(relay), 5) == RelayStats(4, 4, "")
