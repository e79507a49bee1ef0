"""eBPF capture, outbound half: connects redirected once, at connect time (bpf/connect_redirect.c).

Why: the iptables capture puts conntrack and NAT on every packet of the app's connection,
which costs a native TLS proxy 17-29% of its throughput here, while a connect-time rewrite
costs nothing measurable (`scripts/bench_capture_cost.py`, docs/performance.md).

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

Not wired into the agent yet: the node manager and the outbound listener still use the
iptables backend (the configuration refuses `ebpf`). IPv4 only so far.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodeagent.datapath.iptables import CaptureError
from nodeagent.datapath.netns import NetnsHandle, NetnsWorker, resolve
from nodeagent.model.constants import OUTBOUND_PORT, PROBE_SNAT_IPV4, PROXY_MARK, PROXY_MASK

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "connect_redirect.c"
CGROUP2_ROOT = "/sys/fs/cgroup/unified"
MAX_POD_IPS = 4  # as in the program

_SO_NETNS_COOKIE = 71
# enum bpf_attach_type (uapi/linux/bpf.h)
_CGROUP_INET4_CONNECT = 10
_CGROUP_SOCK_OPS = 3
_PROGRAMS = (("connect4", _CGROUP_INET4_CONNECT), ("sockops", _CGROUP_SOCK_OPS))


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
        cgroup: str = CGROUP2_ROOT,
        pin_dir: Path | None = None,
        outbound_port: int = OUTBOUND_PORT,
        kernel_headers: Path | None = None,
        worker: NetnsWorker | None = None,
    ) -> None:
        if kernel_headers is not None:
            os.environ.setdefault("BCC_KERNEL_SOURCE", str(kernel_headers))
        from bcc import BPF  # imported here: loading libbcc is slow, and only this needs it

        self._outbound_port = outbound_port
        self._pin_dir = pin_dir
        self._lib = _libbpf()
        self._own_worker = worker is None
        self._worker = worker or NetnsWorker("ebpf")
        self._links: list[int] = []
        text = SOURCE.read_text()
        if pin_dir is not None:
            pin_dir.mkdir(parents=True, exist_ok=True)
            text = _pinned(text, pin_dir)  # the same maps across agent restarts
        try:
            self._bpf: Any = BPF(text=text.encode())
        except Exception as exc:
            raise CaptureError(f"compile {SOURCE.name}: {exc}") from None
        try:
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise CaptureError(f"open cgroup2 {cgroup}: {exc.strerror}") from None
        try:
            for name, attach_type in _PROGRAMS:
                prog_type = BPF.CGROUP_SOCK_ADDR if name == "connect4" else BPF.SOCK_OPS
                fn = self._bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
                self._links.append(self._link(fn.fd, cgroup_fd, attach_type, name))
        except BaseException:
            self._unlink(remove_pins=pin_dir is not None and not self._links)
            raise
        finally:
            os.close(cgroup_fd)

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
