"""The pure parts of the API surface: patch bodies, pod reading, response text."""

from __future__ import annotations

from nodeagent.kube.api import ApiResponse, pod_view, redirection_patch


def test_enable_patch_sets_the_annotation_conditional_on_the_version_read() -> None:
    assert redirection_patch(enabled=True, resource_version="42") == {
        "metadata": {
            "annotations": {"ambient.istio.io/redirection": "enabled"},
            "resourceVersion": "42",
        }
    }


def test_disable_patch_deletes_the_key_with_null() -> None:
    assert redirection_patch(enabled=False) == {
        "metadata": {"annotations": {"ambient.istio.io/redirection": None}}
    }


def test_pod_view_reads_node_version_and_annotation() -> None:
    pod = pod_view(
        {
            "metadata": {
                "resourceVersion": "7",
                "annotations": {"ambient.istio.io/redirection": "enabled", "other": "x"},
            },
            "spec": {"nodeName": "node1"},
        }
    )
    assert (pod.node_name, pod.resource_version, pod.redirected) == ("node1", "7", True)


def test_pod_view_of_a_bare_pod_has_no_annotation() -> None:
    pod = pod_view({"metadata": {"annotations": None}})
    assert pod.redirection is None and not pod.redirected and pod.node_name == ""
    assert not pod_view(
        {"metadata": {"annotations": {"ambient.istio.io/redirection": "x"}}}
    ).redirected


def test_response_describes_itself_with_the_api_servers_reason() -> None:
    forbidden = ApiResponse(403, {"reason": "Forbidden", "message": 'pods "a" is forbidden'})
    assert forbidden.describe() == '403 Forbidden: pods "a" is forbidden'
    assert not forbidden.ok
    assert ApiResponse(502).describe() == "502"
    assert ApiResponse(200).ok
