"""Architecture-level facts: ports, marks, tables and chain names, in one place.

They match Istio ambient (istio-cni + ztunnel) so that tools, dashboards and
peers that know Istio find what they expect.
"""

from typing import Final

# Listeners the agent opens inside every meshed pod's network namespace.
OUTBOUND_PORT: Final = 15001  # captured app egress (REDIRECT target)
INBOUND_PLAINTEXT_PORT: Final = 15006  # captured non-HBONE ingress (REDIRECT target)
INBOUND_HBONE_PORT: Final = 15008  # HBONE (mTLS + HTTP/2 CONNECT); never redirected
DNS_PORT: Final = 15053

# Listeners in the agent's own (node) network namespace.
ADMIN_PORT: Final = 15000  # localhost only
METRICS_PORT: Final = 15020
READINESS_PORT: Final = 15021

# Ports a captured destination must never be proxied to (it would loop).
ILLEGAL_PORTS: Final = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT})

# Every socket the agent creates in a pod netns carries this mark, so the
# capture rules skip it and the agent never re-captures its own traffic.
PROXY_MARK: Final = 0x539
PROXY_MASK: Final = 0xFFF
# Connmark set on agent->app connections with a spoofed source, restored on the
# app's replies so policy routing (table 100) delivers them back to the agent.
CONNMARK: Final = 0x111
CONNMARK_MASK: Final = 0xFFF
ROUTE_TABLE: Final = 100
RULE_PRIORITY: Final = 32764

# Source address the node SNATs kubelet probes to; the in-pod rules let it pass uncaptured.
PROBE_SNAT_IPV4: Final = "169.254.7.127"
PROBE_SNAT_IPV6: Final = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
# The node-side half (datapath/hostprobe.py): ipsets of this node's meshed pod IPs, and
# the nat chain (jumped to first from POSTROUTING) that SNATs node-local TCP to them.
PROBE_SET_IPV4: Final = "istio-inpod-probes-v4"
PROBE_SET_IPV6: Final = "istio-inpod-probes-v6"
CHAIN_HOST_POSTROUTING: Final = "ISTIO_POSTRT"

# Chains the agent owns inside a pod namespace (same names as istio-cni).
CHAIN_PREROUTING: Final = "ISTIO_PRERT"
CHAIN_OUTPUT: Final = "ISTIO_OUTPUT"

# The shipped control plane serves plaintext delta xDS and the CA on one port
# (istiod's plaintext xDS port).
CONTROLPLANE_XDS_PORT: Final = 15010

# The pod annotation istiod reads to advertise a pod as HBONE-capable
# (tunnel_protocol HBONE); istio-cni writes it in stock Istio, the agent here.
REDIRECTION_ANNOTATION: Final = "ambient.istio.io/redirection"
REDIRECTION_ENABLED: Final = "enabled"

# How an outbound connection whose HBONE tunnel never opened ends (its close reason starts
# with this); telemetry reports it with ztunnel's response flag CONNECT.
TUNNEL_OPEN_FAILED: Final = "HBONE tunnel failed to open"

# Envoy's response flags for what traffic management does to a connection (Envoy's
# StreamInfo::ResponseFlag short names), in metrics' `response_flags` and the access log.
OVERFLOW: Final = "UO"  # circuit breaker (maxConnections) refused it
UPSTREAM_CONNECT_FAILURE: Final = "UF"  # the one connect attempt failed
UPSTREAM_RETRY_LIMIT: Final = "URX"  # every connect attempt failed
NO_HEALTHY_UPSTREAM: Final = "UH"  # the service had no endpoint to try
NO_CLUSTER_FOUND: Final = "NC"  # a named waypoint is unknown (Envoy: no cluster found)
NO_ROUTE: Final = "NR"  # the route's every destination is unusable (unknown host or subset)
FAULT_ABORT: Final = "FI"  # an injected abort
FAULT_DELAY: Final = "DI"  # an injected delay

DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
DEFAULT_SERVICE_ACCOUNT: Final = "default"

TYPE_URL_ADDRESS: Final = "type.googleapis.com/istio.workload.Address"
TYPE_URL_AUTHORIZATION: Final = "type.googleapis.com/istio.security.Authorization"
# Istio config kinds served over xDS the way istiod's "api" generator serves them:
# the response type URL names group/version/kind, and each resource is an
# istio.mcp.v1alpha1.Resource envelope whose body holds the kind's spec message.
TYPE_URL_VIRTUAL_SERVICE: Final = "networking.istio.io/v1alpha3/VirtualService"
TYPE_URL_DESTINATION_RULE: Final = "networking.istio.io/v1alpha3/DestinationRule"
# istiod's api generator lists its config store by the exact group/version/kind of the
# type URL, and since Istio 1.22 the store keys these kinds by v1 (v1alpha3 is an alias),
# so the agent asks for both versions; the body is the v1alpha3 message either way.
TYPE_URL_VIRTUAL_SERVICE_V1: Final = "networking.istio.io/v1/VirtualService"
TYPE_URL_DESTINATION_RULE_V1: Final = "networking.istio.io/v1/DestinationRule"
TYPE_URL_MCP_RESOURCE: Final = "type.googleapis.com/istio.mcp.v1alpha1.Resource"
