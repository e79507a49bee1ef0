"""WaypointTunnels' count of the tunnels it serves now: the trim after a burst watches it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nodeagent.waypoint.server import WaypointTunnels


class AcceptingRouter:
    def accept(self, accepted: object) -> object:
        return object()  # a dispatcher: anything but a refusal's text


async def test_live_counts_the_tunnels_being_served_until_each_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tunnels = WaypointTunnels(AcceptingRouter())  # type: ignore[arg-type]
    ends: list[asyncio.Future[None]] = []

    async def serve(accepted: object, dispatcher: object) -> None:
        ends.append(asyncio.get_running_loop().create_future())
        await ends[-1]

    monkeypatch.setattr(tunnels, "_serve_tunnel", serve)
    served: list[Any] = []
    for _ in range(3):
        coro = tunnels(None, None)  # type: ignore[arg-type]
        assert coro is not None
        served.append(asyncio.ensure_future(coro))
    await asyncio.sleep(0)
    assert (tunnels.live, tunnels.tunnels) == (3, 3)
    ends[0].set_result(None)
    ends[1].set_exception(ConnectionResetError("peer went away"))
    outcomes = await asyncio.gather(*served[:2], return_exceptions=True)
    assert isinstance(outcomes[1], ConnectionResetError)
    assert tunnels.live == 1  # a tunnel that failed is no longer live either
    served[2].cancel()
    await asyncio.wait(served[2:])
    assert (tunnels.live, tunnels.tunnels) == (0, 3)
