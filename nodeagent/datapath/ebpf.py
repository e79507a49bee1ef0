"""eBPF capture, outbound half: connects redirected once, at connect time (bpf/connect_redirect.c).

Why: the iptables capture puts conntrack and NAT on every packet of the app's connection,
which costs a native TLS proxy 17-29% of its throughput here, while a connect-time rewrite
costs nothing measurable (`python -m bench.capture_cost`, docs/performance.md).

`ConnectRedirect` compiles the programs with bcc, attaches `connect4` and `sockops` at the
cgroup2 root through BPF links (one pair per agent; each acts only in the namespaces in its
own `pods` map, so several agents can share a kernel, as in the sandbox), and offers:

* `add_pod` / `remove_pod`: capture a pod namespace's outbound TCP connects, or stop;
* `original_destination`: where an accepted connection on the outbound listener was going
  (the eBPF counterpart of SO_ORIGINAL_DST), by the namespace and the app's local port.

With `pin_dir`, maps and links are pinned in bpffs, so capture outlives the agent: after a
crash the pods' connects still go to the (now closed) listener and are refused, not sent in
plaintext (fail closed), and the next agent takes the same maps and swaps its programs into
the same links. `close(keep=False)` removes everything.

`EbpfCapture` is the backend the agent runs with `redirect_backend: ebpf`: this for IPv4
outbound, the iptables backend for inbound and IPv6.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
_PROGRAMS = (
    ("connect4", _CGROUP_INET4_CONNECT),
    ("connect6", _CGROUP_INET6_CONNECT),  # IPv4-mapped destinations on IPv6 sockets
    ("sockops", _CGROUP_SOCK_OPS),
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


def _libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_link_detach.argtypes = [ctypes.c_int]
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    return lib


def _check(result: int, what: str) -> int:
    if result < 0:
        raise CaptureError(f"{what}: {os.strerror(-result)}")
    return result


def _u32(ip: str) -> int:
    """An IPv4 address as the program compares it: network order, read as a native u32."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def _netns_cookie() -> int:
    with socket.socket() as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8), "little")


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
    ) -> None:
        if kernel_headers is not None:
            os.environ.setdefault("BCC_KERNEL_SOURCE", str(kernel_headers))
        try:  # imported here: loading libbcc is slow, and only this needs it
            from bcc import BPF
        except ImportError as exc:
            raise CaptureError(f"bcc is not installed ({exc})") from None

        self._outbound_port = outbound_port
        self._pin_dir = pin_dir
        self._lib = _libbpf()
        self._links: list[int] = []
        cgroup = cgroup2_root(cgroup)
        try:  # first: the cheap mistake is reported before a second of compiling
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise CaptureError(f"open cgroup2 {cgroup}: {exc.strerror}") from None
        try:
            text = read_source()
            if pin_dir is not None:
                pin_dir.mkdir(parents=True, exist_ok=True)
                text = _pinned(text, pin_dir)  # the same maps across agent restarts
            try:
                self._bpf: Any = BPF(text=text.encode())
            except Exception as exc:
                raise CaptureError(f"compile {SOURCE.name}: {exc}") from None
            try:
                for name, attach_type in _PROGRAMS:
                    prog_type = BPF.SOCK_OPS if name == "sockops" else BPF.CGROUP_SOCK_ADDR
                    fn = self._bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
                    self._links.append(self._link(fn.fd, cgroup_fd, attach_type, name))
            except BaseException:
                self._unlink(remove_pins=False)
                self._bpf.cleanup()
                raise
        finally:
            os.close(cgroup_fd)
        self._own_worker = worker is None
        self._worker = worker or NetnsWorker("ebpf")

    @property
    def pin_dir(self) -> Path | None:
        return self._pin_dir

    def _link(self, prog_fd: int, cgroup_fd: int, attach_type: int, name: str) -> int:
        """A link running `prog_fd` at the cgroup: the pinned one (its program swapped for
        ours) if a previous agent left it, else a new one (pinned if we pin)."""
        lib = self._lib
        if self._pin_dir is not None:
            pin = self._pin_dir / f"{name}_link"
            path = str(pin).encode()
            if pin.exists():
                fd = _check(lib.bpf_obj_get(path), f"open pinned link {path.decode()}")
                _check(lib.bpf_link_update(fd, prog_fd, None), f"replace the {name} program")
                return fd
            fd = _check(
                lib.bpf_link_create(prog_fd, cgroup_fd, attach_type, None), f"attach {name}"
            )
            _check(lib.bpf_obj_pin(fd, path), f"pin the {name} link at {path.decode()}")
            return fd
        return _check(lib.bpf_link_create(prog_fd, cgroup_fd, attach_type, None), f"attach {name}")

    # -- pods --------------------------------------------------------------------------------------

    def add_pod(self, netns: NetnsHandle | str, ips: Sequence[str]) -> int:
        """Capture outbound TCP connects made in `netns` (except to `ips`, the pod's own
        addresses, and loopback); returns the namespace cookie that names it here."""
        v4 = [ip for ip in ips if ":" not in ip]
        if len(v4) > MAX_POD_IPS:
            raise CaptureError(f"pod has {len(v4)} IPv4 addresses; at most {MAX_POD_IPS}")
        handle = resolve(netns)
        cookie = self._worker.call(handle, _netns_cookie)
        pods = self._bpf[b"pods"]
        info = pods.Leaf()
        for i, ip in enumerate(v4):
            info.ips[i] = _u32(ip)
        info.skip_ip = _u32(PROBE_SNAT_IPV4)
        info.mark, info.mark_mask = PROXY_MARK, PROXY_MASK
        info.port = socket.htons(self._outbound_port)
        pods[pods.Key(cookie)] = info
        return cookie

    def remove_pod(self, cookie: int) -> None:
        pods = self._bpf[b"pods"]
        try:
            del pods[pods.Key(cookie)]
        except KeyError:
            pass

    def pods(self) -> dict[int, tuple[str, ...]]:
        """The captured namespaces (cookie -> the pod addresses left alone)."""
        return {
            key.value: tuple(socket.inet_ntoa(ip.to_bytes(4, "little")) for ip in leaf.ips if ip)
            for key, leaf in self._bpf[b"pods"].items()
        }

    def original_destination(self, cookie: int, local_port: int) -> tuple[str, int] | None:
        """Where the app's connection from `local_port` (its side, as the listener sees the
        peer) in namespace `cookie` was going; taken out of the map. None if unknown."""
        origins = self._bpf[b"origins"]
        key = origins.Key(cookie, local_port, 0)
        try:
            orig = origins[key]
        except KeyError:
            return None
        try:
            del origins[key]
        except KeyError:
            pass
        return socket.inet_ntoa(orig.ip.to_bytes(4, "little")), socket.ntohs(orig.port)

    def stats(self) -> dict[str, int]:
        table = self._bpf[b"stats"]
        return {"redirected": table[0].value, "origins_filed": table[1].value}

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self, *, keep: bool = False) -> None:
        """Stop. `keep` (with a pin_dir) leaves capture in place for the next agent."""
        self._unlink(remove_pins=not keep)
        self._bpf.cleanup()
        if self._own_worker:
            self._worker.close()

    def _unlink(self, *, remove_pins: bool) -> None:
        for fd in self._links:
            if remove_pins or self._pin_dir is None:
                self._lib.bpf_link_detach(fd)
            os.close(fd)
        self._links.clear()
        if remove_pins and self._pin_dir is not None:
            for entry in self._pin_dir.iterdir():
                entry.unlink()
            self._pin_dir.rmdir()


def _pinned(text: str, pin_dir: Path) -> str:
    """The program text with its maps pinned under `pin_dir` (bcc reuses a pinned map)."""
    swaps = [
        (
            "BPF_HASH(pods, __u64, struct pod_info, 4096);",
            f'BPF_TABLE_PINNED("hash", __u64, struct pod_info, pods, 4096, "{pin_dir}/pods");',
        )
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
    """The calling thread's namespace's own IPv4 addresses, loopback aside."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = (a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET))
        return [ip for ip in found if ip and not ip.startswith("127.")]


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
        changed = self._iptables.apply(netns, plan)
        handle = resolve(netns)
        try:
            ips = self._worker.call(handle, _ipv4_addresses)
            cookie = self._redirect.add_pod(handle, ips)
        except CaptureError:
            raise
        except Exception as exc:
            raise CaptureError(f"eBPF capture in netns {handle}: {exc}") from exc
        if self._cookies.get(handle.inode) != cookie:
            self._cookies[handle.inode] = cookie
            changed = True
        return changed

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
