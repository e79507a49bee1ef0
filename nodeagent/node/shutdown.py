"""At shutdown, ask the API server whether this is an upgrade or an uninstall."""

from __future__ import annotations

import logging

from nodeagent.kube.api import KubeApi
from nodeagent.kube.shutdown import ShutdownDecision, decide_shutdown

log = logging.getLogger(__name__)


async def read_shutdown_decision(api: KubeApi, *, namespace: str, name: str) -> ShutdownDecision:
    """Read the agent's DaemonSet NAMESPACE/NAME and decide (nodeagent.kube.shutdown)."""
    ref = f"{namespace}/{name}"
    try:
        response = await api.get_daemonset(namespace, name)
    except Exception as exc:  # no answer (KubeError) or a bug: either way, fail closed
        return decide_shutdown(None, ref=ref, error=str(exc) or type(exc).__name__)
    return decide_shutdown(response, ref=ref)
