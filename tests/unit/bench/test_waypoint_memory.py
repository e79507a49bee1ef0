"""bench.waypoint_memory: the echo service's address from the mesh file, the path check over
the client agent's access log, and the goal from the medians."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import waypoint_memory

MESH = """
services:
- name: backend
  namespace: demo
  vip: 10.96.0.10
  ports: [{port: 8080, targetPort: 8080}]
- name: echo
  namespace: demo
  vip: 10.96.0.11
  ports: [{port: 9000, targetPort: 9000}]
"""


def test_the_echo_service_is_read_from_the_mesh_file(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    assert waypoint_memory.echo_target(str(mesh)) == ("10.96.0.11", 9000)
    mesh.write_text(MESH.replace("name: echo", "name: other"))
    with pytest.raises(RuntimeError, match="no service 'echo'"):
        waypoint_memory.echo_target(str(mesh))


def test_only_connections_the_waypoint_answered_are_counted(tmp_path: Path) -> None:
    def line(identity: str) -> str:
        return (
            '2026-12-07 05:15:01,497 INFO    access: {"dst.addr":"10.96.0.11:9000",'
            f'"dst.identity":"{identity}","bytes_sent":64}}'
        )

    log = tmp_path / "agent.log"
    log.write_text(
        "\n".join(
            [
                line("spiffe://cluster.local/ns/demo/sa/waypoint"),
                line("spiffe://cluster.local/ns/demo/sa/frontend"),  # straight to a pod
                line(""),  # not tunnelled
                line("spiffe://cluster.local/ns/other/sa/waypoint"),  # another namespace's
                line("spiffe://cluster.local/ns/demo/sa/waypoint"),
                "2026-12-07 05:15:02,000 INFO    nodeagent.app: agent started",
            ]
        )
    )
    assert waypoint_memory.tunnelled_to(str(log), "demo", "waypoint") == 2


def test_the_goal_takes_the_worse_burst() -> None:
    median = {"before_mib": 77.0, "after_1_ratio": 1.04, "after_2_ratio": 1.12, "peak_1_mib": 130}
    (row,) = waypoint_memory.goals(median, 3000)
    assert row["value"] == 1.12
    assert row["met"] is False
    assert "3000-tunnel burst" in row["figure"]
    median["after_2_ratio"] = 1.05
    assert waypoint_memory.goals(median, 3000)[0]["met"] is True
