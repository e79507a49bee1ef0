"""Refused reloads: the real control plane keeps serving its last good mesh.

A real agent-side xDS client (feeding the real StateStore) is connected as
node1, so the server knows node1 has an agent; each scenario edits the watched
file and checks both what the server serves and what the agent holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodeagent.cli.main import main
from nodeagent.config import Config
from nodeagent.controlplane.mesh import MeshError
from nodeagent.controlplane.server import ControlPlaneServer
from nodeagent.model.constants import TYPE_URL_ADDRESS
from nodeagent.state.store import StateStore
from nodeagent.state.updater import StateUpdater
from nodeagent.xds.client import ExponentialBackoff, XdsClient
from tests.builders import MeshFile, wait_until

NODES = """\
nodes:
- {name: node1, token: tok-1, podCIDRs: [10.10.1.0/24]}
- {name: node2, token: tok-2, podCIDRs: [10.10.2.0/24]}
"""
WORKLOAD_A = "- {name: a, namespace: shop, node: node1, ip: 10.10.1.11}\n"
WORKLOAD_B = "- {name: b, namespace: shop, node: node2, ip: 10.10.2.11}\n"
MESH = NODES + "workloads:\n" + WORKLOAD_A + WORKLOAD_B
UID_A = "Kubernetes//Pod/shop/a"
UID_B = "Kubernetes//Pod/shop/b"
LOGGER = "nodeagent.controlplane.server"


@contextlib.asynccontextmanager
async def served_to_node1(
    tmp_path: Path,
) -> AsyncIterator[tuple[ControlPlaneServer, StateStore, MeshFile]]:
    mesh = MeshFile(tmp_path / "mesh.yaml", MESH)
    server = ControlPlaneServer(mesh.path, "127.0.0.1:0", poll_interval=0.05, require_token=True)
    await server.start()
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    cfg = Config(
        node_name="node1",
        xds_address=f"http://127.0.0.1:{server.port}",
        auth_token_path=str(token),
    )
    store = StateStore()
    client = XdsClient(cfg, StateUpdater(store), backoff=ExponentialBackoff(initial=0.05, cap=0.2))
    try:
        async with client:
            await asyncio.wait_for(client.wait_ready(), 10)
            assert server.servicer.connected_nodes() == {"node1"}
            yield server, store, mesh
    finally:
        await server.stop(grace=None)


def cut_after_nodes(text: str) -> str:
    """The file as a truncation at a line boundary leaves it: nodes, no workloads."""
    return text[: text.index("workloads:")]


REFUSED = [
    pytest.param("", 1, "nodes: the file is empty (truncated?)", id="empty"),
    pytest.param(
        "meshConfig: {trustDomain: cluster.local}\n", 1, "nodes: no nodes declared", id="no-nodes"
    ),
    pytest.param(
        cut_after_nodes(MESH),
        2,
        "nodes[0]: this edit removes every workload of node node1 (1 workload(s) before: "
        "shop/a) while its agent is connected",
        id="connected-node-emptied",
    ),
    pytest.param(
        MESH.replace("ip: 10.10.1.11", "ip: 10.10.9.11"),
        5,
        "workloads[0].ip: 10.10.9.11 is outside the pod range of node node1 (10.10.1.0/24)",
        id="ip-outside-pod-range",
    ),
]


@pytest.mark.parametrize(("text", "line", "expected"), REFUSED)
async def test_refused_reload_keeps_the_last_good_mesh_and_a_later_good_write_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, line: int, expected: str
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with served_to_node1(tmp_path) as (server, store, mesh):
        served = dict(server.mesh_store.snapshot[TYPE_URL_ADDRESS])
        reloads = server.watcher.reloads
        mesh.write(text)
        await wait_until(lambda: server.watcher.last_error is not None, "the refusal")
        error = server.watcher.last_error or ""
        assert error.startswith(f"{mesh.path}:{line}:"), error
        assert expected in error
        # A few more polls: still refused once, nothing pushed, nothing lost.
        await asyncio.sleep(0.3)
        refusals = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage() for r in refusals] == [
            f"mesh file refused, still serving the last good one: {error}"
        ]
        assert server.watcher.reloads == reloads
        assert dict(server.mesh_store.snapshot[TYPE_URL_ADDRESS]) == served
        assert {w.uid for w in store.workloads()} == {UID_A, UID_B}
        assert server.mesh_store.mesh.workloads[0].ips == ("10.10.1.11",)

        # The file restored (with an edit, to see it arrive): picked up again.
        mesh.write(MESH.replace("ip: 10.10.2.11", "ip: 10.10.2.12"))
        await wait_until(
            lambda: (
                (w := store.workload(UID_B)) is not None
                and [str(a) for a in w.addresses] == ["10.10.2.12"]
            ),
            "the restored file",
        )
        assert server.watcher.last_error is None and store.workload(UID_A) is not None


async def test_a_connected_node_is_emptied_only_when_the_file_says_so_and_it_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with served_to_node1(tmp_path) as (server, store, mesh):
        # node2 has no agent connected: emptying it is an ordinary edit.
        mesh.write(MESH.replace(WORKLOAD_B, ""))
        await wait_until(lambda: store.workload(UID_B) is None, "b removed")
        assert server.watcher.last_error is None

        mesh.write(NODES + "workloads:\n")
        await wait_until(lambda: server.watcher.last_error is not None, "the refusal")
        assert "nodes[0]: this edit removes every workload of node node1" in (
            server.watcher.last_error or ""
        )
        assert store.workload(UID_A) is not None

        flagged = NODES.replace("tok-1,", "tok-1, allowEmpty: true,")
        mesh.write(flagged + "workloads:\n")
        await wait_until(lambda: store.workload(UID_A) is None, "a removed on purpose")
        assert server.watcher.last_error is None
        notes = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert notes == [
            f"mesh file accepted as written: {mesh.path}:2:3: nodes[0].allowEmpty: node node1 "
            "(agent connected) is left without workloads on purpose "
            "(1 workload(s) before: shop/a)"
        ]


async def test_an_empty_or_nodeless_file_is_refused_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "mesh.yaml"
    empty.write_text("")
    with pytest.raises(MeshError, match=rf"^{empty}:1:1: nodes: the file is empty"):
        ControlPlaneServer(empty, "127.0.0.1:0")


def test_check_applies_the_same_rules_and_prints_the_accepted_emptiness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mesh.yaml"
    for text, expected in [
        ("", f"{path}:1:1: nodes: the file is empty (truncated?)"),
        ("workloads: []\n", f"{path}:1:1: nodes: no nodes declared"),
        (
            MESH.replace("10.10.2.11", "10.10.1.12"),
            f"{path}:6:47: workloads[1].ip: 10.10.1.12 is outside the pod range of node node2 "
            "(10.10.2.0/24); it is in node1's range",
        ),
    ]:
        path.write_text(text)
        assert main(["controlplane", "--mesh", str(path), "--check"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    path.write_text("nodes: []\n")
    assert main(["controlplane", "--mesh", str(path), "--check", "-o", "json"]) == 0
    out, err = capsys.readouterr()
    assert '"nodes": 0' in out
    assert err == f"note: {path}:1:1: nodes: [] given: serving no nodes\n"


async def test_a_loader_crash_does_not_end_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    async with served_to_node1(tmp_path) as (server, store, mesh):
        real = server.watcher.reader.load

        def flaky(raw: bytes | None = None) -> object:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("validator bug")
            return real(raw)

        monkeypatch.setattr(server.watcher.reader, "load", flaky)
        mesh.write(MESH.replace("ip: 10.10.2.11", "ip: 10.10.2.12"))
        await wait_until(lambda: server.watcher.last_error is not None, "the failed load")
        assert "internal error: RuntimeError('validator bug')" in (server.watcher.last_error or "")
        mesh.write(MESH.replace("ip: 10.10.2.11", "ip: 10.10.2.13"))
        await wait_until(
            lambda: (
                (w := store.workload(UID_B)) is not None
                and [str(a) for a in w.addresses] == ["10.10.2.13"]
            ),
            "the next write, still watched",
        )


async def test_a_file_caught_mid_write_is_read_once_it_holds_still(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A writer that truncates, then writes: the watcher may poll between the
    # two. The empty instant is not refused; the finished file is applied.
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with served_to_node1(tmp_path) as (server, store, mesh):
        reloads = server.watcher.reloads
        with mesh.path.open("w") as f:
            f.flush()
            await asyncio.sleep(0.06)  # at least one poll sees it empty
            f.write(MESH.replace("ip: 10.10.2.11", "ip: 10.10.2.12"))
        await wait_until(
            lambda: (
                (w := store.workload(UID_B)) is not None
                and [str(a) for a in w.addresses] == ["10.10.2.12"]
            ),
            "the finished file",
        )
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == []
        assert server.watcher.last_error is None
        assert server.watcher.reloads == reloads + 1
