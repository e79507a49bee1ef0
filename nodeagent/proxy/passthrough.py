"""Connection handlers of an agent built without a CA (tests): pass bytes straight on.

They make capture visible and testable end to end without mTLS:

* outbound (15001): recover where the app was connecting (SO_ORIGINAL_DST),
  connect there *from the pod's namespace* with a marked socket (so the
  pod's own capture rules skip it) and relay;
* inbound plaintext (15006): the original destination is the pod's own
  ip:port; connect to it inside the pod, from the client's address when the
  kernel allows (IP_TRANSPARENT + bind to the client's ip, port 0; the
  connmark rules route the app's replies back to us), else from the pod, and
  relay;
* inbound HBONE (15008): without the tunnel there is nobody to terminate it,
  so the connection is closed at once (fail closed).

A destination on one of the agent's own ports (15001/15006/15008) of the pod
itself would loop back into the agent; such connections are closed with a
log line. With certificates, app.build registers the HBONE handlers
(nodeagent.proxy.outbound, nodeagent.proxy.inbound) instead of these.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from nodeagent.datapath.netns import original_destination
from nodeagent.model.address import unmap
from nodeagent.model.constants import (
    ILLEGAL_PORTS,
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
)
from nodeagent.proxy.listeners import ConnectionHandler, LocalPod
from nodeagent.proxy.sockets import (
    CONNECT_TIMEOUT,
    connect_in_pod,
    family_of,
    hold,
    relay_sockets,
    reset_socket,
)

log = logging.getLogger(__name__)


@dataclass
class PassthroughStats:
    """Per listener port: connections relayed, refused (loops, 15008) and failed upstream."""

    relayed: dict[int, int] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)
    upstream_failed: dict[int, int] = field(default_factory=dict)
    transparent: int = 0  # inbound upstreams that kept the client's source address

    def count(self, kind: str, port: int) -> None:
        table: dict[int, int] = getattr(self, kind)
        table[port] = table.get(port, 0) + 1


def _is_self(pod: LocalPod, host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified or pod.owns(str(addr))


class _Passthrough:
    def __init__(
        self, stats: PassthroughStats | None = None, *, connect_timeout: float = CONNECT_TIMEOUT
    ) -> None:
        self.stats = stats or PassthroughStats()
        self._connect_timeout = connect_timeout

    def _refuse_loop(
        self, pod: LocalPod, sock: socket.socket, port: int, dst: tuple[str, int]
    ) -> bool:
        if dst[1] in ILLEGAL_PORTS and _is_self(pod, dst[0]):
            log.warning(
                "pod %s: connection on %d to %s:%d refused: it would loop into the agent",
                pod.label,
                port,
                dst[0],
                dst[1],
            )
            self.stats.count("refused", port)
            reset_socket(sock)
            return True
        return False

    async def _connect_and_relay(
        self,
        pod: LocalPod,
        sock: socket.socket,
        port: int,
        dst: tuple[str, int],
        *,
        source: str | None = None,
    ) -> None:
        try:
            upstream, spoofed = await connect_in_pod(
                pod, dst, source=source, connect_timeout=self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            self.stats.count("upstream_failed", port)
            log.info(
                "pod %s: connection on %d to %s:%d failed: %s",
                pod.label,
                port,
                dst[0],
                dst[1],
                exc or type(exc).__name__,
            )
            reset_socket(sock)
            return
        except BaseException:
            sock.close()
            raise
        self.stats.transparent += spoofed
        self.stats.count("relayed", port)
        log.debug("pod %s: relaying %d -> %s:%d", pod.label, port, dst[0], dst[1])
        await hold(await relay_sockets(sock, upstream))


class OutboundPassthrough(_Passthrough):
    """15001: to the original destination, from the pod's namespace, marked."""

    def __init__(
        self,
        stats: PassthroughStats | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        destination_of: Callable[[socket.socket], tuple[str, int]] = original_destination,
    ) -> None:
        super().__init__(stats, connect_timeout=connect_timeout)
        self._destination_of = destination_of  # the eBPF backend answers from its map

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        try:
            dst = self._destination_of(sock)
        except OSError as exc:
            log.info("pod %s: no original destination on %d: %s", pod.label, listener_port, exc)
            reset_socket(sock)
            return
        dst = (unmap(dst[0]), dst[1])
        if self._refuse_loop(pod, sock, listener_port, dst):
            return
        await self._connect_and_relay(pod, sock, listener_port, dst)


class InboundPassthrough(_Passthrough):
    """15006: to the pod's own ip:port, with the client's source address if possible."""

    def __init__(
        self,
        stats: PassthroughStats | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        transparent: bool = True,
    ) -> None:
        super().__init__(stats, connect_timeout=connect_timeout)
        self._transparent = transparent

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        try:
            dst = original_destination(sock)
            peer = unmap(sock.getpeername()[0])
        except OSError as exc:
            log.info("pod %s: inbound connection lost before use: %s", pod.label, exc)
            reset_socket(sock)
            return
        dst = (unmap(dst[0]), dst[1])
        if self._refuse_loop(pod, sock, listener_port, dst):
            return
        # Spoof only across families that match (an IPv4 client to an IPv4 port).
        source = peer if self._transparent and family_of(peer) == family_of(dst[0]) else None
        await self._connect_and_relay(pod, sock, listener_port, dst, source=source)


class HboneUnavailable:
    """15008 while no tunnel is plugged in: refuse (fail closed), say so once per connection."""

    def __init__(self, stats: PassthroughStats | None = None) -> None:
        self.stats = stats or PassthroughStats()

    async def __call__(self, pod: LocalPod, sock: socket.socket, listener_port: int) -> None:
        log.info("pod %s: HBONE connection on %d closed: no tunnel yet", pod.label, listener_port)
        self.stats.count("refused", listener_port)
        reset_socket(sock)


def passthrough_handlers(
    stats: PassthroughStats | None = None,
    *,
    destination_of: Callable[[socket.socket], tuple[str, int]] = original_destination,
) -> Mapping[int, ConnectionHandler]:
    """The handler map for PodListenerFactory, sharing one stats object."""
    stats = stats or PassthroughStats()
    return {
        OUTBOUND_PORT: OutboundPassthrough(stats, destination_of=destination_of),
        INBOUND_PLAINTEXT_PORT: InboundPassthrough(stats),
        INBOUND_HBONE_PORT: HboneUnavailable(stats),
    }
