"""Enter pod network namespaces safely, and make the agent's sockets inside them.

setns(2) changes the namespace of the calling thread only, so work that must
happen inside a pod's namespace runs on a dedicated worker thread
(`NetnsWorker`) that enters the namespace, does the work and always returns
to its own namespace, even on error. The one exception is an upstream socket
(`NetnsSocketFactory.upstream`, one per inbound connection): the calling
thread, the event loop's, steps in for the single socket(2) call and straight
back, with no Python code between the two setns calls; a thread that cannot
get back ends the process rather than make another socket in the wrong place.
A socket belongs to the namespace it was created in for its whole life, so
sockets are used from any thread afterwards (non-blocking, from asyncio).

`InPodSocketFactory` is the small interface the proxy sees (the proxy never
knows which namespace it is in); `NetnsSocketFactory` is the real one: every
socket it makes carries SO_MARK 0x539 so the in-pod capture rules skip it,
listeners get SO_REUSEPORT (an old and a new agent can listen at once during
a restart) and IP_TRANSPARENT where the kernel allows (best effort).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from nodeagent.model.address import unmap
from nodeagent.model.constants import (
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    PROXY_MARK,
)

T = TypeVar("T")

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
# Socket options the stdlib does not name everywhere (linux/in.h, in6.h, netfilter).
SO_ORIGINAL_DST = 80  # level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # level SOL_IPV6
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = getattr(socket, "SO_MARK", 36)
# listen(2) caps the backlog at the namespace's net.core.somaxconn: asking for the most
# lets that sysctl decide (a fixed 1,024 overflowed in a burst of 5,000 connects).
LISTEN_BACKLOG = 65535
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the namespace."""


class NetnsVanishedError(NetnsError):
    """The namespace is gone (pod deleted) or was replaced by another one."""


