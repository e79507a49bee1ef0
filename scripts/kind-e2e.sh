#!/usr/bin/env bash
# End-to-end test of the nodeagent DaemonSet on a kind cluster.
#
# Creates a kind cluster (1 control plane, 2 workers), installs Istio's control
# plane WITHOUT its node agents (no ztunnel, no istio-cni), builds the nodeagent
# image and loads it into the nodes, installs the kind overlay, deploys two
# clients (worker 1) and two servers (worker 2) in an ambient namespace, and
# checks:
#   annotation  the agents wrote ambient.istio.io/redirection=enabled on every
#               test pod (no pod template sets it)
#   traffic     every client reaches every server across nodes
#   mtls        on the server's node the traffic is only HBONE on port 15008:
#               tcpdump sees no packet to the app port and not the plaintext
#   identity    the server node's agent reports the client's SPIFFE identity
#               (istio_tcp_connections_opened_total, reporter=destination)
#   source-ip   the server sees the client pod's IP (original source kept)
#   deny        an L4 DENY AuthorizationPolicy on client-b's identity is enforced
#   agent       every agent serves readiness (:15021) and metrics (:15020)
#   upgrade     a rollout restart of the DaemonSet keeps the rules and the
#               annotations (SIGTERM with the DaemonSet present), and traffic
#               flows again once the new agents are ready
#   uninstall   after uninstall no capture rules remain in any pod namespace,
#               and no test pod keeps the annotation
#
# Usage:
#   scripts/kind-e2e.sh [all]          up, every check, uninstall, down (trap)
#   scripts/kind-e2e.sh up             create and install only
#   scripts/kind-e2e.sh check NAME...  run checks against a cluster that is up
#   scripts/kind-e2e.sh down           delete the cluster
#   scripts/kind-e2e.sh preflight      say what is missing, exit 1 if anything
#
# Needs: docker (with a running engine), kind, kubectl, istioctl (Istio >= 1.24;
# set ISTIOCTL=/path/to/istioctl). Environment: KIND_CLUSTER (default
# nodeagent-e2e), KEEP_CLUSTER=1 keeps the cluster after `all`, TCPDUMP_IMAGE
# (default nicolaka/netshoot:v0.13), WAIT (default 180s).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLUSTER=${KIND_CLUSTER:-nodeagent-e2e}
CTX="kind-${CLUSTER}"
ISTIOCTL=${ISTIOCTL:-istioctl}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
TCPDUMP_IMAGE=${TCPDUMP_IMAGE:-nicolaka/netshoot:v0.13}
WAIT=${WAIT:-180s}
# The kind overlay refers to this image (imagePullPolicy: Never).
IMAGE=nodeagent:dev
AGENT_NS=istio-system
APP_NS=mesh-e2e
TRUST_DOMAIN=cluster.local
OVERLAY="$ROOT/daemonset/kustomize/overlays/kind"
APPS="$ROOT/tests/kind/apps"
ALL_CHECKS=(annotation traffic mtls identity source-ip deny agent upgrade)
APPS_LIST=(client-a client-b server-a server-b)
REDIRECTION_JSONPATH='{.metadata.annotations.ambient\.istio\.io/redirection}'

log() { printf '[kind-e2e] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
k() { kubectl --context "$CTX" "$@"; }

# retry SECONDS CMD...: run CMD every 2 s until it succeeds or time runs out.
retry() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 2
  done
}

