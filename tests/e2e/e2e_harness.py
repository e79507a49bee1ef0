"""What the e2e tests share: the sandbox CLI, a view of a running sandbox, a tcpdump
capture in a node's namespace (stopped by its PID) and a pcap reader."""

from __future__ import annotations

import json
import os
import selectors
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodeagent.sandbox.demo import DENY_FRONTEND as DENY_FRONTEND  # the demo's own policy
from nodeagent.sandbox.processes import NSENTER

NODEAGENT = str(Path(sys.executable).parent / "nodeagent")
FRONTEND = "spiffe://cluster.local/ns/demo/sa/frontend"
BACKEND = "spiffe://cluster.local/ns/demo/sa/backend"
BACKEND_VIP = "10.96.0.10"
ECHO_VIP = "10.96.0.11"
POLICY_WAIT = 15.0  # control plane polls its file every 0.5 s, then pushes over xDS


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NODEAGENT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def service_routes(mesh: Mesh, service: str, *, node: str = "", waypoint: bool = False) -> Any:
    """`service` as `nodeagent routes -o json` shows it (an agent's with `node`, the
    waypoint's with `waypoint`); None while that proxy has no config for it. Waits on this
    route state, not on a sample of calls: a sample cannot tell a change half applied."""
    where = ["--waypoint"] if waypoint else ["--node", node]
    done = _cli("routes", service, "--sandbox", mesh.name, *where, "-o", "json")
    if done.returncode != 0:
        assert done.returncode != 2, done.stderr  # a usage error: the test's own
        if "no routes, rules or traffic for service" not in done.stderr:
            print(f"nodeagent routes: {done.stderr.strip()}")  # shown if the wait fails
        return None
    found = json.loads(done.stdout)["services"]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Mesh:
    """The module's sandbox: its name, status and a few ways to act inside it."""

    name: str
    status: dict[str, Any]
    tmp: Path
    backend: str = "iptables"

    def pod(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status["pods"] if p["name"] == name)

    def netns(self, target: str) -> str:
        if target.startswith("node") and "-" not in target:
            return next(n["netns"] for n in self.status["nodes"] if n["name"] == target)
        return str(self.pod(target)["netns"])

    def agent_log(self, node: str) -> str:
        path = next(a["log"] for a in self.status["agents"] if a["name"] == f"agent-{node}")
        return Path(path).read_text(errors="replace")

    def run_in(
        self, target: str, argv: list[str], timeout: float = 15.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NSENTER, f"--net=/var/run/netns/{self.netns(target)}", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def python_in(
        self, target: str, code: str, *args: str, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run_in(target, [sys.executable, "-c", code, *args], timeout=timeout)

    def curl(self, src: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run_in(src, ["curl", "-sS", "--max-time", "5", *extra, url])

    def get_json(self, src: str, url: str, *extra: str) -> dict[str, Any]:
        result = self.curl(src, url, *extra)
        assert result.returncode == 0, f"curl from {src} to {url}: {result.stderr.strip()}"
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def behave(
        self, pod: str, *, fail: float = 0.0, status: int = 500, delay: float = 0.0
    ) -> dict[str, Any]:
        """Set `pod`'s demo app switches (`sandbox behave`; all at once, defaults reset):
        the share `fail` of its requests answered `status`, every answer held `delay` s."""
        share = f"{fail:.9f}".rstrip("0").rstrip(".") or "0"  # exact decimal, as the app reads it
        result = _cli(
            "sandbox", "behave", self.name, pod,
            "--fail", share, "--status", str(status), "--delay", repr(float(delay)),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def app_log(self, pod: str) -> list[dict[str, Any]]:
        """The requests `pod`'s demo app logged (one JSON object per request, oldest
        first: time, method, path, host, client_ip, client_port, status)."""
        records = []
        for line in Path(self.pod(pod)["log"]).read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue  # anything else the app printed (a traceback)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "method" in record:
                records.append(record)
        return records

    def waypoint_metrics(self) -> str:
        """The waypoint's /metrics, read inside its own namespace."""
        result = subprocess.run(
            [NSENTER, f"--net=/var/run/netns/{self.name}-node1-waypoint", "--",
             "curl", "-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    def waypoint_log(self) -> str:
        return Path(self.status["waypoint"]["log"]).read_text(errors="replace")

    def apply(self, text: str, *, delete: bool = False) -> None:
        path = self.tmp / f"policy-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        result = _cli("sandbox", "apply", self.name, str(path), *(["--delete"] if delete else []))
        assert result.returncode == 0, result.stderr


@contextmanager
def sandbox(
    tmp: Path,
    backend: str,
    *,
    waypoint: bool = False,
    shadow: bool = False,
    prometheus: bool = False,
    **env: str,
) -> Iterator[Mesh]:
    """A 2x2 sandbox with the control plane and an agent per node (and the demo
    namespace's waypoint pod with `waypoint`, pod node2-shadow, a v3 backend, with
    `shadow`, and Prometheus in the underlay scraping the agents with `prometheus`),
    removed on exit."""
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root and the real kernel")
    name = f"m{uuid.uuid4().hex[:7]}"
    try:
        up = _cli(
            "sandbox", "up", "--name", name, "--nodes", "2", "--pods-per-node", "2",
            *(["--waypoint"] if waypoint else []),
            *(["--shadow"] if shadow else []),
            *(["--prometheus"] if prometheus else []),
            env={"LOG_LEVEL": "debug", "REDIRECT_BACKEND": backend, **env},
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        status = _cli("sandbox", "status", name, "-o", "json")
        assert status.returncode == 0, status.stderr
        yield Mesh(name, json.loads(status.stdout), tmp, backend)
    finally:
        down = _cli("sandbox", "down", name)
        if down.returncode != 0:
            print(f"sandbox down {name} failed: {down.stderr.strip()}", file=sys.stderr)


def wait_until(what: str, check: Callable[[], bool], timeout: float = POLICY_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.2)


# --- a capture in a node's namespace ---------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    src: tuple[str, int]
    dst: tuple[str, int]
    flags: int
    payload: bytes


def read_pcap(path: Path) -> list[Segment]:
    """IPv4/TCP segments of a classic pcap file from `tcpdump -i any` (Linux cooked v1 or v2)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    link_len, proto_at = {113: (16, 14), 276: (20, 0)}[linktype]
    segments = []
    off = 24
    while off + 16 <= len(data):
        caplen = struct.unpack(endian + "I", data[off + 8 : off + 12])[0]
        frame = data[off + 16 : off + 16 + caplen]
        off += 16 + caplen
        if len(frame) < link_len + 20 or frame[proto_at : proto_at + 2] != b"\x08\x00":
            continue
        ip = frame[link_len:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:  # not TCP
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:total]
        sport, dport = struct.unpack("!HH", tcp[:4])
        doff = (tcp[12] >> 4) * 4
        segments.append(
            Segment(
                src=(".".join(map(str, ip[12:16])), sport),
                dst=(".".join(map(str, ip[16:20])), dport),
                flags=tcp[13],
                payload=bytes(tcp[doff:]),
            )
        )
    return segments


CAPTURE_BLOCK_S = 1.2  # packets reach tcpdump in blocks, within about a second


class Capture:
    """tcpdump on every interface of a namespace, for pod-range TCP; stopped by its PID."""

    def __init__(self, netns: str, pcap: Path, bpf: str = "tcp and net 10.10.0.0/16") -> None:
        self.pcap = pcap
        self.stats = ""  # tcpdump's closing counts (captured, dropped), for failure messages
        self.proc = subprocess.Popen(
            [NSENTER, f"--net=/var/run/netns/{netns}", "--",
             "tcpdump", "-i", "any", "-nn", "-U", "-s", "0", "-B", "8192", "-c", "5000",
             "-w", str(pcap), bpf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self._await_listening()

    def _await_listening(self) -> None:
        assert self.proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stderr, selectors.EVENT_READ)
        seen = b""
        deadline = time.monotonic() + 10
        try:
            while b"listening on" not in seen:
                if time.monotonic() > deadline or not sel.select(deadline - time.monotonic()):
                    raise AssertionError(f"tcpdump did not start: {seen!r}")
                chunk = os.read(self.proc.stderr.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"tcpdump exited: {seen!r}")
                seen += chunk
        finally:
            sel.close()

    def await_segments(self, check: Callable[[list[Segment]], bool], timeout: float = 10.0) -> None:
        """Until the file (written per packet, `-U`) holds what `check` wants and then no new
        packet for one block period: the kernel hands captured packets to tcpdump in blocks,
        up to about a second late (later on a loaded machine), and the caller's checks of
        what `stop` returns are also about packets that should not be there."""
        deadline = time.monotonic() + timeout
        seen, quiet_since = -1, 0.0
        while time.monotonic() < deadline:
            try:
                segments = read_pcap(self.pcap)
            except (struct.error, IndexError, KeyError):
                segments = None  # a record still being written
            now = time.monotonic()
            if segments is not None and (seen >= 0 or check(segments)):
                if len(segments) != seen:
                    seen, quiet_since = len(segments), now
                elif now - quiet_since >= CAPTURE_BLOCK_S:
                    return
            time.sleep(0.2)

    def stop(self) -> list[Segment]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # tcpdump flushes its file on SIGINT
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.stats = self.proc.stderr.read().decode(errors="replace").strip()
            self.proc.stderr.close()
        return read_pcap(self.pcap)
