"""The composition root's admin wiring: a built agent answers on its admin socket from its
real components, serves metrics, and exits on /quitquitquit."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nodeagent import app
from nodeagent.admin.client import AdminClient
from nodeagent.config import Config
from nodeagent.datapath.capture import plan_from_addresses
from nodeagent.datapath.discovery import MatchResult, match_workloads
from nodeagent.datapath.netns import NetnsHandle
from nodeagent.datapath.plan import CapturePlan
from nodeagent.model.workload import Workload
from nodeagent.state.store import StateBatch
from tests.builders import workload as build_workload


class NoNamespaces:
    def find(
        self, workloads: Mapping[str, Iterable[str]]
    ) -> tuple[MatchResult, dict[int, NetnsHandle]]:
        return match_workloads({}, workloads), {}


class NoCapture:
    def apply(self, netns: NetnsHandle, plan: CapturePlan) -> bool:
        return True

    def remove(self, netns: NetnsHandle) -> None:
        pass

    def read_installed(self, netns: NetnsHandle) -> Any:
        raise NotImplementedError


def workload(name: str, ip: str, node: str) -> Workload:
    return build_workload(
        name, ip, uid=f"uid-{name}", namespace="demo", hbone=True, node=node, service_account=name
    )


async def test_admin_socket_serves_the_agents_state_and_quitquitquit_stops_it(
    tmp_path: Path,
) -> None:
    sock = str(tmp_path / "admin.sock")
    config = Config(
        node_name="node1",
        admin_address="",
        admin_socket=sock,
        metrics_address="127.0.0.1:0",
        readiness_address="",
    )
    agent = await app.build(
        config,
        capture=NoCapture(),
        scanner=NoNamespaces(),
        sockets_for=lambda netns: None,  # type: ignore[arg-type,return-value]
        plan_for=plan_from_addresses,
        xds=False,
        ca=False,
        scan_interval=0.01,
    )
    agent.store.apply(
        StateBatch(workloads=(workload("a", "10.1.0.5", "node1"), workload("b", "10.2.0.5", "n2")))
    )
    runner = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(5):
            while agent.admin is None or agent.admin.bound is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        client = AdminClient(sock)
        dump = await asyncio.to_thread(client.config_dump)
        assert {w["name"] for w in dump["workloads"]} == {"a", "b"}
        assert dump["config"]["node_name"] == "node1"
        explained = await asyncio.to_thread(client.explain, "a", "10.2.0.5:80")
        assert explained["verdict"] == "allow"
        assert explained["destination"]["workload"] == "demo/b"
        (pod,) = await asyncio.to_thread(client.pods)
        assert (pod["name"], pod["capture_state"]) == ("a", "pending")  # no namespace found

        url = agent.admin.bound.metrics_url + "/metrics"
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
        assert 'nodeagent_pods{state="pending"} 1.0' in text

        assert "draining" in await asyncio.to_thread(client.request, "POST", "/quitquitquit")
        async with asyncio.timeout(10):
            await runner
    finally:
        agent.stop()
        await runner
