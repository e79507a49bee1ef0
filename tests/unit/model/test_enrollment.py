"""Istio ambient's enrollment rule (istio-cni podutil.go), one case per reason."""

from __future__ import annotations

import pytest

from nodeagent.kube.api import namespace_meta, pod_meta
from nodeagent.model.enrollment import NamespaceMeta, PodMeta, Reason, enrollment

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def pod(**kw: object) -> PodMeta:
    return PodMeta(namespace="demo", name="web", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("the_pod", "ns_labels", "enrolled", "reason"),
    [
        (pod(), AMBIENT, True, Reason.NAMESPACE_LABELLED),
        (pod(labels=AMBIENT), {}, True, Reason.POD_LABELLED),
        (pod(), {}, False, Reason.NOT_LABELLED),
        (pod(), {"istio.io/dataplane-mode": "none"}, False, Reason.NOT_LABELLED),
        (pod(labels={"istio.io/dataplane-mode": "none"}), AMBIENT, False, Reason.OPTED_OUT),
        (pod(labels={"istio.io/dataplane-mode": "sidecar"}), AMBIENT, False, Reason.OPTED_OUT),
        (pod(host_network=True), AMBIENT, False, Reason.HOST_NETWORK),
        (
            pod(annotations={"sidecar.istio.io/status": "{}"}),
            AMBIENT,
            False,
            Reason.SIDECAR,
        ),
        (pod(containers=("app", "istio-proxy")), AMBIENT, False, Reason.SIDECAR),
        (pod(containers=("app",)), AMBIENT, True, Reason.NAMESPACE_LABELLED),
    ],
)
def test_enrollment_follows_istio_cni(the_pod, ns_labels, enrolled, reason):
    got = enrollment(the_pod, NamespaceMeta(name="demo", labels=ns_labels))
    assert (got.enrolled, got.reason) == (enrolled, reason)


def test_an_unknown_namespace_enrolls_only_a_labelled_pod():
    assert not enrollment(pod(), None).enrolled
    assert enrollment(pod(labels=AMBIENT), None).enrolled


def test_pod_meta_reads_a_pod_object():
    body = {
        "metadata": {
            "name": "web",
            "namespace": "demo",
            "uid": "u-1",
            "resourceVersion": "7",
            "labels": {"app": "web", "bad": 3},
            "annotations": {"sidecar.istio.io/status": "{}"},
        },
        "spec": {
            "nodeName": "node1",
            "hostNetwork": True,
            "serviceAccountName": "web-sa",
            "initContainers": [{"name": "istio-proxy"}],
            "containers": [{"name": "app"}],
        },
        "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]},
    }
    meta = pod_meta(body)
    assert meta.key == "demo/web" and meta.uid == "u-1" and meta.node == "node1"
    assert meta.labels == {"app": "web"} and meta.host_network
    assert meta.containers == ("istio-proxy", "app") and meta.ips == ("10.0.0.1", "fd00::1")
    assert meta.service_account == "web-sa" and meta.resource_version == "7"
    assert pod_meta({"status": {"podIP": "10.0.0.2"}}).ips == ("10.0.0.2",)
    assert namespace_meta({"metadata": {"name": "demo", "labels": AMBIENT}}).labels == AMBIENT
