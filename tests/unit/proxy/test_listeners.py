"""PodListenerFactory and PodListeners: the pool hears about a pod only once its listeners are
drained; a connection's socket is closed when its handler fails or is cancelled."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from nodeagent.datapath.netns import NetnsHandle
from nodeagent.model.workload import Workload
from nodeagent.proxy.listeners import LocalPod, PodListenerFactory, PodListeners


class EphemeralPorts:
    """Pod listeners on loopback ephemeral ports (the real factory binds in the pod)."""

    def __init__(self, netns: NetnsHandle) -> None:
        self.netns = netns

    def listener(self, port: int, *, backlog: int = 1024) -> socket.socket:
        sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        sock.setblocking(False)
        return sock

    def upstream(self, family: socket.AddressFamily) -> socket.socket:
        raise AssertionError("no upstream connections in these tests")

    def close(self) -> None:
        pass


async def refuse(pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
    sock.close()


POD = Workload(
    uid="u1",
    name="web",
    namespace="default",
    addresses=(ipaddress.ip_address("10.1.0.5"),),
    node="node1",
)


def factory(drained: list[str]) -> PodListenerFactory:
    return PodListenerFactory(
        {15001: refuse}, EphemeralPorts, ports=(15001,), on_drained=drained.append
    )


async def test_pool_is_told_after_the_pods_listeners_are_closed() -> None:
    drained: list[str] = []
    listeners = await factory(drained).open(POD, NetnsHandle(path="/fake/1", inode=1))
    assert drained == []
    await listeners.close(drain=0.0)
    assert drained == ["u1"]


async def test_replaced_namespace_keeps_the_pool_while_the_new_listeners_are_open() -> None:
    drained: list[str] = []
    pods = factory(drained)
    old = await pods.open(POD, NetnsHandle(path="/fake/1", inode=1))
    new = await pods.open(POD, NetnsHandle(path="/fake/2", inode=2))
    await old.close(drain=0.0)
    assert drained == []  # the pod still dials from its new namespace
    await new.close(drain=0.0)
    assert drained == ["u1"]


async def _connect_and_wait_until_served(listeners: PodListeners) -> socket.socket:
    port = listeners._sockets[15001].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    for _ in range(200):
        if listeners.stats.accepted.get(15001) and not listeners.active:
            return client
        await asyncio.sleep(0.01)
    raise AssertionError("the connection was not served")


async def test_a_failing_handler_is_counted_and_its_socket_closed(caplog) -> None:
    seen: list[socket.socket] = []

    async def fail(pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        seen.append(sock)
        raise RuntimeError("boom")

    pods = PodListenerFactory({15001: fail}, EphemeralPorts, ports=(15001,))
    listeners = await pods.open(POD, NetnsHandle(path="/fake/1", inode=1))
    client = await _connect_and_wait_until_served(listeners)
    assert listeners.stats.failed == {15001: 1}
    assert seen[0].fileno() == -1  # closed for the handler
    assert "handler for port 15001 failed" in caplog.text and "boom" in caplog.text
    client.close()
    await listeners.close(drain=0.0)


async def test_connections_still_open_at_close_are_cancelled_and_their_sockets_closed() -> None:
    started = asyncio.Event()
    seen: list[socket.socket] = []

    async def hang(pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        seen.append(sock)
        started.set()
        await asyncio.sleep(3600)

    pods = PodListenerFactory({15001: hang}, EphemeralPorts, ports=(15001,))
    listeners = await pods.open(POD, NetnsHandle(path="/fake/1", inode=1))
    port = listeners._sockets[15001].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    await asyncio.wait_for(started.wait(), 5)
    assert listeners.active == 1
    await listeners.close(drain=0.01)
    assert listeners.active == 0
    assert seen[0].fileno() == -1
    assert listeners.stats.failed == {}
    client.close()


async def test_a_failing_accept_backs_off_instead_of_spinning(caplog) -> None:
    pods = PodListenerFactory({15001: refuse}, EphemeralPorts, ports=(15001,))
    listeners = await pods.open(POD, NetnsHandle(path="/fake/1", inode=1))
    lsock = listeners._sockets[15001]
    # A listening socket shut for reading stays readable and its accept fails (EINVAL):
    # a real accept error, as EMFILE would be.
    lsock.shutdown(socket.SHUT_RD)
    await asyncio.sleep(0.35)
    failures = caplog.text.count("accept on 15001 failed")
    assert 1 <= failures <= 10  # one per 0.1 s back-off, not thousands (one per loop turn)
    await listeners.close(drain=0.0)
    await asyncio.sleep(0.15)
    assert caplog.text.count("accept on 15001 failed") == failures  # closed: no retry left
