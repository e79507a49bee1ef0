"""The agent's settings: one frozen, typed, validated object built at start.

Sources, lowest precedence first: defaults, a YAML file, environment variables
(the names ztunnel and istio-cni use where one exists), command-line overrides.
Every error names the field and the source it came from; a bad file is refused
whole so a running agent keeps the settings it has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal, get_args

from nodeagent.model import constants
from nodeagent.model.yamlfile import YamlSyntaxError, load_yaml

RedirectBackend = Literal["iptables", "ebpf"]
LogLevel = Literal["trace", "debug", "info", "warning", "error"]
KubeApiMode = Literal["auto", "on", "off"]

# Where a pod finds its API server and service-account credentials.
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


class ConfigError(ValueError):
    """A setting was missing or invalid; the message names the field and its source."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """Every setting of a running agent."""

    node_name: str = ""
    """Kubernetes node this agent serves (env NODE_NAME). Pods whose workload
    record names this node are captured. Required by `run`."""

    pod_name: str = "nodeagent"
    """The agent's own pod name (env POD_NAME), sent in the xDS node id."""

    pod_namespace: str = "istio-system"
    """The agent's own namespace (env POD_NAMESPACE), sent in the xDS node id."""

    instance_ip: str = ""
    """The agent's IP (env INSTANCE_IP), sent in the xDS node id and metadata."""

    cluster_id: str = "Kubernetes"
    """Cluster name sent as gRPC `clusterid` metadata (env CLUSTER_ID)."""

    trust_domain: str = constants.DEFAULT_TRUST_DOMAIN
    """SPIFFE trust domain of workload identities (env TRUST_DOMAIN)."""

    xds_address: str = "https://istiod.istio-system.svc:15012"
    """Control plane for delta xDS (env XDS_ADDRESS). `http://` means plaintext,
    for local use only; `https://` verifies the server with `xds_root_ca`."""

    xds_root_ca: str = ""
    """PEM file with the root that signs the control plane's serving certificate
    (env XDS_ROOT_CA). Empty with an https address means the system roots."""

    ca_address: str = ""
    """Certificate authority (env CA_ADDRESS). Empty means the same as xds_address."""

    auth_token_path: str = "/var/run/secrets/tokens/istio-token"
    """Bearer token file sent on every control-plane call (env AUTH_TOKEN); read
    again on every reconnect, because projected tokens rotate."""

    xds_keepalive_time: float = 30.0
    """Seconds between HTTP/2 keepalive PINGs on the xDS connection (ztunnel's 30 s).
    A server polices PINGs: istiod answers PINGs closer than 15 s apart (its
    enforcement MinTime, half its 30 s keepaliveInterval) with GOAWAY
    too_many_pings, and the shipped control plane enforces the same 15 s, so keep
    this at 15 s or more. PINGs go out whether or not data flowed, so a dead
    connection is noticed within this plus `xds_keepalive_timeout`."""

    xds_keepalive_timeout: float = 10.0
    """Seconds to wait for a keepalive PING's ACK before the xDS connection is
    dropped and dialled again (ztunnel and istiod: 10 s)."""

    hbone_handshake_timeout: float = 10.0
    """Seconds an inbound HBONE connection (15008) gets from accept to the end of
    its TLS handshake before it is closed; also the wait for the local pod's
    certificate. The same 10 s bounds an outbound HBONE connect (ztunnel's
    CONNECTION_TIMEOUT)."""

    hbone_preface_timeout: float = 10.0
    """Seconds an inbound HBONE connection gets, after TLS, to send the HTTP/2
    client preface and SETTINGS; a peer that does not is closed. 10 s, as Go's
    HTTP/2 server waits for a preface; without a bound a peer that finished TLS
    and went quiet held its socket forever."""

    hbone_idle_timeout: float = 600.0
    """Seconds an inbound HBONE connection may carry no stream before the server
    closes it (GOAWAY). Twice the client pool's 300 s (ztunnel's
    POOL_UNUSED_RELEASE_TIMEOUT): the client, which knows whether it still wants
    the connection, normally closes first; this only reclaims connections whose
    client forgot them or went away."""

    hbone_max_connections: int = 4096
    """Inbound HBONE connections the agent holds at once, all pods together,
    counted from accept (TLS handshakes included). One more is closed at once,
    before TLS, and counted in nodeagent_hbone_inbound_refused_total. Each
    connection costs a descriptor, and each tunnel on it another for the app:
    4096 leaves room under a 20000 descriptor limit."""

    hbone_max_connections_per_identity: int = 1024
    """Inbound HBONE connections one peer SPIFFE identity may hold at once, all
    pods together. One more is closed after its TLS handshake, before any HTTP/2
    is sent, and counted; so one identity can take at most a quarter of
    `hbone_max_connections` and not starve the rest. A client pod opens one
    connection per destination pod, so replicas x local pods must fit."""

    redirect_backend: RedirectBackend = "iptables"
    """How pod traffic is captured (env REDIRECT_BACKEND): `iptables` (default)
    or `ebpf` (IPv4 outbound connects redirected once, at connect time, by a
    cgroup BPF program; inbound and IPv6 stay with iptables)."""

    cgroup2_path: str = ""
    """The host's cgroup2 root, where the eBPF backend attaches (env CGROUP2_PATH).
    Empty: the first cgroup2 mount in /proc/self/mounts."""

    bpf_pin_dir: str = "auto"
    """Where the eBPF backend pins its maps and links so capture outlives the agent
    (env BPF_PIN_DIR). `auto`: /sys/fs/bpf/nodeagent/<cluster_id>/<node_name> when a
    bpffs is mounted there; empty: never pin (capture ends with the agent)."""

    log_level: LogLevel = "info"
    """Starting log level (env LOG_LEVEL); changeable at run time via the admin API."""

    admin_address: str = f"127.0.0.1:{constants.ADMIN_PORT}"
    """Admin HTTP listener; localhost only because it exposes config and control."""

    admin_socket: str = "/var/run/nodeagent/admin.sock"
    """Admin API on a Unix socket too (env ADMIN_SOCKET), for the node-level CLI."""

    metrics_address: str = f"0.0.0.0:{constants.METRICS_PORT}"
    """Prometheus metrics listener (`/metrics`, `/stats/prometheus`)."""

    readiness_address: str = f"0.0.0.0:{constants.READINESS_PORT}"
    """Readiness listener (`/healthz/ready`)."""

    secret_ttl_seconds: int = 24 * 3600
    """Requested workload certificate lifetime (env SECRET_TTL_SECONDS)."""

    netns_dir: str = "/var/run/netns"
    """Directory of named network namespaces scanned for pods (env NETNS_DIR)."""

    proc_root: str = "/proc"
    """Where processes are scanned for pod namespaces (env PROC_ROOT; /host/proc in a pod)."""

    state_dir: str = "/var/run/nodeagent"
    """Agent runtime files (sockets, pinned BPF objects) (env STATE_DIR)."""

    drain_seconds: float = 5.0
    """How long live connections may finish after shutdown starts (env DRAIN_SECONDS)."""

    capture_check_interval: float = 10.0
    """Seconds between checks of every ready pod's capture against its plan (env
    CAPTURE_CHECK_INTERVAL): a rule removed or changed by hand is put back, logged
    and counted (nodeagent_capture_repairs_total)."""

    kube_api: KubeApiMode = "auto"
    """Whether the agent talks to the Kubernetes API server (env KUBE_API), to
    annotate the pods it captures, to watch the pods on its node and the namespaces
    (enrollment: which pods Istio ambient captures) and, at SIGTERM, to read its
    own DaemonSet (upgrade or uninstall). Without it every workload the control
    plane places on the node is captured. `auto`: when `kube_api_address` is set or the agent
    runs in a pod (KUBERNETES_SERVICE_HOST/PORT set); `on`: required, start fails
    without an address; `off`: never (the sandbox has no API server)."""

    kube_api_address: str = ""
    """API server URL (env KUBE_API_ADDRESS), `https://host:port`. Empty means
    the in-cluster address from KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT."""

    kube_token_path: str = IN_CLUSTER_TOKEN
    """Bearer token file for API server calls (env KUBE_TOKEN): the standard
    service-account token, read again on every call because the kubelet rotates it."""

    kube_root_ca: str = IN_CLUSTER_CA
    """PEM file with the CA that signs the API server's certificate (env KUBE_ROOT_CA)."""

    cni_socket: str = ""
    """Unix socket where the chained CNI plugin (`nodeagent-cni`) reports new pods
    (env CNI_SOCKET); empty means `cni.sock` in `state_dir`
    (/var/run/nodeagent/cni.sock), `off` turns it off. The plugin's config names the
    same path."""

    cni_add_timeout: float = 8.0
    """How long a CNI ADD may wait for the new pod to be captured (env
    CNI_ADD_TIMEOUT); after it the plugin leaves fail-closed rules the agent adopts.
    Keep it below the plugin's own `add_timeout_seconds`."""

    daemonset_name: str = "nodeagent"
    """The agent's own DaemonSet, in `pod_namespace` (env DAEMONSET_NAME), read at
    SIGTERM: gone or being deleted means uninstall, present means upgrade."""

    extra: Mapping[str, str] = field(default_factory=dict)
    """Proxy metadata passed through to the control plane in the xDS node metadata."""

    @property
    def effective_cni_socket(self) -> str:
        if self.cni_socket == "off":
            return ""
        return self.cni_socket or str(PurePath(self.state_dir) / "cni.sock")

    @property
    def effective_ca_address(self) -> str:
        return self.ca_address or self.xds_address

    @property
    def xds_node_id(self) -> str:
        # Same shape as ztunnel's node id so istiod classifies us as a ztunnel.
        ip = self.instance_ip or "1.1.1.1"
        ns = self.pod_namespace
        return f"ztunnel~{ip}~{self.pod_name}.{ns}~{ns}.svc.cluster.local"


