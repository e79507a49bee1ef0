"""The proxy's side of an HBONE tunnel: a relay end over a `TunnelStream`, and TLS material.

`TunnelRelayEnd` lets `nodeagent.proxy.relay.Relay` join a TCP connection and a
CONNECT stream with the same semantics as two TCP ends:

* bytes in order, DATA taken as memoryviews without copies;
* backpressure both ways: when the TCP side cannot take more, the tunnel stops
  returning flow-control credit (the peer stops after one window); when the
  tunnel's windows are full, the TCP side stops reading until they drain;
* half-close: END_STREAM <-> FIN;
* reset: RST_STREAM (CONNECT_ERROR, as RFC 9113 §8.5 maps a TCP reset) <-> RST,
  and a dead HTTP/2 connection resets the relay.

`WorkloadTls` turns the CertificateManager's certificates into cached
`ssl.SSLContext`s for the HBONE client pool and server (which may not import
nodeagent.identity themselves: it is a sibling layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable
from typing import Protocol

from nodeagent.hbone.aio import TunnelStream
from nodeagent.hbone.connection import ErrorCode
from nodeagent.identity import tls
from nodeagent.identity.csr import WorkloadCertificate
from nodeagent.model.identity import Identity
from nodeagent.proxy.relay import Relay, RelayEnd, TcpRelayEnd

log = logging.getLogger(__name__)


class TunnelRelayEnd(RelayEnd):
    """A relay end over one CONNECT stream (either side of the tunnel)."""

    __slots__ = ("_drain", "_early", "_early_eof", "_held", "_paused", "_wired", "stream")

    def __init__(self, name: str, stream: TunnelStream) -> None:
        super().__init__(name)
        self.stream = stream
        self._wired = False
        self._paused = False
        self._held = 0  # bytes taken while paused: their flow-control credit is returned on resume
        # Bytes that arrived before we took over are not yet acked: we ack them as we relay.
        self._early: list[tuple[memoryview, int]] | None = stream.take_buffered() or None
        self._early_eof = stream.eof
        self._drain: asyncio.Task[None] | None = None
        stream.consume(self)  # acks what we relay; no bound method per event
        if stream.connection_closed.done():
            asyncio.get_running_loop().call_soon(self.stream_lost, None)

    # -- stream events (nodeagent.hbone.aio.StreamConsumer) --------------------------------

    def stream_data(self, data: memoryview) -> None:
        if not self._wired:
            if self._early is None:
                self._early = []
            self._early.append((data, len(data)))
            return
        self.on_data(data)
        # We are inside the HboneConnection's read, which flushes once it has dispatched the
        # whole read: queue the credit without a flush of our own (one less per DATA frame).
        self._credit(len(data), flush=False)

    def _direct_data(self, data: memoryview) -> bool:
        # The connection's direct path (TunnelStream.deliver_to): `on_data` and `_credit`
        # inlined, since this runs once per DATA frame; True lets the connection ack at once.
        self.received += len(data)
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.do_send(data)
        if self._paused:
            self._held += len(data)
            return False
        return not self.closed

    def _credit(self, size: int, *, flush: bool = True) -> None:
        if self._paused:
            self._held += size
        elif self.closed:
            pass
        else:
            self.stream.ack(size, flush=flush)

    def stream_end(self) -> None:
        if not self._wired:
            self._early_eof = True
            return
        self.on_eof()

    def stream_reset(self, error_code: int) -> None:
        if self._wired and not self.closed:
            self.detach()
            self.on_reset(f"{self.name}: stream reset by peer (code {error_code})")

    def stream_lost(self, error: BaseException | None) -> None:
        if self._wired and not self.closed:
            self.detach()
            gone = error is None or self.stream.connection_closed.done()
            self.on_reset(f"{self.name}: {'HBONE connection closed' if gone else error}")

    def detach(self) -> None:
        """Stop hearing from the stream's connection: a pooled connection outlives many
        tunnels."""
        self._stop_drain()
        self.stream.deliver_to(None)

    def wire(self) -> None:
        """Start relaying; replays what arrived before the relay existed."""
        self._wired = True
        early, self._early = self._early, None
        for data, length in early or ():
            self.on_data(data)
            self._credit(length)
        if self._early_eof:
            self.on_eof()
        else:
            self.stream.deliver_to(self._direct_data)
        error = self.stream.error
        if error is not None and not self.closed and not self._early_eof:
            self.on_reset(f"{self.name}: {error}")

    # -- relay verbs -------------------------------------------------------------------------------

    def do_send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            clear = self.stream.write(data)
        except Exception as exc:  # reset or connection gone: end the relay, outside this call
            asyncio.get_running_loop().call_soon(self._fail_later, f"{self.name}: {exc}")
            return
        if not clear and self._drain is None:
            self.on_write_paused()
            self._drain = asyncio.get_running_loop().create_task(
                self._wait_drained(), name=f"tunnel-drain {self.stream.authority}"
            )

    def _fail_later(self, error: str) -> None:
        if not self.closed:
            self.detach()
            self.on_reset(error)

    async def _wait_drained(self) -> None:
        try:
            await self.stream.drain()
        except Exception:
            return  # the stream died: the reset callbacks end the relay
        finally:
            self._drain = None
        self.on_write_resumed()

    def do_send_eof(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.write_eof()

    def do_reset(self) -> None:
        self.detach()
        if not self.stream.closed:
            with contextlib.suppress(Exception):
                self.stream.reset(ErrorCode.CONNECT_ERROR)

    def do_close(self) -> None:
        self.detach()
        if self.got_eof and self.sent_eof:
            return  # ended both ways; buffered DATA + END_STREAM still go out as windows allow
        if not self.stream.closed:
            with contextlib.suppress(Exception):
                self.stream.reset(ErrorCode.CANCEL)

    def do_pause_reading(self) -> None:
        self._paused = True

    def do_resume_reading(self) -> None:
        self._paused = False
        held, self._held = self._held, 0
        if held and not self.closed:
            with contextlib.suppress(Exception):
                self.stream.ack(held)

    def _stop_drain(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None


def join(downstream: TcpRelayEnd | TunnelRelayEnd, upstream: TcpRelayEnd | TunnelRelayEnd) -> Relay:
    """Relay between two ends (the client's side first, so `Relay.a` is downstream) and start
    moving bytes."""
    relay = Relay(downstream, upstream)
    downstream.wire()
    upstream.wire()
    return relay


# --- TLS material ----------------------------------------------------------------------------


class CertificateSource(Protocol):
    """Where workload certificates come from (the CertificateManager)."""

    async def wait_for(self, identity: Identity) -> WorkloadCertificate: ...


class WorkloadTls:
    """Client and server SSLContexts per identity, rebuilt when the certificate rotates.

    Implements both `nodeagent.proxy.pool.ClientTls` and `nodeagent.hbone.server.ServerTls`.
    """

    def __init__(self, certificates: CertificateSource) -> None:
        self._certificates = certificates
        self._contexts: dict[tuple[str, Identity], tuple[int, ssl.SSLContext]] = {}

    async def _context(self, side: str, identity: Identity) -> ssl.SSLContext:
        cert = await self._certificates.wait_for(identity)
        cached = self._contexts.get((side, identity))
        if cached is not None and cached[0] == cert.serial:
            return cached[1]
        ctx = tls.client_context(cert) if side == "client" else tls.server_context(cert)
        self._contexts[(side, identity)] = (cert.serial, ctx)
        return ctx

    async def client_context(self, identity: Identity) -> ssl.SSLContext:
        return await self._context("client", identity)

    async def server_context(self, identity: Identity) -> ssl.SSLContext:
        return await self._context("server", identity)

    def verify_server(self, ssl_object: ssl.SSLObject, expected: Iterable[Identity]) -> Identity:
        return tls.verify_server_identity(ssl_object, expected)

    def client_identity(self, ssl_object: ssl.SSLObject, trust_domain: str) -> Identity:
        return tls.client_identity(ssl_object, trust_domain)

    def forget(self, identity: Identity) -> None:
        """Drop cached contexts of an identity no local pod uses any more."""
        for side in ("client", "server"):
            self._contexts.pop((side, identity), None)
