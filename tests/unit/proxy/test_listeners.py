"""PodListenerFactory: the pool hears about a pod only once its listeners are drained."""

from __future__ import annotations

import ipaddress
import socket

from nodeagent.datapath.netns import NetnsHandle
from nodeagent.model.workload import Workload
from nodeagent.proxy.listeners import LocalPod, PodListenerFactory


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