ENV_NAMES: dict[str, str] = {
    "NODE_NAME": "node_name",
    "POD_NAME": "pod_name",
    "POD_NAMESPACE": "pod_namespace",
    "INSTANCE_IP": "instance_ip",
    "CLUSTER_ID": "cluster_id",
    "TRUST_DOMAIN": "trust_domain",
    "XDS_ADDRESS": "xds_address",
    "XDS_ROOT_CA": "xds_root_ca",
    "CA_ADDRESS": "ca_address",
    "AUTH_TOKEN": "auth_token_path",
    "REDIRECT_BACKEND": "redirect_backend",
    "CGROUP2_PATH": "cgroup2_path",
    "BPF_PIN_DIR": "bpf_pin_dir",
    "LOG_LEVEL": "log_level",
    "ADMIN_ADDRESS": "admin_address",
    "ADMIN_SOCKET": "admin_socket",
    "METRICS_ADDRESS": "metrics_address",
    "READINESS_ADDRESS": "readiness_address",
    "SECRET_TTL_SECONDS": "secret_ttl_seconds",
    "NETNS_DIR": "netns_dir",
    "PROC_ROOT": "proc_root",
    "STATE_DIR": "state_dir",
    "DRAIN_SECONDS": "drain_seconds",
    "CAPTURE_CHECK_INTERVAL": "capture_check_interval",
    "KUBE_API": "kube_api",
    "KUBE_API_ADDRESS": "kube_api_address",
    "KUBE_TOKEN": "kube_token_path",
    "KUBE_ROOT_CA": "kube_root_ca",
    "DAEMONSET_NAME": "daemonset_name",
    "CNI_SOCKET": "cni_socket",
    "CNI_ADD_TIMEOUT": "cni_add_timeout",
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, raw: Any, source: str) -> Any:
    """Turn a raw value into the field's type, or raise naming field and source."""
    ftype = _FIELDS[name].type
    where = f"{source}: field {name!r}"
    if name == "extra":
        if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
            raise ConfigError(f"{where}: expected a mapping of strings, got {raw!r}")
        return {str(k): str(v) for k, v in raw.items()}
    if ftype in ("int", int):
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: expected an integer, got {raw!r}")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {raw!r}") from None
        if value <= 0:
            raise ConfigError(f"{where}: must be positive, got {value}")
        return value
    if ftype in ("float", float):
        try:
            fvalue = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {raw!r}") from None
        if fvalue < 0:
            raise ConfigError(f"{where}: must not be negative, got {fvalue}")
        return fvalue
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: expected a string, got {raw!r}")
    literal = {
        "RedirectBackend": RedirectBackend,
        "LogLevel": LogLevel,
        "KubeApiMode": KubeApiMode,
    }.get(str(ftype))
    if literal is not None:
        allowed = get_args(literal)
        value_s = raw.strip().lower()
        if value_s not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(allowed)}, got {raw!r}")
        return value_s
    return raw


