"""The control plane process: xDS and the CA on one port, token checks, the CLI."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

from nodeagent.cli.main import main
from nodeagent.config import Config
from nodeagent.controlplane.run import ControlPlaneOptions, build_server
from nodeagent.controlplane.server import ControlPlaneServer, freeze_long_lived
from nodeagent.identity import csr
from nodeagent.identity.caclient import CaClient, CaClientError
from nodeagent.model.identity import Identity
from nodeagent.xds.client import XdsClient

MESH = """\
meshConfig: {trustDomain: example.org}
nodes: [{name: node1, token: tok-1}, {name: node2, token: tok-2}]
workloads:
- {name: a, namespace: ns1, node: node1, ip: 10.0.0.1, serviceAccount: alice}
- {name: c, namespace: ns2, node: node2, ip: 10.0.0.3, serviceAccount: carol}
"""


class NullSink:
    def apply_delta(self, type_url: str, upserts: object, removals: object) -> dict[str, str]:
        return {}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def test_ca_is_served_on_the_xds_port_and_authorizes_from_the_mesh(tmp_path: Path) -> None:
    mesh = write(tmp_path, "mesh.yaml", MESH)
    server = build_server(
        ControlPlaneOptions(mesh=mesh, listen="127.0.0.1:0", ca_dir=tmp_path / "ca")
    )
    await server.start()
    client = CaClient.connect(
        f"http://127.0.0.1:{server.port}",
        token_path=str(write(tmp_path, "token", "tok-1")),
        cluster_id="Kubernetes",
        ttl=3600,
    )
    try:
        alice = Identity("example.org", "ns1", "alice")
        cert = await client.fetch(alice)
        assert csr.uri_sans(cert.leaf) == [str(alice)]
        # carol runs only on node2: node1's token may not ask for her.
        with pytest.raises(CaClientError):
            await client.fetch(Identity("example.org", "ns2", "carol"))
    finally:
        await client.close()
        await server.stop(grace=None)
    assert (tmp_path / "ca").is_dir()


async def test_require_token_refuses_streams_with_unknown_tokens(tmp_path: Path) -> None:
    mesh = write(tmp_path, "mesh.yaml", MESH)
    async with ControlPlaneServer(mesh, "127.0.0.1:0", require_token=True) as server:
        cfg = Config(
            xds_address=f"http://127.0.0.1:{server.port}",
            auth_token_path=str(write(tmp_path, "token", "wrong")),
        )
        retries: list[float] = []

        async def sleep(delay: float) -> None:
            retries.append(delay)
            await asyncio.sleep(0.01)

        async with XdsClient(cfg, NullSink(), sleep=sleep) as client:
            async with asyncio.timeout(10):
                while not retries:  # noqa: ASYNC110 (the fake sleep marks a failed attempt)
                    await asyncio.sleep(0.01)
            assert "UNAUTHENTICATED" in client.stats.last_error and not client.ready
        # With the node's token the same server lets the agent in.
        write(tmp_path, "token", "tok-2")
        async with XdsClient(cfg, NullSink()) as client:
            await asyncio.wait_for(client.wait_ready(), 10)
        assert server.servicer.streams[-1].token_node == "node2"


def test_cli_check_prints_a_summary_or_the_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, "good.yaml", MESH)
    assert main(["controlplane", "--mesh", str(good), "--check", "-o", "json"]) == 0
    assert '"workloads": 2' in capsys.readouterr().out
    bad = write(tmp_path, "bad.yaml", MESH.replace("10.0.0.3", "10.0.0.256"))
    assert main(["controlplane", "--mesh", str(bad), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:5:" in err and "workloads[1].ip" in err


def test_tls_options_must_come_together(tmp_path: Path) -> None:
    mesh = write(tmp_path, "mesh.yaml", MESH)
    with pytest.raises(ValueError, match="go together"):
        build_server(ControlPlaneOptions(mesh=mesh, tls_cert=mesh))


async def test_extra_servicer_cannot_be_added_after_start(tmp_path: Path) -> None:
    mesh = write(tmp_path, "mesh.yaml", MESH)
    async with ControlPlaneServer(mesh, "127.0.0.1:0") as server:
        with pytest.raises(RuntimeError):
            server.add_servicer(lambda s: None)
        assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"


def test_a_cycle_frozen_by_one_full_read_is_collected_by_the_next() -> None:
    class Node:
        peer: object = None

    try:
        a, b = Node(), Node()
        a.peer, b.peer = b, a  # a cycle: only the cyclic collector frees it
        gone = weakref.ref(a)
        freeze_long_lived()  # the first full read freezes it, alive
        del a, b
        freeze_long_lived()  # the next full read: unreachable now
        assert gone() is None
    finally:
        gc.unfreeze()
