"""The delta-ADS client's gRPC edge: connect, subscribe, apply, ACK/NACK, reconnect.

All bookkeeping (versions, nonces, ACK/NACK text, readiness) lives in the
sans-IO `DeltaAdsProtocol`; this module only moves messages between it, the
gRPC stream and a `StateSink` (the state updater, plugged in by app.py). While
disconnected nothing is cleared: the sink keeps serving the last good state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from nodeagent.config import Config
from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from nodeagent.pb.envoy.config.core.v3 import base_pb2 as base_pb
from nodeagent.pb.envoy.service.discovery.v3 import ads_pb2_grpc
from nodeagent.pb.envoy.service.discovery.v3 import discovery_pb2 as discovery_pb
from nodeagent.state.mcp import CONFIG_TYPE_URLS, resource_type_url
from nodeagent.xds.protocol import (
    DeltaAdsProtocol,
    OutboundRequest,
    ReceivedResource,
    ReceivedResponse,
)

log = logging.getLogger(__name__)

# ztunnel's types, then Istio's config kinds (VirtualService, DestinationRule, under
# both the v1alpha3 and the v1 type URL, and the waypoints' AuthorizationPolicies) as
# istiod's "api" generator serves them on the same stream. The config kinds are
# optional: readiness never waits for them, so a control plane that does not serve
# them leaves the agent as it was.
DEFAULT_TYPES = (TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION, *CONFIG_TYPE_URLS)
OPTIONAL_TYPES = CONFIG_TYPE_URLS
MAX_MESSAGE = 200 * 1024 * 1024  # ztunnel's max decode size


class StateSink(Protocol):
    """Where resources go; the state updater implements it."""

    def apply_delta(
        self, type_url: str, upserts: Sequence[tuple[str, bytes]], removals: Sequence[str]
    ) -> dict[str, str]:
        """Apply good upserts and removals at once; return {name: reason} of rejected ones."""
        ...


class XdsAddressError(ValueError):
    """The control-plane address is not `http://host:port` or `https://host:port`."""


@dataclass(frozen=True)
class ExponentialBackoff:
    """Delays between reconnects: doubling from `initial` up to `cap`, with jitter."""

    initial: float = 0.1
    cap: float = 15.0
    factor: float = 2.0
    jitter: float = 0.2
    """Fraction of the delay added or removed at random, so agents don't reconnect in step."""
    rng: Callable[[], float] = random.random

    def delay(self, attempt: int) -> float:
        base = min(self.cap, self.initial * self.factor ** max(0, attempt))
        spread = base * self.jitter * (2 * self.rng() - 1)
        return float(max(0.0, min(self.cap, base + spread)))


@dataclass
class XdsClientStats:
    """Connection state and counters, for metrics and the admin API."""

    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    pushes: int = 0
    acks: int = 0
    nacks: int = 0
    last_error: str = ""
    last_nack: str = ""
    by_type: dict[str, int] = field(default_factory=dict)
    """Responses applied, by type URL."""
    nacks_by_type: dict[str, int] = field(default_factory=dict)
    """Responses NACKed (some resource refused), by type URL."""
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    """Bytes of the resources received (their serialized values), by type URL, as
    ztunnel's istio_xds_message_bytes_total counts them."""
    terminations: dict[str, int] = field(default_factory=dict)
    """Ended streams by reason, as istio_xds_connection_terminations_total counts
    them: ConnectionError (never got a response), Error, Complete."""


def node_message(config: Config) -> base_pb.Node:
    """The Node as ztunnel sends it: its id shape and its metadata keys."""
    md = struct_pb2.Struct()
    md.update(
        {
            "NAME": config.pod_name,
            "NAMESPACE": config.pod_namespace,
            "INSTANCE_IPS": config.instance_ip,
            "NODE_NAME": config.node_name,
            "CLUSTER_ID": config.cluster_id,
            **dict(config.extra),
        }
    )
    return base_pb.Node(id=config.xds_node_id, metadata=md)


def _to_pb(req: OutboundRequest, node: base_pb.Node) -> discovery_pb.DeltaDiscoveryRequest:
    out = discovery_pb.DeltaDiscoveryRequest(
        type_url=req.type_url,
        response_nonce=req.response_nonce,
        initial_resource_versions=dict(req.initial_resource_versions),
    )
    if req.include_node:
        out.node.CopyFrom(node)
    if req.error_message is not None:
        out.error_detail.CopyFrom(status_pb2.Status(message=req.error_message))
    return out


def _from_pb(resp: discovery_pb.DeltaDiscoveryResponse) -> ReceivedResponse:
    return ReceivedResponse(
        type_url=resp.type_url,
        nonce=resp.nonce,
        resources=[
            ReceivedResource(
                name=r.name, version=r.version, type_url=r.resource.type_url, value=r.resource.value
            )
            for r in resp.resources
        ],
        removed=list(resp.removed_resources),
    )


def read_token(path: str) -> str:
    """The bearer token, read fresh (projected tokens rotate); '' if there is none."""
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        log.warning("cannot read xDS token %s: %s", path, e.strerror or e)
        return ""


