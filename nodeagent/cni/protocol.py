"""The CNI side of nodeagent-cni as data (pure: no I/O).

* `parse_netconf`: the network configuration the runtime writes to stdin (CNI spec 1.0:
  cniVersion, name, type, prevResult) and our keys: `agent_socket`, `add_timeout_seconds`,
  `log_file`;
* `parse_env`: the CNI_* environment, with the variables each command requires;
* `CniError`: a spec error, rendered as `{"cniVersion", "code", "msg", "details"}`;
* `version_answer`, `pod_ips`: the VERSION result and the pod's addresses in prevResult;
* `agent_request` / `parse_agent_reply`: the one HTTP/1.1 exchange with the agent over its
  Unix socket (`POST /cmdadd|/cmddel|/cmdcheck`, JSON both ways; the agent closes after
  replying, so the reply is everything read until EOF).

Only cheap stdlib imports here: the plugin runs on every pod start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
IMPLEMENTED_VERSION = "1.0.0"
PLUGIN_TYPE = "nodeagent-cni"
DEFAULT_AGENT_SOCKET = "/var/run/nodeagent/cni.sock"
DEFAULT_ADD_TIMEOUT_SECONDS = 10.0
MAX_REPLY_BYTES = 64 * 1024

# Error codes of the CNI spec 1.0 ("Error" section); 100+ are plugin-specific.
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_DECODING = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
# Ours: the agent answered that the pod is not captured, and no fail-closed hold exists.
ERR_NOT_CAPTURED = 999

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
# Variables each command needs (spec §"Parameters"); DEL may come without a netns.
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "VERSION": (),
}

# Agent reply states that mean "nothing more to do for this pod".
STATE_CAPTURED = "captured"
STATE_NOT_ENROLLED = "not_enrolled"
STATE_REMOVED = "removed"
OK_STATES = frozenset({STATE_CAPTURED, STATE_NOT_ENROLLED, STATE_REMOVED})


class CniError(Exception):
    """A spec error: printed on stdout as the result, with a non-zero exit."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def result(self, cni_version: str = IMPLEMENTED_VERSION) -> dict[str, Any]:
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }


class NetConf(NamedTuple):
    """The network configuration for this plugin, as the runtime passed it."""

    cni_version: str
    name: str
    type: str
    prev_result: dict[str, Any] | None
    agent_socket: str = DEFAULT_AGENT_SOCKET
    add_timeout_seconds: float = DEFAULT_ADD_TIMEOUT_SECONDS
    log_file: str | None = None


