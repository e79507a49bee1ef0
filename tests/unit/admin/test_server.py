"""The admin, metrics and readiness servers, in-process on loopback and a Unix socket."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.admin.metrics import AgentMetrics, ConnectionLabels
from nodeagent.admin.providers import AdminProviders
from nodeagent.admin.readiness import Readiness
from nodeagent.admin.server import AdminServers


def _exists(path: str) -> bool:
    return Path(path).exists()


def _mode(path: str) -> int:
    return Path(path).stat().st_mode & 0o777


def _servers(providers: AdminProviders, tmp_path: Path, **kw: Any) -> AdminServers:
    return AdminServers(
        providers=providers,
        metrics=kw.pop("metrics", AgentMetrics()),
        readiness=kw.pop("readiness", Readiness()),
        admin_address="127.0.0.1:0",
        admin_socket=str(tmp_path / "run" / "admin.sock"),
        metrics_address="127.0.0.1:0",
        readiness_address="127.0.0.1:0",
        **kw,
    )


async def test_config_dump_has_ztunnel_sections_over_tcp_and_unix_socket(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        bound = servers.bound
        assert bound is not None and bound.admin is not None and bound.admin_socket
        for where in ({"tcp": bound.admin}, {"unix": bound.admin_socket}):
            status, headers, body = await fetch("GET", "/config_dump", **where)
            assert status == 200
            assert headers["content-type"] == "application/json"
            dump = json.loads(body)
            assert {"workloads", "services", "policies", "certificates", "config"} <= set(dump)
            assert dump["workloads"][0]["name"] == "client-1"
            assert dump["certificates"][0]["state"] == "Available"
            assert dump["config"]["redirectBackend"] == "iptables"
            state = dump["workloadState"]["Kubernetes//Pod/default/client-1"]
            assert state["info"] == {
                "name": "client-1",
                "namespace": "default",
                "serviceAccount": "client",
            }
            assert state["state"] == "Up"
            assert state["captureState"] == "ready"
            assert state["connections"]["outbound"][0] == {
                "src": "10.1.0.5:40000",
                "originalDst": "10.96.0.10:80",
                "actualDst": "10.2.0.5:15008",
                "protocol": "HBONE",
            }
            failed = dump["workloadState"]["Kubernetes//Pod/default/client-2"]
            assert failed["state"] == "Pending"
            assert failed["lastError"] == "iptables-restore: exit 1"
    assert not _exists(bound.admin_socket)


async def test_unix_socket_is_private_to_root(providers: AdminProviders, tmp_path: Path) -> None:
    async with _servers(providers, tmp_path) as servers:
        assert servers.bound is not None and servers.bound.admin_socket
        assert _mode(servers.bound.admin_socket) == 0o600


async def test_connections_and_pods_list_what_providers_hold(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        assert servers.bound is not None and servers.bound.admin
        status, _, body = await fetch("GET", "/connections", tcp=servers.bound.admin)
        assert status == 200
        conns = json.loads(body)
        assert conns[0]["remote_target"] == "10.96.0.10:80"
        assert conns[0]["bytes_recv"] == 2000
        status, _, body = await fetch("GET", "/pods", tcp=servers.bound.admin)
        assert status == 200
        pods = {p["name"]: p for p in json.loads(body)}
        assert pods["client-1"]["listeners"][0] == "10.1.0.5:15001"
        assert pods["client-2"]["capture_state"] == "failed"


async def test_rules_shows_drift_and_rejects_unknown_or_missing_pod(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        addr = servers.bound.admin if servers.bound else None
        status, _, body = await fetch("GET", "/rules?pod=default/client-1", tcp=addr)
        assert status == 200
        rules = json.loads(body)
        assert rules["drift"] is True
        by_status = {(line["status"], line["rule"]) for line in rules["lines"]}
        assert ("missing", "-A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001") in by_status
        assert ("extra", "-A ISTIO_OUTPUT -j DROP") in by_status
        # Counters differ ([0:0] vs [12:3400]) but that is not drift.
        assert ("ok", ":ISTIO_OUTPUT -") in by_status

        status, _, body = await fetch("GET", "/rules?pod=default/nope", tcp=addr)
        assert status == 404
        assert body == b"unknown pod 'default/nope'\n"
        status, _, _ = await fetch("GET", "/rules", tcp=addr)
        assert status == 400


async def test_explain_answers_and_maps_errors_to_statuses(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        addr = servers.bound.admin if servers.bound else None
        status, _, body = await fetch(
            "GET", "/explain?from=default/client-1&to=10.96.0.10:9999", tcp=addr
        )
        assert status == 200
        result = json.loads(body)
        assert result["verdict"] == "deny"
        assert result["policy"] == "default/deny-client"
        status, _, body = await fetch("GET", "/explain?from=x/y&to=10.96.0.10:80", tcp=addr)
        assert status == 404 and b"unknown pod" in body
        status, _, body = await fetch("GET", "/explain?from=default/client-1&to=nope", tcp=addr)
        assert status == 400 and body.startswith(b"bad destination")
        status, _, _ = await fetch("GET", "/explain?from=default/client-1&to=1.2.3.4:0", tcp=addr)
        assert status == 400
        status, _, _ = await fetch("GET", "/explain?to=1.2.3.4:80", tcp=addr)
        assert status == 400


async def test_routes_answers_json_or_501_without_a_source(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        addr = servers.bound.admin if servers.bound else None
        status, _, body = await fetch("GET", "/routes", tcp=addr)
        assert status == 200
        assert json.loads(body)["services"][0]["virtualService"] == "demo/canary"
    bare = dataclasses.replace(providers, routes=None)
    async with _servers(bare, tmp_path) as servers:
        addr = servers.bound.admin if servers.bound else None
        status, _, body = await fetch("GET", "/routes", tcp=addr)
        assert status == 501 and b"traffic management" in body


async def test_logging_is_post_only_lists_sets_and_rejects_bad_levels(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        addr = servers.bound.admin if servers.bound else None
        status, headers, _ = await fetch("GET", "/logging", tcp=addr)
        assert status == 405
        assert headers["allow"] == "POST"
        status, _, body = await fetch("POST", "/logging", tcp=addr)
        assert (status, body) == (200, b"current log level is info\n")
        status, _, body = await fetch("POST", "/logging?level=access=debug,warn", tcp=addr)
        assert (status, body) == (200, b"current log level is warn,access=debug\n")
        status, _, body = await fetch("POST", "/logging?level=loud", tcp=addr)
        assert status == 400 and b"unknown log level 'loud'" in body
        status, _, body = await fetch("POST", "/logging?reset", tcp=addr)
        assert (status, body) == (200, b"current log level is info\n")


async def test_quitquitquit_runs_the_drain_hook_once(
    providers: AdminProviders, tmp_path: Path, fetch: Any, drain: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        addr = servers.bound.admin if servers.bound else None
        status, _, _ = await fetch("GET", "/quitquitquit", tcp=addr)
        assert status == 405
        assert drain.calls == 0
        status, _, body = await fetch("POST", "/quitquitquit", tcp=addr)
        assert (status, body) == (200, b"draining, then exiting\n")
        for _ in range(5):
            await asyncio.sleep(0)
        assert drain.calls == 1
        status, _, body = await fetch("POST", "/quitquitquit", tcp=addr)
        assert body == b"already draining\n"
        assert drain.calls == 1


async def test_drain_hook_may_stop_the_servers_itself(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    stopped = asyncio.Event()
    holder: dict[str, AdminServers] = {}

    async def drain_then_exit() -> None:
        await holder["servers"].stop()
        stopped.set()

    servers = _servers(AdminProviders(drain_then_exit=drain_then_exit), tmp_path)
    holder["servers"] = servers
    bound = await servers.start()
    status, _, _ = await fetch("POST", "/quitquitquit", tcp=bound.admin)
    assert status == 200
    await asyncio.wait_for(stopped.wait(), 5)
    with pytest.raises(OSError):
        await fetch("GET", "/pods", tcp=bound.admin)
    await servers.stop()  # idempotent


async def test_unknown_path_is_404_with_one_line_and_bad_request_is_400(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        assert servers.bound is not None
        status, _, body = await fetch("GET", "/nope", tcp=servers.bound.admin)
        assert status == 404
        assert body == b"no such endpoint: /nope\n"
        status, _, _ = await fetch("GET", "", tcp=servers.bound.admin, raw=b"GARBAGE\r\n\r\n")
        assert status == 400
        status, _, body = await fetch("GET", "/", tcp=servers.bound.admin)
        assert status == 200 and b"/config_dump" in body


async def test_provider_failure_is_a_500_not_a_dead_server(tmp_path: Path, fetch: Any) -> None:
    class Broken:
        def pods(self) -> list[Any]:
            raise RuntimeError("store gone")

    async with _servers(AdminProviders(pods=Broken()), tmp_path) as servers:
        assert servers.bound is not None
        status, _, body = await fetch("GET", "/pods", tcp=servers.bound.admin)
        assert status == 500 and b"store gone" in body
        status, _, _ = await fetch("GET", "/connections", tcp=servers.bound.admin)
        assert status == 200


async def test_readiness_flips_when_every_check_passes(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    readiness = Readiness()
    xds = readiness.flag("xds-synced")
    pods_settled = {"value": False}
    readiness.add("pods-settled", lambda: pods_settled["value"])
    async with _servers(providers, tmp_path, readiness=readiness) as servers:
        addr = servers.bound.readiness if servers.bound else None
        status, _, body = await fetch("GET", "/healthz/ready", tcp=addr)
        assert (status, body) == (503, b"not ready: xds-synced, pods-settled\n")
        xds.mark_ready()
        status, _, body = await fetch("GET", "/healthz/ready", tcp=addr)
        assert (status, body) == (503, b"not ready: pods-settled\n")
        pods_settled["value"] = True
        status, _, body = await fetch("GET", "/healthz/ready", tcp=addr)
        assert (status, body) == (200, b"ready\n")
        # The readiness port serves nothing else.
        status, _, _ = await fetch("GET", "/config_dump", tcp=addr)
        assert status == 404


def test_duplicate_readiness_check_is_refused() -> None:
    readiness = Readiness()
    readiness.flag("xds")
    with pytest.raises(ValueError, match="'xds' is already registered"):
        readiness.flag("xds")


async def test_metrics_scrape_parses_and_byte_counters_match(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    metrics = AgentMetrics()
    labels = ConnectionLabels(
        reporter="source",
        source_workload="client",
        source_workload_namespace="default",
        destination_workload="server",
        connection_security_policy="mutual_tls",
    )
    metrics.traffic.record_open(labels)
    metrics.traffic.record_bytes(labels, sent=1000, received=50)
    metrics.traffic.record_close(labels, sent=234, received=6)
    async with _servers(providers, tmp_path, metrics=metrics) as servers:
        addr = servers.bound.metrics if servers.bound else None
        for path in ("/metrics", "/stats/prometheus"):
            status, headers, body = await fetch("GET", path, tcp=addr)
            assert status == 200
            assert headers["content-type"].startswith("text/plain; version=")
            samples = {
                s.name: s
                for fam in text_string_to_metric_families(body.decode())
                for s in fam.samples
                if s.labels.get("reporter") == "source"
            }
            assert samples["istio_tcp_sent_bytes_total"].value == 1234
            assert samples["istio_tcp_received_bytes_total"].value == 56
            assert samples["istio_tcp_connections_opened_total"].value == 1
            assert samples["istio_tcp_connections_closed_total"].value == 1
            sent = samples["istio_tcp_sent_bytes_total"].labels
            assert sent["destination_workload"] == "server"
            assert sent["source_principal"] == "unknown"
            assert sent["connection_security_policy"] == "mutual_tls"
        status, _, _ = await fetch("POST", "/metrics", tcp=addr)
        assert status == 405


def test_admin_address_must_be_loopback(providers: AdminProviders) -> None:
    with pytest.raises(ValueError, match="must be a loopback address"):
        AdminServers(
            providers=providers,
            metrics=AgentMetrics(),
            readiness=Readiness(),
            admin_address="0.0.0.0:15000",
        )


async def test_port_in_use_fails_start_cleanly_naming_the_server(
    providers: AdminProviders, tmp_path: Path
) -> None:
    async with _servers(providers, tmp_path) as first:
        assert first.bound is not None and first.bound.metrics is not None
        host, port = first.bound.metrics
        second = AdminServers(
            providers=providers,
            metrics=AgentMetrics(),
            readiness=Readiness(),
            admin_address="127.0.0.1:0",
            admin_socket=str(tmp_path / "second.sock"),
            metrics_address=f"{host}:{port}",
            readiness_address="127.0.0.1:0",
        )
        with pytest.raises(OSError, match="metrics server cannot listen"):
            await second.start()
        assert not _exists(str(tmp_path / "second.sock"))


async def test_stop_closes_idle_client_connections_without_leaking(
    providers: AdminProviders, tmp_path: Path
) -> None:
    servers = _servers(providers, tmp_path)
    bound = await servers.start()
    assert bound.admin is not None and bound.admin_socket
    # Clients that connect and send nothing hold a handler each until stop().
    idle = [await asyncio.open_connection(*bound.admin) for _ in range(3)]
    idle.append(await asyncio.open_unix_connection(bound.admin_socket))
    await asyncio.sleep(0)
    await servers.stop()
    for reader, writer in idle:
        # Closed by stop() itself, not by the 10 s request timeout.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()


async def test_head_answers_headers_only(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    async with _servers(providers, tmp_path) as servers:
        assert servers.bound is not None
        status, headers, body = await fetch("HEAD", "/pods", tcp=servers.bound.admin)
        assert status == 200 and body == b""
        assert int(headers["content-length"]) > 0


class _Releaser:
    def __init__(self) -> None:
        self.released: list[str] = []

    def release(self, pod: str) -> str:
        if pod == "default/ready-1":
            raise ValueError(
                "pod 'default/ready-1' is ready, not held: only held pods are released"
            )
        if pod != "default/held-1":
            raise LookupError(f"no pod {pod!r} on node node1")
        self.released.append("uid-held-1")
        return "uid-held-1"


async def test_release_un_meshes_only_a_held_pod_with_clear_statuses(
    providers: AdminProviders, tmp_path: Path, fetch: Any
) -> None:
    releaser = _Releaser()
    with_release = dataclasses.replace(providers, release=releaser)
    async with _servers(with_release, tmp_path) as servers:
        addr = servers.bound.admin if servers.bound else None
        status, _, _ = await fetch("GET", "/release?pod=default/held-1", tcp=addr)
        assert status == 405 and releaser.released == []
        status, _, body = await fetch("POST", "/release", tcp=addr)
        assert status == 400 and b"missing ?pod=" in body
        status, _, body = await fetch("POST", "/release?pod=default/ready-1", tcp=addr)
        assert status == 409 and b"not held" in body
        status, _, body = await fetch("POST", "/release?pod=default/nope", tcp=addr)
        assert status == 404 and b"no pod 'default/nope'" in body
        status, _, body = await fetch("POST", "/release?pod=default/held-1", tcp=addr)
        assert status == 200 and body.startswith(b"released uid-held-1")
        assert releaser.released == ["uid-held-1"]
    async with _servers(providers, tmp_path / "b") as servers:
        addr = servers.bound.admin if servers.bound else None
        status, _, _ = await fetch("POST", "/release?pod=default/held-1", tcp=addr)
        assert status == 501
