"""The sandbox's CNI runtime as data: conflists, what each plugin reads, its environment,
chain order and prevResult, DEL in reverse, and plugin errors, against a scripted exec."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodeagent.sandbox import cni
from nodeagent.sandbox.plan import build_plan

POD = cni.Attachment(
    container_id="s-node1-pod2",
    netns="/var/run/netns/s-node1-pod2",
    pod_namespace="demo",
    pod_name="node1-pod2",
    ips=("10.10.1.12",),
)
HOST = "/var/run/netns/s-node1"


def _conflist(*chained: dict[str, Any]) -> dict[str, Any]:
    return cni.build_conflist(
        pod_cidr="10.10.1.0/24",
        gateway="10.10.1.1",
        ipam_dir="/state/cni/node1/ipam",
        chained=chained,
    )


# -- the conflist -----------------------------------------------------------------


def test_conflist_is_ptp_with_host_local_over_the_node_range_then_loopback() -> None:
    assert _conflist() == {
        "cniVersion": "1.0.0",
        "name": "sandbox",
        "plugins": [
            {
                "type": "ptp",
                "capabilities": {"ips": True},
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.10.1.0/24", "gateway": "10.10.1.1"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": "/state/cni/node1/ipam",
                },
            },
            {"type": "loopback"},
        ],
    }


def test_nodeagent_plugin_is_chained_last_with_its_agent_socket() -> None:
    plugins = _conflist(cni.nodeagent_plugin("/state/node1/admin.sock"))["plugins"]
    assert [p["type"] for p in plugins] == ["ptp", "loopback", "nodeagent-cni"]
    assert plugins[-1] == {"type": "nodeagent-cni", "agent_socket": "/state/node1/admin.sock"}


def test_find_nodeagent_cni_wants_an_executable_next_to_python(tmp_path: Path) -> None:
    python = tmp_path / "python"
    assert cni.find_nodeagent_cni(str(python)) is None
    script = tmp_path / "nodeagent-cni"
    script.write_text("#!/bin/sh\n")
    assert cni.find_nodeagent_cni(str(python)) is None  # not executable
    script.chmod(0o755)
    assert cni.find_nodeagent_cni(str(python)) == tmp_path


def test_missing_plugins_names_each_absent_one(tmp_path: Path) -> None:
    assert cni.missing_plugins(tmp_path) == ["ptp", "host-local", "loopback"]
    for name in ("ptp", "loopback"):
        (tmp_path / name).write_text("")
        (tmp_path / name).chmod(0o755)
    assert cni.missing_plugins(tmp_path) == ["host-local"]


# -- what one plugin reads on stdin ---------------------------------------------------

PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.10.1.12/24", "interface": 1}]}


@pytest.mark.parametrize(
    ("index", "prev", "expected_extra"),
    [
        # ptp declared `ips`: it gets the pinned address; first in the chain: no prevResult.
        (0, None, {"runtimeConfig": {"ips": ["10.10.1.12"]}}),
        # loopback declared nothing: no runtimeConfig; it gets the previous result.
        (1, PREV, {"prevResult": PREV}),
        (2, PREV, {"prevResult": PREV}),
    ],
    ids=["ptp-first", "loopback-second", "chained-last"],
)
def test_plugin_config_merges_name_version_capabilities_and_prev_result(
    index: int, prev: dict[str, Any] | None, expected_extra: dict[str, Any]
) -> None:
    conflist = _conflist(cni.nodeagent_plugin("/a.sock"))
    plugin = conflist["plugins"][index]
    config = cni.plugin_config(conflist, plugin, runtime=cni.runtime_config(POD), prev_result=prev)
    assert config == {**plugin, "name": "sandbox", "cniVersion": "1.0.0", **expected_extra}


def test_runtime_config_is_empty_without_pinned_addresses() -> None:
    unpinned = cni.Attachment(container_id="c", netns="/n", pod_namespace="demo", pod_name="p")
    assert cni.runtime_config(unpinned) == {}
    ptp = _conflist()["plugins"][0]
    assert "runtimeConfig" not in cni.plugin_config(_conflist(), ptp, runtime={}, prev_result=None)


# -- the environment ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "cni_path", "inherited", "expected"),
    [
        (
            "ADD",
            ["/usr/lib/cni"],
            {},
            {
                "CNI_COMMAND": "ADD",
                "CNI_CONTAINERID": "s-node1-pod2",
                "CNI_NETNS": "/var/run/netns/s-node1-pod2",
                "CNI_IFNAME": "eth0",
                "CNI_PATH": "/usr/lib/cni",
                "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=node1-pod2;"
                "K8S_POD_INFRA_CONTAINER_ID=s-node1-pod2",
            },
        ),
        (
            "DEL",
            ["/usr/lib/cni", "/venv/bin"],
            # The runtime's own environment passes through, minus stale CNI_* values.
            {"PATH": "/usr/bin", "CNI_COMMAND": "VERSION", "CNI_NETNS": "/elsewhere"},
            {
                "PATH": "/usr/bin",
                "CNI_COMMAND": "DEL",
                "CNI_CONTAINERID": "s-node1-pod2",
                "CNI_NETNS": "/var/run/netns/s-node1-pod2",
                "CNI_IFNAME": "eth0",
                "CNI_PATH": f"/usr/lib/cni{os.pathsep}/venv/bin",
                "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=node1-pod2;"
                "K8S_POD_INFRA_CONTAINER_ID=s-node1-pod2",
            },
        ),
    ],
    ids=["add", "del-with-inherited-env"],
)
def test_plugin_env(
    command: cni.Command, cni_path: list[str], inherited: dict[str, str], expected: dict[str, str]
) -> None:
    assert cni.plugin_env(command, POD, cni_path, inherited) == expected


# -- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (
            cni.PluginOutput(
                returncode=1,
                stdout=b'{"cniVersion":"1.0.0","code":999,"msg":"failed to allocate",'
                b'"details":"range 0 is full"}',
                stderr=b"",
            ),
            "pod demo/node1-pod2: CNI ADD failed in plugin ptp: code 999: failed to allocate "
            "(range 0 is full)",
        ),
        (
            cni.PluginOutput(returncode=1, stdout=b'{"code":7,"msg":"bad config"}', stderr=b""),
            "pod demo/node1-pod2: CNI ADD failed in plugin ptp: code 7: bad config",
        ),
        (
            cni.PluginOutput(returncode=2, stdout=b"", stderr=b"panic: boom\nmore\n"),
            "pod demo/node1-pod2: CNI ADD failed in plugin ptp: exited with status 2: more",
        ),
        (
            cni.PluginOutput(returncode=None, stdout=b"", stderr=b"no answer within 30s (killed)"),
            "pod demo/node1-pod2: CNI ADD failed in plugin ptp: no answer within 30s (killed)",
        ),
    ],
    ids=["code-msg-details", "code-msg", "no-json", "timed-out"],
)
def test_parse_error_keeps_the_plugins_own_words(out: cni.PluginOutput, message: str) -> None:
    assert str(cni.parse_error("ptp", "ADD", POD.target, out)) == message


# -- the chain against a scripted exec ---------------------------------------------


@dataclass
class ScriptedExec:
    """Records each run; answers ADD with the prevResult plus its plugin's name."""

    fail: str | None = None
    calls: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)

    def run(
        self, binary: Path, host_netns: str, env: Mapping[str, str], stdin: bytes, timeout: float
    ) -> cni.PluginOutput:
        config = json.loads(stdin)
        self.calls.append((binary.name, env["CNI_COMMAND"], host_netns, config))
        if binary.name == self.fail:
            error = {"cniVersion": "1.0.0", "code": 11, "msg": "try later", "details": "busy"}
            return cni.PluginOutput(returncode=1, stdout=json.dumps(error).encode(), stderr=b"")
        if env["CNI_COMMAND"] != "ADD":
            return cni.PluginOutput(returncode=0, stdout=b"", stderr=b"")
        prev = config.get("prevResult", {"cniVersion": "1.0.0", "seen": []})
        result = {**prev, "seen": [*prev["seen"], binary.name]}
        return cni.PluginOutput(returncode=0, stdout=json.dumps(result).encode(), stderr=b"")


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    for name in ("ptp", "loopback", "nodeagent-cni"):
        (tmp_path / name).write_text("")
        (tmp_path / name).chmod(0o755)
    return tmp_path


