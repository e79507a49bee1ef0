"""Upgrade or uninstall at SIGTERM, as a table over the DaemonSet read's outcome."""

from __future__ import annotations

import pytest

from nodeagent.kube.api import ApiResponse
from nodeagent.kube.shutdown import ShutdownMode, decide_shutdown

UPGRADE, UNINSTALL = ShutdownMode.UPGRADE, ShutdownMode.UNINSTALL
LIVE = {"kind": "DaemonSet", "metadata": {"name": "nodeagent", "uid": "1"}}
DELETING = {"metadata": {"name": "nodeagent", "deletionTimestamp": "2025-05-01T10:00:00Z"}}


@pytest.mark.parametrize(
    ("response", "mode", "reason_has"),
    [
        (ApiResponse(200, LIVE), UPGRADE, "still exists"),
        (ApiResponse(200, DELETING), UNINSTALL, "being deleted"),
        (ApiResponse(200, {"metadata": {"deletionTimestamp": None}}), UPGRADE, "still exists"),
        (ApiResponse(200, {}), UPGRADE, "still exists"),
        (ApiResponse(404, {"reason": "NotFound"}), UNINSTALL, "not found"),
        (ApiResponse(403, {"reason": "Forbidden"}), UNINSTALL, "RBAC removed"),
        (ApiResponse(401), UNINSTALL, "ServiceAccount removed"),
        (None, UPGRADE, "unreachable"),
        (ApiResponse(500, {"message": "etcd down"}), UPGRADE, "500"),
        (ApiResponse(503), UPGRADE, "fail closed"),
        (ApiResponse(429, {"reason": "TooManyRequests"}), UPGRADE, "429 TooManyRequests"),
        (ApiResponse(409), UPGRADE, "fail closed"),
        (ApiResponse(400), UPGRADE, "fail closed"),
    ],
)
def test_shutdown_mode_follows_the_daemonset(
    response: ApiResponse | None, mode: ShutdownMode, reason_has: str
) -> None:
    decision = decide_shutdown(response, ref="istio-system/nodeagent", error="timed out")
    assert decision.mode is mode
    assert reason_has in decision.reason


def test_reasons_name_the_daemonset_and_the_cause() -> None:
    gone = decide_shutdown(ApiResponse(404), ref="istio-system/nodeagent")
    assert "istio-system/nodeagent" in gone.reason
    unreachable = decide_shutdown(None, ref="istio-system/nodeagent", error="no answer within 5 s")
    assert "no answer within 5 s" in unreachable.reason
    assert "keeping the rules" in unreachable.reason
