"""The agent's listeners inside one pod's network namespace, and their accept loops.

For every ready pod the agent listens *inside the pod's namespace* on
15001 (captured outbound), 15006 (captured inbound plaintext) and 15008
(inbound HBONE). The sockets come from the pod's `InPodSocketFactory`, so each
carries SO_MARK 0x539 and SO_REUSEPORT: during a restart the old and the new
agent listen side by side and the kernel spreads new connections over both.

Each accepted connection goes to the `ConnectionHandler` registered for its
port: nodeagent.proxy.outbound on 15001, nodeagent.proxy.inbound on 15006 and
15008 (an agent built without a CA, in tests, registers the same handlers with
no tunnel: outbound in plaintext, 15008 refused). A handler:

* receives the `LocalPod` (who the pod is: uid, name, identity, IPs, its
  namespace and socket factory), the accepted non-blocking socket, and the
  listener port;
* owns the socket from then on (closes it on every path, also when cancelled);
* is cancelled when the pod's listeners close after the drain time, so it
  must clean up in `finally`.

`PodListeners` tracks the live connections so a teardown can drain them: stop
accepting at once, let running connections finish for up to `drain` seconds,
then cancel the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from nodeagent.datapath.netns import LISTEN_BACKLOG, InPodSocketFactory, NetnsHandle
from nodeagent.model.constants import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from nodeagent.model.identity import Identity
from nodeagent.model.workload import IPAddress, Workload

log = logging.getLogger(__name__)

# Connections accepted per wake of a listening socket before other ready work gets a turn.
ACCEPTS_PER_WAKE = 64


POD_PORTS: tuple[int, ...] = (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT)


@dataclass(frozen=True, eq=False, kw_only=True)
class LocalPod:
    """A meshed pod on this node, as the proxy sees it."""

    uid: str
    namespace: str
    name: str
    identity: Identity
    addresses: tuple[IPAddress, ...]
    netns: NetnsHandle
    sockets: InPodSocketFactory
    """Makes the agent's sockets (marked, not re-captured) inside this pod."""

    @functools.cached_property
    def label(self) -> str:
        # Made once: every connection's record and log lines carry it.
        return f"{self.namespace}/{self.name}" if self.name else self.uid

    def owns(self, ip: str) -> bool:
        """Whether `ip` is one of the pod's own addresses."""
        return any(str(a) == ip for a in self.addresses)

    @classmethod
    def from_workload(
        cls, workload: Workload, netns: NetnsHandle, sockets: InPodSocketFactory
    ) -> LocalPod:
        return cls(
            uid=workload.uid,
            namespace=workload.namespace,
            name=workload.name,
            identity=workload.identity(),
            addresses=workload.addresses,
            netns=netns,
            sockets=sockets,
        )


class ConnectionHandler(Protocol):
    """Serves one connection accepted on a pod listener; owns and closes `sock`."""

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None: ...


@dataclass
class ListenerStats:
    """Per-port connection counters."""

    accepted: dict[int, int] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)  # the handler raised

    def count(self, kind: str, port: int) -> None:
        table: dict[int, int] = getattr(self, kind)
        table[port] = table.get(port, 0) + 1


