"""Fuzz target: the shipped control plane's mesh file (`controlplane/mesh.py`).

The input is the file's bytes, read the way the control plane reads it (`load_mesh` on a
path), including the Istio AuthorizationPolicy YAML inside it. `MeshError`, naming the file,
is the documented refusal. A file that is accepted must then serve: every workload and
service becomes its own xDS resource, and the agent's converter accepts each of them (a file
the control plane takes but every agent NACKs would leave the mesh half-configured). A reload
from a fixed good file to the new one is checked as the server checks it, again refusing
only with `MeshError`.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

from nodeagent.controlplane.mesh import (
    MeshConfig,
    MeshError,
    check_reload,
    load_mesh,
    parse_mesh,
)
from nodeagent.controlplane.resources import build_snapshot
from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from nodeagent.state.convert import ConversionError, address_from_bytes, authorization_from_bytes

INSTRUMENT = ("nodeagent",)
MAX_LEN = 8192

_scratch: Path | None = None


def _path() -> Path:
    """One scratch file per process, in memory where there is a tmpfs."""
    global _scratch
    if _scratch is None:
        base = "/dev/shm" if Path("/dev/shm").is_dir() else None
        fd, name = tempfile.mkstemp(prefix="fuzz-mesh-", suffix=".yaml", dir=base)
        os.close(fd)
        _scratch = Path(name)
        atexit.register(_scratch.unlink, missing_ok=True)
    return _scratch


def fuzz_one(data: bytes) -> None:
    path = _path()
    path.write_bytes(data)
    try:
        mesh = load_mesh(path)
    except MeshError as err:
        assert str(err).startswith(f"{path}:"), f"error does not name the file: {err}"
        return
    snapshot = build_snapshot(mesh)
    addresses = snapshot[TYPE_URL_ADDRESS]
    assert len(addresses) == len(mesh.workloads) + len(mesh.services), (
        f"{len(mesh.workloads)} workloads and {len(mesh.services)} services became"
        f" {len(addresses)} Address resources: one name is used twice"
    )
    for name, resource in addresses.items():
        try:
            address_from_bytes(name, resource.value)
        except ConversionError as err:
            raise AssertionError(f"the control plane serves what agents refuse: {err}") from err
    for name, resource in snapshot[TYPE_URL_AUTHORIZATION].items():
        try:
            authorization_from_bytes(name, resource.value)
        except ConversionError as err:
            raise AssertionError(f"the control plane serves what agents refuse: {err}") from err
    try:
        check_reload(_base(), mesh, connected=("node1", "node2"))
    except MeshError:
        pass


_BASE_TEXT = """\
nodes:
- {name: node1, token: t1, podCIDRs: [10.1.0.0/24]}
- {name: node2, token: t2}
workloads:
- {name: a, node: node1, ip: 10.1.0.5}
- {name: b, node: node2, ip: 10.2.0.7}
"""
_base_mesh: MeshConfig | None = None


def _base() -> MeshConfig:
    global _base_mesh
    if _base_mesh is None:
        _base_mesh = parse_mesh(_BASE_TEXT, "base.yaml")
    return _base_mesh


# Seeds: a file with every field, the base, the smallest valid files, and near misses that
# reach the refusals (an IP outside its node's range, an unknown field, a duplicate token).
_EVERYTHING = """\
meshConfig:
  trustDomain: example.org
  rootNamespace: istio-system
  clusterId: c1
nodes:
- name: node1
  token: secret-node1
  podCIDRs: [10.1.0.0/24, "fd00:1::/64"]
- name: node2
  token: secret-node2
  podCIDRs: [10.2.0.0/24]
- {name: node3, token: secret-node3, allowEmpty: true}
workloads:
- name: web-0
  namespace: shop
  node: node1
  ips: [10.1.0.5, "fd00:1::5"]
  serviceAccount: web
  labels: {app: web, version: v1}
- name: db-0
  namespace: shop
  node: node2
  ip: 10.2.0.7
  serviceAccount: db
  labels: {app: db}
  uid: c1//Pod/shop/db-0
  network: net-a
services:
- name: web
  namespace: shop
  vip: 10.96.0.10
  ports:
  - {port: 80, targetPort: 8080, name: http}
  - {port: 443}
  selector: {app: web}
- name: db
  namespace: shop
  hostname: db.shop.example
  ports: [{port: 5432, targetPort: "5432"}]
  selector: {app: db}
authorizationPolicies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: web-allow, namespace: shop, labels: {team: a}, annotations: {x: y}}
  spec:
    action: ALLOW
    selector:
      matchLabels: {app: web}
    rules:
    - from:
      - source:
          principals: ["example.org/ns/shop/sa/front", "spiffe://example.org/ns/a/sa/*"]
          notPrincipals: ["*bad"]
          namespaces: ["shop"]
          notNamespaces: ["kube-*"]
          ipBlocks: ["10.0.0.0/8", "fd00::/8"]
          notIpBlocks: ["10.9.9.9"]
      to:
      - operation:
          ports: ["8080", 9090]
          notPorts: [15008]
    -
- metadata: {name: strict, namespace: istio-system}
  spec:
    action: DENY
    rules:
    - from: [{source: {notPrincipals: ["*"]}}]
"""


def seeds() -> dict[str, bytes]:
    return {
        "everything": _EVERYTHING.encode(),
        "base": _BASE_TEXT.encode(),
        "no-nodes-on-purpose": b"nodes: []\n",
        "no-workloads-on-purpose": b"nodes: [{name: node1, token: t}]\nworkloads: []\n",
        "flow-style": b'{"nodes": [{"name": "n", "token": "t"}], "workloads": []}',
        "outside-pod-range": _BASE_TEXT.replace("10.1.0.5", "10.3.0.5").encode(),
        "unknown-field": (_BASE_TEXT + "extra: 1\n").encode(),
        "duplicate-token": _BASE_TEXT.replace("t2", "t1").encode(),
        "empty": b"",
    }