def _check_address(name: str, value: str, source: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source}: field {name!r}: expected HOST:PORT, got {value!r}")


def _validate(cfg: Config, source: str) -> None:
    for name in ("admin_address", "metrics_address", "readiness_address"):
        _check_address(name, getattr(cfg, name), source)
    for name in ("xds_address", "ca_address"):
        value = getattr(cfg, name)
        if value and not value.startswith(("http://", "https://", "unix:")):
            raise ConfigError(
                f"{source}: field {name!r}: expected http://, https:// or unix: URL, got {value!r}"
            )
    if cfg.kube_api_address and not cfg.kube_api_address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{source}: field 'kube_api_address': expected an http:// or https:// URL, "
            f"got {cfg.kube_api_address!r}"
        )
    if cfg.kube_api != "off" and not cfg.daemonset_name:
        raise ConfigError(f"{source}: field 'daemonset_name': must not be empty")
    if not cfg.trust_domain or "/" in cfg.trust_domain:
        raise ConfigError(f"{source}: field 'trust_domain': invalid {cfg.trust_domain!r}")
    for name in _POSITIVE_SECONDS:
        if getattr(cfg, name) <= 0:
            raise ConfigError(
                f"{source}: field {name!r}: must be positive, got {getattr(cfg, name)}"
            )
    if cfg.hbone_max_connections_per_identity > cfg.hbone_max_connections:
        raise ConfigError(
            f"{source}: field 'hbone_max_connections_per_identity': "
            f"{cfg.hbone_max_connections_per_identity} is more than hbone_max_connections "
            f"({cfg.hbone_max_connections})"
        )


