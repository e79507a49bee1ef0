"""Fuzz target: `nodeagent sandbox apply` and `sandbox status` on user-written YAML.

The input is an apply file (workloads, services and Istio AuthorizationPolicies), optionally
preceded by the sandbox's current mesh file and a NUL byte (NUL is never valid YAML), for a
mesh file someone edited by hand; without one, the mesh the sandbox generates for 2 nodes x
2 pods is used. The target runs what `SandboxManager.apply` and `status` run, minus the
files: the apply file checked on its own, merged into the mesh (plain, `--delete` and
`--replace`), the result validated by the control plane's validator. `ApplyError` and
`MeshError`, both naming file, line and field, are the documented refusals.
"""

from __future__ import annotations

from typing import Any

from nodeagent.controlplane.mesh import MeshError, parse_mesh
from nodeagent.sandbox.mesh import (
    ApplyError,
    build_mesh,
    counts,
    dump_mesh,
    load_mesh_dict,
    merge_resources,
    parse_user_file,
    place_error,
    standalone_text,
)
from nodeagent.sandbox.plan import build_plan

INSTRUMENT = ("nodeagent",)
MAX_LEN = 8192

SOURCE = "apply.yaml"
MESH = "/run/nodeagent-sandbox/fuzz/mesh.yaml"
_PLAN = build_plan("fuzz", 2, 2)
_MESH_TEXT = dump_mesh(build_mesh(_PLAN, {"node1": "token-1", "node2": "token-2"}))
# (delete, replace): `sandbox apply`, `--delete`, `--replace`.
_MODES = ((False, False), (True, False), (False, True))


def fuzz_one(data: bytes) -> None:
    head, nul, tail = data.partition(b"\0")
    mesh_text = head.decode("utf-8", "replace") if nul else _MESH_TEXT
    user_text = (tail if nul else head).decode("utf-8", "replace")
    current: dict[str, Any] | None = None
    try:
        current = load_mesh_dict(mesh_text, MESH)
    except ApplyError as err:
        assert str(err).startswith(MESH), f"error does not name the mesh file: {err}"
    else:
        counts(current)  # what `sandbox status` shows
    try:
        user = parse_user_file(user_text, SOURCE)
    except ApplyError as err:
        assert str(err).startswith(SOURCE), f"error does not name the apply file: {err}"
        return
    valid = True
    if not user.documents:  # as the manager: documents are checked as they are read
        try:
            parse_mesh(standalone_text(user_text, _PLAN), SOURCE)
        except MeshError as err:
            assert str(err).startswith(SOURCE), f"error does not name the apply file: {err}"
            valid = False
    if current is None:
        return
    for delete, replace in _MODES:
        if not (valid or delete):  # as the manager: a deletion needs only names
            continue
        try:
            merged, summary = merge_resources(current, user, delete=delete, replace=replace)
        except ApplyError:
            continue
        summary.describe()
        try:
            parse_mesh(dump_mesh(merged), MESH)
        except MeshError as err:
            place_error(str(err), merged, user)  # "does not fit the sandbox's mesh": refused


_WORKLOAD = """\
workloads:
- name: extra
  namespace: demo
  node: node2
  ip: 10.10.2.20
  serviceAccount: backend
  labels: {app: extra, role: backend}
"""
_EVERYTHING = """\
workloads:
- {name: node1-pod2, namespace: demo, node: node1, ip: 10.10.1.12, serviceAccount: backend}
- {name: dual, namespace: demo, node: node1, ips: [10.10.1.30, "10.10.1.31"], uid: u-dual}
services:
- name: extra
  namespace: demo
  hostname: extra.demo.svc.cluster.local
  vip: 10.96.0.20
  ports: [{port: 80, targetPort: 8080}, {port: 443}]
  selector: {app: extra}
authorizationPolicies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-frontend, namespace: demo}
  spec:
    action: DENY
    selector: {matchLabels: {role: backend}}
    rules:
    - from:
      - source: {principals: ["cluster.local/ns/demo/sa/frontend"], ipBlocks: ["10.10.0.0/16"]}
      to:
      - operation: {ports: ["8080"], notPorts: [9000]}
"""

_DOCUMENTS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend, namespace: demo}
spec:
  host: backend
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 10, connectTimeout: 250ms}}
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 5s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: canary
  namespace: demo
  annotations: {traffic.nodeagent.io/tcp-fault: '{"0": {"abort": {"percentage": {"value": 5}}}}'}
spec:
  hosts: [backend]
  tcp:
  - route:
    - {destination: {host: backend, subset: v1}, weight: 90}
    - {destination: {host: backend, subset: v2}, weight: 10}
"""


def seeds() -> dict[str, bytes]:
    return {
        "add-workload": _WORKLOAD.encode(),
        "everything": _EVERYTHING.encode(),
        "same-name-other-ip": b"workloads:\n- {name: node1-pod1, namespace: demo, node: node1,"
        b" ip: 10.10.1.99}\n",
        "delete-policy": b"authorizationPolicies:\n- metadata: {name: deny-frontend,"
        b" namespace: demo}\n",
        "flow-style": b'{"services": [{"name": "s", "namespace": "demo", "vip": "10.96.0.30"}]}',
        "owned-section": b"nodes: []\n",
        "istio-documents": _DOCUMENTS.encode(),
        "hand-edited-mesh": _MESH_TEXT.replace("10.10.2.12", "10.10.2.13").encode()
        + b"\0"
        + _WORKLOAD.encode(),
        "mesh-without-workloads": b"nodes: [{name: node1, token: t, allowEmpty: true}]\n\0"
        + _WORKLOAD.encode(),
        # A small hand-written mesh with every section, for mutations of its shape.
        "hand-written-mesh": b"nodes: [{name: node2, token: t}]\nworkloads: []\nservices: []\n"
        b"authorizationPolicies: []\n\0" + _WORKLOAD.encode(),
    }
