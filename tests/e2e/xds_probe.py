"""A minimal delta-xDS subscriber for the e2e tests, run inside a sandbox node's namespace.

Usage: python xds_probe.py ADDRESS TOKEN_FILE. It opens one
DeltaAggregatedResources stream (plaintext, bearer token from the file, as a
node agent would), subscribes by wildcard to Address and Authorization, ACKs
every response and prints one JSON line per response, decoded, until killed.
It uses the raw generated stub on purpose: it checks what the control plane
puts on the wire, independently of the agent's own xDS client.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import sys
from collections.abc import Iterator
from typing import Any

import grpc

from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from nodeagent.pb.envoy.service.discovery.v3 import ads_pb2_grpc as ads_pb_grpc
from nodeagent.pb.envoy.service.discovery.v3 import discovery_pb2 as discovery_pb
from nodeagent.pb.istio.security import authorization_pb2 as authorization_pb
from nodeagent.pb.istio.workload import workload_pb2 as workload_pb


def _ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def decode(resp: discovery_pb.DeltaDiscoveryResponse) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for res in resp.resources:
        if resp.type_url == TYPE_URL_ADDRESS:
            address = workload_pb.Address.FromString(res.resource.value)
            if address.HasField("workload"):
                w = address.workload
                resources.append(
                    {
                        "kind": "workload",
                        "resource": res.name,
                        "name": w.name,
                        "namespace": w.namespace,
                        "node": w.node,
                        "ips": [_ip(a) for a in w.addresses],
                        "service_account": w.service_account,
                        "trust_domain": w.trust_domain,
                        "services": sorted(w.services),
                    }
                )
            else:
                s = address.service
                resources.append(
                    {
                        "kind": "service",
                        "resource": res.name,
                        "name": s.name,
                        "namespace": s.namespace,
                        "hostname": s.hostname,
                        "vips": [_ip(a.address) for a in s.addresses],
                        "ports": [[p.service_port, p.target_port] for p in s.ports],
                    }
                )
        else:
            a = authorization_pb.Authorization.FromString(res.resource.value)
            resources.append(
                {
                    "kind": "authorization",
                    "resource": res.name,
                    "name": a.name,
                    "namespace": a.namespace,
                    "action": authorization_pb.Action.Name(a.action),
                    "rules": len(a.rules),
                }
            )
    return {
        "type_url": resp.type_url,
        "resources": resources,
        "removed": list(resp.removed_resources),
    }


def main(address: str, token_file: str) -> int:
    with open(token_file) as f:
        token = f.read().strip()
    outbox: queue.Queue[discovery_pb.DeltaDiscoveryRequest | None] = queue.Queue()
    for type_url in (TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION):
        outbox.put(discovery_pb.DeltaDiscoveryRequest(type_url=type_url))

    def requests() -> Iterator[discovery_pb.DeltaDiscoveryRequest]:
        while (req := outbox.get()) is not None:
            yield req

    with grpc.insecure_channel(address) as channel:
        stub = ads_pb_grpc.AggregatedDiscoveryServiceStub(channel)
        stream = stub.DeltaAggregatedResources(
            requests(), metadata=(("authorization", f"Bearer {token}"),)
        )
        try:
            for resp in stream:
                print(json.dumps(decode(resp)), flush=True)
                outbox.put(
                    discovery_pb.DeltaDiscoveryRequest(
                        type_url=resp.type_url, response_nonce=resp.nonce
                    )
                )
        except grpc.RpcError as exc:
            print(json.dumps({"error": f"{exc.code().name}: {exc.details()}"}), flush=True)
            return 1
        finally:
            outbox.put(None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