def keepalive_options(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """The channel's keepalive: a PING every `time_s` seconds, dropped after `timeout_s`
    without its ACK.

    gRPC's core holds a client to 2 PINGs without data, then to one a minute, whatever
    keepalive_time says; lifting that (max_pings_without_data 0) makes the PINGs regular,
    as ztunnel's are, so a dead connection is noticed within `time_s + timeout_s`. The
    server must accept PINGs that often: istiod takes one every 15 s (half its 30 s
    keepaliveInterval), the shipped control plane the same (ServerKeepalive).
    """
    return [
        ("grpc.keepalive_time_ms", round(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def open_channel(
    address: str,
    root_ca: str = "",
    *,
    keepalive_time: float = 30.0,
    keepalive_timeout: float = 10.0,
) -> grpc.aio.Channel:
    """A channel to `http://host:port` (plaintext) or `https://host:port` (TLS)."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise XdsAddressError(
            f"xDS address {address!r}: expected http://HOST:PORT or https://HOST:PORT"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    target = f"{host}:{parts.port}"
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        *keepalive_options(keepalive_time, keepalive_timeout),
    ]
    if parts.scheme == "http":
        return grpc.aio.insecure_channel(target, options=options)
    roots = Path(root_ca).read_bytes() if root_ca else None
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.aio.secure_channel(target, creds, options=options)


class XdsClient:
    """Keeps one delta-ADS stream to the control plane alive and feeds a StateSink."""

    def __init__(
        self,
        config: Config,
        sink: StateSink,
        *,
        type_urls: Sequence[str] = DEFAULT_TYPES,
        optional_types: Collection[str] = OPTIONAL_TYPES,
        backoff: ExponentialBackoff | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        on_update: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._sink = sink
        self._backoff = backoff or ExponentialBackoff()
        self._sleep = sleep or asyncio.sleep
        self._on_update = on_update
        self.protocol = DeltaAdsProtocol(
            type_urls,
            optional=optional_types,
            resource_types={t: resource_type_url(t) for t in type_urls},
        )
        self.stats = XdsClientStats()
        self._node = node_message(config)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.protocol.ready

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def wait_changed(self) -> None:
        """Wait for the next response applied (tests and the admin API use it)."""
        self._changed.clear()
        await self._changed.wait()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="xds-client")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> XdsClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self) -> None:
        """Connect, serve the stream, and reconnect with backoff until cancelled."""
        attempt = 0
        while True:
            reason = "ConnectionError"
            try:
                await self._run_stream()
                reason = "Complete"
                self.stats.last_error = "stream ended by the server"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                self.stats.last_error = f"{e.code().name}: {e.details()}"
                if self.stats.connected:
                    reason = "Error"
            except Exception as e:  # a bad address or root file: keep retrying, say why
                self.stats.last_error = f"{type(e).__name__}: {e}"
            # A stop() that lands while an attempt is failing can be swallowed on the way (a
            # gRPC call ending as an error; asyncio.wait_for in 3.11 when its inner call
            # finishes in the same turn). Honour it here, or stop() waits for ever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            had_stream = self.stats.connected
            if had_stream:
                self.stats.disconnects += 1
            self.stats.connected = False
            self.stats.terminations[reason] = self.stats.terminations.get(reason, 0) + 1
            # A stream that worked resets the backoff; failing connects double it.
            attempt = 0 if had_stream else attempt + 1
            delay = self._backoff.delay(attempt)
            log.warning("xDS stream down (%s); reconnecting in %.2fs", self.stats.last_error, delay)
            await self._sleep(delay)

    async def _run_stream(self) -> None:
        metadata: list[tuple[str, str]] = [("clusterid", self._config.cluster_id)]
        token = read_token(self._config.auth_token_path)
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        got_response = False
        cfg = self._config
        channel = open_channel(
            cfg.xds_address,
            cfg.xds_root_ca,
            keepalive_time=cfg.xds_keepalive_time,
            keepalive_timeout=cfg.xds_keepalive_timeout,
        )
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources(metadata=tuple(metadata))
            try:
                for req in self.protocol.start_stream():
                    await call.write(_to_pb(req, self._node))
            except grpc.aio.AioRpcError as e:
                # A write can fail (as a bare INTERNAL) before the server's status
                # arrives; the call's final status says why it really ended.
                raise await _final_status(call, e) from None
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                if not got_response:
                    got_response = True
                    self.stats.connected = True
                    self.stats.connects += 1
                    self.stats.last_error = ""
                await call.write(_to_pb(self._handle(resp), self._node))
        finally:
            await channel.close(grace=None)

    def _handle(self, resp: discovery_pb.DeltaDiscoveryResponse) -> OutboundRequest:
        action = self.protocol.receive(_from_pb(resp))
        try:
            rejected: Mapping[str, str] = self._sink.apply_delta(
                action.type_url, action.upserts, action.removals
            )
        except Exception as e:  # a sink bug must not kill the stream; NACK everything
            log.exception("state sink failed on %s", action.type_url)
            rejected = {name: f"internal error: {e}" for name, _ in action.upserts}
        reply = self.protocol.complete(action, rejected)
        self.stats.pushes += 1
        self.stats.by_type[action.type_url] = self.stats.by_type.get(action.type_url, 0) + 1
        size = sum(len(r.resource.value) for r in resp.resources)
        self.stats.bytes_by_type[action.type_url] = (
            self.stats.bytes_by_type.get(action.type_url, 0) + size
        )
        if reply.is_nack:
            self.stats.nacks += 1
            nacked = self.stats.nacks_by_type
            nacked[action.type_url] = nacked.get(action.type_url, 0) + 1
            self.stats.last_nack = reply.error_message or ""
            log.warning("xDS NACK %s: %s", action.type_url, reply.error_message)
        else:
            self.stats.acks += 1
        if self.protocol.ready:
            self._ready.set()
        self._changed.set()
        if self._on_update is not None:
            self._on_update(action.type_url)
        return reply


async def _final_status(call: Any, fallback: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """The error carrying the call's real final status, or `fallback` if there is none."""
    try:
        async with asyncio.timeout(2):  # not wait_for: it can swallow a cancel in 3.11
            code = await call.code()
        details = await call.details()
    except (TimeoutError, grpc.aio.AioRpcError):
        return fallback
    if code is None or code == grpc.StatusCode.OK:
        return fallback
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)
