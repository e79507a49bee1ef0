"""The composition root wires the agent; `nodeagent run` turns settings into a Config."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from nodeagent import app
from nodeagent.cli.errors import CliError
from nodeagent.cli.main import build_parser
from nodeagent.cli.run import load_config
from nodeagent.config import Config, ConfigError
from nodeagent.datapath.capture import plan_from_addresses
from nodeagent.datapath.discovery import MatchResult, match_workloads
from nodeagent.datapath.netns import NetnsHandle
from nodeagent.datapath.plan import CapturePlan
from nodeagent.kube.client import KubeClient, resolve_endpoint
from nodeagent.model.enrollment import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL
from nodeagent.model.workload import Workload
from nodeagent.node.lifecycle import PodState
from nodeagent.proxy.inbound import HboneUnavailable, InboundHboneHandler, InboundPlaintextHandler
from nodeagent.proxy.outbound import OutboundHandler
from nodeagent.state.store import StateBatch

CONFIG = Config(node_name="node1", xds_address="http://127.0.0.1:1")

AMBIENT = {DATAPLANE_MODE_LABEL: DATAPLANE_MODE_AMBIENT}  # the namespace is enrolled


class OneNamespaceScanner:
    def __init__(self, inode: int, ips: set[str]) -> None:
        self.inode, self.ips = inode, ips

    def find(
        self, workloads: Mapping[str, Iterable[str]]
    ) -> tuple[MatchResult, dict[int, NetnsHandle]]:
        result = match_workloads({self.inode: self.ips}, workloads)
        return result, {self.inode: NetnsHandle(path="/fake/pod", inode=self.inode)}


class RecordingCapture:
    def __init__(self) -> None:
        self.installed: dict[int, CapturePlan] = {}

    def apply(self, netns: NetnsHandle, plan: CapturePlan) -> bool:
        changed = self.installed.get(netns.inode) != plan
        self.installed[netns.inode] = plan
        return changed

    def remove(self, netns: NetnsHandle) -> None:
        self.installed.pop(netns.inode, None)

    def read_installed(self, netns: NetnsHandle) -> Any:
        raise NotImplementedError


class LoopbackSockets:
    """An InPodSocketFactory on loopback: each 'pod port' is an ephemeral port."""

    def __init__(self, netns: NetnsHandle) -> None:
        self._netns = netns
        self.bound: dict[int, int] = {}

    @property
    def netns(self) -> NetnsHandle:
        return self._netns

    def listener(self, port: int, *, backlog: int = 1024) -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(backlog)
        sock.setblocking(False)
        self.bound[port] = sock.getsockname()[1]
        return sock

    def upstream(self, family: socket.AddressFamily) -> socket.socket:
        sock = socket.socket(family)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        pass


def pod_workload() -> Workload:
    return Workload(
        uid="u1",
        name="web",
        namespace="default",
        addresses=(ipaddress.ip_address("10.1.0.5"),),
        node="node1",
    )


async def test_built_agent_captures_a_local_pod_and_stops_leaving_capture() -> None:
    capture = RecordingCapture()
    factories: list[LoopbackSockets] = []

    def sockets_for(netns: NetnsHandle) -> LoopbackSockets:
        factories.append(LoopbackSockets(netns))
        return factories[-1]

    agent = await build_with_one_pod_namespace(CONFIG, capture, sockets_for=sockets_for)
    runner = asyncio.create_task(agent.run())
    agent.store.apply(StateBatch(workloads=(pod_workload(),)))
    async with asyncio.timeout(5):
        await agent.node_manager.wait_for_state("u1", PodState.READY)
    assert agent.ready
    assert 7 in capture.installed
    # 15008 without a tunnel: the connection is accepted and closed at once.
    hbone_port = factories[0].bound[15008]
    reader, writer = await asyncio.open_connection("127.0.0.1", hbone_port)
    try:
        data = await reader.read()
    except ConnectionResetError:  # closed with RST: refused, not served
        data = b""
    assert data == b""
    writer.close()
    agent.stop()
    await runner
    assert 7 in capture.installed  # a normal stop leaves capture for the next agent
    assert agent.listeners.open_pods == {}
    hbone = agent.listeners.handlers[15008]
    assert isinstance(hbone, HboneUnavailable) and hbone.refused == 1


async def test_build_wires_xds_and_certificates_without_connecting() -> None:
    agent = await app.build(
        CONFIG, capture=RecordingCapture(), scanner=OneNamespaceScanner(1, set())
    )
    assert agent.xds is not None and agent.certificates is not None
    assert not agent.ready  # no config from the control plane yet
    # With certificates the tunnel serves the in-pod ports; 15008 is the HBONE server.
    handlers = agent.listeners.handlers
    assert isinstance(handlers[15001], OutboundHandler)
    assert isinstance(handlers[15006], InboundPlaintextHandler)
    assert isinstance(handlers[15008], InboundHboneHandler)
    assert agent.connections is not None and agent.pool is not None
    await agent.shutdown()


async def test_build_refuses_missing_node_name_and_unknown_backend() -> None:
    with pytest.raises(ConfigError, match="node_name"):
        await app.build(Config(), xds=False, ca=False)
    with pytest.raises(ConfigError, match=r"redirect_backend.*cgroup2 /nonexistent"):
        await app.build(
            Config(node_name="n", redirect_backend="ebpf", cgroup2_path="/nonexistent/cg"),
            xds=False,
            ca=False,
        )


def _args(*argv: str) -> Any:
    return build_parser().parse_args(["run", *argv])


def test_run_flags_override_environment_and_file(tmp_path: Any) -> None:
    file = tmp_path / "agent.yaml"
    file.write_text("node_name: from-file\nnetns_dir: /file/netns\nlog_level: debug\n")
    config = load_config(
        _args("--config", str(file), "--node-name", "from-flag", "--drain-seconds", "2"),
        env={"NODE_NAME": "from-env", "PROC_ROOT": "/host/proc"},
    )
    assert config.node_name == "from-flag"
    assert config.netns_dir == "/file/netns"
    assert config.proc_root == "/host/proc"
    assert config.log_level == "debug"
    assert config.drain_seconds == 2.0


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        ((), "node_name"),
        (("--node-name", "n", "--log-level", "loud"), "log_level"),
        (("--node-name", "n", "--xds-address", "ftp://x:1"), "xds_address"),
        (("--node-name", "n", "--drain-seconds", "soon"), "drain_seconds"),
    ],
)
def test_run_refuses_bad_settings_in_one_line_naming_the_field(
    argv: tuple[str, ...], field: str
) -> None:
    with pytest.raises(CliError) as err:
        load_config(_args(*argv), env={})
    assert field in str(err.value)
    assert "\n" not in str(err.value)


# -- shutdown: upgrade or uninstall, against the loopback API server (tests/unit/conftest.py) --

REDIRECTION = {"ambient.istio.io/redirection": "enabled"}
DS_PATH = "/apis/apps/v1/namespaces/istio-system/daemonsets/nodeagent"


async def build_with_one_pod_namespace(
    config: Config, capture: RecordingCapture, **build: Any
) -> app.AgentHandles:
    """The real wiring, with namespace 7 holding 10.1.0.5 and no control plane."""
    return await app.build(
        config,
        capture=capture,
        scanner=OneNamespaceScanner(7, {"10.1.0.5"}),
        plan_for=plan_from_addresses,
        xds=False,
        ca=False,
        scan_interval=0.01,
        **build,
    )


async def run_until_annotated(api: Any, **build: Any) -> tuple[app.AgentHandles, Any, Any]:
    """A built agent with a captured, annotated pod; returns (agent, capture, runner)."""
    capture = RecordingCapture()
    cleanup = build.pop("cleanup", False)
    agent = await build_with_one_pod_namespace(
        api.config(node_name="node1", xds_address="http://127.0.0.1:1"),
        capture,
        sockets_for=LoopbackSockets,
        admin=False,
        netns_alive=lambda netns: True,
        **build,
    )
    runner = asyncio.create_task(agent.run(cleanup=cleanup))
    agent.store.apply(StateBatch(workloads=(pod_workload(),)))
    async with asyncio.timeout(5):
        await api.wait_until(lambda: api.annotations_of("default", "web") == REDIRECTION)
    assert 7 in capture.installed
    return agent, capture, runner


@pytest.mark.parametrize(
    ("daemonset", "uninstall"),
    [("present", False), ("deleting", True), ("absent", True), ("forbidden", True), ("500", False)],
)
async def test_sigterm_keeps_or_removes_rules_and_annotations_by_the_daemonset(
    kube_api_server: Any, daemonset: str, uninstall: bool
) -> None:
    async with kube_api_server() as api:
        api.add_namespace("default", AMBIENT)
        api.add_pod("default", "web", node="node1")
        if daemonset in ("present", "deleting"):
            api.add_daemonset("istio-system", "nodeagent", deleting=daemonset == "deleting")
        elif daemonset == "forbidden":
            api.answer("GET", DS_PATH, 403)
        elif daemonset == "500":
            api.answer("GET", DS_PATH, 500)
        agent, capture, runner = await run_until_annotated(api)
        agent.stop()
        await runner
        assert [c.path for c in api.calls("GET") if "daemonsets" in c.path] == [DS_PATH]
        if uninstall:
            assert capture.installed == {}
            assert api.annotations_of("default", "web") == {}
        else:
            assert 7 in capture.installed
            assert api.annotations_of("default", "web") == REDIRECTION


async def test_unreachable_api_server_at_sigterm_keeps_the_rules(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        api.add_namespace("default", AMBIENT)
        api.add_pod("default", "web", node="node1")
        endpoint = resolve_endpoint(api.config(), {})
        assert endpoint is not None
        client = KubeClient(endpoint, timeout=0.2)
        agent, capture, runner = await run_until_annotated(api, kube=client)
        api.answer("GET", DS_PATH, api.HANG)
        agent.stop()
        await runner
        assert 7 in capture.installed
        assert api.annotations_of("default", "web") == REDIRECTION


async def test_forced_cleanup_uninstalls_without_asking(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        api.add_namespace("default", AMBIENT)
        api.add_pod("default", "web", node="node1")
        api.add_daemonset("istio-system", "nodeagent")
        agent, capture, runner = await run_until_annotated(api, cleanup=True)
        agent.stop()
        await runner
        assert capture.installed == {}
        assert api.annotations_of("default", "web") == {}
        assert not [c for c in api.calls() if "daemonsets" in c.path]


async def test_daemonset_name_and_namespace_come_from_the_config(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        config = api.config(node_name="node1", pod_namespace="mesh", daemonset_name="agent")
        agent = await app.build(config, capture=RecordingCapture(), xds=False, ca=False)
        assert agent.kube is not None
        assert await agent.uninstalling() is True  # no such DaemonSet: 404, uninstall
        assert api.calls()[-1].path == "/apis/apps/v1/namespaces/mesh/daemonsets/agent"
        await agent.shutdown()


async def test_outside_a_cluster_there_is_no_api_client() -> None:
    agent = await app.build(CONFIG, capture=RecordingCapture(), xds=False, ca=False, environ={})
    assert agent.kube is None and agent.annotations is None
    assert await agent.uninstalling() is False
    await agent.shutdown()


def test_cleanup_flag_and_its_old_name() -> None:
    assert _args("--cleanup").cleanup is True
    assert _args("--cleanup-on-exit").cleanup is True
    assert _args().cleanup is False


def test_allocator_tuning_is_idempotent() -> None:
    first = app.tune_allocator()
    assert app.tune_allocator() == first
