"""A container runtime's CNI half, for running the real plugin chain from a conflist on disk.

`CniRuntime` does what libcni does for a network list (CNI spec 1.0, "Execution of
Network Configurations"): each plugin gets the list's `cniVersion` and `name` merged into
its own config on stdin, plus `prevResult` (ADD: the previous plugin's result; CHECK and
DEL: the cached result of the whole ADD); ADD and CHECK run the list in order, DEL in
reverse. Plugins run inside a "node" namespace (ptp puts its host-side veth and routes
there), so the test host is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYSTEM_PLUGINS = "/usr/lib/cni"


@dataclass
class Call:
    plugin: str
    command: str
    code: int
    stdout: str
    stderr: str
    seconds: float

    def result(self) -> dict[str, Any]:
        assert self.code == 0, f"{self.plugin} {self.command}: {self.stdout} {self.stderr}"
        parsed: dict[str, Any] = json.loads(self.stdout) if self.stdout.strip() else {}
        return parsed


@dataclass
class CniRuntime:
    conflist: Path
    cni_path: list[Path]
    node_netns: str  # /var/run/netns name the plugins run in
    calls: list[Call] = field(default_factory=list)

    def network(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(self.conflist.read_text())
        return config

    def _find(self, kind: str) -> Path:
        for directory in self.cni_path:
            if (directory / kind).exists():
                return directory / kind
        raise AssertionError(f"plugin {kind} not in {self.cni_path}")

    def exec_plugin(
        self,
        plugin: dict[str, Any],
        command: str,
        container_id: str,
        netns: str,
        prev: dict[str, Any] | None,
        ifname: str = "eth0",
    ) -> Call:
        network = self.network()
        stdin = {**plugin, "cniVersion": network["cniVersion"], "name": network["name"]}
        if prev is not None:
            stdin["prevResult"] = prev
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": ":".join(str(p) for p in self.cni_path),
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=pod-{container_id}"
            f";K8S_POD_UID=uid-{container_id}",
        }
        argv = ["nsenter", f"--net=/var/run/netns/{self.node_netns}", "--"]
        started = time.monotonic()
        done = subprocess.run(
            [*argv, str(self._find(plugin["type"]))],
            input=json.dumps(stdin),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        call = Call(
            plugin["type"],
            command,
            done.returncode,
            done.stdout,
            done.stderr,
            time.monotonic() - started,
        )
        self.calls.append(call)
        return call

    def add(self, container_id: str, netns: str) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in self.network()["plugins"]:
            prev = self.exec_plugin(plugin, "ADD", container_id, netns, prev).result()
        assert prev is not None
        return prev

    def check(self, container_id: str, netns: str, cached: dict[str, Any]) -> list[Call]:
        plugins = self.network()["plugins"]
        return [self.exec_plugin(p, "CHECK", container_id, netns, cached) for p in plugins]

    def delete(self, container_id: str, netns: str, cached: dict[str, Any] | None) -> list[Call]:
        plugins = reversed(self.network()["plugins"])
        return [self.exec_plugin(p, "DEL", container_id, netns, cached) for p in plugins]

    def last(self, plugin: str, command: str) -> Call:
        return next(c for c in reversed(self.calls) if (c.plugin, c.command) == (plugin, command))