preflight() {
  local missing=()
  local cmd
  for cmd in docker kind kubectl "$ISTIOCTL"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd not on PATH")
  done
  if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
    missing+=("no reachable Docker engine (docker info failed)")
  fi
  if ((${#missing[@]})); then
    local item
    for item in "${missing[@]}"; do
      log "missing: $item"
    done
    return 1
  fi
}

# ---- set-up -----------------------------------------------------------------

create_cluster() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "cluster $CLUSTER exists; reusing it"
  else
    log "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config "$ROOT/tests/kind/kind-config.yaml" --wait 120s
  fi
  local workers
  mapfile -t workers < <(k get nodes -l '!node-role.kubernetes.io/control-plane' \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)
  ((${#workers[@]} >= 2)) || die "expected 2 worker nodes, found ${#workers[@]}"
  k label node "${workers[0]}" nodeagent-e2e/role=client --overwrite >/dev/null
  k label node "${workers[1]}" nodeagent-e2e/role=server --overwrite >/dev/null
}

install_istio() {
  log "installing istiod (ambient profile, ztunnel and istio-cni disabled)"
  # profile=ambient turns on istiod's ambient support (PILOT_ENABLE_AMBIENT)
  # and its workload xDS; our agent replaces both node components.
  # trustedZtunnelNamespace sets CA_TRUSTED_NODE_ACCOUNTS=istio-system/ztunnel:
  # the account our DaemonSet runs as may request certificates for the pods
  # on its node.
  "$ISTIOCTL" install -y --context "$CTX" \
    --set profile=ambient \
    --set components.ztunnel.enabled=false \
    --set components.cni.enabled=false \
    --set values.pilot.env.PILOT_ENABLE_AMBIENT=true \
    --set values.pilot.trustedZtunnelNamespace="$AGENT_NS" \
    --set meshConfig.trustDomain="$TRUST_DOMAIN"
  local trusted
  trusted=$(k -n "$AGENT_NS" get deploy istiod \
    -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="CA_TRUSTED_NODE_ACCOUNTS")].value}')
  if [[ ",$trusted," != *",$AGENT_NS/ztunnel,"* ]]; then
    # Older charts render this only with their own ztunnel enabled.
    log "setting CA_TRUSTED_NODE_ACCOUNTS=$AGENT_NS/ztunnel on istiod (was '${trusted}')"
    k -n "$AGENT_NS" set env deploy/istiod CA_TRUSTED_NODE_ACCOUNTS="$AGENT_NS/ztunnel"
  fi
  k -n "$AGENT_NS" rollout status deploy/istiod --timeout "$WAIT"
  # istiod writes its root certificate into every namespace; the agent mounts it.
  retry 60 k -n "$AGENT_NS" get configmap istio-ca-root-cert >/dev/null ||
    die "istiod did not create istio-ca-root-cert"
}

build_image() {
  log "building $IMAGE"
  docker build -f "$ROOT/daemonset/image/Dockerfile" -t "$IMAGE" "$ROOT"
  kind load docker-image "$IMAGE" --name "$CLUSTER"
}

install_agent() {
  log "installing the nodeagent DaemonSet (kind overlay)"
  k apply -k "$OVERLAY"
  k -n "$AGENT_NS" rollout status ds/nodeagent --timeout "$WAIT"
}

deploy_apps() {
  log "deploying the test apps in $APP_NS"
  k apply -k "$APPS"
  local app
  for app in "${APPS_LIST[@]}"; do
    k -n "$APP_NS" rollout status "deploy/$app" --timeout "$WAIT"
  done
  # Ready means xDS synced and every local meshed pod captured.
  k -n "$AGENT_NS" wait pod -l app.kubernetes.io/name=nodeagent --for=condition=Ready \
    --timeout "$WAIT"
}

up() {
  preflight || die "prerequisites missing"
  create_cluster
  install_istio
  build_image
  install_agent
  deploy_apps
  log "cluster $CLUSTER is up (kubectl --context $CTX)"
}

down() {
  if [[ "$KEEP_CLUSTER" == 1 ]]; then
    log "KEEP_CLUSTER=1: leaving cluster $CLUSTER"
    return 0
  fi
  log "deleting kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER" || true
}

# ---- helpers for checks -------------------------------------------------------

# call CLIENT SERVER MESSAGE: one connection from a client pod; prints the reply.
call() {
  k -n "$APP_NS" exec "deploy/$1" -c app -- python3 /app/echo.py call "$2" 8080 "$3"
}

pod_ip() {
  k -n "$APP_NS" get pod -l "app=$1" -o jsonpath='{.items[0].status.podIP}'
}

node_of() {
  k -n "$APP_NS" get pod -l "app=$1" -o jsonpath='{.items[0].spec.nodeName}'
}

agent_on() {
  k -n "$AGENT_NS" get pod -l app.kubernetes.io/name=nodeagent \
    --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}'
}

# agent_get POD PORT PATH: GET through the API server's pod proxy.
agent_get() {
  k get --raw "/api/v1/namespaces/$AGENT_NS/pods/$1:$2/proxy$3"
}

# reports_peer AGENT PRINCIPAL: the agent's metrics show an inbound (destination)
# connection whose peer identity is PRINCIPAL.
reports_peer() {
  local metrics
  metrics=$(agent_get "$1" 15020 /metrics) || return 1
  grep '^istio_tcp_connections_opened_total{' <<<"$metrics" |
    grep 'reporter="destination"' | grep -qF "source_principal=\"$2\""
}

# redirection APP: the value of the app pod's ambient.istio.io/redirection annotation.
redirection() {
  k -n "$APP_NS" get pod -l "app=$1" -o jsonpath="{.items[0]$REDIRECTION_JSONPATH}"
}

annotated() {
  [[ "$(redirection "$1")" == enabled ]]
}

# pod_rules NODE: capture chains and policy-routing rules in every pod netns on
# a kind node, one line each, prefixed with the namespace.
pod_rules() {
  # shellcheck disable=SC2016 # expanded inside the node, not here
  docker exec "$1" sh -c '
    save=$(command -v iptables-legacy-save || command -v iptables-save)
    for ns in /var/run/netns/*; do
      [ -e "$ns" ] || continue
      nsenter --net="$ns" "$save" 2>/dev/null | grep -E "ISTIO_(PRERT|OUTPUT)" |
        sed "s|^|$ns: |"
      nsenter --net="$ns" ip rule show 2>/dev/null | grep -E "lookup 100" | sed "s|^|$ns: |"
    done' | sed "s|^|$1 |" || true
}

# refused CLIENT SERVER: the connection fails or gets no reply.
refused() {
  ! call "$1" "$2" refused-check >/dev/null 2>&1
}

# ---- checks ---------------------------------------------------------------------

# The agent, not the pod template, puts the annotation on: istiod then sends
# the pods' peers HBONE for them.
check_annotation() {
  local app
  for app in "${APPS_LIST[@]}"; do
    retry 60 annotated "$app" ||
      die "$app: no ambient.istio.io/redirection=enabled annotation (got '$(redirection "$app")')"
  done
  log "the agents annotated ${APPS_LIST[*]}"
}

check_traffic() {
  local client server reply
  for client in client-a client-b; do
    for server in server-a server-b; do
      reply=$(retry 60 call "$client" "$server" "hello-from-$client") ||
        die "$client could not reach $server"
      [[ "$reply" == "$server"* ]] || die "$client -> $server: unexpected reply '$reply'"
      log "$client -> $server: $reply"
    done
  done
}

check_mtls() {
  local server_ip node marker capture
  server_ip=$(pod_ip server-a)
  node=$(node_of server-a)
  marker="plaintext-marker-$RANDOM$RANDOM"
  k delete pod tcpdump-e2e --ignore-not-found --wait >/dev/null
  # A host-network capture on the server's node: everything to and from the
  # server pod that crosses the node, as ASCII.
  k apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: tcpdump-e2e
  namespace: default
spec:
  nodeName: $node
  hostNetwork: true
  restartPolicy: Never
  tolerations:
    - operator: Exists
  containers:
    - name: tcpdump
      image: $TCPDUMP_IMAGE
      command: ["timeout", "30", "tcpdump", "-i", "any", "-nn", "-A", "-l", "tcp and host $server_ip"]
      securityContext:
        capabilities:
          add: ["NET_ADMIN", "NET_RAW"]
EOF
  k wait pod/tcpdump-e2e --for=condition=Ready --timeout "$WAIT" >/dev/null
  retry 20 bash -c "kubectl --context '$CTX' logs tcpdump-e2e 2>&1 | grep -q 'listening on'" ||
    die "tcpdump did not start"
  local i
  for i in 1 2 3; do
    call client-a server-a "$marker-$i" >/dev/null || die "client-a -> server-a failed"
  done
  k wait pod/tcpdump-e2e --for=jsonpath='{.status.phase}'=Succeeded --timeout 60s >/dev/null ||
    true
  capture=$(k logs tcpdump-e2e)
  k delete pod tcpdump-e2e --wait=false >/dev/null
  grep -qF "$server_ip.15008" <<<"$capture" || die "no HBONE (port 15008) traffic to $server_ip seen"
  if grep -qF "$server_ip.8080" <<<"$capture"; then
    die "packets to the app port $server_ip:8080 crossed the node: not tunnelled"
  fi
  if grep -qF "$marker" <<<"$capture"; then
    die "the message was seen in plaintext on the wire"
  fi
  log "only HBONE on $server_ip:15008 crossed the node; no plaintext"
}

check_identity() {
  local node agent principal
  node=$(node_of server-a)
  agent=$(agent_on "$node")
  principal="spiffe://$TRUST_DOMAIN/ns/$APP_NS/sa/client-a"
  call client-a server-a identity-check >/dev/null || die "client-a -> server-a failed"
  retry 30 reports_peer "$agent" "$principal" ||
    die "agent $agent did not report a destination connection from $principal"
  log "agent $agent on $node saw $principal"
}

check_source_ip() {
  local client_ip reply
  client_ip=$(pod_ip client-a)
  reply=$(call client-a server-a source-ip) || die "client-a -> server-a failed"
  [[ "$reply" == *" saw $client_ip said "* ]] ||
    die "server did not see the client's IP $client_ip: '$reply'"
  log "server-a saw client-a's own IP $client_ip"
}

check_deny() {
  k apply -f "$ROOT/tests/kind/deny-policy.yaml"
  if ! retry 60 refused client-b server-a; then
    k delete -f "$ROOT/tests/kind/deny-policy.yaml" --ignore-not-found
    die "client-b still reaches server-a under a DENY policy"
  fi
  local ok=1
  call client-a server-a allowed-check >/dev/null || ok=0
  call client-b server-b allowed-check >/dev/null || ok=0
  k delete -f "$ROOT/tests/kind/deny-policy.yaml" --ignore-not-found
  ((ok)) || die "the DENY policy also blocked connections it does not match"
  retry 60 call client-b server-a after-deny >/dev/null ||
    die "client-b still denied after the policy was deleted"
  log "DENY enforced for client-b -> server-a only, and lifted with the policy"
}

check_agent() {
  local agents agent metrics
  mapfile -t agents < <(k -n "$AGENT_NS" get pod -l app.kubernetes.io/name=nodeagent \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
  ((${#agents[@]} >= 3)) || die "expected an agent on each of 3 nodes, found ${#agents[@]}"
  for agent in "${agents[@]}"; do
    agent_get "$agent" 15021 /healthz/ready >/dev/null || die "$agent: /healthz/ready failed"
    metrics=$(agent_get "$agent" 15020 /metrics) || die "$agent: /metrics failed"
    grep -q '^# TYPE istio_' <<<"$metrics" || die "$agent: no istio_ metrics"
    agent_get "$agent" 15020 /stats/prometheus >/dev/null || die "$agent: /stats/prometheus failed"
  done
  log "readiness and metrics served by ${#agents[@]} agents"
}

# Upgrade: every agent gets SIGTERM while its DaemonSet exists, so it must
# leave the capture rules and the annotations in place for its successor.
check_upgrade() {
  local node before after app
  node=$(node_of server-a)
  before=$(pod_rules "$node")
  [[ -n "$before" ]] || die "no capture rules on $node before the upgrade"
  k -n "$AGENT_NS" rollout restart ds/nodeagent
  k -n "$AGENT_NS" rollout status ds/nodeagent --timeout "$WAIT"
  after=$(pod_rules "$node")
  [[ "$after" == "$before" ]] || die "capture rules on $node changed across the upgrade:
before:
$before
after:
$after"
  for app in "${APPS_LIST[@]}"; do
    annotated "$app" || die "$app lost its annotation across the upgrade"
  done
  retry 60 call client-a server-a after-upgrade >/dev/null ||
    die "client-a cannot reach server-a after the upgrade"
  log "rules and annotations survived a rollout restart; traffic flows"
}

# Uninstall: delete the DaemonSet first (foreground, so each agent sees it
# being deleted and removes its rules from every pod), then everything else.
# Afterwards no pod namespace on any node may hold a capture chain or the
# agent's policy-routing rule.
check_uninstall() {
  k -n "$AGENT_NS" delete daemonset nodeagent --cascade=foreground --wait --timeout "$WAIT"
  k delete -k "$OVERLAY" --ignore-not-found --wait
  local node leftovers app
  leftovers=""
  for node in $(kind get nodes --name "$CLUSTER"); do
    # Every pod netns the runtime has on this node: iptables chains and ip rules.
    leftovers+=$(pod_rules "$node")
  done
  if [[ -n "$leftovers" ]]; then
    die "rules left in pods after uninstall:
$leftovers"
  fi
  for app in "${APPS_LIST[@]}"; do
    [[ -z "$(redirection "$app")" ]] || die "$app still has its annotation after uninstall"
  done
  log "no capture rules and no annotations left in any pod after uninstall"
}

run_check() {
  local name=$1
  local fn="check_${name//-/_}"
  declare -F "$fn" >/dev/null || die "unknown check '$name' (known: ${ALL_CHECKS[*]} uninstall)"
  log "check $name"
  "$fn"
  printf '[kind-e2e] PASS %s\n' "$name"
}

all() {
  preflight || die "prerequisites missing"
  trap down EXIT
  up
  local name failed=()
  for name in "${ALL_CHECKS[@]}" uninstall; do
    # Each check runs as its own process (with its own errexit), so one
    # failure does not hide the others.
    bash "${BASH_SOURCE[0]}" check "$name" || failed+=("$name")
  done
  if ((${#failed[@]})); then
    log "FAILED: ${failed[*]}"
    return 1
  fi
  log "all checks passed"
}

main() {
  local cmd=${1:-all}
  case "$cmd" in
  all) all ;;
  up) up ;;
  down) down ;;
  preflight) preflight ;;
  check)
    shift
    (($#)) || set -- "${ALL_CHECKS[@]}"
    local name
    for name in "$@"; do
      run_check "$name"
    done
    ;;
  -h | --help | help) sed -n '2,30p' "${BASH_SOURCE[0]}" ;;
  *) die "unknown command '$cmd' (all, up, check NAME..., down, preflight)" ;;
  esac
}

main "$@"
