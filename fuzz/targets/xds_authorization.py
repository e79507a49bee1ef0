"""Fuzz target: an `istio.security.Authorization` resource from xDS.

Arbitrary bytes are converted as the agent converts `Any.value`; `ConversionError` is the
documented refusal (it becomes the NACK). A policy that converts must then behave: it
survives encode -> convert unchanged, the state store indexes it and lets it go again, and
it can be evaluated (and explained) for any connection, mTLS or plaintext, IPv4 or IPv6.
"""

from __future__ import annotations

import ipaddress

from google.protobuf import empty_pb2 as empty_pb

from nodeagent.model.identity import Identity
from nodeagent.model.policy import ConnectionAttributes
from nodeagent.model.workload import Workload
from nodeagent.pb.istio.security import authorization_pb2 as auth_pb
from nodeagent.policy.engine import evaluate
from nodeagent.state.convert import ConversionError, authorization_from_bytes
from nodeagent.state.encode import authorization_to_pb
from nodeagent.state.store import StateBatch, StateStore

INSTRUMENT = ("nodeagent",)
MAX_LEN = 4096

_CONNECTIONS = (
    ConnectionAttributes(
        source_ip=ipaddress.ip_address("10.10.1.11"),
        source_identity=Identity.for_workload("cluster.local", "default", "frontend"),
        destination_ip=ipaddress.ip_address("10.10.2.12"),
        destination_port=8080,
        destination_namespace="default",
        destination_name="backend-1",
    ),
    ConnectionAttributes(
        source_ip=ipaddress.ip_address("fd00::11"),
        source_identity=None,
        destination_ip=ipaddress.ip_address("::ffff:10.10.2.12"),
        destination_port=0,
    ),
)


def fuzz_one(data: bytes) -> None:
    try:
        policy = authorization_from_bytes("", data)
    except ConversionError:
        return
    encoded = authorization_to_pb(policy).SerializeToString(deterministic=True)
    again = authorization_from_bytes(policy.key, encoded)
    assert again == policy, f"encode -> convert changed the policy:\n{policy!r}\n{again!r}"
    store = StateStore()
    store.apply(StateBatch(policies=(policy,)))
    assert store.policy(policy.key) == policy
    # A workload in the policy's namespace that names it: every scope applies to it.
    workload = Workload(
        uid="u", name="backend-1", namespace=policy.namespace, authorization_policies=(policy.key,)
    )
    assert store.policies_for(workload) == (policy,), f"{policy.key} does not apply to its target"
    for conn in _CONNECTIONS:
        decision = evaluate((policy,), conn)
        decision.explain()
        _ = decision.error_message
    store.apply(StateBatch(removed_policies=(policy.key,)))
    assert not store.policies_for(workload), f"{policy.key} still applies after its removal"
    assert not any(store.counts().values()), f"{policy.key} left state behind after removal"


def _match(**kw: object) -> auth_pb.Match:
    return auth_pb.Match(**kw)  # type: ignore[arg-type]


def seeds() -> dict[str, bytes]:
    """Policies as istiod sends them: allow by principal, deny by namespace and IP, dry runs."""
    allow = auth_pb.Authorization(
        name="allow-frontend",
        namespace="default",
        scope=auth_pb.Scope.WORKLOAD_SELECTOR,
        action=auth_pb.Action.ALLOW,
        rules=[
            auth_pb.Rule(
                clauses=[
                    auth_pb.Clause(
                        matches=[
                            _match(
                                principals=[
                                    auth_pb.StringMatch(
                                        exact="spiffe://cluster.local/ns/default/sa/frontend"
                                    )
                                ]
                            )
                        ]
                    ),
                    auth_pb.Clause(matches=[_match(destination_ports=[8080, 9000])]),
                ]
            )
        ],
    )
    deny = auth_pb.Authorization(
        name="deny-outsiders",
        namespace="istio-system",
        scope=auth_pb.Scope.GLOBAL,
        action=auth_pb.Action.DENY,
        rules=[
            auth_pb.Rule(
                clauses=[
                    auth_pb.Clause(
                        matches=[
                            _match(
                                not_namespaces=[
                                    auth_pb.StringMatch(prefix="kube-"),
                                    auth_pb.StringMatch(suffix="-system"),
                                ],
                                source_ips=[
                                    auth_pb.Address(address=bytes([10, 0, 0, 0]), length=8),
                                    auth_pb.Address(address=bytes(16), length=0),
                                ],
                                not_destination_ips=[
                                    auth_pb.Address(address=bytes([10, 96, 0, 10]), length=32)
                                ],
                                not_destination_ports=[15008],
                                service_accounts=[
                                    auth_pb.ServiceAccountMatch(
                                        namespace="default", serviceAccount="backend"
                                    )
                                ],
                                not_principals=[
                                    auth_pb.StringMatch(presence=empty_pb.Empty()),
                                ],
                            )
                        ]
                    )
                ]
            ),
            auth_pb.Rule(),
        ],
    )
    dry = auth_pb.Authorization(
        name="dry",
        namespace="prod",
        scope=auth_pb.Scope.NAMESPACE,
        action=auth_pb.Action.DENY,
        dry_run=True,
        rules=[
            auth_pb.Rule(
                clauses=[
                    auth_pb.Clause(
                        matches=[
                            _match(
                                destination_ips=[
                                    auth_pb.Address(address=bytes(15) + b"\x01", length=128)
                                ],
                                not_service_accounts=[
                                    auth_pb.ServiceAccountMatch(namespace="prod", serviceAccount="")
                                ],
                            )
                        ]
                    )
                ]
            )
        ],
    )
    return {
        "allow-principal": allow.SerializeToString(deterministic=True),
        "deny-global": deny.SerializeToString(deterministic=True),
        "dry-run-namespace": dry.SerializeToString(deterministic=True),
        # Refused on purpose: a prefix length beyond the address, a match with no type.
        "bad-prefix-length": auth_pb.Authorization(
            name="bad",
            namespace="default",
            rules=[
                auth_pb.Rule(
                    clauses=[
                        auth_pb.Clause(
                            matches=[
                                _match(source_ips=[auth_pb.Address(address=b"\0" * 4, length=33)])
                            ]
                        )
                    ]
                )
            ],
        ).SerializeToString(deterministic=True),
        "empty-string-match": auth_pb.Authorization(
            name="bad",
            namespace="default",
            rules=[
                auth_pb.Rule(
                    clauses=[auth_pb.Clause(matches=[_match(principals=[auth_pb.StringMatch()])])]
                )
            ],
        ).SerializeToString(deterministic=True),
    }