def test_add_runs_the_chain_in_order_each_given_the_previous_result(plugin_dir: Path) -> None:
    fake = ScriptedExec()
    runtime = cni.CniRuntime(fake, [str(plugin_dir)], environ={})
    result = runtime.add(_conflist(cni.nodeagent_plugin("/a.sock")), POD, HOST)
    assert result["seen"] == ["ptp", "loopback", "nodeagent-cni"]
    assert [(name, cmd, host) for name, cmd, host, _ in fake.calls] == [
        ("ptp", "ADD", HOST),
        ("loopback", "ADD", HOST),
        ("nodeagent-cni", "ADD", HOST),
    ]
    assert "prevResult" not in fake.calls[0][3]
    assert fake.calls[1][3]["prevResult"]["seen"] == ["ptp"]
    assert fake.calls[2][3]["prevResult"]["seen"] == ["ptp", "loopback"]


def test_add_stops_at_the_first_failing_plugin_with_its_error(plugin_dir: Path) -> None:
    fake = ScriptedExec(fail="loopback")
    runtime = cni.CniRuntime(fake, [str(plugin_dir)], environ={})
    with pytest.raises(cni.CniError) as caught:
        runtime.add(_conflist(cni.nodeagent_plugin("/a.sock")), POD, HOST)
    assert (caught.value.plugin, caught.value.code, caught.value.msg) == (
        "loopback",
        11,
        "try later",
    )
    assert caught.value.details == "busy"
    assert [name for name, *_ in fake.calls] == ["ptp", "loopback"]


