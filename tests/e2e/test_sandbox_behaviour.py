"""The sandbox's tools for resilience tests, end to end: a demo app made to fail and to
answer slowly (`sandbox behave`), its request log, and the shadow pod (`up --shadow`)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .e2e_harness import BACKEND_VIP, NODEAGENT, Mesh, _cli, sandbox, wait_until

pytestmark = pytest.mark.e2e

TARGET = "node2-pod2"
CLIENT = "node1-pod1"
SHADOW = "node2-shadow"

# Run inside a pod: N requests to the local app, each on its own connection; prints
# [{"status", "failed", "seconds"}, ...].
LOCAL_CLIENT = r"""
import http.client, json, sys, time
out = []
for _ in range(int(sys.argv[1])):
    start = time.monotonic()
    c = http.client.HTTPConnection("127.0.0.1", 8080, timeout=10)
    c.request("GET", sys.argv[2])
    r = c.getresponse()
    body = json.loads(r.read())
    out.append({"status": r.status, "failed": body.get("failed", False),
                "seconds": time.monotonic() - start})
    c.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox(tmp_path_factory.mktemp("behaviour"), "iptables", shadow=True) as m:
        yield m


def _local(mesh: Mesh, pod: str, n: int, path: str) -> list[dict[str, Any]]:
    result = mesh.python_in(pod, LOCAL_CLIENT, str(n), path)
    assert result.returncode == 0, result.stderr
    answers: list[dict[str, Any]] = json.loads(result.stdout)
    return answers


def test_half_of_a_pods_requests_fail_exactly_and_its_log_shows_them(mesh: Mesh) -> None:
    settings = mesh.behave(TARGET, fail=0.5)
    assert settings == {"fail": 0.5, "status": 500, "delay": 0.0, "requests": 0}
    try:
        answers = _local(mesh, TARGET, 10, "/flaky")
    finally:
        mesh.behave(TARGET)  # reset
    assert [a["status"] for a in answers] == [200, 500] * 5
    assert [a["failed"] for a in answers] == [False, True] * 5
    logged = [r for r in mesh.app_log(TARGET) if r["path"] == "/flaky"]
    assert [(r["method"], r["client_ip"], r["status"]) for r in logged] == [
        ("GET", "127.0.0.1", s) for s in [200, 500] * 5
    ]
    assert all(r["host"] == "127.0.0.1:8080" for r in logged)


def test_a_delay_holds_every_answer_and_a_custom_status(mesh: Mesh) -> None:
    delay = 0.7
    mesh.behave(TARGET, fail=1, status=503, delay=delay)
    try:
        answers = _local(mesh, TARGET, 2, "/slow")
    finally:
        mesh.behave(TARGET)
    assert [a["status"] for a in answers] == [503, 503]
    assert all(a["seconds"] >= delay for a in answers), answers
    # Reset: fast and healthy again.
    (after,) = _local(mesh, TARGET, 1, "/fast")
    assert after["status"] == 200 and after["seconds"] < delay


def test_only_the_pod_itself_may_flip_the_switches(mesh: Mesh) -> None:
    result = mesh.curl(CLIENT, f"http://{mesh.pod(TARGET)['ip']}:8080/demo/behaviour",
                       "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}")  # fmt: skip
    assert result.stdout == "403", result.stderr
    bad = _cli("sandbox", "behave", mesh.name, "node9-pod9", "--fail", "0.5")
    assert bad.returncode != 0 and "no demo pod 'node9-pod9'" in bad.stderr
    bad = _cli("sandbox", "behave", mesh.name, TARGET, "--fail", "1.5")
    assert bad.returncode != 0 and "--fail: must be between 0 and 1" in bad.stderr


def test_the_shadow_pod_is_listed_and_serves_the_backend_service(mesh: Mesh) -> None:
    shadow = mesh.pod(SHADOW)
    assert (shadow["ip"], shadow["node"]) == ("10.10.2.251", "node2")
    assert shadow["labels"]["app"] == "backend" and shadow["labels"]["version"] == "v3"
    assert shadow["app_pid"] and Path(shadow["log"]).exists()
    table = _cli("sandbox", "status", mesh.name)
    assert SHADOW in table.stdout, table.stderr
    seen: set[str] = set()

    def reached_shadow() -> bool:
        answer = mesh.get_json(CLIENT, f"http://{BACKEND_VIP}:8080/via-vip")
        seen.add(answer["pod"])
        return any(r["path"] == "/via-vip" for r in mesh.app_log(SHADOW))

    wait_until("a call to the backend VIP reaches node2-shadow", reached_shadow, timeout=30)
    (first, *_) = [r for r in mesh.app_log(SHADOW) if r["path"] == "/via-vip"]
    # Through the mesh: the tunnel keeps the caller's address.
    assert first["client_ip"] == mesh.pod(CLIENT)["ip"] and first["status"] == 200
    assert seen <= {"node1-pod2", "node2-pod2", SHADOW}


def test_behave_prints_the_settings_as_json(mesh: Mesh) -> None:
    result = subprocess.run(
        [NODEAGENT, "sandbox", "behave", mesh.name, SHADOW, "--delay", "250ms"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["delay"] == 0.25
    start = time.monotonic()
    (answer,) = _local(mesh, SHADOW, 1, "/held")
    assert answer["seconds"] >= 0.25 and time.monotonic() - start >= 0.25
    mesh.behave(SHADOW)
