"""The sandbox as a CNI runtime: each node's conflist as data, and the plugin invoker.

A container runtime (containerd, CRI-O) wires a pod by running the plugins of one
network configuration list in order (CNI spec 1.0, "Execution of Network
Configurations"). Each plugin reads on stdin its own object from the list with the
list's `name` and `cniVersion` added, the `runtimeConfig` keys it declared in
`capabilities`, and, after the first, the previous plugin's result as `prevResult`.
The attachment itself travels in CNI_* environment variables. DEL runs the list in
reverse, each plugin given the ADD's final result as `prevResult`. A failing plugin
exits non-zero with `{code, msg, details}` on stdout.

The sandbox does exactly that for each pod, with the pod's node namespace as the
"host": the plugins run inside it, so ptp leaves the host side of each veth there.

Chain (per node): `ptp` with `host-local` IPAM over the node's pod range, then
`loopback`, then whatever the caller appends (the node agent's `nodeagent-cni`).
Pod addresses are fixed by the plan, not chosen by IPAM: the runtime passes each
pod's address as `runtimeConfig.ips` (ptp declares the `ips` capability and hands
its whole config to host-local, which then reserves exactly that address or fails).

Layout under the sandbox's state dir: `cni/<node>/net.d/10-sandbox.conflist`,
`cni/<node>/ipam/` (host-local's data dir: one file per reserved address, holding
the container id and interface), `cni/<node>/results/` (the cached ADD results that
DEL gets back, as libcni keeps them in /var/lib/cni/results).

Pure: `build_conflist`, `nodeagent_plugin`, `plugin_config`, `plugin_env`,
`cni_args`, `parse_error`. I/O: `CniRuntime` runs a chain through a `PluginExec`
(the real one, `NsenterExec`, runs a plugin binary inside a namespace with nsenter),
and the small file helpers of `NodeFiles`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

CNI_VERSION = "1.0.0"
NETWORK_NAME = "sandbox"
CONFLIST_FILE = "10-sandbox.conflist"
PLUGIN_DIR = Path("/usr/lib/cni")
# The chain's own plugins; without any of them the sandbox wires pods itself.
REQUIRED_PLUGINS = ("ptp", "host-local", "loopback")
NODEAGENT_PLUGIN = "nodeagent-cni"
IFNAME = "eth0"
# Plugins normally answer in milliseconds; a hung one (say, a chained plugin waiting
# on a stopped agent) must not hang `up` or `down`.
PLUGIN_TIMEOUT = 30.0
MISSING_WARNING = (
    "sandbox: CNI plugins not found in {dir} (apt install containernetworking-plugins); "
    "using hand-made veths"
)

Command = Literal["ADD", "DEL"]


class CniError(RuntimeError):
    """A plugin failed: its own code, msg and details (CNI spec, "Error"), and for what."""

    def __init__(
        self,
        *,
        plugin: str,
        command: str,
        target: str,
        code: int | None,
        msg: str,
        details: str = "",
    ) -> None:
        self.plugin = plugin
        self.command = command
        self.target = target
        self.code = code
        self.msg = msg
        self.details = details
        text = f"{target}: CNI {command} failed in plugin {plugin}: "
        text += f"code {code}: {msg}" if code is not None else msg
        if details:
            text += f" ({details})"
        super().__init__(text)


@dataclass(frozen=True, kw_only=True)
class Attachment:
    """What a runtime knows of one pod's attachment to the network."""

    container_id: str  # letters, digits, '-', '_', '.' (the spec's CNI_CONTAINERID)
    netns: str  # the pod's namespace, as a path
    pod_namespace: str
    pod_name: str
    ips: tuple[str, ...] = ()  # addresses the pod must get (runtimeConfig.ips)
    ifname: str = IFNAME

    @property
    def target(self) -> str:
        return f"pod {self.pod_namespace}/{self.pod_name}"


@dataclass(frozen=True, kw_only=True)
class PluginOutput:
    """How one plugin run ended. `returncode` None: it timed out and was killed."""

    returncode: int | None
    stdout: bytes
    stderr: bytes


# -- pure: configuration, environment, errors ------------------------------------


