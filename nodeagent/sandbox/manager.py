"""SandboxManager: `up`, `down`, `status`, `exec` and process bookkeeping.

`up` records its intent in the state file before each step (namespaces, then
processes), so `down` can always finish the job: it stops recorded processes
(pid + start time), then any process still living in one of the sandbox's
namespaces, removes the namespaces (their veths go with them) recorded in the
state or matching the sandbox's naming pattern, and finally the state dir.
Nothing is created in the root namespace.

Order in `up`: namespaces; node tokens and the mesh file written; demo apps
and the control plane spawned (their start-up overlaps the next step); links,
addresses and routes; each pod's network from the CNI plugins (cni.py: per node a
conflist on disk, the chain run per pod as a container runtime does; hand-made
veths instead when the plugins are not installed); wait until every app listens
and the control plane accepts connections. `down` runs the chain's DEL for every
pod (best effort) before it removes the namespaces. Tests may set
NODEAGENT_SANDBOX_CRASH_AT=namespaces|links|apps to make `up` die (os._exit, no
clean-up) right after that step, simulating a crash.

The control plane (`nodeagent controlplane`, kind `controlplane`) runs in the
underlay namespace, so every node (and pod) reaches it at the bridge address
172.30.0.1:15010. It serves xDS and the CA on that port, plaintext, and requires
a node's bearer token. `apply` edits its mesh file, which it watches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nodeagent
from nodeagent.model.constants import METRICS_PORT, READINESS_PORT
from nodeagent.sandbox import cni, processes
from nodeagent.sandbox import kube as kube_mod
from nodeagent.sandbox import mesh as mesh_mod
from nodeagent.sandbox import prometheus as prom_mod
from nodeagent.sandbox.demoapp import BEHAVIOUR_PATH, DEFAULT_FAIL_STATUS, MAX_DELAY, parse_share
from nodeagent.sandbox.mesh import CONTROLPLANE_PORT, ApplyError, MergeSummary
from nodeagent.sandbox.netns import NetnsAdapter, NetnsError, list_netns, netns_inode, netns_path
from nodeagent.sandbox.plan import (
    ECHO_PORT,
    HTTP_PORT,
    SHADOW_SUFFIX,
    WAYPOINT_NAME,
    NamespacePlan,
    PlanError,
    PodNetwork,
    PodPlan,
    SandboxPlan,
    build_plan,
    netns_pattern,
    validate_name,
)
from nodeagent.sandbox.processes import ProcessId
from nodeagent.sandbox.state import (
    DEFAULT_STATE_ROOT,
    ProcessRecord,
    SandboxState,
    StateStore,
    admin_socket,
)

PACKAGE_ROOT = Path(nodeagent.__file__).resolve().parent.parent
CRASH_ENV = "NODEAGENT_SANDBOX_CRASH_AT"
APP_READY_TIMEOUT = 20.0
DEMOAPP_KIND = "demoapp"
CONTROLPLANE_KIND = "controlplane"
CONTROLPLANE_NAME = "controlplane"
CONTROLPLANE_READY_TIMEOUT = 20.0
AGENT_KIND = "agent"
AGENT_READY_TIMEOUT = 30.0
# state.extra key of a CNI-wired sandbox: {"path": CNI_PATH dirs, "nodeagent": chained?}
CNI_KEY = "cni"
# Pods wired at once; host-local serializes a node's allocations with its own lock.
CNI_WORKERS = 8

# Validates a whole mesh file's text (source names it in errors); raises
# ValueError naming file, line and field. The CLI injects the control plane's
# parser: the sandbox sits beside the controlplane package and may not import it.
MeshValidator = Callable[[str, str], object]


class SandboxError(RuntimeError):
    """A user-facing sandbox failure, one line."""


@dataclass(frozen=True)
class DownReport:
    existed: bool
    namespaces: int = 0
    processes: int = 0


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os._exit(99)  # simulate a crash: no finally, no clean-up


def _kernel_config() -> dict[str, str]:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return dict(
                line.strip().split("=", 1)
                for line in f
                if line.startswith("CONFIG_") and "=" in line
            )
    except OSError:
        return {}


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = [
                ln for ln in f.read()[-4096:].decode(errors="replace").splitlines() if ln.strip()
            ]
    except OSError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


def preflight() -> None:
    """Refuse early, in one line, when the machine cannot run a sandbox."""
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (network namespaces); run it with sudo")
    if not Path("/proc/self/ns/net").exists():
        raise SandboxError("this kernel has no network namespaces (CONFIG_NET_NS)")
    if shutil.which(processes.NSENTER) is None:
        raise SandboxError("nsenter not found; install util-linux")
    config = _kernel_config()
    for option in ("CONFIG_VETH", "CONFIG_BRIDGE", "CONFIG_NET_NS"):
        if config and config.get(option) not in ("y", "m"):
            raise SandboxError(f"this kernel lacks {option}, which the sandbox needs")


class NamespaceOps(Protocol):
    """What the manager needs from the OS for namespaces (NetnsAdapter is the real one)."""

    def create(self, names: list[str]) -> None: ...
    def apply(self, plan: NamespacePlan) -> None: ...
    def remove(self, name: str) -> None: ...
    def socket(self, netns: str, family: int = ..., type: int = ...) -> socket.socket: ...
    def close(self) -> None: ...


class SandboxManager:
    """Builds, reports on and removes sandboxes; the OS adapters are injectable."""

    def __init__(
        self,
        store: StateStore | None = None,
        adapter: NamespaceOps | None = None,
        python: str = sys.executable,
        *,
        plugin_exec: cni.PluginExec | None = None,
        cni_bin_dir: Path = cni.PLUGIN_DIR,
    ) -> None:
        self.store = store or StateStore(DEFAULT_STATE_ROOT)
        self._adapter = adapter
        self.python = python
        # How CNI plugins run (the real one: nsenter into the node) and where they live.
        self.plugin_exec: cni.PluginExec = plugin_exec or cni.NsenterExec(processes.NSENTER)
        self.cni_bin_dir = cni_bin_dir

    @property
    def adapter(self) -> NamespaceOps:
        if self._adapter is None:
            self._adapter = NetnsAdapter()
        return self._adapter

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.close()
            self._adapter = None

    def __enter__(self) -> SandboxManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ---------------------------------------------------------

    def exists(self, name: str) -> bool:
        pattern = netns_pattern(name)
        return self.store.exists(name) or any(pattern.match(n) for n in list_netns())

    def names(self) -> list[str]:
        return self.store.names()

    def load(self, name: str) -> tuple[SandboxState, SandboxPlan]:
        """The state and plan of an existing sandbox, or SandboxError naming it."""
        try:
            validate_name(name)
        except PlanError as exc:
            raise SandboxError(str(exc)) from None
        state = self.store.load(name)
        if state is None:
            known = ", ".join(self.names()) or "none"
            raise SandboxError(f"unknown sandbox {name!r} (existing: {known})")
        return state, _plan_of(state)

    def admin_socket(self, name: str, node: str) -> str:
        """The admin socket of `node`'s agent, or SandboxError naming what does not exist."""
        _state, plan = self.load(name)
        nodes = [n.name for n in plan.nodes]
        if node not in nodes:
            raise SandboxError(f"sandbox {name!r} has no node {node!r} (nodes: {', '.join(nodes)})")
        return admin_socket(name, node, root=self.store.root)

    def pod_node(self, name: str, pod: str) -> str | None:
        """The node a pod of sandbox `name` runs on (pod as name, netns or ns/name)."""
        _state, plan = self.load(name)
        found = plan.pod(pod.rpartition("/")[2])
        return found.node if found else None

    def status(self, name: str) -> dict[str, Any]:
        state, plan = self.load(name)

        def pid_of(record: ProcessRecord | None) -> int | None:
            if record is None or record.pid is None:
                return None
            alive = processes.is_running(ProcessId(record.pid, record.start_time))
            return record.pid if alive else None

        def log_of(process: str) -> str | None:
            record = state.process(process)
            return record.log if record is not None else None

        def proc_view(record: ProcessRecord) -> dict[str, Any]:
            return {
                "name": record.name,
                "netns": record.netns,
                "pid": pid_of(record),
                "log": record.log,
            }

        return {
            "name": plan.name,
            "phase": state.phase,
            "underlay": {"netns": plan.underlay_netns, "ip": plan.underlay_ip},
            "nodes": [
                {"name": n.name, "ip": n.ip, "netns": n.netns, "pod_cidr": n.pod_cidr}
                for n in plan.nodes
            ],
            "pods": [
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "service_account": p.service_account,
                    "labels": p.labels(plan.name),
                    "node": p.node,
                    "ip": p.ip,
                    "netns": p.netns,
                    "app_pid": pid_of(state.process(f"{DEMOAPP_KIND}-{p.name}")),
                    # The app's output: with --log-requests, one JSON line per request.
                    "log": log_of(f"{DEMOAPP_KIND}-{p.name}"),
                }
                for p in plan.pods
            ],
            "agents": [proc_view(r) for r in state.processes if r.kind == "agent"],
            "waypoint": (
                {
                    "name": plan.waypoint.name,
                    "namespace": plan.waypoint.namespace,
                    "ip": plan.waypoint.ip,
                    "node": plan.waypoint.node,
                    **(proc_view(r) if (r := state.process(WAYPOINT_NAME)) else {}),
                }
                if plan.waypoint is not None
                else None
            ),
            "controlplane": self._controlplane_view(state, proc_view),
            "prometheus": self._prometheus_view(state, proc_view),
        }

    def _prometheus_view(
        self, state: SandboxState, proc_view: Callable[[ProcessRecord], dict[str, Any]]
    ) -> dict[str, Any] | None:
        record = state.process(prom_mod.PROMETHEUS_NAME)
        info = state.extra.get(prom_mod.PROMETHEUS_KIND)
        if record is None or not isinstance(info, dict):
            return None
        return {"address": info.get("address"), "config": info.get("config"), **proc_view(record)}

    def _controlplane_view(
        self, state: SandboxState, proc_view: Callable[[ProcessRecord], dict[str, Any]]
    ) -> dict[str, Any] | None:
        record = next((r for r in state.processes if r.kind == CONTROLPLANE_KIND), None)
        info = state.extra.get(CONTROLPLANE_KIND)
        if record is None or not isinstance(info, dict):
            return None
        view = {"address": info.get("address"), "mesh_file": info.get("mesh_file")}
        view.update(proc_view(record))
        mesh_file = str(info.get("mesh_file"))
        try:
            # Counts read back from the file: they include what `apply` added.
            view["serves"] = mesh_mod.counts(
                mesh_mod.load_mesh_dict(Path(mesh_file).read_bytes(), mesh_file)
            )
        except OSError as exc:
            view["mesh_error"] = f"{mesh_file}: cannot read: {exc.strerror or exc}"
        except ApplyError as exc:
            # The control plane refuses such a file too, and keeps serving its last good one.
            view["mesh_error"] = str(exc)
        return view

    def resolve_netns(self, name: str, target: str) -> str:
        """The namespace of a pod, a node, or `underlay` in sandbox `name`."""
        _, plan = self.load(name)
        if target in ("underlay", plan.underlay_netns):
            return plan.underlay_netns
        pod = plan.pod(target)
        if pod is not None:
            return pod.netns
        node = plan.node(target)
        if node is not None:
            return node.netns
        raise SandboxError(
            f"unknown pod or node {target!r} in sandbox {name} "
            f"(pods: {plan.pods[0].name} .. {plan.pods[-1].name}; nodes: node1 .. "
            f"{plan.nodes[-1].name}; or underlay)"
        )

    # -- up --------------------------------------------------------------

    def up(
        self,
        name: str,
        nodes: int,
        pods_per_node: int,
        *,
        controlplane: bool = True,
        agents: bool = True,
        waypoint: bool = False,
        use_waypoint: bool = True,
        shadow: bool = False,
        prometheus: bool = False,
    ) -> SandboxPlan:
        """Build the sandbox; on failure remove what was made and raise SandboxError.

        `controlplane=False` skips the control plane and the agents (faster, for
        tests of the network alone); `agents=False` skips only the agents.
        `shadow` adds the pod node2-shadow (a v3 backend, see plan.py), to mirror to.
        `prometheus` runs Prometheus in the underlay namespace, scraping every agent
        and the waypoint (see prometheus.py).
        """
        prometheus_binary = self._prometheus_binary(
            prometheus=prometheus, agents=agents and controlplane
        )
        missing = cni.missing_plugins(self.cni_bin_dir)
        pod_network: PodNetwork = "veth" if missing else "cni"
        try:
            plan = build_plan(
                name,
                nodes,
                pods_per_node,
                waypoint=waypoint,
                shadow=shadow,
                pod_network=pod_network,
            )
        except PlanError as exc:
            raise SandboxError(str(exc)) from None
        preflight()
        if missing:
            print(cni.MISSING_WARNING.format(dir=self.cni_bin_dir), file=sys.stderr)
        pod_cni = None if missing else self._pod_cni(agents=agents and controlplane)
        in_use = SandboxError(
            f"sandbox {name!r} already exists; remove it with `nodeagent sandbox down {name}`"
        )
        if self.exists(name):
            raise in_use
        all_netns = tuple(ns.name for ns in plan.namespaces)
        # Intent first: `down` removes these even if we die in the next line.
        state = SandboxState(
            name=name,
            nodes=nodes,
            pods_per_node=pods_per_node,
            namespaces=all_netns,
            extra={
                **({WAYPOINT_NAME: True} if waypoint else {}),
                **({SHADOW_SUFFIX: True} if shadow else {}),
                **({CNI_KEY: pod_cni} if pod_cni is not None else {}),
            },
        )
        if not self.store.claim(state):
            raise in_use
        try:
            self._build(
                plan,
                controlplane,
                agents=agents and controlplane,
                use_waypoint=use_waypoint,
                pod_cni=pod_cni,
                prometheus_binary=prometheus_binary,
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.store.update(name, lambda s: dataclasses.replace(s, phase="failed"))
            self.down(name)
            if isinstance(exc, NetnsError | OSError | cni.CniError):
                raise SandboxError(f"sandbox {name}: {exc}") from None
            raise
        self.store.update(name, lambda s: dataclasses.replace(s, phase="ready"))
        return plan

    def _build(
        self,
        plan: SandboxPlan,
        controlplane: bool,
        *,
        agents: bool = False,
        use_waypoint: bool = True,
        pod_cni: dict[str, Any] | None = None,
        prometheus_binary: str | None = None,
    ) -> None:
        app_env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
        self.adapter.create([ns.name for ns in plan.namespaces])
        _crash_point("namespaces")
        specs = self._demoapp_specs(plan, app_env)
        if controlplane:
            specs.append(self._controlplane_spec(plan, app_env, use_waypoint=use_waypoint))
            specs.append(self._kubeapi_spec(plan, app_env))
        if agents:
            # Agents retry the control plane with backoff, so they start with it.
            specs.extend(self._agent_specs(plan, app_env))
            if plan.waypoint is not None:
                specs.append(self._waypoint_spec(plan, app_env))
        if prometheus_binary is not None:
            specs.append(self._prometheus_spec(plan, prometheus_binary))
        # Processes start now, while the network is configured: apps bind 0.0.0.0
        # and need no interface, and their start-up (the bulk of `up`) then
        # overlaps the netlink work on the other core.
        pending = self.spawn_processes(plan.name, specs)
        try:
            for ns in plan.namespaces:
                self.adapter.apply(ns)
            if pod_cni is not None:
                self._attach_pods(plan, pod_cni)
            _crash_point("links")
        except BaseException:
            for fd in pending.ready_fds:
                os.close(fd)
            raise
        self.await_ready(pending)
        if controlplane:
            self.await_controlplane(plan.name)
            self._await_listening(
                plan.name, kube_mod.KUBEAPI_KIND, kube_mod.KUBEAPI_PORT, "the Kubernetes API"
            )
        if agents:
            self.await_agents(plan.name)
        if prometheus_binary is not None:
            self._await_listening(
                plan.name, prom_mod.PROMETHEUS_NAME, prom_mod.PROMETHEUS_PORT, "Prometheus"
            )
        _crash_point("apps")

    # -- pod networking (CNI) ----------------------------------------------

    def _pod_cni(self, *, agents: bool) -> dict[str, Any]:
        """This `up`'s CNI settings, kept in the state for `down`: CNI_PATH, and whether
        the chain ends with the agents' `nodeagent-cni` (only when agents run and it is
        installed next to this Python)."""
        nodeagent_dir = cni.find_nodeagent_cni(sys.executable) if agents else None
        path = [str(self.cni_bin_dir), *([str(nodeagent_dir)] if nodeagent_dir else [])]
        return {"path": path, "nodeagent": nodeagent_dir is not None}

    def _agent_cni_socket(self, name: str, node: str) -> str:
        """Where `node`'s agent hears from `nodeagent-cni` (its CNI_SOCKET)."""
        return str(self.store.dir(name) / node / "cni.sock")

    def _cni_files(self, name: str, node: str) -> cni.NodeFiles:
        return cni.NodeFiles(self.store.dir(name) / "cni" / node)

    def _attachment(self, plan: SandboxPlan, pod: PodPlan) -> cni.Attachment:
        return cni.Attachment(
            container_id=f"{plan.name}-{pod.name}",
            netns=str(netns_path(pod.netns)),
            pod_namespace=pod.namespace,
            pod_name=pod.name,
            ips=(pod.ip,),  # host-local reserves exactly the plan's address
        )

    def _attach_pods(self, plan: SandboxPlan, pod_cni: dict[str, Any]) -> None:
        """Write each node's conflist, then run the chain's ADD for every pod (pods in
        parallel, each pod's plugins in order) inside its node's namespace; the first
        failure, in pod order, is raised as the plugin's own error."""
        runtime = cni.CniRuntime(self.plugin_exec, pod_cni["path"])
        if pod_cni.get("nodeagent"):
            # On a real node the agent (a DaemonSet) runs before pods start: let the
            # chained plugin find it, or it holds each pod closed until adopted.
            self._await_agent_sockets(plan)
        conflists = {}
        for node in plan.nodes:
            files = self._cni_files(plan.name, node.name)
            chained = (
                [cni.nodeagent_plugin(self._agent_cni_socket(plan.name, node.name))]
                if pod_cni.get("nodeagent")
                else []
            )
            conflist = cni.build_conflist(
                pod_cidr=node.pod_cidr,
                gateway=node.gateway,
                ipam_dir=files.ipam_dir,
                chained=chained,
            )
            files.write_conflist(conflist)
            conflists[node.name] = (files, files.read_conflist() or conflist)
        nodes = {n.name: n for n in plan.nodes}

        def attach(pod: PodPlan) -> None:
            files, conflist = conflists[pod.node]
            conflist = _chain_for(plan, pod, conflist)
            attachment = self._attachment(plan, pod)
            result = runtime.add(conflist, attachment, str(netns_path(nodes[pod.node].netns)))
            files.save_result(attachment, result)

        pods = plan.wired_pods()
        with ThreadPoolExecutor(max_workers=min(CNI_WORKERS, len(pods))) as pool:
            futures = [pool.submit(attach, pod) for pod in pods]
        for future in futures:
            future.result()

    def _await_agent_sockets(self, plan: SandboxPlan, timeout: float = AGENT_READY_TIMEOUT) -> None:
        """Wait until every node's agent accepts on its CNI socket; give up quietly at
        `timeout` (nodeagent-cni then fails closed, and `await_agents` reports why)."""
        deadline = time.monotonic() + timeout
        for node in plan.nodes:
            path = self._agent_cni_socket(plan.name, node.name)
            while time.monotonic() < deadline:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    try:
                        sock.connect(path)
                        break
                    except OSError:
                        pass
                time.sleep(0.02)

    def _detach_pods(self, state: SandboxState | None) -> None:
        """The chain's DEL for every pod of a CNI-wired sandbox, in reverse plugin order,
        each plugin given the pod's cached ADD result; best effort: failures are warned
        about on stderr, and the namespaces are removed next anyway."""
        pod_cni = state.extra.get(CNI_KEY) if state is not None else None
        if state is None or not isinstance(pod_cni, dict):
            return
        try:
            plan = _plan_of(state)
        except PlanError:
            return
        runtime = cni.CniRuntime(self.plugin_exec, pod_cni.get("path") or [str(self.cni_bin_dir)])
        Job = tuple[cni.NodeFiles, dict[str, Any], cni.Attachment, str]
        jobs: list[Job] = []
        for node in plan.nodes:
            files = self._cni_files(plan.name, node.name)
            # The conflist as written (what the pods were added with); none: no ADD ran.
            conflist = files.read_conflist()
            if conflist is None or netns_inode(node.netns) is None:
                continue
            host = str(netns_path(node.netns))
            jobs.extend(
                (files, _chain_for(plan, pod, conflist), self._attachment(plan, pod), host)
                for pod in plan.wired_pods()
                if pod.node == node.name
            )

        def detach(job: Job) -> list[str]:
            files, conflist, attachment, host = job
            errors = runtime.delete(conflist, attachment, host, files.load_result(attachment))
            if not errors:
                files.forget_result(attachment)
            return [str(e) for e in errors]

        if not jobs:
            return
        with ThreadPoolExecutor(max_workers=min(CNI_WORKERS, len(jobs))) as pool:
            outcomes = list(pool.map(detach, jobs))
        for errors in outcomes:
            for error in errors:
                print(f"sandbox: {error}; removing the namespaces anyway", file=sys.stderr)

    def _demoapp_specs(self, plan: SandboxPlan, app_env: dict[str, str]) -> list[ProcessSpec]:
        return [
            ProcessSpec(
                kind=DEMOAPP_KIND,
                name=f"{DEMOAPP_KIND}-{p.name}",
                netns=p.netns,
                # -S: no site-packages scan; the app needs only the stdlib and
                # this package (found via PYTHONPATH), which halves its start-up.
                argv=(
                    self.python,
                    "-S",
                    "-m",
                    "nodeagent.sandbox.demoapp",
                    f"--sandbox={plan.name}",
                    f"--pod={p.name}",
                    f"--namespace={p.namespace}",
                    f"--service-account={p.service_account}",
                    f"--node={p.node}",
                    f"--ip={p.ip}",
                    f"--http-port={HTTP_PORT}",
                    f"--echo-port={ECHO_PORT}",
                    # One JSON line per request on stdout, i.e. in the app's log file.
                    "--log-requests",
                ),
                ready_flag="--ready-fd",
                env=app_env,
            )
            for p in plan.pods
        ]

    # -- control plane -----------------------------------------------------

    def _controlplane_spec(
        self, plan: SandboxPlan, env: dict[str, str], *, use_waypoint: bool = True
    ) -> ProcessSpec:
        """Write node tokens and the mesh file, record the address; the process to start."""
        name = plan.name
        tokens = mesh_mod.new_tokens(plan)
        for node, token in tokens.items():
            self.store.write_private(self.store.token_path(name, node), token + "\n")
        mesh_file = self.store.mesh_path(name)
        self.store.write_private(
            mesh_file,
            mesh_mod.dump_mesh(mesh_mod.build_mesh(plan, tokens, use_waypoint=use_waypoint)),
        )
        address = f"{plan.underlay_ip}:{CONTROLPLANE_PORT}"
        info = {"address": address, "mesh_file": str(mesh_file)}
        self.store.update(
            name, lambda st: dataclasses.replace(st, extra={**st.extra, CONTROLPLANE_KIND: info})
        )
        return ProcessSpec(
            kind=CONTROLPLANE_KIND,
            name=CONTROLPLANE_NAME,
            netns=plan.underlay_netns,
            argv=(
                self.python,
                "-m",
                "nodeagent.cli.main",
                "controlplane",
                f"--mesh={mesh_file}",
                # Any address of the underlay namespace (it has only the bridge and
                # lo): binding does not wait for the bridge's address to exist.
                f"--listen=0.0.0.0:{CONTROLPLANE_PORT}",
                f"--ca-dir={self.store.ca_dir(name)}",
                "--require-token",
            ),
            env=env,
        )

    def _kubeapi_spec(self, plan: SandboxPlan, env: dict[str, str]) -> ProcessSpec:
        """The sandbox's Kubernetes API (pods, namespaces, the agents' DaemonSet), seeded
        from the plan; the agents watch it for enrollment (see sandbox/kube.py)."""
        name = plan.name
        directory = self.store.dir(name)
        seed = directory / "kube-seed.json"
        self.store.write_private(seed, json.dumps(kube_mod.seed_objects(plan)))
        token_file = directory / "kube-token"
        self.store.write_private(token_file, secrets.token_hex(16) + "\n")
        info = {
            "address": f"{plan.underlay_ip}:{kube_mod.KUBEAPI_PORT}",
            "token_file": str(token_file),
        }
        self.store.update(
            name,
            lambda st: dataclasses.replace(st, extra={**st.extra, kube_mod.KUBEAPI_KIND: info}),
        )
        return ProcessSpec(
            kind=kube_mod.KUBEAPI_KIND,
            name=kube_mod.KUBEAPI_KIND,
            netns=plan.underlay_netns,
            argv=(
                self.python,
                "-m",
                "nodeagent.sandbox.kubeapi",
                f"--listen=0.0.0.0:{kube_mod.KUBEAPI_PORT}",
                f"--seed={seed}",
                f"--token-file={token_file}",
            ),
            env=env,
        )

    def edit_metadata(self, name: str, target: str, field_name: str, items: Sequence[str]) -> str:
        """`sandbox label` / `annotate`: patch a namespace's or pod's labels or
        annotations in the sandbox's Kubernetes API; the object as it is now."""
        state, plan = self.load(name)
        info = state.extra.get(kube_mod.KUBEAPI_KIND)
        if not isinstance(info, dict):
            raise SandboxError(f"sandbox {name!r} has no Kubernetes API (made without one)")
        try:
            path = kube_mod.object_path(target, plan)
            patch = kube_mod.metadata_patch(field_name, kube_mod.parse_changes(items))
            token = Path(str(info["token_file"])).read_text().strip()
            host, _, port = str(info["address"]).rpartition(":")
            sock = self.adapter.socket(plan.underlay_netns)
            try:
                sock.settimeout(10.0)
                sock.connect((host, int(port)))
                obj = kube_mod.patch_object(sock, str(info["address"]), path, patch, token)
            finally:
                sock.close()
        except (kube_mod.KubeEditError, OSError) as exc:
            raise SandboxError(f"sandbox {name}: {exc}") from None
        return kube_mod.describe(obj)

    def _agent_specs(self, plan: SandboxPlan, env: dict[str, str]) -> list[ProcessSpec]:
        """One `nodeagent run` per node, in the node's namespace, like a host-network
        DaemonSet pod. Discovery is scoped to the node's own pods: its netns dir holds
        links to just their namespaces, and /proc scanning points at an empty dir
        (sandboxes reuse pod addresses, so a wider scan could match another's pods)."""
        specs = []
        for node in plan.nodes:
            node_dir = self.store.dir(plan.name) / node.name
            netns_dir = node_dir / "netns"
            netns_dir.mkdir(parents=True, exist_ok=True)
            (node_dir / "noproc").mkdir(exist_ok=True)
            for pod in plan.pods:
                if pod.node == node.name:
                    link = netns_dir / pod.netns
                    if not link.is_symlink():
                        link.symlink_to(netns_path(pod.netns))
            agent_env = {
                **env,
                "NODE_NAME": node.name,
                "POD_NAME": f"nodeagent-{node.name}",
                "INSTANCE_IP": node.ip,
                "CLUSTER_ID": plan.name,
                "XDS_ADDRESS": f"http://{plan.underlay_ip}:{CONTROLPLANE_PORT}",
                "AUTH_TOKEN": str(self.store.token_path(plan.name, node.name)),
                "NETNS_DIR": str(netns_dir),
                "PROC_ROOT": str(node_dir / "noproc"),
                "STATE_DIR": str(node_dir),
                "ADMIN_SOCKET": admin_socket(plan.name, node.name, self.store.root),
                # The socket the node's conflist names for the chained nodeagent-cni.
                "CNI_SOCKET": self._agent_cni_socket(plan.name, node.name),
                "DRAIN_SECONDS": "1",
                # eBPF backend: no pins. `down` stops the agents without an uninstall,
                # and pinned programs would outlive the sandbox.
                "BPF_PIN_DIR": "",
                # The sandbox's own API server (never the one of a cluster the sandbox
                # itself may run in): enrollment by labels, as on a node.
                "KUBE_API": "on",
                "KUBE_API_ADDRESS": f"http://{plan.underlay_ip}:{kube_mod.KUBEAPI_PORT}",
                "KUBE_TOKEN": str(self.store.dir(plan.name) / "kube-token"),
            }
            specs.append(
                ProcessSpec(
                    kind=AGENT_KIND,
                    name=f"{AGENT_KIND}-{node.name}",
                    netns=node.netns,
                    argv=(self.python, "-m", "nodeagent.cli.main", "run"),
                    env=agent_env,
                )
            )
        return specs

    # -- Prometheus (`up --prometheus`) ----------------------------------------

    @staticmethod
    def _prometheus_binary(*, prometheus: bool, agents: bool) -> str | None:
        """The Prometheus to run, None when not asked for; SandboxError, before anything
        is made, when it cannot be run."""
        if not prometheus:
            return None
        if not agents:
            raise SandboxError(
                "--prometheus scrapes the agents: it cannot go with --no-controlplane or "
                "--no-agents"
            )
        binary = prom_mod.find_binary()
        if binary is None:
            raise SandboxError(
                f"{prom_mod.PROMETHEUS_BINARY} not found: install it with `make setup` "
                "(Debian's package prometheus)"
            )
        return binary

    def _prometheus_spec(self, plan: SandboxPlan, binary: str) -> ProcessSpec:
        """Write Prometheus's config (its data dir beside it, under the state dir, goes
        with `down`) and record its address; the process to start in the underlay."""
        directory = self.store.dir(plan.name) / prom_mod.PROMETHEUS_NAME
        (directory / prom_mod.DATA_DIR).mkdir(parents=True, exist_ok=True)
        config = directory / prom_mod.CONFIG_FILE
        config.write_text(prom_mod.render_config(plan))
        info = {
            "address": f"{plan.underlay_ip}:{prom_mod.PROMETHEUS_PORT}",
            "config": str(config),
        }
        self.store.update(
            plan.name,
            lambda st: dataclasses.replace(st, extra={**st.extra, prom_mod.PROMETHEUS_KIND: info}),
        )
        return ProcessSpec(
            kind=prom_mod.PROMETHEUS_KIND,
            name=prom_mod.PROMETHEUS_NAME,
            netns=plan.underlay_netns,
            argv=prom_mod.argv(binary, directory),
        )

    def _waypoint_spec(self, plan: SandboxPlan, env: dict[str, str]) -> ProcessSpec:
        """`nodeagent waypoint` in its pod's namespace, with the token of its node (the
        CA signs the identities of the node's workloads, the waypoint's among them)."""
        wp = plan.waypoint
        assert wp is not None
        return ProcessSpec(
            kind=WAYPOINT_NAME,
            name=WAYPOINT_NAME,
            netns=wp.netns,
            argv=(
                self.python,
                "-m",
                "nodeagent.cli.main",
                "waypoint",
                f"--name={wp.name}",
                f"--namespace={wp.namespace}",
                f"--metrics-address=0.0.0.0:{METRICS_PORT}",
            ),
            env={
                **env,
                "NODE_NAME": wp.node,
                "CLUSTER_ID": plan.name,
                "XDS_ADDRESS": f"http://{plan.underlay_ip}:{CONTROLPLANE_PORT}",
                "AUTH_TOKEN": str(self.store.token_path(plan.name, wp.node)),
                "KUBE_API": "off",
            },
        )

    def await_agents(self, name: str, timeout: float = AGENT_READY_TIMEOUT) -> None:
        """Wait until every agent answers ready on :15021 inside its node namespace
        (config received from the control plane, every pod captured or failed), and
        the waypoint, if there is one, on its :15020 (config received)."""
        state, plan = self.load(name)
        deadline = time.monotonic() + timeout
        waiting = [
            (f"the agent of {node.name}", f"{AGENT_KIND}-{node.name}", node.netns, READINESS_PORT)
            for node in plan.nodes
        ]
        if plan.waypoint is not None:
            wp = plan.waypoint
            waiting.append((f"waypoint {wp.name}", WAYPOINT_NAME, wp.netns, METRICS_PORT))
        for what, process, netns, port in waiting:
            record = state.process(process)
            if record is None or record.pid is None:
                raise SandboxError(f"sandbox {name}: {what} was not started")
            proc = ProcessId(record.pid, record.start_time)
            while not self._answers_ready(netns, port):
                if not processes.is_running(proc):
                    raise SandboxError(
                        f"{what} exited: {_last_line(record.log) or 'no output'} (log {record.log})"
                    )
                if time.monotonic() > deadline:
                    raise SandboxError(
                        f"{what} was not ready within {timeout:.0f}s: "
                        f"{_last_line(record.log) or 'no output'} (log {record.log})"
                    )
                time.sleep(0.1)

    def _answers_ready(self, netns: str, port: int) -> bool:
        sock = self.adapter.socket(netns)
        try:
            sock.settimeout(1.0)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False
        finally:
            sock.close()

    def await_controlplane(self, name: str, timeout: float = CONTROLPLANE_READY_TIMEOUT) -> None:
        """Wait until the control plane accepts connections at its address.

        `nodeagent controlplane` has no ready fd; an accepted connection from the
        underlay namespace means its gRPC server is bound and serving.
        """
        self._await_listening(name, CONTROLPLANE_NAME, CONTROLPLANE_PORT, "the control plane")

    def _await_listening(
        self,
        name: str,
        process: str,
        port: int,
        what: str,
        timeout: float = CONTROLPLANE_READY_TIMEOUT,
    ) -> None:
        """Wait until `process` accepts connections on the underlay address at `port`."""
        state, plan = self.load(name)
        record = state.process(process)
        if record is None or record.pid is None:
            raise SandboxError(f"sandbox {name}: {what} was not started")
        proc = ProcessId(record.pid, record.start_time)
        deadline = time.monotonic() + timeout
        while True:
            if not processes.is_running(proc):
                raise SandboxError(
                    f"{what} exited: {_last_line(record.log) or 'no output'} (log {record.log})"
                )
            sock = self.adapter.socket(plan.underlay_netns)
            try:
                sock.settimeout(1.0)
                sock.connect((plan.underlay_ip, port))
                return
            except OSError:
                pass
            finally:
                sock.close()
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"{what} did not accept connections within {timeout:.0f}s: "
                    f"{_last_line(record.log) or 'no output'} (log {record.log})"
                )
            time.sleep(0.05)

    def apply(
        self,
        name: str,
        text: str,
        source: str,
        validate: MeshValidator,
        *,
        delete: bool = False,
        replace: bool = False,
    ) -> MergeSummary:
        """Merge a user's resources into the sandbox's mesh file (or remove them).

        The user's file is checked on its own first (errors name its lines),
        then the merged mesh; the mesh file is replaced atomically only if both
        pass, and the control plane, which watches it, pushes the change.
        `replace` lets a workload keep its name at another IP or node.
        """
        state, plan = self.load(name)
        info = state.extra.get(CONTROLPLANE_KIND)
        if not isinstance(info, dict) or not info.get("mesh_file"):
            raise SandboxError(
                f"sandbox {name} has no control plane (it was made with --no-controlplane)"
            )
        try:
            user = mesh_mod.parse_user_file(text, source)
            if not delete and not user.documents:  # a deletion needs only names
                # Documents are checked field by field as they are read; what refers to the
                # sandbox (hosts, subsets) is checked on the merged mesh below.
                validate(mesh_mod.standalone_text(text, plan), source)
        except ValueError as exc:
            raise SandboxError(str(exc)) from None
        mesh_file = Path(str(info["mesh_file"]))
        with self.store.locked(name):
            try:
                current = mesh_mod.load_mesh_dict(mesh_file.read_bytes(), str(mesh_file))
            except OSError as exc:
                raise SandboxError(f"cannot read the sandbox's mesh file: {exc}") from None
            except ApplyError as exc:
                raise SandboxError(
                    f"{exc} (sandbox {name}'s mesh file; nothing applied: fix or restore it)"
                ) from None
            try:
                merged, summary = mesh_mod.merge_resources(
                    current, user, delete=delete, replace=replace
                )
            except ApplyError as exc:
                raise SandboxError(str(exc)) from None
            new_text = mesh_mod.dump_mesh(merged)
            try:
                validate(new_text, str(mesh_file))
            except ValueError as exc:
                placed = mesh_mod.place_error(str(exc), merged, user)
                raise SandboxError(
                    f"{source} does not fit sandbox {name}'s mesh, nothing changed: {placed}"
                ) from None
            if summary.added or summary.replaced or summary.deleted:
                self.store.write_private(mesh_file, new_text)
        return summary

    # -- processes (demo apps, node agents, the control plane) --------------

    def start_processes(
        self, name: str, specs: Sequence[ProcessSpec], timeout: float = APP_READY_TIMEOUT
    ) -> list[ProcessRecord]:
        """Start processes in parallel and wait until all are ready (see spawn_processes)."""
        pending = self.spawn_processes(name, specs)
        self.await_ready(pending, timeout)
        return pending.started

    def spawn_processes(self, name: str, specs: Sequence[ProcessSpec]) -> PendingProcesses:
        """Start processes without waiting, recording intent before and pids after.

        A spec with `ready_flag` gets `<flag> <fd>` appended and must write
        `ready` to that fd once it serves; `await_ready` waits for that.
        """
        records = [
            ProcessRecord(
                kind=s.kind,
                name=s.name,
                netns=s.netns,
                argv=tuple(s.argv),
                log=str(self.store.log_path(name, s.name)),
            )
            for s in specs
        ]

        def record_all(st: SandboxState) -> SandboxState:
            for r in records:
                st = st.with_process(r)
            return st

        self.store.update(name, record_all)
        pending = PendingProcesses(records=records)
        try:
            for spec, rec in zip(specs, records, strict=True):
                argv = list(rec.argv)
                pass_fds: tuple[int, ...] = ()
                if spec.ready_flag:
                    r, w = os.pipe()
                    pending.ready_fds[r] = rec.name
                    argv += [spec.ready_flag, str(w)]
                    pass_fds = (w,)
                try:
                    pid = processes.spawn(rec.netns, argv, Path(rec.log), pass_fds, spec.env)
                finally:
                    for fd in pass_fds:
                        os.close(fd)
                pending.started.append(
                    dataclasses.replace(rec, pid=pid.pid, start_time=pid.start_time)
                )
        except BaseException:
            for fd in pending.ready_fds:
                os.close(fd)
            raise
        finally:
            if pending.started:
                done = {r.name: r for r in pending.started}
                self.store.update(name, lambda st: record_all_started(st, done))
        return pending

    def await_ready(self, pending: PendingProcesses, timeout: float = APP_READY_TIMEOUT) -> None:
        """Wait for every ready fd of `pending`; SandboxError naming a laggard's log."""
        fds, pending.ready_fds = pending.ready_fds, {}
        failed = processes.wait_ready(fds, timeout) if fds else []
        if failed:
            first = next(r for r in pending.records if r.name == failed[0])
            # The log goes with the sandbox's clean-up, so quote its last line.
            raise SandboxError(
                f"{len(failed)} process(es) did not become ready, e.g. {first.name} "
                f"in {first.netns}: {_last_line(first.log) or 'no output'}"
            )

    def stop_process(self, name: str, process: str) -> bool:
        """Stop one recorded process and forget it; False if it was not recorded."""
        state, _ = self.load(name)
        record = state.process(process)
        if record is None:
            return False
        if record.pid is not None:
            processes.terminate([ProcessId(record.pid, record.start_time)])
        self.store.update(name, lambda st: st.without_process(process))
        return True

    # -- behaviour switches ------------------------------------------------

    def behave(
        self,
        name: str,
        pod: str,
        *,
        fail: str = "0",
        status: int = DEFAULT_FAIL_STATUS,
        delay: float = 0.0,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """Set a pod's demo app switches (see demoapp.py; all three at once, a default
        resets) by POST /demo/behaviour to 127.0.0.1:8080 from inside the pod's
        namespace, the only caller the app obeys; return the settings it answered."""
        try:
            parse_share(fail)
        except ValueError as exc:
            raise SandboxError(f"--{exc}") from None  # "fail: ..."
        if not 200 <= status <= 599:
            raise SandboxError(f"--status must be an HTTP status between 200 and 599, got {status}")
        if not 0 <= delay <= MAX_DELAY:
            raise SandboxError(f"--delay must be between 0 and {MAX_DELAY:.0f}s, got {delay}")
        _state, plan = self.load(name)
        found = plan.pod(pod.rpartition("/")[2])
        if found is None:
            raise SandboxError(
                f"sandbox {name} has no demo pod {pod!r} "
                f"(pods: {', '.join(p.name for p in plan.pods)})"
            )
        preflight()
        path = f"{BEHAVIOUR_PATH}?fail={fail.strip()}&status={status}&delay={delay!r}"
        sock = self.adapter.socket(found.netns)
        try:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", HTTP_PORT))
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{HTTP_PORT}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        except OSError as exc:
            raise SandboxError(
                f"the demo app of {found.name} did not answer on 127.0.0.1:{HTTP_PORT}: "
                f"{exc.strerror or exc}"
            ) from None
        finally:
            sock.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not line.startswith("HTTP/1.1 200") or not isinstance(answer, dict):
            why = answer.get("error") if isinstance(answer, dict) else None
            raise SandboxError(
                f"the demo app of {found.name} refused: {why or line or 'no answer'}"
            )
        return answer

    # -- exec --------------------------------------------------------------

    def exec(self, name: str, target: str, cmd: Sequence[str]) -> int:
        """Run `cmd` in the target's namespace, inheriting stdio; return its exit code."""
        if not cmd:
            raise SandboxError("no command given (use: exec NAME POD -- CMD...)")
        preflight()
        netns = self.resolve_netns(name, target)
        argv = [processes.NSENTER, f"--net={netns_path(netns)}", "--", *cmd]
        try:
            return subprocess.run(argv, check=False).returncode
        except KeyboardInterrupt:
            return 130

    # -- down --------------------------------------------------------------

    def down(self, name: str) -> DownReport:
        """Remove everything sandbox `name` made; idempotent, works on half-built ones."""
        try:
            validate_name(name)
        except PlanError as exc:
            raise SandboxError(str(exc)) from None
        preflight()
        pattern = netns_pattern(name)
        state = self.store.load(name)
        swept = [n for n in list_netns() if pattern.match(n)]
        if state is None and not swept and not self.store.exists(name):
            return DownReport(existed=False)
        namespaces = sorted(set(swept) | set(state.namespaces if state else ()))
        recorded = [
            ProcessId(p.pid, p.start_time) for p in (state.processes if state else ()) if p.pid
        ]
        inodes = {i for i in (netns_inode(n) for n in namespaces) if i is not None}
        # Recorded processes first, then anything else still inside our namespaces
        # (a process started just before a crash, or by `exec`).
        strays = processes.pids_in_netns(inodes)
        victims = {p.pid: p for p in recorded + strays}
        # Like a node tearing down a pod: the network goes while the node's agent
        # still runs (a chained plugin may tell it), then the namespaces.
        self._detach_pods(state)
        processes.terminate(victims.values())
        for n in namespaces:
            self.adapter.remove(n)
        self.store.remove(name)
        return DownReport(existed=True, namespaces=len(namespaces), processes=len(victims))


@dataclass(frozen=True, kw_only=True)
class ProcessSpec:
    """A process to start in a sandbox namespace."""

    kind: str
    name: str
    netns: str
    argv: Sequence[str]
    env: dict[str, str] | None = None
    ready_flag: str | None = None


@dataclass
class PendingProcesses:
    """Processes spawned by `spawn_processes`, not yet known to be ready."""

    records: list[ProcessRecord]
    started: list[ProcessRecord] = field(default_factory=list)
    ready_fds: dict[int, str] = field(default_factory=dict)


def _chain_for(plan: SandboxPlan, pod: PodPlan, conflist: dict[str, Any]) -> dict[str, Any]:
    """The chain run for `pod`: its node's conflist, except that the waypoint pod skips
    nodeagent-cni. In Istio the CNI plugin lets the waypoint be (its pod is labelled
    istio.io/dataplane-mode=none, read from the API server); the sandbox's agents do not
    discover the waypoint's namespace, so asked about it they would wait out their ADD
    timeout and the plugin would hold the pod closed."""
    if plan.waypoint is not None and pod.name == plan.waypoint.name:
        return cni.without_plugin(conflist, cni.NODEAGENT_PLUGIN)
    return conflist


def _plan_of(state: SandboxState) -> SandboxPlan:
    """The plan a sandbox was made with, rebuilt from its state."""
    pod_cni = state.extra.get(CNI_KEY)
    pod_network: PodNetwork = "cni" if isinstance(pod_cni, dict) else "veth"
    return build_plan(
        state.name,
        state.nodes,
        state.pods_per_node,
        waypoint=bool(state.extra.get(WAYPOINT_NAME)),
        shadow=bool(state.extra.get(SHADOW_SUFFIX)),
        pod_network=pod_network,
    )


def record_all_started(state: SandboxState, done: dict[str, ProcessRecord]) -> SandboxState:
    for record in done.values():
        state = state.with_process(record)
    return state