class PodListeners:
    """The listeners of one pod: open (all or none), accept, dispatch, drain, close."""

    def __init__(
        self,
        pod: LocalPod,
        handlers: Mapping[int, ConnectionHandler],
        *,
        ports: tuple[int, ...] = POD_PORTS,
        backlog: int = LISTEN_BACKLOG,
        totals: ListenerStats | None = None,
        on_close: Callable[[PodListeners], None] | None = None,
        on_drained: Callable[[PodListeners], None] | None = None,
    ) -> None:
        missing = [p for p in ports if p not in handlers]
        if missing:
            raise ValueError(f"no connection handler for port(s) {missing}")
        self.pod = pod
        self._handlers = dict(handlers)
        self._ports = ports
        self._backlog = backlog
        self._sockets: dict[int, socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff: dict[int, asyncio.TimerHandle] = {}  # port -> accepting again after EMFILE
        # Each connection's task (the handler's own coroutine: no wrapper frame) and its socket.
        self._connections: dict[asyncio.Task[None], socket.socket] = {}
        # Made once per port, not per connection: the task name and the done callback.
        self._task_names = {port: f"conn-{port}" for port in ports}
        self._on_done = {port: functools.partial(self._connection_done, port) for port in ports}
        # The context the connection tasks and their done callbacks run in: one for them all
        # (the agent sets and reads no context variables), not a copy per connection; per
        # listener set, so never entered from two loops' threads at once.
        self._context = contextvars.Context()
        self.stats = ListenerStats()
        self._totals = totals
        self._on_close = on_close
        self._on_drained = on_drained
        self.closed = False

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(sorted(self._sockets))

    @property
    def active(self) -> int:
        """Connections being served right now."""
        return len(self._connections)

    async def open(self) -> None:
        """Bind every port inside the pod and start accepting.

        All or none: if one port cannot be bound (taken, namespace gone) the
        ones already bound are closed and the error (naming the port and the
        namespace) propagates.
        """
        try:
            for port in self._ports:
                # The factory works on a namespace worker thread; keep the loop free.
                self._sockets[port] = await asyncio.to_thread(
                    self.pod.sockets.listener, port, backlog=self._backlog
                )
        except BaseException:
            self._close_sockets()
            raise
        self._loop = asyncio.get_running_loop()
        for port in self._sockets:
            self._watch(port)
        log.debug("pod %s: listening on %s", self.pod.label, self.ports)

    def _watch(self, port: int) -> None:
        """Accept from the loop's reader callback: one epoll registration per listening socket,
        not an add and a remove (and a future) per connection as `sock_accept` makes."""
        self._backoff.pop(port, None)
        sock = self._sockets.get(port)
        if sock is not None and self._loop is not None and not self.closed:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, port, sock)

    def _accept(self, port: int, lsock: socket.socket) -> None:
        assert self._loop is not None
        handler = self._handlers[port]
        for _ in range(ACCEPTS_PER_WAKE):  # then let other work run; the reader fires again
            try:
                conn, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: back off a little instead of spinning.
                log.warning("pod %s: accept on %d failed: %s", self.pod.label, port, exc)
                self._loop.remove_reader(lsock.fileno())
                self._backoff[port] = self._loop.call_later(0.1, self._watch, port)
                return
            conn.setblocking(False)
            self._count("accepted", port)
            task = self._loop.create_task(
                handler(self.pod, conn, port),
                name=self._task_names[port],
                context=self._context,
            )
            self._connections[task] = conn
            task.add_done_callback(self._on_done[port], context=self._context)

    def _connection_done(self, port: int, task: asyncio.Task[None]) -> None:
        conn = self._connections.pop(task, None)
        if not self._connections:
            self._connections = {}  # a dict keeps its size: let a burst's table go
        if task.cancelled():
            if conn is not None:
                conn.close()  # the handler owns it, but may have been cancelled before using it
            return
        exc = task.exception()
        if exc is None:
            return
        if conn is not None:
            conn.close()
        if isinstance(exc, Exception):
            self._count("failed", port)
            log.error("pod %s: handler for port %d failed", self.pod.label, port, exc_info=exc)

    def _count(self, kind: str, port: int) -> None:
        self.stats.count(kind, port)
        if self._totals is not None:
            self._totals.count(kind, port)

    async def close(self, *, drain: float = 0.0) -> None:
        """Stop accepting now; give live connections `drain` seconds, then cancel them."""
        if self.closed:
            return
        self.closed = True
        if self._on_close is not None:
            self._on_close(self)
        self._close_sockets()
        pending = set(self._connections)
        if pending and drain > 0:
            _done, pending = await asyncio.wait(pending, timeout=drain)
        for task in pending:
            task.cancel()
        if pending:
            log.info(
                "pod %s: %d connection(s) still open after %.1fs drain, closed",
                self.pod.label,
                len(pending),
                drain,
            )
            await asyncio.gather(*pending, return_exceptions=True)
        if self._on_drained is not None:
            self._on_drained(self)

    def _close_sockets(self) -> None:
        for timer in self._backoff.values():
            timer.cancel()
        self._backoff.clear()
        for sock in self._sockets.values():
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(OSError, ValueError):
                    self._loop.remove_reader(sock.fileno())
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()
        self.pod.sockets.close()


SocketFactoryMaker = Callable[[NetnsHandle], InPodSocketFactory]


class PodListenerFactory:
    """Opens a pod's listeners for the node manager and keeps every open set.

    `sockets_for(netns)` builds the pod's socket factory (in the agent, a
    NetnsSocketFactory on a shared worker); `handlers` maps each port to its
    ConnectionHandler.
    """

    def __init__(
        self,
        handlers: Mapping[int, ConnectionHandler],
        sockets_for: SocketFactoryMaker,
        *,
        ports: tuple[int, ...] = POD_PORTS,
        backlog: int = LISTEN_BACKLOG,
        on_drained: Callable[[str], object] | None = None,
    ) -> None:
        # on_drained(uid): a pod's listeners are closed and its connections drained (the
        # HBONE pool then drops the connections that pod dialled).
        self._on_drained = on_drained
        self._handlers = dict(handlers)
        self._sockets_for = sockets_for
        self._ports = ports
        self._backlog = backlog
        self.open_pods: dict[str, PodListeners] = {}  # by workload uid
        # Totals over every set this factory opened (closed ones included).
        self.totals = ListenerStats()

    @property
    def handlers(self) -> Mapping[int, ConnectionHandler]:
        """The handler of each port."""
        return self._handlers

    async def open(self, workload: Workload, netns: NetnsHandle) -> PodListeners:
        pod = LocalPod.from_workload(workload, netns, self._sockets_for(netns))
        listeners = PodListeners(
            pod,
            self._handlers,
            ports=self._ports,
            backlog=self._backlog,
            totals=self.totals,
            on_close=self._forget,
            on_drained=self._drained,
        )
        await listeners.open()
        self.open_pods[workload.uid] = listeners
        return listeners

    def _forget(self, listeners: PodListeners) -> None:
        if self.open_pods.get(listeners.pod.uid) is listeners:
            del self.open_pods[listeners.pod.uid]

    def _drained(self, listeners: PodListeners) -> None:
        # Not while a newer set for the same pod is open (a namespace replaced): it dials too.
        if self._on_drained is not None and listeners.pod.uid not in self.open_pods:
            self._on_drained(listeners.pod.uid)

    def accepted(self, port: int) -> int:
        """Connections accepted on `port` over all pods, since start."""
        return self.totals.accepted.get(port, 0)
