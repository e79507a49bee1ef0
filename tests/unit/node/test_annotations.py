"""The redirection annotation, driven through the real client against the loopback API server."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from nodeagent.kube.client import KubeClient, resolve_endpoint
from nodeagent.model.workload import Workload
from nodeagent.node.annotations import PodAnnotationManager, PodRef, pod_ref
from nodeagent.node.lifecycle import Backoff

KEY = "ambient.istio.io/redirection"
WEB = PodRef("demo", "web-1")
POD_PATH = "/api/v1/namespaces/demo/pods/web-1"
WAIT = 5.0


@asynccontextmanager
async def annotator(api: Any, node: str = "node1") -> AsyncIterator[PodAnnotationManager]:
    endpoint = resolve_endpoint(api.config(), {})
    assert endpoint is not None
    manager = PodAnnotationManager(
        KubeClient(endpoint, timeout=0.5),
        node_name=node,
        backoff=Backoff(initial=0.01, cap=0.05),
    )
    try:
        yield manager
    finally:
        await manager.close()


async def settled(manager: PodAnnotationManager) -> None:
    async with asyncio.timeout(WAIT):
        await manager.wait_idle()


async def test_ready_pod_gets_the_annotation_conditional_on_what_was_read(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node1", annotations={"keep": "me"})
        version = api.pods[("demo", "web-1")]["metadata"]["resourceVersion"]
        manager.set_redirection(WEB, True)
        await settled(manager)
        assert api.annotations_of("demo", "web-1") == {KEY: "enabled", "keep": "me"}
        [patch] = api.calls("PATCH")
        assert patch.body == {
            "metadata": {"annotations": {KEY: "enabled"}, "resourceVersion": version}
        }
        assert manager.stats.patches == 1


async def test_removal_patches_the_key_to_null_and_leaves_other_annotations(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node1", annotations={KEY: "enabled", "keep": "me"})
        manager.set_redirection(WEB, False)
        await settled(manager)
        assert api.annotations_of("demo", "web-1") == {"keep": "me"}
        [patch] = api.calls("PATCH")
        assert patch.body["metadata"]["annotations"] == {KEY: None}


async def test_pod_already_annotated_is_only_read(kube_api_server: Any) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node1", annotations={KEY: "enabled"})
        manager.set_redirection(WEB, True)
        await settled(manager)
        assert [c.method for c in api.calls()] == ["GET"]


async def test_pod_of_another_node_is_never_patched(kube_api_server: Any) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node2")
        manager.set_redirection(WEB, True)
        await settled(manager)
        assert api.calls("PATCH") == []
        assert api.annotations_of("demo", "web-1") == {}


async def test_gone_pod_needs_nothing(kube_api_server: Any) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        manager.set_redirection(WEB, False)
        await settled(manager)
        assert [(c.method, c.path) for c in api.calls()] == [("GET", POD_PATH)]


@pytest.mark.parametrize(("method", "status"), [("GET", 500), ("GET", 403), ("PATCH", 503)])
async def test_failures_are_retried_with_backoff_and_logged(
    kube_api_server: Any, caplog: Any, method: str, status: int
) -> None:
    caplog.set_level("WARNING", logger="nodeagent.node.annotations")
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node1")
        api.answer(method, POD_PATH, status, status)
        manager.set_redirection(WEB, True)
        await settled(manager)
        assert api.annotations_of("demo", "web-1") == {KEY: "enabled"}
        assert manager.stats.failures == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert f"pod demo/web-1: cannot set annotation {KEY} (attempt 1" in warnings[0]
    assert f"{method} pod demo/web-1: {status} Forced" in warnings[0]


async def test_no_answer_is_retried_until_the_api_server_answers(kube_api_server: Any) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node1")
        api.answer("GET", POD_PATH, api.HANG)
        manager.set_redirection(WEB, True)
        await settled(manager)
        assert api.annotations_of("demo", "web-1") == {KEY: "enabled"}
        assert manager.stats.failures == 1


async def test_conflict_reads_the_pod_again(kube_api_server: Any) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node1")
        api.answer("PATCH", POD_PATH, 409)
        manager.set_redirection(WEB, True)
        await settled(manager)
        assert [c.method for c in api.calls()] == ["GET", "PATCH", "GET", "PATCH"]
        assert api.annotations_of("demo", "web-1") == {KEY: "enabled"}
        assert manager.stats.failures == 0


async def test_the_latest_wish_wins(kube_api_server: Any) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node1")
        api.answer("GET", POD_PATH, 500)  # keep the first attempt busy
        manager.set_redirection(WEB, True)
        manager.set_redirection(WEB, False)
        manager.set_redirection(WEB, True)
        await settled(manager)
        assert api.annotations_of("demo", "web-1") == {KEY: "enabled"}
        assert len(api.calls("PATCH")) == 1


async def test_close_gives_up_on_a_pod_the_api_server_never_answers_for(
    kube_api_server: Any,
) -> None:
    async with kube_api_server() as api, annotator(api) as manager:
        api.add_pod("demo", "web-1", node="node1")
        api.answer("GET", POD_PATH, *[api.HANG] * 10)
        manager.set_redirection(WEB, True)
        assert not await manager.flush(0.05)
        assert manager.pending == [WEB]
        await manager.close()
        assert manager.pending == []
        manager.set_redirection(WEB, True)  # after close: ignored, no new worker
        assert manager.pending == []


def test_only_pod_workloads_map_to_pods() -> None:
    def wl(uid: str) -> Workload:
        return Workload(
            uid=uid, name="web-1", namespace="demo", addresses=(ipaddress.ip_address("10.0.0.1"),)
        )

    assert pod_ref(wl("Kubernetes//Pod/demo/web-1")) == WEB
    assert pod_ref(wl("Kubernetes/networking.istio.io/WorkloadEntry/demo/vm")) is None
    assert pod_ref(wl("u1")) == WEB  # a record in no known shape: trust name/namespace
