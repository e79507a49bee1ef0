"""The xDS stream survives the agent's keepalive PINGs against the shipped control plane.

The real settings are PINGs every 30 s against a server that accepts one every 15 s; the
trouble they fix showed after minutes. Here every interval is divided by 30 (agent 1 s,
server 0.5 s), so the same ratios play out in seconds. The control case keeps the agent's
scaled PINGs but gives the server gRPC's own defaults, as before the fix: it answers
GOAWAY too_many_pings, so the PINGs under test are really sent and really policed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from nodeagent.admin.metrics import AgentMetrics
from nodeagent.config import Config, build_config
from nodeagent.controlplane.server import ControlPlaneServer, ServerKeepalive
from nodeagent.xds.client import ExponentialBackoff, XdsClient, keepalive_options

MESH = """\
nodes: [{name: node1, token: tok-1}]
workloads:
- {name: a, namespace: ns1, node: node1, ip: 10.0.0.1}
"""
SCALE = 30.0  # seconds of the real settings per second of this test
AGENT_PING = Config().xds_keepalive_time / SCALE  # 1 s
SCALED_SERVER = ServerKeepalive(
    time=ServerKeepalive().time / SCALE,
    timeout=1.0,  # the ACK wait is not under test; loopback on a busy machine
    min_ping_interval=ServerKeepalive().min_ping_interval / SCALE,  # 0.5 s
)
RUN_SECONDS = 15.0  # 15 agent PINGs; the old server refused the third


class NullSink:
    def apply_delta(self, type_url: str, upserts: object, removals: object) -> dict[str, str]:
        return {}


@contextlib.asynccontextmanager
async def agent_on(
    tmp_path: Path, keepalive: ServerKeepalive | None
) -> AsyncIterator[tuple[ControlPlaneServer, XdsClient]]:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    async with ControlPlaneServer(mesh, "127.0.0.1:0", keepalive=keepalive) as server:
        cfg = Config(
            xds_address=f"http://127.0.0.1:{server.port}",
            auth_token_path="",
            xds_keepalive_time=AGENT_PING,
            xds_keepalive_timeout=1.0,
        )
        backoff = ExponentialBackoff(initial=0.05, cap=0.2)
        async with XdsClient(cfg, NullSink(), backoff=backoff) as client:
            await asyncio.wait_for(client.wait_ready(), 10)
            yield server, client


def terminations_metric(client: XdsClient) -> dict[str, float]:
    """istio_xds_connection_terminations_total by reason, as a scrape shows it."""
    metrics = AgentMetrics()
    stats = client.stats
    metrics.sync_xds(
        connected=stats.connected,
        pushes_by_type=stats.by_type,
        nacks_by_type=stats.nacks_by_type,
        terminations_by_reason=stats.terminations,
    )
    text = metrics.exposition().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "istio_xds_connection_terminations_total"
    }


async def test_agent_pings_do_not_disconnect_it_from_the_shipped_control_plane(
    tmp_path: Path,
) -> None:
    async with agent_on(tmp_path, SCALED_SERVER) as (server, client):
        await asyncio.sleep(RUN_SECONDS)
        assert client.stats.connected
        assert client.stats.connects == 1
        assert len(server.servicer.streams) == 1  # the server never saw a second stream
        reasons = terminations_metric(client)
        assert set(reasons) == {"ConnectionError", "Error", "Reconnect", "Complete"}
        assert sum(reasons.values()) == 0


async def test_control_grpc_default_server_policy_sends_goaway_too_many_pings(
    tmp_path: Path,
) -> None:
    async with agent_on(tmp_path, None) as (_server, client):
        async with asyncio.timeout(RUN_SECONDS):
            while not client.stats.terminations:  # noqa: ASYNC110 (the client counts them)
                await asyncio.sleep(0.1)
        assert "too_many_pings" in client.stats.last_error.lower().replace(" ", "_")
        assert terminations_metric(client)["Error"] >= 1


def test_agent_keepalive_is_one_istiod_and_the_shipped_server_accept() -> None:
    cfg = build_config()
    # istiod's enforcement MinTime is half its 30 s keepaliveInterval (istio pkg/grpc).
    istiod_min_time = 30.0 / 2
    assert cfg.xds_keepalive_time >= istiod_min_time
    assert cfg.xds_keepalive_time >= ServerKeepalive().min_ping_interval
    options = dict(keepalive_options(cfg.xds_keepalive_time, cfg.xds_keepalive_timeout))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 10_000
    server = dict(ServerKeepalive().grpc_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= 30_000
    assert server["grpc.keepalive_permit_without_calls"] == 1