def test_add_names_a_plugin_missing_from_cni_path(tmp_path: Path) -> None:
    runtime = cni.CniRuntime(ScriptedExec(), [str(tmp_path)], environ={})
    with pytest.raises(cni.CniError, match=r"plugin ptp: plugin not found in CNI_PATH"):
        runtime.add(_conflist(), POD, HOST)


def test_del_runs_in_reverse_with_the_add_result_and_keeps_going(plugin_dir: Path) -> None:
    fake = ScriptedExec(fail="loopback")
    runtime = cni.CniRuntime(fake, [str(plugin_dir)], environ={})
    added = {"cniVersion": "1.0.0", "seen": ["ptp", "loopback", "nodeagent-cni"]}
    errors = runtime.delete(_conflist(cni.nodeagent_plugin("/a.sock")), POD, HOST, added)
    assert [name for name, *_ in fake.calls] == ["nodeagent-cni", "loopback", "ptp"]
    assert all(cmd == "DEL" and config["prevResult"] == added for _, cmd, _, config in fake.calls)
    assert [str(e) for e in errors] == [
        "pod demo/node1-pod2: CNI DEL failed in plugin loopback: code 11: try later (busy)"
    ]


def test_results_are_cached_per_container_and_interface(tmp_path: Path) -> None:
    files = cni.NodeFiles(tmp_path / "cni" / "node1")
    files.write_conflist(_conflist())
    assert files.read_conflist() == _conflist()
    assert files.conflist == tmp_path / "cni/node1/net.d/10-sandbox.conflist"
    assert files.load_result(POD) is None
    files.save_result(POD, PREV)
    assert files.result_path(POD).name == "sandbox-s-node1-pod2-eth0.json"
    assert files.load_result(POD) == PREV
    files.forget_result(POD)
    assert files.load_result(POD) is None


# -- the plan in CNI mode -----------------------------------------------------------


def test_cni_plan_leaves_pod_links_to_the_plugins_and_keeps_the_rest() -> None:
    handmade = build_plan("s", 2, 2, waypoint=True)
    plan = build_plan("s", 2, 2, waypoint=True, pod_network="cni")
    assert plan.pod_network == "cni"
    # Same pods, addresses and namespaces: only who wires them differs.
    assert [(p.name, p.ip, p.netns) for p in plan.wired_pods()] == [
        (p.name, p.ip, p.netns) for p in handmade.wired_pods()
    ]
    assert [ns.name for ns in plan.namespaces] == [ns.name for ns in handmade.namespaces]
    node1 = next(ns for ns in plan.namespaces if ns.name == "s-node1")
    assert node1.veths == ()
    assert [i.ifname for i in node1.interfaces] == ["eth0"]
    assert [r.dst for r in node1.routes] == ["10.10.2.0/24"]
    assert node1.sysctls == next(ns for ns in handmade.namespaces if ns.name == "s-node1").sysctls
    for pod in (ns for ns in plan.namespaces if ns.role == "pod"):
        assert (pod.interfaces, pod.routes) == ((), ())
        assert ("ipv4/conf/all/rp_filter", "0") in pod.sysctls
    underlay = plan.namespaces[0]
    assert underlay == handmade.namespaces[0]


def test_without_plugin_drops_only_that_type() -> None:
    full = _conflist(cni.nodeagent_plugin("/a.sock"))
    assert cni.without_plugin(full, "nodeagent-cni") == _conflist()
    assert cni.without_plugin(_conflist(), "nodeagent-cni") == _conflist()