# Durations for which 0 would mean "never wait" (a float setting may otherwise be 0).
_POSITIVE_SECONDS = (
    "xds_keepalive_time",
    "xds_keepalive_timeout",
    "hbone_handshake_timeout",
    "hbone_preface_timeout",
    "hbone_idle_timeout",
    "capture_check_interval",
)


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML settings file into raw field values; unknown keys are errors."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = load_yaml(fh.read(), path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    except YamlSyntaxError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    for key in data:
        if key not in _FIELDS:
            raise ConfigError(f"{path}: unknown field {key!r}")
    return data


def build_config(
    *,
    env: Mapping[str, str] | None = None,
    file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Config | None = None,
) -> Config:
    """Build and validate a Config; raises ConfigError naming field and source."""
    values: dict[str, Any] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if file:
        layers.append((file, load_file(file)))
    if env:
        layers.append(
            ("environment", {f: env[e] for e, f in ENV_NAMES.items() if env.get(e, "") != ""})
        )
    if overrides:
        unknown = [k for k in overrides if k not in _FIELDS]
        if unknown:
            raise ConfigError(f"flags: unknown field {unknown[0]!r}")
        layers.append(("flags", {k: v for k, v in overrides.items() if v is not None}))
    sources: dict[str, str] = {}
    for source, raw in layers:
        for name, value in raw.items():
            values[name] = _coerce(name, value, source)
            sources[name] = source
    cfg = dataclasses.replace(base or Config(), **values)
    _validate(cfg, ", ".join(sorted(set(sources.values()))) or "defaults")
    return cfg