def build_conflist(
    *,
    pod_cidr: str,
    gateway: str,
    ipam_dir: Path | str,
    chained: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The network configuration list of one node: ptp + host-local over its pod range,
    loopback, then `chained` plugins (each a plugin object with at least `type`)."""
    return {
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "ptp",
                # The runtime pins each pod's address with runtimeConfig.ips.
                "capabilities": {"ips": True},
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    # Per node: nodes share a file system here, not IPAM state.
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "loopback"},
            *(dict(p) for p in chained),
        ],
    }


def nodeagent_plugin(agent_socket: str) -> dict[str, Any]:
    """The node agent's chained plugin, told where its node's agent listens."""
    return {"type": NODEAGENT_PLUGIN, "agent_socket": agent_socket}


def without_plugin(conflist: Mapping[str, Any], plugin_type: str) -> dict[str, Any]:
    """`conflist` with every plugin of type `plugin_type` left out."""
    plugins = [p for p in conflist["plugins"] if p.get("type") != plugin_type]
    return {**conflist, "plugins": plugins}


def cni_args(attachment: Attachment) -> str:
    """CNI_ARGS as kubelet sets them. IgnoreUnknown: plugins that parse CNI_ARGS
    (host-local does) would otherwise reject the Kubernetes keys they do not know."""
    return ";".join(
        (
            "IgnoreUnknown=1",
            f"K8S_POD_NAMESPACE={attachment.pod_namespace}",
            f"K8S_POD_NAME={attachment.pod_name}",
            f"K8S_POD_INFRA_CONTAINER_ID={attachment.container_id}",
        )
    )


def runtime_config(attachment: Attachment) -> dict[str, Any]:
    """The capability arguments this runtime offers for `attachment`."""
    return {"ips": list(attachment.ips)} if attachment.ips else {}


def plugin_config(
    conflist: Mapping[str, Any],
    plugin: Mapping[str, Any],
    *,
    runtime: Mapping[str, Any],
    prev_result: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What one plugin of `conflist` reads on stdin: its object, the list's name and
    version, the runtime arguments it declared in `capabilities`, and `prevResult`."""
    config = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
    declared = plugin.get("capabilities") or {}
    offered = {key: value for key, value in runtime.items() if declared.get(key)}
    if offered:
        config["runtimeConfig"] = offered
    if prev_result is not None:
        config["prevResult"] = dict(prev_result)
    return config


def plugin_env(
    command: Command,
    attachment: Attachment,
    cni_path: Sequence[str],
    inherited: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The plugin's environment: the runtime's own (as libcni passes it) minus any
    CNI_* of its own, plus the attachment's CNI_* parameters."""
    env = {k: v for k, v in (inherited or {}).items() if not k.startswith("CNI_")}
    env.update(
        {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": attachment.container_id,
            "CNI_NETNS": attachment.netns,
            "CNI_IFNAME": attachment.ifname,
            "CNI_ARGS": cni_args(attachment),
            "CNI_PATH": os.pathsep.join(cni_path),
        }
    )
    return env


def parse_error(plugin: str, command: str, target: str, out: PluginOutput) -> CniError:
    """The plugin's error, from the JSON it printed or, failing that, its stderr."""
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "msg" in doc:
        code = doc.get("code")
        return CniError(
            plugin=plugin,
            command=command,
            target=target,
            code=code if isinstance(code, int) else None,
            msg=str(doc["msg"]),
            details=str(doc.get("details") or ""),
        )
    if out.returncode is None:
        why = out.stderr.decode(errors="replace").strip() or "timed out"
    else:
        text = (out.stderr or out.stdout).decode(errors="replace").strip()
        last = text.splitlines()[-1][:300] if text else "no output"
        why = f"exited with status {out.returncode}: {last}"
    return CniError(plugin=plugin, command=command, target=target, code=None, msg=why)


# -- I/O: plugin discovery, files, execution -------------------------------------


def find_plugin(plugin_type: str, cni_path: Sequence[str]) -> Path | None:
    """The first executable named `plugin_type` in the CNI_PATH directories."""
    for directory in cni_path:
        candidate = Path(directory) / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_plugins(plugin_dir: Path = PLUGIN_DIR) -> list[str]:
    """The chain's own plugins that `plugin_dir` lacks (all present: [])."""
    return [p for p in REQUIRED_PLUGINS if find_plugin(p, [str(plugin_dir)]) is None]


def find_nodeagent_cni(python: str) -> Path | None:
    """The directory holding an executable `nodeagent-cni` next to `python` (a
    virtualenv's console scripts sit beside its interpreter), or None."""
    directory = Path(python).parent
    return directory if find_plugin(NODEAGENT_PLUGIN, [str(directory)]) else None


@dataclass(frozen=True)
class NodeFiles:
    """Where one node's CNI files live: `<sandbox state dir>/cni/<node>/`."""

    root: Path

    @property
    def conflist(self) -> Path:
        return self.root / "net.d" / CONFLIST_FILE

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    def result_path(self, attachment: Attachment) -> Path:
        # libcni's cache name: network, container id, interface.
        name = f"{NETWORK_NAME}-{attachment.container_id}-{attachment.ifname}.json"
        return self.results_dir / name

    def write_conflist(self, conflist: Mapping[str, Any]) -> None:
        self.conflist.parent.mkdir(parents=True, exist_ok=True)
        self.conflist.write_text(json.dumps(conflist, indent=2) + "\n")

    def read_conflist(self) -> dict[str, Any] | None:
        """The conflist on disk (what DEL runs), or None if it was never written."""
        try:
            doc = json.loads(self.conflist.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("plugins"), list) else None

    def save_result(self, attachment: Attachment, result: Mapping[str, Any]) -> None:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.result_path(attachment).write_text(json.dumps(result) + "\n")

    def load_result(self, attachment: Attachment) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.result_path(attachment).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def forget_result(self, attachment: Attachment) -> None:
        self.result_path(attachment).unlink(missing_ok=True)


class PluginExec(Protocol):
    """Runs one plugin binary with the host side in `host_netns` (a namespace path)."""

    def run(
        self,
        binary: Path,
        host_netns: str,
        env: Mapping[str, str],
        stdin: bytes,
        timeout: float,
    ) -> PluginOutput: ...


class NsenterExec:
    """The real PluginExec: `nsenter --net=HOST_NETNS -- PLUGIN`, so the plugin starts
    in the node's namespace (it takes that as the host, as on a real node)."""

    def __init__(self, nsenter: str = "nsenter") -> None:
        self.nsenter = nsenter

    def run(
        self,
        binary: Path,
        host_netns: str,
        env: Mapping[str, str],
        stdin: bytes,
        timeout: float,
    ) -> PluginOutput:
        argv = [self.nsenter, f"--net={host_netns}", "--", str(binary)]
        try:
            done = subprocess.run(
                argv, input=stdin, env=dict(env), capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            msg = f"no answer within {timeout:.0f}s (killed)"
            return PluginOutput(returncode=None, stdout=b"", stderr=msg.encode())
        return PluginOutput(returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)


class CniRuntime:
    """Runs a conflist's chain for one attachment, the way a container runtime does."""

    def __init__(
        self,
        exec: PluginExec,
        cni_path: Sequence[str],
        *,
        timeout: float = PLUGIN_TIMEOUT,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._exec = exec
        self.cni_path = tuple(cni_path)
        self.timeout = timeout
        self._environ = dict(os.environ if environ is None else environ)

    def add(
        self, conflist: Mapping[str, Any], attachment: Attachment, host_netns: str
    ) -> dict[str, Any]:
        """ADD through every plugin in order; the final result, or CniError from the
        first plugin that fails (the runtime then DELs the attachment)."""
        prev: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            prev = self._invoke("ADD", conflist, plugin, attachment, host_netns, prev)
        return prev or {}

    def delete(
        self,
        conflist: Mapping[str, Any],
        attachment: Attachment,
        host_netns: str,
        prev_result: Mapping[str, Any] | None,
    ) -> list[CniError]:
        """DEL through every plugin in reverse, each given the ADD's result; best
        effort: every plugin runs, and their failures are returned."""
        errors = []
        for plugin in reversed(conflist["plugins"]):
            try:
                self._invoke("DEL", conflist, plugin, attachment, host_netns, prev_result)
            except CniError as exc:
                errors.append(exc)
            except OSError as exc:
                errors.append(
                    CniError(
                        plugin=str(plugin.get("type")),
                        command="DEL",
                        target=attachment.target,
                        code=None,
                        msg=str(exc.strerror or exc),
                    )
                )
        return errors

    def _invoke(
        self,
        command: Command,
        conflist: Mapping[str, Any],
        plugin: Mapping[str, Any],
        attachment: Attachment,
        host_netns: str,
        prev: Mapping[str, Any] | None,
    ) -> dict[str, Any] | None:
        plugin_type = str(plugin.get("type"))

        def own_error(msg: str) -> CniError:  # the runtime's own finding, not the plugin's
            return CniError(
                plugin=plugin_type, command=command, target=attachment.target, code=None, msg=msg
            )

        binary = find_plugin(plugin_type, self.cni_path)
        if binary is None:
            where = os.pathsep.join(self.cni_path)
            raise own_error(f"plugin not found in CNI_PATH {where}")
        config = plugin_config(
            conflist, plugin, runtime=runtime_config(attachment), prev_result=prev
        )
        env = plugin_env(command, attachment, self.cni_path, self._environ)
        out = self._exec.run(binary, host_netns, env, json.dumps(config).encode(), self.timeout)
        if out.returncode != 0:
            raise parse_error(plugin_type, command, attachment.target, out)
        if command != "ADD":
            return None
        try:
            result = json.loads(out.stdout)
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise own_error(f"succeeded but printed no result: {out.stdout[:200]!r}")
        return result
