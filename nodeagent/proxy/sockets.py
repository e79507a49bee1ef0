"""Socket and address helpers both directions of the proxy share.

Outbound (15001), inbound (15006, 15008) and the plain-TCP handlers all connect
from inside a pod's namespace, close refused connections with RST, relay two
sockets and print `host:port` the same way; they take these from here, so
neither direction imports the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from nodeagent.datapath.netns import set_transparent
from nodeagent.proxy.listeners import LocalPod
from nodeagent.proxy.relay import Relay, RelayStats, connect_socket, connect_tcp_end, relay_pair

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0

# SO_LINGER {on, 0 s}: close() then sends RST instead of FIN.
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reset_socket(sock: socket.socket) -> None:
    """Close with RST, so the client sees a failure rather than a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


async def connect_in_pod(
    pod: LocalPod,
    dst: tuple[str, int],
    *,
    source: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> tuple[socket.socket, bool]:
    """A connected, marked socket from inside `pod` to `dst`; from `source` if the kernel lets
    us (returns whether it did). Raises OSError/TimeoutError if the connect fails."""
    sock = pod.sockets.upstream(family_of(dst[0]))
    spoofed = False
    try:
        if source is not None and family_of(source) == family_of(dst[0]) and set_transparent(sock):
            try:
                sock.bind((source, 0))
                spoofed = True
            except OSError as exc:  # no route back to that address: go from the pod
                log.debug("pod %s: cannot bind to client %s: %s", pod.label, source, exc)
        async with asyncio.timeout(connect_timeout):  # not wait_for: no task per connect
            await connect_socket(sock, dst)
    except BaseException:
        sock.close()
        raise
    return sock, spoofed


async def relay_sockets(down: socket.socket, up: socket.socket) -> Relay:
    """Start relaying two connected sockets (downstream first); closes both if that fails."""
    try:
        down_end = await connect_tcp_end("downstream", down)
        up_end = await connect_tcp_end("upstream", up)
    except BaseException:
        up.close()
        down.close()
        raise
    return relay_pair(down_end, up_end)


def hold(relay: Relay) -> asyncio.Future[RelayStats]:
    """What a connection's task awaits while its relay runs: the relay's own `done`, bare (no
    coroutine and no shield per idle connection: together ~1 KB of each). A holder cancelled
    meanwhile (a drain that ran out) cancels `done`; its `finally: registry.remove(live)`
    then resets both sides (ConnectionRegistry.remove ends a relay that outlived its holder)."""
    return relay.done
