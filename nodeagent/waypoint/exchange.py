"""What the waypoint's HTTP codecs (http1.py, http2.py) and its router share.

A codec reads requests from a downstream `ByteStream` (a CONNECT tunnel) and,
for each one, asks a `Dispatcher` what to do: `route` answers with a
`LocalReply` (redirect, direct response, 404 no route) or a `Forward` (the
rewritten head and the response header changes). For a Forward the codec asks
`pick` for an endpoint (a different one per request: balancing is per request),
`open`s a byte stream to it (or reuses one it keeps per `Endpoint.key`), writes
the request, streams the bodies both ways, and finally hands a `RequestRecord`
to `record` for telemetry and the access log.

The codecs know nothing of services, policy or HBONE; the dispatcher knows
nothing of HTTP framing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from nodeagent.model.response_flags import join_flags
from nodeagent.model.routing import HeaderOps
from nodeagent.traffic.resilience import RetryPolicy

__all__ = [
    "HTTP1",
    "HTTP2",
    "UPSTREAM_IDLE_TIMEOUT",
    "ByteStream",
    "Dispatcher",
    "Endpoint",
    "Forward",
    "HeaderOps",
    "LocalReply",
    "RequestHead",
    "RequestRecord",
    "RequestTally",
    "UpstreamError",
    "WatchedByteStream",
]

HTTP1 = "HTTP/1.1"
HTTP2 = "HTTP/2"

# An upstream connection with no request in flight closes after this without a
# DestinationRule idleTimeout (Envoy's default for the cluster's idle_timeout: 1 h).
UPSTREAM_IDLE_TIMEOUT = 3600.0


class ByteStream(Protocol):
    """An ordered, reliable byte stream with half-close (a tunnel, or a socket in tests)."""

    async def read(self) -> bytes:
        """The next bytes; b"" at the peer's end of stream. Raises ConnectionError on reset."""
        ...

    def write(self, data: bytes) -> object:
        """Queue bytes (may not be mutated afterwards)."""
        ...

    async def drain(self) -> None:
        """Wait until written bytes are taken (backpressure)."""
        ...

    def write_eof(self) -> None:
        """Half-close our direction."""
        ...

    def abort(self) -> None:
        """Reset: the peer sees an error, not a clean end."""
        ...


class WatchedByteStream(ByteStream, Protocol):
    """A ByteStream that can tell of its peer's end without being read (HTTP/1.1's downstream:
    between a request's end and its response nothing reads it, because of pipelining)."""

    def watch_end(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once when the peer ends or resets its direction (already ended: soon);
        None stops watching. What arrives meanwhile stays buffered for the next read."""
        ...


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str  # as sent: path and query
    authority: str  # Host (HTTP/1.1) or :authority (HTTP/2)
    headers: tuple[tuple[str, str], ...]  # lowercase names, no pseudo-headers, no hop-by-hop
    protocol: str = HTTP1
    scheme: str = "http"

    def header(self, name: str) -> str | None:
        """The header's values joined by "," (None if absent); `name` in lowercase."""
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None


@dataclass(frozen=True, slots=True)
class LocalReply:
    """A response the waypoint makes itself."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    flags: str = ""  # Envoy's response flag for telemetry (NR, UH, UF, UO, ...); "" for none


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request upstream: `head` already rewritten and its headers changed."""

    head: RequestHead
    response_headers: HeaderOps = field(default_factory=HeaderOps)
    route: str = ""  # which route matched, for logs ("" the service's default route)
    plan: Any = None  # the dispatcher's own state for `pick` (opaque to codecs)
    delay: float = 0.0  # an injected delay before the request goes on (flag DI)
    abort: LocalReply | None = None  # an injected abort, answered after the delay (flag FI)
    timeout: float | None = None  # seconds for the whole exchange (504 UT); None: no limit
    retry: RetryPolicy | None = None  # None: one try only
    mirror: bool = False  # `mirrors` has copies to send: the body must be kept for them
    # Whether the cluster's retry budget (maxRetries) lets one more retry start now.
    may_retry: Callable[[], bool] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one request goes. Streams opened to the same `key` may be reused for the next
    request to that key (HTTP/1.1 keep-alive, HTTP/2 multiplexing)."""

    key: Hashable
    address: str  # "ip:port", for logs
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    token: Any = field(default=None, compare=False, hash=False, repr=False)  # the dispatcher's
    max_requests: int | None = field(default=None, compare=False, hash=False)  # per connection
    idle_timeout: float | None = field(default=None, compare=False, hash=False)  # seconds


class UpstreamError(ConnectionError):
    """No stream to the endpoint: `reply` is what the client gets (503 UF, ...)."""

    def __init__(self, reply: LocalReply, detail: str = "") -> None:
        super().__init__(detail or f"{reply.status} {reply.flags}")
        self.reply = reply


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request, for telemetry and the access log."""

    head: RequestHead  # as the client sent it
    status: int  # 0 when no response head was sent (reset)
    flags: str
    duration: float  # seconds, from the request head to the end of the response
    request_bytes: int  # body bytes received from the client
    response_bytes: int  # body bytes sent to the client
    endpoint: Endpoint | None = None  # the last try's
    route: str = ""
    attempts: int = 0  # tries sent upstream (1 + retries)
    note: str = ""  # why the exchange went as it did (retries disabled, ...), for the access log


class RequestTally:
    """What a codec counts of one request while it runs, for its RequestRecord."""

    __slots__ = (
        "attempts",
        "endpoint",
        "flags",
        "note",
        "request_bytes",
        "response_bytes",
        "route",
        "status",
    )

    def __init__(self) -> None:
        self.status = 0
        self.flags = ""
        self.request_bytes = 0
        self.response_bytes = 0
        self.endpoint: Endpoint | None = None
        self.route = ""
        self.attempts = 0
        self.note = ""

    def flag(self, flag: str) -> None:
        """Add a response flag (Envoy writes several joined by ",")."""
        self.flags = join_flags(self.flags, flag)

    def record(self, head: RequestHead, duration: float) -> RequestRecord:
        return RequestRecord(
            head,
            self.status,
            self.flags,
            duration,
            self.request_bytes,
            self.response_bytes,
            self.endpoint,
            self.route,
            self.attempts,
            self.note,
        )


class Dispatcher(Protocol):
    """The router of one downstream tunnel (its caller and destination service are known)."""

    def route(self, head: RequestHead) -> Forward | LocalReply: ...

    async def pick(self, forward: Forward) -> Endpoint | LocalReply:
        """The endpoint for this try (LocalReply 503 UH when none is healthy, UO when the
        circuit breaker is full and its queue too; waits while the request is queued)."""
        ...

    async def open(self, endpoint: Endpoint, protocol: str) -> ByteStream:
        """A new stream to `endpoint` that will carry `protocol`; raises UpstreamError."""
        ...

    def attempt_done(self, endpoint: Endpoint, status: int, *, local_origin: bool) -> None:
        """One try on `endpoint` ended with `status` (0: no response; `local_origin`: our side
        failed to get one). Frees its slot and feeds outlier detection; the last try's endpoint
        may also come back in `record`, which then does nothing more for it."""
        ...

    def mirrors(self, forward: Forward) -> Sequence[tuple[Endpoint, RequestHead]]:
        """Where copies of this request go (endpoint, the head to send), drawn per request."""
        ...

    def mirror_done(self, endpoint: Endpoint, status: int) -> None:
        """A copy's outcome (0: failed before a response), for the mirror counters."""
        ...

    def record(self, record: RequestRecord) -> None: ...
