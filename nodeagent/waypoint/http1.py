"""HTTP/1.1 for the waypoint, with h11: server side to the client, client side upstream.

One coroutine per downstream connection, requests one after another (keep-alive and
pipelining): each is routed and balanced on its own (`Dispatcher.route`, `pick`), sent on an
idle upstream connection for the endpoint's key (`Http1Upstreams`) or a new one, and its
bodies are streamed both ways with backpressure; h11 does the framing (content-length,
chunked, read-until-close), so bodies are never buffered whole. A request body that is not
already in hand is pumped by a second task so that the upstream may answer while it is still
arriving; bodyless requests (the usual case) need no task.

Errors answer as Envoy does: a malformed request gets Envoy's local reply and the
connection closes (flag DPE); an upstream that fails before its response head gives 503 (UF);
after the head the client's connection is reset. `Upgrade` requests are forwarded with their
Upgrade header and, on 101, both sides become an opaque byte relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from http import HTTPStatus

import h11

from nodeagent.traffic.resilience import TryFailure
from nodeagent.waypoint.attempts import (
    BODY_BUFFER_LIMIT,
    REQUEST_TIMEOUT,
    AttemptFailed,
    MirrorTasks,
    RequestClock,
    delay_and_abort,
    run_tries,
)
from nodeagent.waypoint.exchange import (
    HTTP1,
    UPSTREAM_IDLE_TIMEOUT,
    ByteStream,
    Dispatcher,
    Endpoint,
    Forward,
    LocalReply,
    RequestHead,
    RequestRecord,
    RequestTally,
    UpstreamError,
    WatchedByteStream,
)

log = logging.getLogger(__name__)

__all__ = [
    "MAX_REQUEST_HEADERS",
    "Http1Upstreams",
    "bad_request_reply",
    "reason_phrase",
    "serve_http1",
]

# Envoy's default max_request_headers_kb (60); h11 answers 431 past it, as Envoy does.
MAX_REQUEST_HEADERS = 60 * 1024
_MAX_RESPONSE_HEADERS = 60 * 1024

# RFC 9110 §7.6.1 and the ones Envoy also strips; names listed in Connection go too.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
    )
)

_JOIN_BELOW = 16 * 1024  # chunk framing joined with small data: one write instead of three

_EMPTY_HEAD = RequestHead(method="", path="", authority="", headers=())

# Envoy's local-reply bodies for an upstream lost before its response head
# (router.cc: "upstream connect error or disconnect/reset before headers. reset reason: ...").
_RESET_BEFORE_HEADERS = b"upstream connect error or disconnect/reset before headers. reset reason: "
_TEXT_PLAIN = (("content-type", "text/plain"),)


def bad_request_reply(status: int = 400) -> LocalReply:
    """Envoy's answer to a malformed HTTP/1 request: its codec error goes to sendLocalReply
    with the status's reason phrase as the text/plain body (codec_impl.cc sendProtocolError),
    flag DPE, and the connection closes."""
    reason = reason_phrase(status)
    return LocalReply(status, _TEXT_PLAIN, reason.encode(), flags="DPE")


@functools.cache
def reason_phrase(status: int) -> str:
    """The standard reason phrase: Envoy writes its own, whatever the upstream sent."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _upstream_lost(reason: str, flags: str) -> LocalReply:
    return LocalReply(503, _TEXT_PLAIN, _RESET_BEFORE_HEADERS + reason.encode(), flags=flags)


class _BadRequest(Exception):
    """A request h11 accepted but Envoy refuses."""

    def __init__(self, status: int = 400) -> None:
        super().__init__(status)
        self.status = status


class _DownstreamGone(Exception):
    """The client failed or left while its request was being forwarded."""


class _Http1Attempt:
    """A try that got its response head (or a 101)."""

    __slots__ = ("endpoint", "head", "up")

    def __init__(self, up: _Peer, head: h11.Response | h11.InformationalResponse) -> None:
        self.up = up
        self.head = head
        self.endpoint: Endpoint | None = None

    @property
    def status(self) -> int:
        return self.head.status_code

    @property
    def grpc_status(self) -> int | None:
        return None  # gRPC needs HTTP/2

    def discard(self) -> None:
        self.up.discard()


