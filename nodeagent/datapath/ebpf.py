"""eBPF capture, outbound half: connects redirected once, at connect time (bpf/connect_redirect.c).

Why: the iptables capture puts conntrack and NAT on every packet of the app's connection,
which costs a native TLS proxy 17-29% of its throughput here, while a connect-time rewrite
costs nothing measurable (`python -m bench.capture_cost`, docs/performance.md).

`ConnectRedirect` has the programs compiled and loaded by bcc in a short-lived child
(bpfload.py: bcc and LLVM would otherwise stay in the agent, ~110 MiB of RSS), attaches
`connect4`, `connect6` and `sockops` at the cgroup2 root through BPF links (one set per
agent; each acts only in the namespaces in its own `pods` map, so several agents can share
a kernel, as in the sandbox), and offers, through raw bpf(2) calls (bpfsys.py):

* `add_pod` / `remove_pod`: capture a pod namespace's outbound TCP connects, or stop;
* `original_destination`: where an accepted connection on the outbound listener was going
  (the eBPF counterpart of SO_ORIGINAL_DST), by the namespace and the app's local port.

With `pin_dir`, maps, programs and links are pinned in bpffs, so capture outlives the agent:
after a crash the pods' connects still go to the (now closed) listener and are refused, not
sent in plaintext (fail closed), and the next agent takes the same maps and swaps its
programs into the same links. The pinned programs are named by a digest of the program text
and serve as a cache: an agent restarting with the same text reuses them and starts no
child. Without `pin_dir` the child hands the descriptors over (SCM_RIGHTS) and nothing is
pinned: capture ends with the agent's process. `close(keep=False)` removes everything.

`EbpfCapture` is the backend the agent runs with `redirect_backend: ebpf`: this for IPv4
outbound, the iptables backend for inbound and IPv6.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.resources
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from nodeagent.datapath import bpfload, bpfsys
from nodeagent.datapath.bpfsys import BpfSys
from nodeagent.datapath.discovery import read_addresses
from nodeagent.datapath.iptables import CaptureError, InstalledCapture, IptablesBackend
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, original_destination, resolve
from nodeagent.datapath.plan import CapturePlan
from nodeagent.model.constants import OUTBOUND_PORT, PROBE_SNAT_IPV4, PROXY_MARK, PROXY_MASK

# Package data (nodeagent/bpf links to the repo's bpf/), so an installed agent finds it.
SOURCE = Path(str(importlib.resources.files("nodeagent") / "bpf" / "connect_redirect.c"))
MAX_POD_IPS = 4  # as in the program

_SO_NETNS_COOKIE = 71
# enum bpf_attach_type (uapi/linux/bpf.h)
_CGROUP_INET4_CONNECT = 10
_CGROUP_INET6_CONNECT = 11
_CGROUP_SOCK_OPS = 3
_PROGRAMS = (  # (function, attach type, program type)
    ("connect4", _CGROUP_INET4_CONNECT, bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR),
    # IPv4-mapped destinations on IPv6 sockets
    ("connect6", _CGROUP_INET6_CONNECT, bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR),
    ("sockops", _CGROUP_SOCK_OPS, bpfsys.PROG_TYPE_SOCK_OPS),
)


def read_source(path: Path = SOURCE) -> str:
    """The BPF program's C text; a missing file is a CaptureError naming its path."""
    try:
        return path.read_text()
    except OSError as exc:
        raise CaptureError(f"cannot read BPF source {path}: {exc.strerror or exc}") from None


def kernel_headers() -> Path | None:
    """Headers bcc can compile against: `make setup` leaves matching ones in the checkout
    (the image sets BCC_KERNEL_SOURCE itself)."""
    path = Path(__file__).resolve().parents[2] / ".cache" / "kheaders"
    return path if path.is_dir() else None


def _mounts() -> str:
    try:
        return Path("/proc/self/mounts").read_text()
    except OSError:
        return ""