class SocketSetupError(OSError):
    """A socket could not be made in a pod namespace; the message names it and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NetnsHandle:
    """A network namespace: a path to open it by, and the inode that identifies it.

    The inode guards against reuse: a path (a /proc/<pid> entry, a bind mount)
    can come to point at a different namespace; entering checks it.
    inode 0 means "whatever the path points at" (resolve() fills it in).
    """

    path: str
    inode: int = 0

    def __str__(self) -> str:
        return f"{self.path} (inode {self.inode})" if self.inode else self.path


def resolve(ref: NetnsHandle | str | int | os.PathLike[str]) -> NetnsHandle:
    """A handle from a /var/run/netns name, a path, an open fd, or a handle.

    Raises NetnsVanishedError if it does not exist (or a handle's inode changed).
    """
    if isinstance(ref, NetnsHandle):
        path = ref.path
    elif isinstance(ref, int):
        path = f"/proc/{os.getpid()}/fd/{ref}"
    else:
        text = os.fspath(ref)
        path = text if "/" in text else str(NETNS_DIR / text)
    try:
        inode = Path(path).stat().st_ino
    except OSError as exc:
        raise NetnsVanishedError(f"network namespace {path} is gone: {exc.strerror}") from None
    if isinstance(ref, NetnsHandle) and ref.inode and ref.inode != inode:
        raise NetnsVanishedError(
            f"network namespace {ref} was replaced (now inode {inode}); the pod is gone"
        )
    return NetnsHandle(path=path, inode=inode)


_libc = ctypes.CDLL(None, use_errno=True)
# The same setns(2) called without releasing the GIL, for the event loop's thread: the call
# takes about a microsecond, and releasing the GIL around it would invite a thread switch.
_libc_held = ctypes.PyDLL(None, use_errno=True)
_libc_held.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_own_netns = threading.local()
EXIT_STUCK_IN_POD = 70  # EX_SOFTWARE: a thread could not return from a pod's namespace


def _setns(fd: int, what: object) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns into {what} failed: {os.strerror(err)}")


def current_inode() -> int:
    """Inode of the calling thread's network namespace."""
    return Path("/proc/thread-self/ns/net").stat().st_ino


def _home_fd() -> int:
    """An open descriptor of the calling thread's own namespace (opened on its first call,
    which must be made at home, and kept for the thread's life)."""
    fd: int | None = getattr(_own_netns, "fd", None)
    if fd is None:
        fd = _own_netns.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return fd


def socket_inside(pod_fd: int, home_fd: int, family: socket.AddressFamily) -> socket.socket:
    """A TCP socket made in the namespace `pod_fd` by the calling thread, which steps in for
    the socket(2) call alone and returns to `home_fd`; raises OSError if either fails.

    If the thread cannot return, the process ends (EXIT_STUCK_IN_POD): the caller may be the
    event loop, which makes every other pod's sockets and must not make one more here.
    """
    if _libc_held.setns(pod_fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into the pod's namespace: {os.strerror(err)}")
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    finally:
        if _libc_held.setns(home_fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            log.critical(
                "thread %s is stuck in a pod's network namespace (setns home: %s); exiting",
                threading.current_thread().name,
                os.strerror(err),
            )
            os._exit(EXIT_STUCK_IN_POD)


@contextmanager
def entered(handle: NetnsHandle) -> Iterator[NetnsHandle]:
    """Run the body with the *calling thread* inside `handle`, then return home.

    Only for threads the caller owns (a NetnsWorker), never the event loop's.
    If the thread cannot get back home it is unusable: that raises NetnsError
    and the worker replaces its thread.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            fd = os.open(handle.path, os.O_RDONLY)
        except OSError as exc:
            raise NetnsVanishedError(
                f"network namespace {handle} is gone: {exc.strerror}"
            ) from None
        try:
            inode = os.fstat(fd).st_ino
            if handle.inode and inode != handle.inode:
                raise NetnsVanishedError(
                    f"network namespace {handle} was replaced (now inode {inode})"
                )
            _setns(fd, handle)
        finally:
            os.close(fd)
        try:
            yield handle
        finally:
            try:
                _setns(home, "the worker's own namespace")
            except NetnsError as exc:
                raise _Poisoned(str(exc)) from None
    finally:
        os.close(home)


class _Poisoned(NetnsError):
    """The worker thread is stuck in a foreign namespace."""


class NetnsWorker:
    """A dedicated thread that runs functions inside given namespaces, one at a time.

    One thread serializes namespace work, which python-iptables needs anyway
    (its table handles are process-wide singletons).
    """

    def __init__(self, name: str = "netns") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NetnsWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wrap(self, handle: NetnsHandle | None, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            if handle is None:
                return fn(*args)
            with entered(handle):
                return fn(*args)
        except _Poisoned:
            # Replaced here, on the worker, before the caller hears of the failure: the
            # caller's next request must not queue behind the stuck thread.
            self._replace_thread()
            raise

    def submit(self, handle: NetnsHandle | None, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Start fn(*args) on the worker inside `handle` (None: the worker's own); do not
        wait."""
        return self._pool.submit(self._wrap, handle, fn, args)

    def call(self, handle: NetnsHandle | None, fn: Callable[..., T], *args: Any) -> T:
        """`submit` and wait."""
        return self.submit(handle, fn, *args).result()

    async def run(self, handle: NetnsHandle | None, fn: Callable[..., T], *args: Any) -> T:
        """`call` for asyncio: the loop keeps running while the worker works."""
        return await asyncio.wrap_future(self.submit(handle, fn, *args))

    def _replace_thread(self) -> None:
        with self._lock:
            old = self._pool
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        old.shutdown(wait=False)


# -- sockets -------------------------------------------------------------------


class InPodSocketFactory(Protocol):
    """Makes the agent's sockets inside one pod's network namespace."""

    @property
    def netns(self) -> NetnsHandle: ...

    def listener(self, port: int, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
        """A non-blocking TCP listener on `port` on the pod side (dual-stack if
        the pod has IPv6), marked, SO_REUSEPORT, transparent if possible."""
        ...

    def upstream(self, family: socket.AddressFamily) -> socket.socket:
        """A non-blocking, unconnected, marked TCP socket (for proxy.relay.connect_socket)."""
        ...

    def close(self) -> None:
        """Release what the factory holds (the pod's listeners are closed)."""
        ...


def set_transparent(sock: socket.socket) -> bool:
    """Best effort IP_TRANSPARENT / IPV6_TRANSPARENT; False if the kernel refuses."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        return True
    except OSError:
        return False


def ipv6_enabled() -> bool:
    """Whether the calling thread's namespace has IPv6 (on a NetnsWorker, inside it)."""
    try:
        # /proc/sys/net follows the opening thread's namespace.
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
            if f.read().strip() != "0":
                return False
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        probe.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class NetnsSocketFactory:
    """The real InPodSocketFactory: listeners made on a NetnsWorker inside the pod, upstream
    sockets by the calling thread stepping into the pod (`socket_inside`)."""

    def __init__(
        self,
        netns: NetnsHandle,
        worker: NetnsWorker,
        *,
        mark: int = PROXY_MARK,
        ipv6: bool | None = None,
    ) -> None:
        self._netns = netns
        self._worker = worker
        self._mark = mark
        self._ipv6 = ipv6
        self.transparent: bool | None = None  # learned on the first listener
        self._fd: int | None = None  # the pod's namespace, open from the first upstream socket
        self._closed = False

    @property
    def netns(self) -> NetnsHandle:
        return self._netns

    @property
    def ipv6(self) -> bool:
        if self._ipv6 is None:
            self._ipv6 = self._worker.call(self._netns, ipv6_enabled)
        return self._ipv6

    def _marked(self, sock: socket.socket) -> socket.socket:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self._mark)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise SocketSetupError(
                exc.errno, f"socket in netns {self._netns}: set SO_MARK: {exc.strerror}"
            ) from None
        return sock

    def _new(self, family: socket.AddressFamily) -> socket.socket:
        return self._marked(socket.socket(family, socket.SOCK_STREAM))

    def listener(self, port: int, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
        dual = self.ipv6
        host = "::" if dual else "0.0.0.0"

        def make() -> socket.socket:
            sock = self._new(socket.AF_INET6 if dual else socket.AF_INET)
            try:
                if dual:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                self.transparent = set_transparent(sock)
                sock.bind((host, port))
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                raise SocketSetupError(
                    exc.errno,
                    f"listen on [{host}]:{port} in netns {self._netns}: {exc.strerror}",
                ) from None
            return sock

        return self._worker.call(self._netns, make)

    def upstream(self, family: socket.AddressFamily) -> socket.socket:
        # One per inbound connection, so made here rather than on the worker: two setns
        # calls cost about 2 us, a worker round trip cost a thread hand-off and, while the
        # loop was busy, a GIL exchange for each syscall the worker made.
        try:
            sock = socket_inside(self._pod_fd(), _home_fd(), family)
        except OSError as exc:
            raise SocketSetupError(
                exc.errno, f"socket in netns {self._netns}: {exc.strerror}"
            ) from None
        finally:
            if self._closed:  # a connection still in flight after close(): keep nothing open
                self._release()
        return self._marked(sock)

    def _pod_fd(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self._netns.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SocketSetupError(
                    errno.ENOENT, f"network namespace {self._netns} is gone: {exc.strerror}"
                ) from None
            inode = os.fstat(fd).st_ino
            if self._netns.inode and inode != self._netns.inode:
                os.close(fd)
                raise SocketSetupError(
                    errno.ENOENT, f"network namespace {self._netns} was replaced (inode {inode})"
                )
            self._fd = fd
        return self._fd

    def close(self) -> None:
        """Let go of the pod's namespace (the pod is going away). An upstream() after this
        still works while the namespace is there, and holds it no longer than the call."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def listeners(self, ports: tuple[int, ...] | None = None) -> dict[int, socket.socket]:
        """The agent's in-pod listeners (15001, 15006, 15008 by default), all or none."""
        made: dict[int, socket.socket] = {}
        try:
            for port in ports or (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT):
                made[port] = self.listener(port)
        except BaseException:
            for sock in made.values():
                sock.close()
            raise
        return made


def _orig_dst_v4(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntop(socket.AF_INET, addr), port


def _orig_dst_v6(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    port, _flow, addr = struct.unpack_from("!HI16s", raw, 2)
    return unmap(socket.inet_ntop(socket.AF_INET6, addr)), port


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (host, port); IPv4-mapped
    addresses come back as plain IPv4. Falls back to the socket's local
    address (the TPROXY case, or a connection that was not redirected)."""
    local = sock.getsockname()
    attempts: list[Callable[[socket.socket], tuple[str, int]]]
    if sock.family == socket.AF_INET:
        attempts = [_orig_dst_v4]
    elif unmap(local[0]) != local[0]:  # IPv4 client on a dual-stack socket
        attempts = [_orig_dst_v4, _orig_dst_v6]
    else:
        attempts = [_orig_dst_v6, _orig_dst_v4]
    for attempt in attempts:
        try:
            return attempt(sock)
        except OSError:
            continue
    return unmap(local[0]), local[1]