class _Peer:
    """One side of an exchange: a byte stream and the h11 state of its connection.

    What is sent is held until the next flush, so a head and the body pieces already at
    hand leave in one write (one tunnel frame) instead of one each; reading flushes first."""

    __slots__ = ("closed", "conn", "eof", "idle_deadline", "out", "out_size", "served", "stream")

    def __init__(self, stream: ByteStream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.served = 0  # requests answered on this connection (maxRequestsPerConnection)
        self.idle_deadline = 0.0  # while kept idle: when it closes (time.monotonic())
        self.eof = False
        self.closed = False
        self.out: list[bytes] = []
        self.out_size = 0

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            self.flush()
            await self.read()

    async def read(self) -> None:
        data = await self.stream.read()
        if not data:
            self.eof = True
        self.conn.receive_data(data)

    def send(self, event: h11.Event) -> None:
        pieces = self.conn.send_with_data_passthrough(event)
        if pieces:
            self.out.extend(pieces)
            self.out_size += sum(map(len, pieces))

    def flush(self) -> None:
        out = self.out
        if not out:
            return
        if len(out) == 1:
            self.stream.write(out[0])
        elif self.out_size <= _JOIN_BELOW:
            self.stream.write(b"".join(out))
        else:
            for piece in out:  # large data passes through uncopied
                self.stream.write(piece)
        out.clear()
        self.out_size = 0

    def discard(self) -> None:
        """Drop the connection: a clean close if the peer already ended, else a reset."""
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        with contextlib.suppress(ConnectionError, RuntimeError):
            if self.eof:
                self.stream.write_eof()
            else:
                self.stream.abort()


class Http1Upstreams:
    """Idle keep-alive upstream connections per `Endpoint.key`, with their h11 client state.

    Share one across downstream connections (one per process or per tunnel, the caller's
    choice): a connection is taken for one request at a time and given back once both
    directions finished cleanly. At most `max_idle_per_key` idle ones are kept; an upstream
    that closes is dropped (when its response says so, or found closed when next taken, in
    which case a bodyless request is sent again on a new connection)."""

    def __init__(
        self, max_idle_per_key: int = 32, *, idle_timeout: float = UPSTREAM_IDLE_TIMEOUT
    ) -> None:
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout = idle_timeout  # without the endpoint's own (idleTimeout)
        self._idle: dict[Hashable, list[_Peer]] = {}
        self.mirrors = MirrorTasks()
        # One timer for every idle connection, at the earliest deadline: a timer per
        # connection given back would cost a timer (and a loop lookup) per request.
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0

    def idle(self, key: Hashable) -> int:
        """How many idle connections are kept for `key`."""
        return len(self._idle.get(key, ()))

    def close(self) -> None:
        """Close every idle connection and stop the mirror copies in flight."""
        self.mirrors.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, {}
        for peers in idle.values():
            for peer in peers:
                peer.discard()

    def _take(self, key: Hashable) -> _Peer | None:
        peers = self._idle.get(key)
        if not peers:
            return None
        peer = peers.pop()  # the most recently used: the likeliest to be alive
        if not peers:
            del self._idle[key]
        return peer

    def _give(self, endpoint: Endpoint, peer: _Peer) -> None:
        peer.served += 1
        limit = endpoint.max_requests
        if limit is not None and peer.served >= limit:
            peer.discard()  # the DestinationRule's maxRequestsPerConnection
            return
        key = endpoint.key
        peers = self._idle.setdefault(key, [])
        if len(peers) >= self.max_idle_per_key:
            peer.discard()
            return
        peers.append(peer)
        # connectionPool.http.idleTimeout, else Envoy's 1 h: an idle connection closes after it.
        idle = endpoint.idle_timeout if endpoint.idle_timeout is not None else self.idle_timeout
        peer.idle_deadline = deadline = time.monotonic() + idle
        if self._sweep is None or deadline < self._sweep_at:
            self._arm_sweep(deadline)

    def _arm_sweep(self, deadline: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = deadline
        delay = max(0.0, deadline - time.monotonic())
        self._sweep = asyncio.get_running_loop().call_later(delay, self._close_expired)

    def _close_expired(self) -> None:
        self._sweep = None
        now = time.monotonic()
        earliest: float | None = None
        for key, peers in list(self._idle.items()):
            kept = []
            for peer in peers:
                if peer.idle_deadline <= now:
                    peer.discard()
                else:
                    kept.append(peer)
                    if earliest is None or peer.idle_deadline < earliest:
                        earliest = peer.idle_deadline
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if earliest is not None:
            self._arm_sweep(earliest)


def _new_client(stream: ByteStream) -> _Peer:
    return _Peer(
        stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEADERS)
    )


def _connection_tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


def _request_head(request: h11.Request) -> tuple[RequestHead, bool, bool]:
    """The client's head as the router sees it, whether it asks to upgrade, whether its body
    is chunked."""
    raw = [(n.decode("ascii"), v.decode("latin-1")) for n, v in request.headers]
    # h11 bounds only a head that arrives in pieces; Envoy bounds the headers' total size.
    if sum(len(n) + len(v) for n, v in raw) > MAX_REQUEST_HEADERS:
        raise _BadRequest(431)
    tokens: set[str] = set()
    has_upgrade = chunked = has_length = False
    host = ""
    for name, value in raw:
        if name == "connection":
            tokens |= _connection_tokens(value)
        elif name == "upgrade":
            has_upgrade = True
        elif name == "transfer-encoding":
            chunked = True  # h11 refuses any transfer-encoding but chunked (501)
        elif name == "content-length":
            has_length = True
        elif name == "host":
            host = value
    if chunked and has_length:
        # Envoy refuses both by default (http1 codec: "both 'Content-Length' and
        # 'Transfer-Encoding' are set", unless allow_chunked_length): request smuggling.
        raise _BadRequest
    upgrade = has_upgrade and "upgrade" in tokens
    drop = HOP_BY_HOP | tokens
    if upgrade:
        drop = drop - {"upgrade"}
    drop |= {"host"}
    headers = tuple((n, v) for n, v in raw if n not in drop)
    target = request.target.decode("latin-1")
    authority = host
    if not target.startswith("/") and "://" in target:
        # absolute-form (a proxy-style request): its authority wins over Host (RFC 9112 §3.2.2)
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        authority, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    method = request.method.decode("ascii")
    return RequestHead(method, target, authority, headers, HTTP1), upgrade, chunked


def _response_headers(
    headers: Iterable[tuple[bytes, bytes]], switching: bool
) -> list[tuple[str, str]]:
    raw = [(n.decode("ascii"), v.decode("latin-1")) for n, v in headers]
    tokens: set[str] = set()
    for name, value in raw:
        if name == "connection":
            tokens |= _connection_tokens(value)
    drop = HOP_BY_HOP | tokens
    if switching:
        drop = drop - {"upgrade"}
    out = [(n, v) for n, v in raw if n not in drop]
    if switching:
        out.append(("connection", "upgrade"))
    return out


class _Session:
    """One downstream connection."""

    def __init__(
        self, downstream: WatchedByteStream, dispatcher: Dispatcher, upstreams: Http1Upstreams
    ) -> None:
        self.downstream = downstream
        self.down = _Peer(
            downstream, h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEADERS)
        )
        self.dispatcher = dispatcher
        self.upstreams = upstreams
        self.pump_error: BaseException | None = None
        self.pump: asyncio.Task[None] | None = None  # the request body's, while it streams
        self.clock = RequestClock()  # the current request's
        self.upgrading = False  # the current request asks for an upgrade
        self.ended = False  # downstream finished by us (write_eof or abort)
        # From a request's end to its response's, the client's end is watched (nothing reads
        # the downstream then): Envoy takes a FIN as the client gone (no half-close on an HTTP
        # connection) and resets the request, DC. `serving`: a request is in `_request`;
        # `watching`: a watch is set (until `_unwatch`); `left`: it fired.
        self.task: asyncio.Task[object] | None = None
        self.serving = False
        self.watching = False
        self.left = False

    async def run(self, first: bytes) -> None:
        self.task = asyncio.current_task()
        down = self.down
        conn = down.conn
        if first:
            conn.receive_data(first)
        try:
            while True:
                try:
                    event = await down.next_event()
                except h11.RemoteProtocolError as error:
                    if not down.eof:
                        tally = RequestTally()
                        await self._refuse(error.error_status_hint, tally)
                        self.dispatcher.record(
                            RequestRecord(_EMPTY_HEAD, tally.status, tally.flags, 0.0, 0, 0)
                        )
                    return
                if type(event) is not h11.Request:
                    return  # ConnectionClosed: the client is done
                if not await self._request(event):
                    return
                if conn.our_state is not h11.DONE:
                    return  # MUST_CLOSE (the request said close, or HTTP/1.0)
                conn.start_next_cycle()
        except ConnectionError:
            self._end(abort=True)
        except asyncio.CancelledError:
            if not self.left or self._uncancel():
                raise  # a shutdown's (too)
            self._end(abort=True)  # the client left while its response was awaited
        finally:
            self._end(abort=False)

    def _end(self, *, abort: bool) -> None:
        if self.ended:
            return
        self.ended = True
        stream = self.down.stream
        with contextlib.suppress(ConnectionError, RuntimeError, h11.LocalProtocolError):
            if abort:
                stream.abort()
            else:
                self.down.flush()
                stream.write_eof()

    async def _refuse(self, status: int, tally: RequestTally) -> None:
        """Answer a malformed request as Envoy does (if no response began); the caller closes."""
        reply = bad_request_reply(status if status in (400, 413, 431, 501) else 400)
        tally.status, tally.flags = reply.status, reply.flags
        if self.down.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(ConnectionError):
                self.down.flush()
                self.down.stream.write(_raw_reply(reply, close=True))
                await self.down.stream.drain()

    async def _reply(self, reply: LocalReply, tally: RequestTally) -> None:
        """Send a LocalReply; the connection stays unless the request said close, or the client
        still waits for 100-continue (its body would come in the next request's place)."""
        conn = self.down.conn
        headers = [
            (n.encode("latin-1"), v.encode("latin-1"))
            for n, v in reply.headers
            if n.lower() not in ("content-length", "transfer-encoding", "connection")
        ]
        headers.append((b"content-length", str(len(reply.body)).encode()))
        if conn.they_are_waiting_for_100_continue:
            headers.append((b"connection", b"close"))
        self.down.send(h11.Response(status_code=reply.status, headers=headers))
        if reply.body:
            self.down.send(h11.Data(data=reply.body))
        self.down.send(h11.EndOfMessage())
        self.down.flush()
        tally.status = reply.status
        tally.flag(reply.flags)
        tally.response_bytes = len(reply.body)
        await self.down.stream.drain()

    async def _skip_body(self, tally: RequestTally) -> bool:
        """Read and drop the rest of a request body we answered without; False to close."""
        down = self.down
        while down.conn.their_state is h11.SEND_BODY:
            if down.conn.our_state is not h11.DONE:
                return False
            event = await down.next_event()
            if type(event) is h11.Data:
                tally.request_bytes += len(event.data)
        return down.conn.their_state is h11.DONE

    async def _request(self, request: h11.Request) -> bool:
        """Serve one request; False when the downstream connection must close."""
        start = time.monotonic()
        dispatcher = self.dispatcher
        tally = RequestTally()
        self.serving = True
        try:
            head, upgrade, chunked = _request_head(request)
        except _BadRequest as error:
            head = _EMPTY_HEAD
            await self._refuse(error.status, tally)
            dispatcher.record(RequestRecord(head, tally.status, tally.flags, 0.0, 0, 0))
            return False
        try:
            decision = dispatcher.route(head)
            if type(decision) is LocalReply:
                await self._reply(decision, tally)
                return await self._skip_body(tally)
            assert isinstance(decision, Forward)
            tally.route = decision.route
            fault = await delay_and_abort(decision, tally)
            if fault is not None:
                await self._reply(fault, tally)
                return await self._skip_body(tally)
            self.clock = clock = RequestClock()
            try:
                async with clock.after_request(decision.timeout):
                    return await self._forward(request, decision, upgrade, chunked, tally)
            except TimeoutError:
                return await self._timed_out(tally)
        except _DownstreamGone:
            if not tally.flags:
                tally.flag("DC")
            self._end(abort=True)
            return False
        except h11.RemoteProtocolError as error:
            if self.down.eof:
                tally.flag("DC")
                self._end(abort=True)
            else:
                await self._refuse(error.error_status_hint, tally)
            return False
        except ConnectionError:
            tally.flags = tally.flags or "DC"
            self._end(abort=True)
            return False
        except asyncio.CancelledError:
            if self.left:
                tally.flag("DC")  # its FIN or reset, while its response was awaited (run ends it)
            raise
        except h11.LocalProtocolError as error:
            # A head h11 will not write (a rewrite or header op with bytes HTTP forbids): the
            # route's fault, not the client's; this connection only ends.
            log.warning("waypoint: cannot send %s %s: %s", head.method, head.path, error)
            self._end(abort=True)
            return False
        finally:
            self.serving = False
            self._unwatch()
            dispatcher.record(tally.record(head, time.monotonic() - start))

    def _request_ended(self) -> None:
        """The client's end of stream was read: its timeouts start, and its end is watched.
        Not for an upgrade: Envoy takes an upgrade's request as not ended (no end of stream on
        its head), and its relay reads the client throughout."""
        if not self.upgrading:
            self.clock.request_ended()
            # Not once the exchange is over (a pump that ends after a local reply).
            if self.serving and not self.watching and not self.left:
                self.watching = True
                self.downstream.watch_end(self._client_left)

    def _client_left(self) -> None:
        """The client ended or reset while its response was awaited: end the exchange."""
        if self.watching and not self.left:
            self.left = True
            if self.task is not None:
                self.task.cancel()

    def _unwatch(self) -> None:
        if self.watching:
            self.watching = False
            self.downstream.watch_end(None)

    def _uncancel(self) -> int:
        """Take back this session's own cancel; what remains is someone else's."""
        task = asyncio.current_task()
        return task.uncancel() if task is not None else 0

    async def _timed_out(self, tally: RequestTally) -> bool:
        """A timeout fired: Envoy's 504 if no response began, else a reset."""
        tally.flag("UT")
        if self.down.conn.our_state is h11.SEND_RESPONSE:
            await self._reply(REQUEST_TIMEOUT, tally)
            if self.down.conn.their_state is h11.DONE:
                return True
        self._end(abort=True)
        return False

    async def _open(self, endpoint: Endpoint) -> tuple[_Peer, bool]:
        """An upstream connection for `endpoint` and whether it was reused; raises UpstreamError."""
        peer = self.upstreams._take(endpoint.key)
        if peer is not None:
            return peer, True
        stream = await self.dispatcher.open(endpoint, HTTP1)
        return _new_client(stream), False

    async def _forward(
        self,
        request: h11.Request,
        forward: Forward,
        upgrade: bool,
        chunked: bool,
        tally: RequestTally,
    ) -> bool:
        down = self.down
        dconn = down.conn
        self.pump_error = None
        # What is already buffered decides whether the body needs a pump task.
        first: object = dconn.next_event()
        kept: list[h11.Data] = []  # the body, kept to be sent again (retries, mirrors)
        complete = type(first) is h11.EndOfMessage
        if not complete and not upgrade and (forward.retry is not None or forward.mirror):
            first, complete = await self._keep_body(first, kept, tally)
            if not complete:
                tally.note = f"no retry or mirror: request body over {BODY_BUFFER_LIMIT} bytes"
        replayable = complete and not upgrade
        self.upgrading = upgrade
        if complete:
            self._request_ended()
        head = forward.head
        headers = [(b"host", head.authority.encode("latin-1"))] if head.authority else []
        headers.extend(
            (n.encode("latin-1"), v.encode("latin-1")) for n, v in head.headers if n != "expect"
        )
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        if upgrade:
            headers.append((b"connection", b"upgrade"))
        target = head.path.encode("latin-1")
        method = head.method.encode("ascii")
        up_request = h11.Request(method=method, target=target, headers=headers)
        streaming = None if complete else first

        async def try_once(endpoint: Endpoint, connected: Callable[[], None]) -> _Http1Attempt:
            return await self._try(endpoint, up_request, kept, streaming, tally, connected)

        if replayable and forward.mirror:
            self._mirror(forward, method, target, headers, kept)
        try:
            outcome = await run_tries(
                self.dispatcher, forward, tally, self.clock, try_once, replayable=replayable
            )
            if isinstance(outcome, LocalReply):
                await self._reply(outcome, tally)
                if self.pump is not None and not self.pump.done():
                    return False  # the rest of the body has nowhere to go
                return await self._skip_body(tally)
            assert isinstance(outcome, _Http1Attempt)
            try:
                return await self._respond(outcome, forward, tally)
            except BaseException:
                outcome.up.discard()  # cancelled, or a bug: never leave it open nor give it back
                raise
        finally:
            # Whatever ended the exchange (a local reply too): no pump outlives it.
            pump, self.pump = self.pump, None
            if pump is not None and not pump.done():
                pump.cancel()
                try:
                    await pump
                except asyncio.CancelledError:
                    if _cancelling():
                        raise  # this task's own (a shutdown, the client gone), not the pump's
                except Exception:
                    pass  # the pump's failure is already its pump_error

    async def _keep_body(
        self, event: object, kept: list[h11.Data], tally: RequestTally
    ) -> tuple[object, bool]:
        """Read the request body into `kept`, up to BODY_BUFFER_LIMIT; (the next unread event,
        whether the body is complete). Past the limit the rest will be streamed."""
        down = self.down
        if down.conn.they_are_waiting_for_100_continue:
            down.send(h11.InformationalResponse(status_code=100, headers=[]))
        size = 0
        while True:
            if event is h11.NEED_DATA:
                down.flush()
                await down.read()
            elif type(event) is h11.Data:
                assert isinstance(event, h11.Data)
                if size + len(event.data) > BODY_BUFFER_LIMIT:
                    return event, False
                size += len(event.data)
                tally.request_bytes += len(event.data)
                kept.append(event)
            elif type(event) is h11.EndOfMessage:
                return event, True
            else:
                return event, False  # PAUSED
            event = down.conn.next_event()

    async def _try(
        self,
        endpoint: Endpoint,
        up_request: h11.Request,
        kept: list[h11.Data],
        streaming: object,
        tally: RequestTally,
        connected: Callable[[], None],
    ) -> _Http1Attempt:
        """One try: a connection, the request and the kept body (then the rest of a streamed
        one), up to the response head; raises AttemptFailed."""
        event: h11.Event | type[h11.PAUSED] | None = None
        while True:
            try:
                up, reused = await self._open(endpoint)
            except UpstreamError as error:
                raise AttemptFailed(TryFailure.CONNECT_FAILURE, error.reply) from None
            connected()
            try:
                up.send(up_request)
                for piece in kept:
                    up.send(piece)
                if streaming is None:
                    up.send(h11.EndOfMessage())
                    if reused:  # a closed kept connection shows here, before any commitment
                        event = await up.next_event()
            except (ConnectionError, h11.RemoteProtocolError) as error:
                up.discard()
                if reused and streaming is None and (up.eof or isinstance(error, ConnectionError)):
                    continue  # a kept connection the upstream had closed: try a new one
                raise AttemptFailed(
                    TryFailure.RESET, _upstream_lost("connection termination", "UF")
                ) from None
            except BaseException:
                up.discard()
                raise
            break
        try:
            if streaming is not None:
                down = self.down
                if down.conn.they_are_waiting_for_100_continue:
                    down.send(h11.InformationalResponse(status_code=100, headers=[]))
                try:
                    complete = self._pump_buffered(up, streaming, tally)
                except h11.RemoteProtocolError:
                    up.discard()
                    raise
                if complete:
                    self._request_ended()
                else:
                    self.pump = asyncio.create_task(self._pump(up, tally))
            attempt = await self._await_head(up, event, tally)
            attempt.endpoint = endpoint
            return attempt
        except BaseException:
            up.discard()
            raise

    def _mirror(
        self,
        forward: Forward,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        kept: list[h11.Data],
    ) -> None:
        """Send copies of the request; their responses are read and dropped, apart from ours."""
        for endpoint, head in self.dispatcher.mirrors(forward):
            shadow = [(b"host", head.authority.encode("latin-1"))]
            shadow.extend((n, v) for n, v in headers if n != b"host")
            request = h11.Request(method=method, target=target, headers=shadow)
            self.upstreams.mirrors.spawn(self._shadow(endpoint, request, list(kept)))

    async def _shadow(self, endpoint: Endpoint, request: h11.Request, kept: list[h11.Data]) -> None:
        status = 0
        up: _Peer | None = None
        try:
            up, _ = await self._open(endpoint)
            up.send(request)
            for piece in kept:
                up.send(piece)
            up.send(h11.EndOfMessage())
            up.flush()
            while True:
                event = await up.next_event()
                if type(event) is h11.Response:
                    assert isinstance(event, h11.Response)
                    status = event.status_code
                elif type(event) is h11.EndOfMessage or type(event) is h11.ConnectionClosed:
                    break
            if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
                up.conn.start_next_cycle()
                self.upstreams._give(endpoint, up)
                up = None
        except (UpstreamError, ConnectionError, h11.ProtocolError) as error:
            log.debug("waypoint: mirror to %s: %s", endpoint.address, error)
        finally:
            if up is not None:
                up.discard()
            self.dispatcher.mirror_done(endpoint, status)

    def _pump_buffered(self, up: _Peer, event: object, tally: RequestTally) -> bool:
        """Forward the body events already buffered; True once the body is complete."""
        dconn = self.down.conn
        while True:
            if event is h11.NEED_DATA:
                return False
            if type(event) is h11.Data:
                tally.request_bytes += len(event.data)
                up.send(event)
            elif type(event) is h11.EndOfMessage:
                up.send(h11.EndOfMessage())
                return True
            else:
                return False  # PAUSED: nothing more to read until the upgrade is decided
            event = dconn.next_event()

    async def _pump(self, up: _Peer, tally: RequestTally) -> None:
        """Stream the rest of the request body upstream, with backpressure."""
        try:
            await _copy_body(self.down, up, tally, request=True)
            self._request_ended()
        except (ConnectionError, h11.RemoteProtocolError) as error:
            # The client failed mid-body: the upstream must not take a truncated request as
            # complete, so reset it; _respond sees the reason.
            self.pump_error = error
            up.discard()

    async def _await_head(
        self, up: _Peer, event: h11.Event | type[h11.PAUSED] | None, tally: RequestTally
    ) -> _Http1Attempt:
        """Read up to the response head (passing 1xx on); a lost upstream is AttemptFailed (the
        client can still get a 503), a client lost mid-body is _DownstreamGone."""
        down = self.down
        try:
            while True:
                if event is None:
                    down.flush()  # a 100 or 1xx of ours
                    event = await up.next_event()
                kind = type(event)
                if kind is h11.InformationalResponse:
                    assert isinstance(event, h11.InformationalResponse)
                    if event.status_code == 101:
                        return _Http1Attempt(up, event)
                    if event.status_code != 100:  # ours went already; others pass (103)
                        down.send(
                            h11.InformationalResponse(
                                status_code=event.status_code,
                                headers=_encode(_response_headers(event.headers, False)),
                            )
                        )
                    event = None
                    continue
                if kind is not h11.Response:
                    raise h11.RemoteProtocolError("upstream closed before a response")
                assert isinstance(event, h11.Response)
                return _Http1Attempt(up, event)
        except (ConnectionError, h11.RemoteProtocolError) as error:
            up.discard()
            pump_error = self.pump_error
            if pump_error is not None:
                if isinstance(pump_error, h11.RemoteProtocolError) and not down.eof:
                    raise pump_error from None
                raise _DownstreamGone from None
            if isinstance(error, h11.RemoteProtocolError) and not up.eof:
                reply = _upstream_lost("protocol error", "UPE")
            else:
                reply = _upstream_lost("connection termination", "UF")
            if down.conn.our_state is not h11.SEND_RESPONSE:
                # A 1xx went already: no 503 can follow it; end the exchange here.
                tally.status = reply.status
                tally.flag(reply.flags)
                raise _DownstreamGone from None
            raise AttemptFailed(TryFailure.RESET, reply) from None

    async def _respond(self, attempt: _Http1Attempt, forward: Forward, tally: RequestTally) -> bool:
        down = self.down
        up = attempt.up
        event = attempt.head
        if isinstance(event, h11.InformationalResponse):
            return await self._switch(up, event, forward, tally)
        headers = forward.response_headers.apply(tuple(_response_headers(event.headers, False)))
        down.send(
            h11.Response(
                status_code=event.status_code,
                headers=_encode(headers),
                reason=reason_phrase(event.status_code),
            )
        )
        tally.status = event.status_code
        # After the head: a failure either way resets the other side.
        try:
            await _copy_body(up, down, tally, request=False)
        except h11.RemoteProtocolError:
            tally.flag("UPE" if not up.eof else "UC")
            up.discard()
            self._end(abort=True)
            return False
        except ConnectionError:
            # Which side failed decides the flag; both are dropped.
            tally.flag("DC" if self.pump_error is not None else "UC")
            up.discard()
            self._end(abort=True)
            return False

        pump = self.pump
        request_complete = pump is None or pump.done()
        if request_complete and self.pump_error is None:
            if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
                up.conn.start_next_cycle()
                endpoint = attempt.endpoint
                assert endpoint is not None
                self.upstreams._give(endpoint, up)
            else:
                up.discard()
            return True
        # The upstream answered before the request ended: neither connection can go on.
        up.discard()
        return False

    async def _switch(
        self, up: _Peer, event: h11.InformationalResponse, forward: Forward, tally: RequestTally
    ) -> bool:
        """101: relay both ways as opaque bytes until both ends close."""
        down = self.down
        headers = forward.response_headers.apply(tuple(_response_headers(event.headers, True)))
        down.send(
            h11.InformationalResponse(
                status_code=101, headers=_encode(headers), reason=reason_phrase(event.status_code)
            )
        )
        tally.status = 101
        if down.conn.our_state is not h11.SWITCHED_PROTOCOL:
            # h11 refused the switch (the client never asked): nothing sane remains.
            up.discard()
            self._end(abort=True)
            return False
        down.flush()
        down_rest, _ = down.conn.trailing_data
        up_rest, _ = up.conn.trailing_data
        self.ended = up.closed = True  # the relay ends both streams itself
        upward = asyncio.create_task(_relay(down.stream, down_rest, up.stream))
        try:
            try:
                tally.response_bytes = await _relay(up.stream, up_rest, down.stream)
            except ConnectionError:
                tally.flag("UC")
                upward.cancel()
            try:
                tally.request_bytes = await upward
            except ConnectionError:
                tally.flags = tally.flags or "DC"
            except asyncio.CancelledError:
                if _cancelling():
                    raise  # this task's own (a shutdown), not the upward relay's
                tally.flags = tally.flags or "DC"
        except BaseException:
            # Cancelled (a shutdown): the relays own both streams (nothing else ends them).
            upward.cancel()
            for stream in (up.stream, down.stream):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    stream.abort()
            raise
        return False


