"""The sandbox's state file: what it intends to create and what it has started.

Every creation step is recorded *before* it happens, so `down` can undo a
sandbox whose `up` crashed halfway. Processes of every kind (demo apps, node
agents, the control plane) share one record type: kind, name, netns,
argv, log file, pid and the pid's start time (so a reused pid is never killed).

Layout: ``<root>/<NAME>/state.json``, ``<root>/<NAME>/logs/<process>.log``, the
control plane's ``<root>/<NAME>/mesh.yaml`` and ``<root>/<NAME>/ca/``, and one
``<root>/<NAME>/<node>/token`` per node (mode 0600: the bearer token that node's
agent presents to the control plane).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STATE_ROOT = Path("/var/run/nodeagent-sandbox")
STATE_FILE = "state.json"
MESH_FILE = "mesh.yaml"
TOKEN_FILE = "token"
CA_DIR = "ca"


@dataclass(frozen=True, kw_only=True)
class ProcessRecord:
    """One process the sandbox started (or is about to start: pid None)."""

    kind: str  # "demoapp", "agent" or "controlplane"
    name: str  # unique within the sandbox, e.g. "demoapp-node1-pod1"
    netns: str
    argv: tuple[str, ...]
    log: str
    pid: int | None = None
    start_time: int | None = None  # /proc/<pid>/stat field 22, clock ticks since boot

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["argv"] = list(self.argv)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessRecord:
        return cls(
            kind=str(d["kind"]),
            name=str(d["name"]),
            netns=str(d["netns"]),
            argv=tuple(d.get("argv", ())),
            log=str(d.get("log", "")),
            pid=d.get("pid"),
            start_time=d.get("start_time"),
        )


@dataclass(frozen=True, kw_only=True)
class SandboxState:
    name: str
    nodes: int
    pods_per_node: int
    phase: str = "creating"  # creating -> ready; failed; deleting
    namespaces: tuple[str, ...] = ()  # intended (maybe created) namespaces
    processes: tuple[ProcessRecord, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # room for later work

    def with_process(self, record: ProcessRecord) -> SandboxState:
        others = tuple(p for p in self.processes if p.name != record.name)
        return dataclasses.replace(self, processes=(*others, record))

    def without_process(self, name: str) -> SandboxState:
        return dataclasses.replace(
            self, processes=tuple(p for p in self.processes if p.name != name)
        )

    def process(self, name: str) -> ProcessRecord | None:
        return next((p for p in self.processes if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodes": self.nodes,
            "pods_per_node": self.pods_per_node,
            "phase": self.phase,
            "namespaces": list(self.namespaces),
            "processes": [p.to_dict() for p in self.processes],
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SandboxState:
        return cls(
            name=str(d["name"]),
            nodes=int(d["nodes"]),
            pods_per_node=int(d["pods_per_node"]),
            phase=str(d.get("phase", "creating")),
            namespaces=tuple(d.get("namespaces", ())),
            processes=tuple(ProcessRecord.from_dict(p) for p in d.get("processes", ())),
            extra=dict(d.get("extra", {})),
        )


def admin_socket(sandbox: str, node: str, root: Path = DEFAULT_STATE_ROOT) -> str:
    """The admin socket of node `node`'s agent in sandbox `sandbox` (the one convention:
    the sandbox starts agents with it, the CLI's `--sandbox/--node` resolves through it)."""
    for label, value in (("sandbox", sandbox), ("node", node)):
        if not value or "/" in value or value in (".", ".."):
            raise ValueError(f"bad {label} name {value!r}")
    return str(root / sandbox / node / "admin.sock")


class StateStore:
    """Reads and atomically rewrites state files under `root`."""

    def __init__(self, root: Path = DEFAULT_STATE_ROOT) -> None:
        self.root = root

    def dir(self, name: str) -> Path:
        return self.root / name

    def log_path(self, name: str, process: str) -> Path:
        return self.root / name / "logs" / f"{process}.log"

    def mesh_path(self, name: str) -> Path:
        return self.root / name / MESH_FILE

    def token_path(self, name: str, node: str) -> Path:
        return self.root / name / node / TOKEN_FILE

    def ca_dir(self, name: str) -> Path:
        return self.root / name / CA_DIR

    def exists(self, name: str) -> bool:
        return self.dir(name).exists()

    def claim(self, state: SandboxState) -> bool:
        """Create the sandbox's directory and first state; False if it already exists."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.dir(state.name).mkdir()
        except FileExistsError:
            return False
        (self.dir(state.name) / "logs").mkdir()
        self.save(state)
        return True

    def load(self, name: str) -> SandboxState | None:
        try:
            with open(self.dir(name) / STATE_FILE) as f:
                return SandboxState.from_dict(json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            # A torn or foreign file: `down` still sweeps by name.
            return None

    def save(self, state: SandboxState) -> None:
        path = self.dir(state.name) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def write_private(self, path: Path, text: str) -> None:
        """Atomically replace `path` with `text`, readable by root only (it holds tokens).

        The temp file is made in the same directory and renamed over `path`, so a
        reader (the control plane polls the mesh file) sees the old or the new
        file, never a torn one.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Serialize read-modify-write of one sandbox's state across processes."""
        fd = os.open(self.dir(name), os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update(
        self, name: str, change: Callable[[SandboxState], SandboxState]
    ) -> SandboxState | None:
        if not self.exists(name):
            return None
        with self.locked(name):
            state = self.load(name)
            if state is None:
                return None
            new = change(state)
            self.save(new)
            return new

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def remove(self, name: str) -> None:
        shutil.rmtree(self.dir(name), ignore_errors=True)
