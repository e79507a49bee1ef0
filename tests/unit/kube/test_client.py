"""The real KubeClient against a real HTTPS server on loopback (tests/unit/conftest.py)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from nodeagent.config import Config, ConfigError
from nodeagent.kube.api import KubeError, redirection_patch
from nodeagent.kube.client import KubeClient, KubeEndpoint, resolve_endpoint

POD_PATH = "/api/v1/namespaces/demo/pods/web-1"
DS_PATH = "/apis/apps/v1/namespaces/istio-system/daemonsets/nodeagent"


def client_for(api: Any, *, timeout: float = 2.0, **changes: Any) -> KubeClient:
    endpoint = resolve_endpoint(api.config(**changes), {})
    assert endpoint is not None
    return KubeClient(endpoint, timeout=timeout)


async def test_get_pod_sends_the_bearer_token_and_reads_a_chunked_body(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api:
        api.add_pod("demo", "web-1", node="node1")
        got = await client_for(api).get_pod("demo", "web-1")
        assert got.status == 200
        assert got.body["spec"]["nodeName"] == "node1"
        [call] = api.calls()
        assert (call.method, call.path) == ("GET", POD_PATH)
        assert call.headers["authorization"] == "Bearer test-sa-token"
        assert call.headers["accept"] == "application/json"
        assert call.headers["host"] == f"127.0.0.1:{api.port}"


async def test_patch_pod_sends_a_merge_patch(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        api.add_pod("demo", "web-1", node="node1")
        patch = redirection_patch(enabled=True)
        done = await client_for(api).patch_pod("demo", "web-1", patch)
        assert done.status == 200
        [call] = api.calls("PATCH")
        assert call.path == POD_PATH
        assert call.headers["content-type"] == "application/merge-patch+json"
        assert call.body == patch
        assert api.annotations_of("demo", "web-1") == {"ambient.istio.io/redirection": "enabled"}


async def test_get_daemonset_reads_the_apps_group(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        api.add_daemonset("istio-system", "nodeagent", deleting=True)
        got = await client_for(api).get_daemonset("istio-system", "nodeagent")
        assert got.status == 200
        assert got.body["metadata"]["deletionTimestamp"]
        assert api.calls()[0].path == DS_PATH


@pytest.mark.parametrize(("status", "reason"), [(404, "Forced"), (403, "Forced"), (500, "Forced")])
async def test_error_statuses_come_back_as_responses(
    kube_api_server: Any, status: int, reason: str
) -> None:
    async with kube_api_server() as api:
        api.answer("GET", DS_PATH, status)
        got = await client_for(api).get_daemonset("istio-system", "nodeagent")
        assert (got.status, got.body["reason"]) == (status, reason)
        assert got.describe().startswith(f"{status} Forced: forced {status}")


async def test_missing_object_is_a_404_with_the_api_servers_message(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        got = await client_for(api).get_pod("demo", "nope")
        assert got.status == 404
        assert got.message == 'pods "nope" not found'


async def test_a_server_that_never_answers_times_out_naming_the_call(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api:
        api.answer("GET", DS_PATH, api.HANG)
        with pytest.raises(KubeError, match=rf"GET {api.url}{DS_PATH}: no answer within 0.2 s"):
            await client_for(api, timeout=0.2).get_daemonset("istio-system", "nodeagent")


async def test_connection_refused_is_a_kube_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once closed
    token = tmp_path / "token"
    token.write_text("t")
    endpoint = KubeEndpoint(
        scheme="http", host="127.0.0.1", port=port, token_path=str(token), ca_path=""
    )
    with pytest.raises(KubeError, match=rf"GET http://127.0.0.1:{port}/api/v1/.*refused"):
        await KubeClient(endpoint).get_pod("demo", "web-1")


async def test_token_is_read_again_for_every_call(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        api.add_pod("demo", "web-1", node="node1")
        client = client_for(api)
        assert (await client.get_pod("demo", "web-1")).status == 200
        api.token = "rotated"
        api.token_path.write_text("rotated\n")
        assert (await client.get_pod("demo", "web-1")).status == 200
        assert [c.headers["authorization"] for c in api.calls()] == [
            "Bearer test-sa-token",
            "Bearer rotated",
        ]
        api.token = "rotated-again"  # the server moved on; our file did not
        assert (await client.get_pod("demo", "web-1")).status == 401


async def test_unreadable_token_names_the_file(kube_api_server: Any) -> None:
    async with kube_api_server() as api:
        client = client_for(api, kube_token_path="/nonexistent/token")
        with pytest.raises(KubeError, match="cannot read token /nonexistent/token"):
            await client.get_pod("demo", "web-1")
        assert api.calls() == []


async def test_server_certificate_from_another_ca_is_refused(kube_api_server: Any) -> None:
    stranger = kube_api_server("stranger")  # only its CA certificate is used
    async with kube_api_server() as api:
        client = client_for(api, kube_root_ca=str(stranger.cert_path))
        with pytest.raises(KubeError, match="TLS: CERTIFICATE_VERIFY_FAILED"):
            await client.get_pod("demo", "web-1")


def test_in_cluster_endpoint_comes_from_the_service_environment() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    endpoint = resolve_endpoint(Config(), env)
    assert endpoint is not None
    assert endpoint.url == "https://10.96.0.1:443"
    assert endpoint.token_path == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert endpoint.ca_path == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    v6 = resolve_endpoint(Config(), {**env, "KUBERNETES_SERVICE_HOST": "fd00::1"})
    assert v6 is not None and v6.url == "https://[fd00::1]:443"


def test_explicit_address_wins_and_off_turns_it_all_off() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    explicit = resolve_endpoint(Config(kube_api_address="https://api.example:6443"), env)
    assert explicit is not None and (explicit.host, explicit.port) == ("api.example", 6443)
    assert resolve_endpoint(Config(kube_api="off"), env) is None


def test_outside_a_cluster_auto_is_off_and_on_is_refused() -> None:
    assert resolve_endpoint(Config(), {}) is None
    with pytest.raises(ConfigError, match="field 'kube_api': 'on' but no API server"):
        resolve_endpoint(Config(kube_api="on"), {})


def test_address_without_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="kube_api_address"):
        resolve_endpoint(Config(kube_api_address="https://:443"), {})
