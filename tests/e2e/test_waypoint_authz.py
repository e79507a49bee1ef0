"""L7 authorization at the waypoint (issue 19 item 6), in a 2x2 sandbox with `--waypoint`:
an AuthorizationPolicy attached to the demo namespace's waypoint by `targetRefs`
ALLOWs only `GET` on `/public*`; the waypoint answers anything else 403
`RBAC: access denied`, as Envoy's RBAC filter does, and never reaches the backend.

The caller is node1-pod1; the backend VIP 10.96.0.10:8080 goes through the waypoint
(10.10.1.250 on node1) because the demo namespace is labelled istio.io/use-waypoint.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator

import pytest

from .e2e_harness import Mesh, sandbox, wait_until

pytestmark = pytest.mark.timeout(300)

CALLER = "node1-pod1"
BACKEND = "10.96.0.10:8080"

POLICY = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: public-only, namespace: demo}
    spec:
      targetRefs:
      - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
      action: ALLOW
      rules:
      - to:
        - operation:
            methods: [GET]
            paths: [/public*]
    """
)

# One request per argv triple; prints each answer's status and body. argv: host port
# (method path)...
CLIENT = textwrap.dedent(
    """\
    import http.client, json, sys
    host, port, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    out = []
    for method, path in zip(rest[::2], rest[1::2]):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request(method, path, body=b"x" if method == "POST" else None)
        r = conn.getresponse()
        out.append({"status": r.status, "body": r.read().decode("utf-8", "replace")})
        conn.close()
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp(f"waypoint-authz-{request.param}")
    with sandbox(tmp, request.param, waypoint=True) as running:
        yield running


def send(mesh: Mesh, *calls: tuple[str, str]) -> list[dict[str, object]]:
    host, port = BACKEND.split(":")
    args = [part for call in calls for part in call]
    done = mesh.python_in(CALLER, CLIENT, host, port, *args, timeout=60)
    assert done.returncode == 0, done.stderr
    answers: list[dict[str, object]] = json.loads(done.stdout)
    return answers


def test_waypoint_policy_allows_get_public_and_denies_post_admin(mesh: Mesh) -> None:
    # Before the policy, the waypoint lets both through to the backend.
    before = send(mesh, ("GET", "/public"), ("POST", "/admin"))
    assert [a["status"] for a in before] == [200, 200], before

    mesh.apply(POLICY)

    def enforced() -> bool:
        return send(mesh, ("POST", "/admin"))[0]["status"] == 403

    wait_until("the waypoint enforces the policy", enforced)
    public, admin, get_admin = send(mesh, ("GET", "/public"), ("POST", "/admin"), ("GET", "/admin"))
    assert public["status"] == 200, public
    assert admin == {"status": 403, "body": "RBAC: access denied"}
    assert get_admin == {"status": 403, "body": "RBAC: access denied"}

    # Removing the policy lifts it.
    mesh.apply(POLICY, delete=True)
    wait_until("the waypoint drops the policy", lambda: not enforced())
