"""The control plane says where it serves once: run.py's stdout line, not also a log line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nodeagent.controlplane.server import ControlPlaneServer
from tests.unit.controlplane.test_server import MESH, write


async def test_starting_logs_no_second_serving_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = write(tmp_path, "mesh.yaml", MESH)
    with caplog.at_level(logging.DEBUG, logger="nodeagent.controlplane"):
        async with ControlPlaneServer(mesh, "127.0.0.1:0"):
            pass
    assert not [r for r in caplog.records if "serving" in r.getMessage()]
