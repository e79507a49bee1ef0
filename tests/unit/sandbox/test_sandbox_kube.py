"""The sandbox's API server contents and `sandbox label`'s argument handling."""

from __future__ import annotations

import pytest

from nodeagent.kube.api import namespace_meta, pod_meta
from nodeagent.model.enrollment import enrollment
from nodeagent.sandbox.kube import (
    KubeEditError,
    metadata_patch,
    object_path,
    parse_changes,
    seed_objects,
)
from nodeagent.sandbox.plan import build_plan


def test_seed_enrolls_every_demo_pod_and_places_it_on_its_node():
    plan = build_plan("t", 2, 2)
    objects = seed_objects(plan)
    namespaces = {
        o["metadata"]["name"]: namespace_meta(o) for o in objects if o["kind"] == "Namespace"
    }
    pods = [pod_meta(o) for o in objects if o["kind"] == "Pod"]
    assert [p.name for p in pods] == [p.name for p in plan.pods]
    for pod, planned in zip(pods, plan.pods, strict=True):
        assert (pod.node, pod.ips, pod.service_account) == (
            planned.node,
            (planned.ip,),
            planned.service_account,
        )
        assert enrollment(pod, namespaces[pod.namespace]).enrolled


def test_changes_follow_kubectl_syntax():
    assert parse_changes(["istio.io/dataplane-mode=none", "team-"]) == {
        "istio.io/dataplane-mode": "none",
        "team": None,
    }
    assert metadata_patch("labels", {"a": None}) == {"metadata": {"labels": {"a": None}}}
    for bad in ([], ["novalue"], ["-bad=1"], ["a b=1"]):
        with pytest.raises(KubeEditError):
            parse_changes(bad)


def test_targets_name_their_api_paths():
    plan = build_plan("t", 2, 2)
    assert object_path("namespace/demo", plan) == "/api/v1/namespaces/demo"
    pod = plan.pods[0]
    assert object_path(f"pod/{pod.name}", plan) == (
        f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}"
    )
    assert object_path("pod/other/x", plan) == "/api/v1/namespaces/other/pods/x"
    with pytest.raises(KubeEditError, match="no pod 'nope'"):
        object_path("pod/nope", plan)
    with pytest.raises(KubeEditError, match="expected namespace/NAME or pod/NAME"):
        object_path("service/x", plan)