def bpf_pin_dir(
    setting: str,
    cluster_id: str,
    node_name: str,
    *,
    bpffs: str = "/sys/fs/bpf",
    mounts: str | None = None,
) -> Path | None:
    """Where this agent pins its maps and links (config `bpf_pin_dir`): `auto` is under
    bpffs, per cluster and node (sandboxes on one host each have a node1), if a bpffs is
    mounted there (the DaemonSet mounts it); empty is nowhere, and capture then ends with
    the agent; anything else is that directory."""
    if setting != "auto":
        return Path(setting) if setting else None
    table = [line.split() for line in (_mounts() if mounts is None else mounts).splitlines()]
    if not any(fields[1:3] == [bpffs, "bpf"] for fields in table if len(fields) >= 3):
        return None
    return Path(bpffs) / "nodeagent" / cluster_id / node_name


def cgroup2_root(configured: str = "", mounts: str | None = None) -> str:
    """The cgroup2 hierarchy to attach at: as configured, else the first cgroup2 mount."""
    if configured:
        return configured
    for line in (_mounts() if mounts is None else mounts).splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return fields[1]
    raise CaptureError("no cgroup2 hierarchy is mounted (set cgroup2_path)")


class PodInfo(ctypes.Structure):
    """struct pod_info, the `pods` map's value (connect_redirect.c)."""

    _fields_ = [
        ("ips", ctypes.c_uint32 * MAX_POD_IPS),
        ("skip_ip", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("mark_mask", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class ConnKey(ctypes.Structure):
    """struct conn_key, the `origins` map's key."""

    _fields_ = [("netns", ctypes.c_uint64), ("port", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class OrigDst(ctypes.Structure):
    """struct orig_dst, where a captured connect was going."""

    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


# The maps as declared in the program: (type, key size, value size); a pinned map that does
# not match is not reused from the cache.
_MAPS = {
    "pods": (bpfsys.MAP_TYPE_HASH, 8, ctypes.sizeof(PodInfo)),
    "pending": (bpfsys.MAP_TYPE_LRU_HASH, 8, ctypes.sizeof(OrigDst)),
    "origins": (bpfsys.MAP_TYPE_LRU_HASH, ctypes.sizeof(ConnKey), ctypes.sizeof(OrigDst)),
    "stats": (bpfsys.MAP_TYPE_ARRAY, 4, 8),
}
LOAD_TIMEOUT = 180.0  # seconds for the child to compile and load (about 2 s here)


def _u32(ip: str) -> int:
    """An IPv4 address as the program compares it: network order, read as a native u32."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def _netns_cookie() -> int:
    with socket.socket() as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8), "little")


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def prog_pin(pin_dir: Path, name: str, digest: str) -> Path:
    """Where a program compiled from the text with this digest is pinned (its cache entry)."""
    return pin_dir / f"{name}_prog_{digest}"


def load_objects(
    text: str,
    *,
    pin_dir: Path | None,
    digest: str,
    kernel_headers: Path | None = None,
    python: str = sys.executable,
    timeout: float = LOAD_TIMEOUT,
) -> tuple[dict[str, int], dict[str, int]]:
    """Compile and load `text` in a child (bpfload.py): descriptors of its programs and
    maps, by name. The programs are pinned as the cache entry when there is a `pin_dir`."""
    request = {
        "text": text,
        "programs": [
            {
                "name": name,
                "prog_type": prog_type,
                "attach_type": attach_type,
                "pin": str(prog_pin(pin_dir, name, digest)) if pin_dir is not None else "",
            }
            for name, attach_type, prog_type in _PROGRAMS
        ],
        "maps": list(_MAPS),
    }
    env = dict(os.environ)
    if kernel_headers is not None:
        env.setdefault("BCC_KERNEL_SOURCE", str(kernel_headers))
    # The child finds this very package, installed or in a checkout.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            with theirs:
                proc = subprocess.run(
                    [python, "-m", "nodeagent.datapath.bpfload", str(theirs.fileno())],
                    input=json.dumps(request).encode(),
                    pass_fds=(theirs.fileno(),),
                    capture_output=True,
                    env=env,
                    timeout=timeout,
                    check=False,
                )
        except subprocess.TimeoutExpired:
            raise CaptureError(f"compile {SOURCE.name}: no answer in {timeout:.0f} s") from None
        except OSError as exc:
            raise CaptureError(f"compile {SOURCE.name}: cannot run {python}: {exc}") from None
        ours.setblocking(False)
        try:
            msg, fds, _, _ = socket.recv_fds(ours, 4096, bpfload.MAX_FDS)
        except BlockingIOError:
            msg, fds = b"", []
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        err = proc.stderr.decode(errors="replace").strip()
        lines = err.splitlines()
        detail = "\n".join(lines[-20:]) if lines else "(no output)"
        raise CaptureError(f"compile {SOURCE.name}: the loader exited {proc.returncode}:\n{detail}")
    named = dict(zip(json.loads(msg), fds, strict=True))
    progs = {name: named.pop(name) for name, _, _ in _PROGRAMS}
    return progs, named


class ConnectRedirect:
    """The connect-time outbound redirect for this agent's pods (see the module docstring)."""

    def __init__(
        self,
        *,
        cgroup: str = "",
        pin_dir: Path | None = None,
        outbound_port: int = OUTBOUND_PORT,
        kernel_headers: Path | None = None,
        worker: NetnsWorker | None = None,
        bpf: BpfSys | None = None,
    ) -> None:
        self._outbound_port = outbound_port
        self._pin_dir = pin_dir
        self._sys = bpf or BpfSys()
        self._links: list[int] = []
        self._maps: dict[str, int] = {}
        self.compiled = False  # whether this start ran the compiler (no cached programs)
        cgroup = cgroup2_root(cgroup)
        try:  # first: the cheap mistake is reported before a second of compiling
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise CaptureError(f"open cgroup2 {cgroup}: {exc.strerror}") from None
        progs: dict[str, int] = {}
        try:
            text = read_source()
            if pin_dir is not None:
                pin_dir.mkdir(parents=True, exist_ok=True)
                text = _pinned(text, pin_dir)  # the same maps across agent restarts
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            cached = self._cached(pin_dir, digest) if pin_dir is not None else None
            if cached is None:
                self.compiled = True
                cached = load_objects(
                    text, pin_dir=pin_dir, digest=digest, kernel_headers=kernel_headers
                )
            progs, self._maps = cached
            for name, attach_type, _ in _PROGRAMS:
                self._links.append(self._link(progs[name], cgroup_fd, attach_type, name))
            if pin_dir is not None:
                self._forget_other_programs(pin_dir, digest)
        except BaseException:
            self._unlink(remove_pins=False)
            _close_all(self._maps)
            raise
        finally:
            _close_all(progs)  # the links (and pins) hold the programs now
            os.close(cgroup_fd)
        self._own_worker = worker is None
        self._worker = worker or NetnsWorker("ebpf")

    @property
    def pin_dir(self) -> Path | None:
        return self._pin_dir

    def _cached(self, pin_dir: Path, digest: str) -> tuple[dict[str, int], dict[str, int]] | None:
        """The pinned programs compiled from this very text and the pinned maps they use,
        if all are there and fit; else None, and stale program pins of this digest go."""
        progs: dict[str, int] = {}
        maps: dict[str, int] = {}
        try:
            for name, (map_type, key_size, value_size) in _MAPS.items():
                maps[name] = fd = self._sys.obj_get(pin_dir / name)
                info = self._sys.map_info(fd)
                if (info.type, info.key_size, info.value_size) != (map_type, key_size, value_size):
                    raise LookupError(name)
            ids = {self._sys.map_info(fd).id for fd in maps.values()}
            for name, _, prog_type in _PROGRAMS:
                progs[name] = fd = self._sys.obj_get(prog_pin(pin_dir, name, digest))
                prog, used = self._sys.prog_info(fd)
                if prog.type != prog_type or not set(used) <= ids:
                    raise LookupError(name)
        except (OSError, LookupError):
            _close_all(progs)
            _close_all(maps)
            for name, _, _ in _PROGRAMS:
                prog_pin(pin_dir, name, digest).unlink(missing_ok=True)
            return None
        return progs, maps

    def _link(self, prog_fd: int, cgroup_fd: int, attach_type: int, name: str) -> int:
        """A link running `prog_fd` at the cgroup: the pinned one (its program swapped for
        ours) if a previous agent left it, else a new one (pinned if we pin)."""
        try:
            if self._pin_dir is not None:
                pin = self._pin_dir / f"{name}_link"
                if pin.exists():
                    fd = self._sys.obj_get(pin)
                    try:
                        self._sys.link_update(fd, prog_fd)
                    except OSError:
                        os.close(fd)
                        raise
                    return fd
                fd = self._sys.link_create(prog_fd, cgroup_fd, attach_type)
                try:
                    self._sys.obj_pin(fd, pin)
                except OSError:
                    self._sys.link_detach(fd)
                    os.close(fd)
                    raise
                return fd
            return self._sys.link_create(prog_fd, cgroup_fd, attach_type)
        except OSError as exc:
            raise CaptureError(f"attach {name}: {exc.strerror or exc}") from None

    @staticmethod
    def _forget_other_programs(pin_dir: Path, digest: str) -> None:
        """Unpin programs of other texts (a previous version's): no link runs them now."""
        for entry in pin_dir.iterdir():
            if "_prog_" in entry.name and not entry.name.endswith(f"_prog_{digest}"):
                entry.unlink(missing_ok=True)

    # -- pods --------------------------------------------------------------------------------------

    def add_pod(self, netns: NetnsHandle | str, ips: Sequence[str]) -> int:
        """Capture outbound TCP connects made in `netns` (except to `ips`, the pod's own
        addresses, and loopback); returns the namespace cookie that names it here."""
        v4 = [ip for ip in ips if ":" not in ip]
        if len(v4) > MAX_POD_IPS:
            raise CaptureError(f"pod has {len(v4)} IPv4 addresses; at most {MAX_POD_IPS}")
        handle = resolve(netns)
        cookie = self._worker.call(handle, _netns_cookie)
        info = PodInfo(skip_ip=_u32(PROBE_SNAT_IPV4), mark=PROXY_MARK, mark_mask=PROXY_MASK)
        for i, ip in enumerate(v4):
            info.ips[i] = _u32(ip)
        info.port = socket.htons(self._outbound_port)
        try:
            self._sys.map_update(self._maps["pods"], ctypes.c_uint64(cookie), info)
        except OSError as exc:
            raise CaptureError(f"add netns {cookie} to the pods map: {exc.strerror}") from None
        return cookie

    def remove_pod(self, cookie: int) -> None:
        self._sys.map_delete(self._maps["pods"], ctypes.c_uint64(cookie))

    def pods(self) -> dict[int, tuple[str, ...]]:
        """The captured namespaces (cookie -> the pod addresses left alone)."""
        fd = self._maps["pods"]
        found: dict[int, tuple[str, ...]] = {}
        for key in self._sys.map_keys(fd, ctypes.c_uint64):
            info = PodInfo()
            if self._sys.map_lookup(fd, key, info):
                found[key.value] = tuple(
                    socket.inet_ntoa(ip.to_bytes(4, "little")) for ip in info.ips if ip
                )
        return found

    def original_destination(self, cookie: int, local_port: int) -> tuple[str, int] | None:
        """Where the app's connection from `local_port` (its side, as the listener sees the
        peer) in namespace `cookie` was going; taken out of the map. None if unknown."""
        fd = self._maps["origins"]
        key = ConnKey(netns=cookie, port=local_port)
        orig = OrigDst()
        if not self._sys.map_lookup(fd, key, orig):
            return None
        self._sys.map_delete(fd, key)
        return socket.inet_ntoa(orig.ip.to_bytes(4, "little")), socket.ntohs(orig.port)

    def stats(self) -> dict[str, int]:
        counts = []
        for index in (0, 1):
            value = ctypes.c_uint64()
            self._sys.map_lookup(self._maps["stats"], ctypes.c_uint32(index), value)
            counts.append(value.value)
        return {"redirected": counts[0], "origins_filed": counts[1]}

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self, *, keep: bool = False) -> None:
        """Stop. `keep` (with a pin_dir) leaves capture in place for the next agent."""
        self._unlink(remove_pins=not keep)
        _close_all(self._maps)
        if self._own_worker:
            self._worker.close()

    def _unlink(self, *, remove_pins: bool) -> None:
        for fd in self._links:
            if remove_pins or self._pin_dir is None:
                with contextlib.suppress(OSError):
                    self._sys.link_detach(fd)
            os.close(fd)
        self._links.clear()
        if remove_pins and self._pin_dir is not None and self._pin_dir.exists():
            for entry in self._pin_dir.iterdir():
                entry.unlink()
            self._pin_dir.rmdir()


def _pinned(text: str, pin_dir: Path) -> str:
    """The program text with its maps pinned under `pin_dir` (bcc reuses a pinned map)."""
    swaps = [
        (
            "BPF_HASH(pods, __u64, struct pod_info, 4096);",
            f'BPF_TABLE_PINNED("hash", __u64, struct pod_info, pods, 4096, "{pin_dir}/pods");',
        ),
        (
            "BPF_ARRAY(stats, __u64, 2);",
            f'BPF_TABLE_PINNED("array", int, __u64, stats, 2, "{pin_dir}/stats");',
        ),
    ]
    for name, key in (("pending", "__u64"), ("origins", "struct conn_key")):
        swaps.append(
            (
                f'BPF_TABLE("lru_hash", {key}, struct orig_dst, {name}, 65536);',
                f'BPF_TABLE_PINNED("lru_hash", {key}, struct orig_dst, {name}, 65536, '
                f'"{pin_dir}/{name}");',
            )
        )
    for plain, pinned in swaps:
        if plain not in text:
            raise CaptureError(f"{SOURCE.name}: map declaration {plain!r} not found")
        text = text.replace(plain, pinned)
    return text


def _ipv4_addresses() -> list[str]:
    """The calling thread's namespace's own IPv4 addresses, loopback aside (one raw netlink
    dump, as the namespace scan reads them)."""
    return sorted(ip for ip in read_addresses() if "." in ip and not ip.startswith("127."))


def socket_netns_cookie(sock: socket.socket) -> int:
    """The cookie of the namespace a socket lives in."""
    raw = sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


class EbpfCapture:
    """The eBPF capture backend (a `CaptureBackend`): IPv4 outbound connects by
    `ConnectRedirect`; inbound and IPv6 outbound by the iptables backend, with the plan built
    `ebpf_outbound_ipv4=True` so that no IPv4 outbound REDIRECT is installed."""

    def __init__(
        self,
        iptables: IptablesBackend,
        redirect: ConnectRedirect,
        worker: NetnsWorker,
    ) -> None:
        self._iptables = iptables
        self._redirect = redirect
        self._worker = worker
        self._cookies: dict[int, int] = {}  # namespace inode -> cookie, to remove it when gone

    def apply(self, netns: NetnsHandle, plan: CapturePlan) -> bool:
        # The program first, the rules second: the rules in place may be the CNI plugin's
        # fail-closed hold, whose IPv4 outbound REDIRECT our plan drops, and a connect
        # between the two steps must be captured by one or the other (never neither).
        handle = resolve(netns)
        try:
            ips = self._worker.call(handle, _ipv4_addresses)
            cookie = self._redirect.add_pod(handle, ips)
        except CaptureError:
            raise
        except Exception as exc:
            raise CaptureError(f"eBPF capture in netns {handle}: {exc}") from exc
        # Recorded before the rules: if they fail, remove() must still find the map entry.
        previous, self._cookies[handle.inode] = self._cookies.get(handle.inode), cookie
        changed = self._iptables.apply(netns, plan)
        return changed or previous != cookie

    def remove(self, netns: NetnsHandle) -> None:
        inode = netns.inode if isinstance(netns, NetnsHandle) else 0
        cookie = self._cookies.pop(inode, None)
        if cookie is not None:
            self._redirect.remove_pod(cookie)
        self._iptables.remove(netns)

    def read_installed(self, netns: NetnsHandle) -> InstalledCapture:
        return self._iptables.read_installed(netns)

    def destination_of(self, sock: socket.socket) -> tuple[str, int]:
        """An accepted outbound connection's original destination: from the eBPF map for a
        connect it redirected, else from conntrack (IPv6, REDIRECTed by iptables)."""
        host, port = sock.getpeername()[:2]
        if host in ("127.0.0.1", "::ffff:127.0.0.1"):
            found = self._redirect.original_destination(socket_netns_cookie(sock), port)
            if found is not None:
                return found
        return original_destination(sock)

    def close(self, *, keep: bool = True) -> None:
        self._redirect.close(keep=keep)
