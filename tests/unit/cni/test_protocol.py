"""The CNI plugin's pure side: network config, environment, spec errors, the agent exchange."""

from __future__ import annotations

import json

import pytest

from nodeagent.cni.hold import hold_text, is_held
from nodeagent.cni.protocol import (
    DEFAULT_AGENT_SOCKET,
    ERR_DECODING,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    AgentReply,
    CniError,
    agent_request,
    chained_result,
    parse_agent_reply,
    parse_cni_args,
    parse_env,
    parse_netconf,
    pod_body,
    pod_ips,
    reply_complete,
    require_check_version,
    version_answer,
)
from nodeagent.datapath.plan import build_family_plan, render_family

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p1"}],
    "ips": [
        {"address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 0},
        {"address": "fd00:22::5/64", "interface": 0},
    ],
}


def conf(**extra: object) -> bytes:
    raw: dict[str, object] = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "nodeagent-cni",
    }
    raw.update(extra)
    return json.dumps(raw).encode()


def env(command: str = "ADD", **extra: str) -> dict[str, str]:
    base = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/p1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u-1",
        "CNI_PATH": "/opt/cni/bin",
    }
    base.update(extra)
    return base


# -- network config ----------------------------------------------------------------------------


def test_netconf_defaults_when_our_keys_are_absent() -> None:
    parsed = parse_netconf(conf(prevResult=PREV))
    assert parsed.cni_version == "1.0.0"
    assert parsed.name == "k8s-pod-network"
    assert parsed.type == "nodeagent-cni"
    assert parsed.prev_result == PREV
    assert parsed.agent_socket == DEFAULT_AGENT_SOCKET
    assert parsed.add_timeout_seconds == 10.0
    assert parsed.log_file is None


def test_netconf_reads_our_keys() -> None:
    parsed = parse_netconf(
        conf(agent_socket="/run/x/cni.sock", add_timeout_seconds=2.5, log_file="/var/log/cni.log")
    )
    assert (parsed.agent_socket, parsed.add_timeout_seconds, parsed.log_file) == (
        "/run/x/cni.sock",
        2.5,
        "/var/log/cni.log",
    )


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"{not json", ERR_DECODING, "not JSON"),
        (b"[1, 2]", ERR_DECODING, "not a JSON object"),
        (json.dumps({"name": "x", "type": "t"}).encode(), ERR_INVALID_CONFIG, "cniVersion"),
        (conf(cniVersion="0.2.0"), ERR_INCOMPATIBLE_VERSION, "0.2.0"),
        (conf(cniVersion="1.1.0"), ERR_INCOMPATIBLE_VERSION, "1.1.0"),
        (conf(type=""), ERR_INVALID_CONFIG, "type"),
        (conf(prevResult=[1]), ERR_INVALID_CONFIG, "prevResult"),
        (conf(agent_socket="relative.sock"), ERR_INVALID_CONFIG, "agent_socket"),
        (conf(add_timeout_seconds=0), ERR_INVALID_CONFIG, "add_timeout_seconds"),
        (conf(add_timeout_seconds="10"), ERR_INVALID_CONFIG, "add_timeout_seconds"),
        (conf(add_timeout_seconds=True), ERR_INVALID_CONFIG, "add_timeout_seconds"),
        (conf(log_file="cni.log"), ERR_INVALID_CONFIG, "log_file"),
    ],
)
def test_bad_netconf_is_a_spec_error(data: bytes, code: int, words: str) -> None:
    with pytest.raises(CniError) as err:
        parse_netconf(data)
    assert err.value.code == code
    assert words in err.value.msg + err.value.details


def test_spec_error_renders_all_four_fields() -> None:
    err = CniError(7, "bad config", "field x")
    assert err.result("0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 7,
        "msg": "bad config",
        "details": "field x",
    }


# -- environment -------------------------------------------------------------------------------


def test_env_reads_every_cni_variable_and_the_pod_from_cni_args() -> None:
    parsed = parse_env(env())
    assert (parsed.command, parsed.container_id, parsed.netns, parsed.ifname, parsed.path) == (
        "ADD",
        "c0ffee",
        "/var/run/netns/p1",
        "eth0",
        "/opt/cni/bin",
    )
    assert (parsed.pod_namespace, parsed.pod_name, parsed.pod_uid) == ("shop", "cart-1", "u-1")


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"CNI_COMMAND": "ADD"}, "CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME"),
        (env(CNI_NETNS=""), "CNI_NETNS"),
        (env("CHECK", CNI_IFNAME=""), "CNI_IFNAME"),
        (env("GC"), "unknown CNI_COMMAND"),
        ({}, "unknown CNI_COMMAND"),
        (env(CNI_ARGS="K8S_POD_NAME"), "KEY=VALUE"),
    ],
)
def test_missing_or_bad_environment_is_error_4(environ: dict[str, str], words: str) -> None:
    with pytest.raises(CniError) as err:
        parse_env(environ)
    assert err.value.code == ERR_INVALID_ENV
    assert words in err.value.msg