async def _copy_body(source: _Peer, sink: _Peer, tally: RequestTally, *, request: bool) -> None:
    """Stream one message body (h11 reframes it for the sink). Whatever one read brought
    leaves in one flush; the sink is drained before the next read (the backpressure)."""
    conn = source.conn
    while True:
        event = conn.next_event()
        kind = type(event)
        if kind is h11.Data:
            assert isinstance(event, h11.Data)
            if request:
                tally.request_bytes += len(event.data)
            else:
                tally.response_bytes += len(event.data)
            sink.send(event)
        elif event is h11.NEED_DATA:
            sink.flush()
            await sink.stream.drain()
            source.flush()
            await source.read()
        elif kind is h11.EndOfMessage:
            sink.send(h11.EndOfMessage())  # trailers dropped: either side may be content-length
            sink.flush()
            return
        else:
            raise h11.RemoteProtocolError("the message ended inside its body")


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _relay(source: ByteStream, rest: bytes, sink: ByteStream) -> int:
    """Copy `source` to `sink` until its end, then half-close `sink`; a failure resets both."""
    count = 0
    try:
        data = rest
        while True:
            if data:
                count += len(data)
                sink.write(data)
                await sink.drain()
            data = await source.read()
            if not data:
                sink.write_eof()
                return count
    except ConnectionError:
        source.abort()
        sink.abort()
        raise


def _encode(
    headers: tuple[tuple[str, str], ...] | list[tuple[str, str]],
) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]


def _raw_reply(reply: LocalReply, *, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {reply.status} {reason_phrase(reply.status)}"]
    lines.append(f"content-length: {len(reply.body)}")
    lines.extend(f"{n}: {v}" for n, v in reply.headers)
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body


async def serve_http1(
    downstream: WatchedByteStream,
    first: bytes,
    dispatcher: Dispatcher,
    upstreams: Http1Upstreams,
) -> None:
    """Serve HTTP/1.x requests from `downstream` until it ends; `first` is what sniffing read.

    Returns when the client is done or the connection had to close; `downstream` is then
    half-closed (or reset after a failure): closing it remains the caller's."""
    await _Session(downstream, dispatcher, upstreams).run(first)
