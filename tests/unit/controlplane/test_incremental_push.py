"""An edit of the mesh file reaches a connected agent as only what it changed.

The real control plane serves a generated mesh; a real agent-side xDS client feeds the
real StateStore through a sink that records every delta it is given. Editing one
workload in the file must push that one resource, read by the file watch as soon as
the file is closed (inotify), with only the edited entry parsed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from nodeagent.config import Config
from nodeagent.controlplane.server import ControlPlaneServer
from nodeagent.model.constants import TYPE_URL_ADDRESS
from nodeagent.state.store import StateStore
from nodeagent.state.updater import StateUpdater
from nodeagent.xds.client import XdsClient
from tests.builders import MeshFile, wait_until

WORKLOADS = 50


def mesh_text(ip_of_7: str = "10.10.0.7") -> str:
    lines = ["nodes:", "- {name: node1, token: tok-1}", "workloads:"]
    for i in range(WORKLOADS):
        ip = ip_of_7 if i == 7 else f"10.10.0.{i}"
        lines.append(
            f"- {{name: w{i}, namespace: shop, node: node1, ip: {ip}, labels: {{app: web}}}}"
        )
    lines += [
        "services:",
        "- {name: web, namespace: shop, vip: 10.96.0.1, ports: [{port: 80}], selector: {app: web}}",
    ]
    return "\n".join(lines) + "\n"


class RecordingSink:
    """The agent's StateUpdater, recording (type, upserted names, removed names) per delta."""

    def __init__(self, store: StateStore) -> None:
        self._updater = StateUpdater(store)
        self.deltas: list[tuple[str, list[str], list[str]]] = []

    def apply_delta(
        self, type_url: str, upserts: Sequence[tuple[str, bytes]], removals: Sequence[str]
    ) -> dict[str, str]:
        # The first (empty) answers for the types the mesh has none of say nothing.
        if upserts or removals:
            self.deltas.append((type_url, [n for n, _ in upserts], list(removals)))
        return self._updater.apply_delta(type_url, upserts, removals)


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path, poll_interval: float = 0.5
) -> AsyncIterator[tuple[ControlPlaneServer, StateStore, RecordingSink, MeshFile]]:
    """The server on the generated mesh, and node1's agent connected and in sync."""
    (tmp_path / "token").write_text("tok-1\n")
    mesh = MeshFile(tmp_path / "mesh.yaml", mesh_text())
    store = StateStore()
    sink = RecordingSink(store)
    async with ControlPlaneServer(mesh.path, "127.0.0.1:0", poll_interval=poll_interval) as server:
        address = f"http://127.0.0.1:{server.port}"
        token = str(tmp_path / "token")
        agent = XdsClient(
            Config(node_name="node1", xds_address=address, auth_token_path=token), sink
        )
        async with agent:
            await asyncio.wait_for(agent.wait_ready(), 10)
            yield server, store, sink, mesh


def address_of(store: StateStore, name: str) -> list[str]:
    w = store.workload(f"Kubernetes//Pod/shop/{name}")
    return [] if w is None else [str(a) for a in w.addresses]


async def test_an_edit_of_one_workload_pushes_only_that_resource(tmp_path: Path) -> None:
    async with served(tmp_path) as (server, store, sink, mesh):
        assert len(store.counts()) and address_of(store, "w7") == ["10.10.0.7"]
        sink.deltas.clear()
        mesh.write(mesh_text(ip_of_7="10.10.0.77"))
        await wait_until(lambda: address_of(store, "w7") == ["10.10.0.77"], "the edit")
        assert sink.deltas == [(TYPE_URL_ADDRESS, ["Kubernetes//Pod/shop/w7"], [])]
        assert server.watcher.last_spliced
        assert address_of(store, "w8") == ["10.10.0.8"]


async def test_a_malformed_edit_is_refused_by_line_and_field_and_nothing_is_pushed(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as (server, store, sink, mesh):
        sink.deltas.clear()
        served_before = dict(server.mesh_store.snapshot[TYPE_URL_ADDRESS])
        mesh.write(mesh_text(ip_of_7="10.10.0.777"))
        await wait_until(lambda: server.watcher.last_error is not None, "the refusal")
        error = server.watcher.last_error or ""
        # Line 11 is w7's entry: 3 lines before the first workload.
        assert error.startswith(f"{mesh.path}:11:"), error
        assert "workloads[7].ip: '10.10.0.777' is not an IP address" in error
        await asyncio.sleep(0.2)
        assert sink.deltas == []
        assert dict(server.mesh_store.snapshot[TYPE_URL_ADDRESS]) == served_before
        assert address_of(store, "w7") == ["10.10.0.7"]

        # Put right, with an edit: applied, again as that one resource.
        mesh.write(mesh_text(ip_of_7="10.10.0.78"))
        await wait_until(lambda: address_of(store, "w7") == ["10.10.0.78"], "the fixed edit")
        assert server.watcher.last_error is None
        assert sink.deltas == [(TYPE_URL_ADDRESS, ["Kubernetes//Pod/shop/w7"], [])]


async def test_an_edit_is_read_when_the_file_is_closed_not_at_the_next_poll(
    tmp_path: Path,
) -> None:
    async with served(tmp_path, poll_interval=60) as (server, store, _, mesh):
        assert server.watcher.watching_events, "inotify is available on Linux"
        (tmp_path / "mesh.yaml").write_text(mesh_text(ip_of_7="10.10.0.79"))
        await wait_until(
            lambda: address_of(store, "w7") == ["10.10.0.79"], "the edit, with no poll", 5
        )
        # Replaced by rename, as editors save: seen too.
        staged = tmp_path / "mesh.yaml.tmp"
        staged.write_text(mesh_text(ip_of_7="10.10.0.80"))
        staged.replace(mesh.path)
        await wait_until(lambda: address_of(store, "w7") == ["10.10.0.80"], "the rename", 5)


async def test_a_file_removed_and_written_anew_is_read_once_complete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.controlplane.server")
    async with served(tmp_path, poll_interval=60) as (server, store, _, mesh):
        mesh.path.unlink()
        with mesh.path.open("w") as f:  # created empty, then written, then closed
            f.flush()
            f.write(mesh_text(ip_of_7="10.10.0.81"))
        await wait_until(lambda: address_of(store, "w7") == ["10.10.0.81"], "the new file", 5)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert server.watcher.last_error is None