def test_del_needs_no_netns_and_version_needs_nothing() -> None:
    assert parse_env(env("DEL", CNI_NETNS="")).netns == ""
    assert parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"


def test_cni_args_skip_empty_pairs() -> None:
    assert parse_cni_args("A=1;;B=") == {"A": "1", "B": ""}


def test_check_is_refused_before_0_4_0() -> None:
    with pytest.raises(CniError) as err:
        require_check_version(parse_netconf(conf(cniVersion="0.3.1")))
    assert err.value.code == ERR_INCOMPATIBLE_VERSION
    require_check_version(parse_netconf(conf(cniVersion="0.4.0")))


# -- results -----------------------------------------------------------------------------------


def test_version_answer_lists_the_supported_versions() -> None:
    assert version_answer() == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }


def test_add_result_is_prev_result_unchanged() -> None:
    assert chained_result(parse_netconf(conf(prevResult=PREV))) == PREV


def test_add_without_prev_result_is_a_config_error() -> None:
    with pytest.raises(CniError) as err:
        chained_result(parse_netconf(conf()))
    assert err.value.code == ERR_INVALID_CONFIG
    assert "chained" in err.value.msg


def test_pod_ips_come_from_prev_result_without_prefixes() -> None:
    assert pod_ips(PREV) == ("10.22.0.5", "fd00:22::5")
    assert pod_ips(None) == ()
    assert pod_ips({"ips": "junk"}) == ()
    assert pod_ips({"ips": [{"gateway": "1.1.1.1"}, "x"]}) == ()


# -- the agent exchange ------------------------------------------------------------------------


def test_add_request_is_one_http_post_with_the_pod_as_json() -> None:
    body = pod_body(parse_env(env()), pod_ips(PREV))
    raw = agent_request("/cmdadd", body)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /cmdadd HTTP/1.1\r\n")
    assert f"Content-Length: {len(payload)}".encode() in head
    assert json.loads(payload) == {
        "netns": "/var/run/netns/p1",
        "container_id": "c0ffee",
        "pod_name": "cart-1",
        "pod_namespace": "shop",
        "pod_uid": "u-1",
        "interface": "eth0",
        "ips": ["10.22.0.5", "fd00:22::5"],
    }
    assert "ips" not in pod_body(parse_env(env("DEL")))


def test_agent_reply_is_parsed_once_complete() -> None:
    payload = b'{"state": "captured", "message": "ok"}'
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    assert not reply_complete(raw[:20])
    assert not reply_complete(raw[:-1])
    assert reply_complete(raw)
    reply = parse_agent_reply(raw)
    assert reply == AgentReply(200, "captured", "ok")
    assert reply.ok
    assert not AgentReply(503, "error", "").ok
    assert not AgentReply(200, "pending", "").ok


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"HTTP/1.1 200 OK\r\n", "headers"),
        (b"SMTP 200\r\n\r\n", "status line"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "status code"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nxyz", "not JSON"),
    ],
)
def test_garbage_from_the_agent_is_a_value_error(raw: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_agent_reply(raw)


# -- fail closed -------------------------------------------------------------------------------


def test_hold_is_the_agents_own_plan_in_a_fresh_namespace() -> None:
    text = hold_text(4, "")
    assert text == render_family(build_family_plan(4))
    assert "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff" in text
    assert "REDIRECT --to-ports 15001" in text
    assert "REDIRECT --to-ports 15006" in text
    assert is_held(text)


def test_hold_leaves_a_held_namespace_alone_and_replaces_stale_jumps() -> None:
    assert hold_text(4, render_family(build_family_plan(4))) is None
    stale = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j ISTIO_PRERT\n"
        ":ISTIO_PRERT - [0:0]\nCOMMIT\n"
    )
    text = hold_text(4, stale)
    assert text is not None
    assert "-D PREROUTING -j ISTIO_PRERT" in text.splitlines()
    assert not is_held(stale)
    assert hold_text(6, "") == render_family(build_family_plan(6))
