"""OS adapter for network namespaces: create, configure (pyroute2), remove, sockets.

All namespace work happens on one dedicated worker thread that enters the
target namespace with setns(2) and always returns to its own. setns and
unshare(CLONE_NEWNET) affect only the calling thread, so the caller's threads
(an asyncio loop, say) never change namespace. pyroute2 0.9 opens its netlink
socket lazily per thread, so an IPRoute made and used on the worker while it
sits in a namespace talks to that namespace. This is one process doing netlink
calls, no fork or `ip` invocation per step. pyroute2 is imported only when
building, because importing it costs 0.2 s that `status`, `exec` and `down`
need not pay.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from nodeagent.datapath.netns import NetnsError, NetnsVanishedError, NetnsWorker, resolve
from nodeagent.sandbox.plan import NamespacePlan, Route

NETNS_DIR = Path("/var/run/netns")

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_SCOPE_LINK = 253

T = TypeVar("T")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_inode(name: str) -> int | None:
    try:
        return netns_path(name).stat().st_ino
    except OSError:
        return None


class NetnsAdapter:
    """Creates, configures and removes named network namespaces."""

    def __init__(self) -> None:
        self._libc = _libc()
        # The one namespace-entering worker (datapath/netns.py): it enters,
        # runs and always returns home, replacing its thread if it cannot.
        self._worker = NetnsWorker("netns")

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> NetnsAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, netns: str | None, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker thread inside `netns` (None: the worker's own)."""
        if netns is None:
            return self._worker.call(None, fn, *args)
        try:
            handle = resolve(netns_path(netns))
        except NetnsVanishedError:
            raise NetnsError(f"network namespace {netns} does not exist") from None
        return self._worker.call(handle, fn, *args)

    # -- lifecycle -------------------------------------------------------

    def _ensure_dir(self) -> None:
        # Same as iproute2: /var/run/netns is a shared mount, so namespaces
        # bound here are visible from other mount namespaces.
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
        d = str(NETNS_DIR).encode()
        if self._libc.mount(b"none", d, b"none", _MS_SHARED | _MS_REC, None) == 0:
            return
        if self._libc.mount(d, d, b"none", _MS_BIND | _MS_REC, None) != 0:
            raise NetnsError(f"cannot bind-mount {NETNS_DIR}: {os.strerror(ctypes.get_errno())}")
        if self._libc.mount(b"none", d, b"none", _MS_SHARED | _MS_REC, None) != 0:
            raise NetnsError(f"cannot share {NETNS_DIR}: {os.strerror(ctypes.get_errno())}")

    def create(self, names: list[str]) -> None:
        """Create each namespace (bound under /var/run/netns); existing ones are an error."""

        def run(name: str) -> None:
            path = netns_path(name)
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
            except FileExistsError:
                raise NetnsError(f"network namespace {name} already exists") from None
            try:
                if self._libc.unshare(_CLONE_NEWNET) != 0:
                    raise NetnsError(f"unshare for {name}: {os.strerror(ctypes.get_errno())}")
                src = b"/proc/thread-self/ns/net"
                if self._libc.mount(src, str(path).encode(), b"none", _MS_BIND, None) != 0:
                    raise NetnsError(f"bind {name}: {os.strerror(ctypes.get_errno())}")
            except NetnsError:
                path.unlink(missing_ok=True)
                raise

        self._worker.call(None, self._ensure_dir)
        # unshare moves the worker thread into the new namespace; running it
        # "inside" our own namespace makes the worker bring the thread back.
        own = resolve("/proc/self/ns/net")
        for name in names:
            self._worker.call(own, run, name)

    def remove(self, name: str) -> None:
        """Unbind and delete a namespace; its interfaces go with it. Missing is fine."""
        path = netns_path(name)
        self._libc.umount2(str(path).encode(), _MNT_DETACH)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise NetnsError(f"cannot remove {path}: {exc.strerror}") from None

    # -- configuration ---------------------------------------------------

    def apply(self, plan: NamespacePlan) -> None:
        """Configure one namespace: sysctls, lo, bridges, veths, addresses, routes.

        Veth peers land in other namespaces, so namespaces must be applied in
        plan order (underlay, nodes, pods): each finds the interfaces that
        earlier ones placed in it.
        """
        from pyroute2 import IPRoute  # slow import (0.2 s): only when building

        def run() -> None:
            for key, value in plan.sysctls:
                with open(f"/proc/sys/net/{key}", "w") as f:
                    f.write(value)
            with IPRoute() as ipr:
                for br in plan.bridges:
                    ipr.link("add", ifname=br, kind="bridge")
                for v in plan.veths:
                    ipr.link(
                        "add",
                        ifname=v.ifname,
                        kind="veth",
                        peer={"ifname": v.peer_ifname, "net_ns_fd": v.peer_netns},
                    )
                # One dump instead of a lookup (itself a dump) per interface.
                index = {link.get("ifname"): int(link["index"]) for link in ipr.get_links()}

                def idx(ifname: str) -> int:
                    if ifname not in index:
                        raise NetnsError(f"interface {ifname} is missing")
                    return index[ifname]

                ipr.link("set", index=idx("lo"), state="up")
                for ifc in plan.interfaces:
                    if ifc.master is not None:
                        ipr.link("set", index=idx(ifc.ifname), master=idx(ifc.master))
                    for cidr in ifc.addresses:
                        ip, plen = cidr.split("/")
                        ipr.addr("add", index=idx(ifc.ifname), address=ip, prefixlen=int(plen))
                    ipr.link("set", index=idx(ifc.ifname), state="up")
                for r in plan.routes:
                    ipr.route("add", **route_spec(r, idx))

        self._netlink(plan.name, "configure", run)

    def _netlink(self, netns: str, step: str, fn: Callable[[], None]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.call(netns, fn)
        except NetlinkError as exc:
            code = exc.code
            hint = " (kernel lacks veth/bridge support?)" if code == errno.EOPNOTSUPP else ""
            raise NetnsError(f"{netns}: {step} failed: {os.strerror(code)}{hint}") from None
        except OSError as exc:
            raise NetnsError(f"{netns}: {step} failed: {exc.strerror or exc}") from None

    # -- sockets ---------------------------------------------------------

    def socket(
        self, netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket that lives in `netns` (it keeps that namespace for its life)."""
        return self.call(netns, socket.socket, family, type)


def route_spec(r: Route, index: Callable[[str], int]) -> dict[str, Any]:
    """pyroute2 keyword arguments for route `r`; `index` maps interface names to indexes."""
    spec: dict[str, Any] = {"dst": "0.0.0.0/0" if r.dst == "default" else r.dst}
    if r.gateway is not None:
        spec["gateway"] = r.gateway
    if r.dev is not None:
        spec["oif"] = index(r.dev)
        if r.gateway is None:
            # iproute2 infers scope link for on-link routes; pyroute2 does not.
            spec["scope"] = _SCOPE_LINK
    return spec