class CniEnv(NamedTuple):
    """The CNI_* environment of one call."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = {}  # a NamedTuple default: never mutated
    path: str = ""

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")


class AgentReply(NamedTuple):
    """The agent's answer: HTTP status, the pod's state, and a message for the log."""

    status: int
    state: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.state in OK_STATES


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"bad cniVersion {version!r}") from None


def parse_netconf(data: bytes | str) -> NetConf:
    """The configuration from stdin; errors carry the spec's codes (6, 7, 1)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(ERR_DECODING, "network config is not JSON", str(exc)) from None
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODING, "network config is not a JSON object")
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, "network config has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    name = raw.get("name", "")
    kind = raw.get("type", "")
    if not isinstance(name, str) or not isinstance(kind, str) or not kind:
        raise CniError(ERR_INVALID_CONFIG, "network config needs string 'name' and 'type'")
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(ERR_INVALID_CONFIG, "prevResult is not a JSON object")
    sock = raw.get("agent_socket", DEFAULT_AGENT_SOCKET)
    if not isinstance(sock, str) or not sock.startswith("/"):
        raise CniError(ERR_INVALID_CONFIG, f"agent_socket must be an absolute path, not {sock!r}")
    timeout = raw.get("add_timeout_seconds", DEFAULT_ADD_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        raise CniError(
            ERR_INVALID_CONFIG, f"add_timeout_seconds must be a number in (0, 300], not {timeout!r}"
        )
    log_file = raw.get("log_file")
    if log_file is not None and (not isinstance(log_file, str) or not log_file.startswith("/")):
        raise CniError(ERR_INVALID_CONFIG, f"log_file must be an absolute path, not {log_file!r}")
    return NetConf(
        cni_version=version,
        name=name,
        type=kind,
        prev_result=prev,
        agent_socket=sock,
        add_timeout_seconds=float(timeout),
        log_file=log_file or None,
    )


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K=V;K=V` (spec); a pair without '=' is an invalid environment."""
    args: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def parse_env(environ: Mapping[str, str]) -> CniEnv:
    """The call's CNI_* variables; a missing required one is error 4."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}")
    missing = [name for name in REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"{command} needs {', '.join(missing)}")
    return CniEnv(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=environ.get("CNI_PATH", ""),
    )


def require_check_version(conf: NetConf) -> None:
    """CHECK exists from 0.4.0 on; older configs must be refused (spec)."""
    if version_tuple(conf.cni_version) < (0, 4, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"CHECK is not defined for {conf.cni_version}")


def version_answer() -> dict[str, Any]:
    return {"cniVersion": IMPLEMENTED_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def chained_result(conf: NetConf) -> dict[str, Any]:
    """ADD's result: prevResult unchanged (a chained plugin that changes nothing)."""
    if conf.prev_result is None:
        raise CniError(
            ERR_INVALID_CONFIG,
            f"{PLUGIN_TYPE} must be chained after a plugin that sets up the pod (no prevResult)",
        )
    if "cniVersion" in conf.prev_result:
        return conf.prev_result
    return {"cniVersion": conf.cni_version, **conf.prev_result}


def pod_ips(prev_result: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The pod's addresses in prevResult (`ips[].address`, CIDR form), without prefixes."""
    if not prev_result:
        return ()
    found: list[str] = []
    entries = prev_result.get("ips")
    if not isinstance(entries, list):
        return ()
    for entry in entries:
        address = entry.get("address") if isinstance(entry, dict) else None
        if isinstance(address, str) and address:
            ip = address.split("/", 1)[0]
            if ip not in found:
                found.append(ip)
    return tuple(found)


def pod_body(env: CniEnv, ips: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The JSON the agent gets for a pod (`ips` only for ADD and CHECK)."""
    body: dict[str, Any] = {
        "netns": env.netns,
        "container_id": env.container_id,
        "pod_name": env.pod_name,
        "pod_namespace": env.pod_namespace,
        "pod_uid": env.pod_uid,
        "interface": env.ifname,
    }
    if ips is not None:
        body["ips"] = list(ips)
    return body


def agent_request(path: str, body: Mapping[str, Any]) -> bytes:
    """One HTTP/1.1 POST with a JSON body; the connection closes after the reply."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\n"
        "Host: nodeagent\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + payload


def reply_complete(data: bytes) -> bool:
    """Whether `data` holds a whole reply (headers and Content-Length bytes of body)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return len(body) >= int(value.strip())
            except ValueError:
                return True  # let parse_agent_reply name the problem
    return False  # no length: read until EOF


def parse_agent_reply(data: bytes) -> AgentReply:
    """The agent's reply; ValueError naming what is wrong with it."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("reply ends before its headers do")
    lines = head.split(b"\r\n")
    status_line = lines[0].split(None, 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    try:
        status = int(status_line[1])
    except ValueError:
        raise ValueError(f"bad status code {status_line[1][:10]!r}") from None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            body = body[: int(value.strip())]
    state, message = "", ""
    if body:
        try:
            decoded = json.loads(body)
        except ValueError:
            raise ValueError("reply body is not JSON") from None
        if isinstance(decoded, dict):
            state = str(decoded.get("state", ""))
            message = str(decoded.get("message", ""))
    return AgentReply(status, state, message)
