"""A sandbox mesh file edited by hand into the wrong shape: a one-line refusal for
`sandbox status` and `sandbox apply`, never a TypeError.

Found by the apply_file fuzz target (`workloads: 1` made `counts` and `merge_resources`
raise TypeError); its input is kept in fuzz/crashes/apply_file/.
"""

from __future__ import annotations

import pytest

from nodeagent.sandbox.mesh import ApplyError, counts, load_mesh_dict

NODES = "nodes: [{name: node1, token: t}]\n"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (NODES + "workloads: 1\n", "mesh.yaml:2:12: workloads"),
        (NODES + "services: true\n", "mesh.yaml:2:11: services"),
        (NODES + "authorizationPolicies: {a: b}\n", "mesh.yaml:2:24: authorizationPolicies"),
        (NODES + "workloads: []\nworkloads: x\n", "mesh.yaml:3:12: workloads"),
    ],
)
def test_a_section_that_is_not_a_list_is_refused_where_it_is(text: str, where: str) -> None:
    with pytest.raises(ApplyError) as err:
        load_mesh_dict(text, "mesh.yaml")
    assert str(err.value) == f"{where}: expected a list; this is not a sandbox's mesh file"


def test_empty_and_missing_sections_still_count_as_none() -> None:
    mesh = load_mesh_dict(NODES + "workloads:\nservices: []\n", "mesh.yaml")
    assert counts(mesh) == {"nodes": 1, "workloads": 0, "services": 0, "authorizationPolicies": 0}
