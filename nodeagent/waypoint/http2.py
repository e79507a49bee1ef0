"""The waypoint's HTTP/2 codec: h2 server to the client, h2 clients to the endpoints.

`serve_http2` terminates one downstream HTTP/2 connection (prior knowledge: the
caller has read the preface). Each stream is one request, routed and balanced on
its own through the `Dispatcher`, and carried on a stream of a client connection
that `Http2Upstreams` shares between every request (of every downstream session)
to the same `Endpoint.key`.

Flow control is end to end: a DATA frame is acknowledged to its sender only once
its bytes were written to the other side and drained, so a slow reader slows
its writer instead of filling our memory. Trailers (gRPC's status) and
RST_STREAM travel both ways.

Frames made in one event-loop turn (window updates, headers of many streams)
leave in one write (`_Wire.flush_soon`); DATA leaves in batches of whatever
was queued before waiting for the transport to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Hashable, Iterable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

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
    HTTP2,
    UPSTREAM_IDLE_TIMEOUT,
    ByteStream,
    Dispatcher,
    Endpoint,
    Forward,
    LocalReply,
    RequestHead,
    RequestTally,
    UpstreamError,
)

__all__ = ["PREFACE", "Http2Upstreams", "serve_http2"]

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Receive windows: h2's default of 64 KiB per stream caps a stream at 64 KiB per
# round trip; 1 MiB lets a few MiB body flow at loopback speed. What we buffer
# is bounded by these (data is acknowledged only once forwarded).
STREAM_WINDOW = 1 << 20
# A client's connection window bounds what one client makes us hold. An upstream
# connection is shared by many clients: a finite connection window there would let
# a few slow clients (each holding a stream window of unforwarded data) stall
# everyone's responses, so only the stream windows bound it (as Envoy's defaults do).
DOWNSTREAM_CONNECTION_WINDOW = 1 << 24
UPSTREAM_CONNECTION_WINDOW = 2**31 - 1
MAX_CONCURRENT_STREAMS = 256
MAX_HEADER_LIST_SIZE = 1 << 16
MAX_STREAM_ID = 2**31 - 1

# Connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2); `host` is carried by
# :authority (and h2 refuses a host that disagrees with a rewritten authority).
_DROP_OUTBOUND = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}
)

# Envoy's body for a 503 before any response head (`UF`, `UC`, `UR`).
_UPSTREAM_RESET_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: "


# Flags of an exchange that ended in trouble: its upstream stream is reset, not finished.
_TROUBLE = frozenset({"DC", "DR", "UC", "UR", "UT", "UPE"})


def _text(raw: bytes) -> str:
    # surrogateescape: any header byte survives the trip through str and back.
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname in _DROP_OUTBOUND or (lname == "te" and value.lower() != "trailers"):
            continue
        out.append((_raw(lname), _raw(value)))
    return out


def _decode(headers: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    return tuple((_text(n), _text(v)) for n, v in headers if not n.startswith(b":"))


def request_head(headers: Sequence[tuple[bytes, bytes]]) -> RequestHead:
    """The head of an HTTP/2 request from its header block (h2 has validated it)."""
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[str, str]] = []
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        else:
            regular.append((_text(name), _text(value)))
    authority = _text(pseudo.get(b":authority", b""))
    if not authority:
        authority = next((v for k, v in regular if k == "host"), "")
    return RequestHead(
        method=_text(pseudo.get(b":method", b"")),
        path=_text(pseudo.get(b":path", b"")),
        authority=authority,
        headers=tuple(regular),
        protocol=HTTP2,
        scheme=_text(pseudo.get(b":scheme", b"http")),
    )


def _request_headers(head: RequestHead) -> list[tuple[bytes, bytes]]:
    out = [(b":method", _raw(head.method))]
    if head.method != "CONNECT":  # CONNECT carries only :method and :authority (RFC 9113 8.5)
        out += [(b":scheme", _raw(head.scheme)), (b":path", _raw(head.path))]
    out.append((b":authority", _raw(head.authority)))
    out += _encode(head.headers)
    return out


def _settings(client: bool) -> h2.settings.Settings:
    # Replacing local_settings before initiate_connection is how h2 itself sets its
    # defaults (H2Connection.__init__); the SETTINGS frame then advertises these.
    return h2.settings.Settings(
        client=client,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )


def _new_connection(client: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client, header_encoding=None)
    )
    conn.local_settings = _settings(client)
    conn.initiate_connection()
    window = UPSTREAM_CONNECTION_WINDOW if client else DOWNSTREAM_CONNECTION_WINDOW
    conn.increment_flow_control_window(window - 65535)
    return conn


class _Wire:
    """One h2 connection over a ByteStream: batched writes, waits for send windows."""

    __slots__ = ("_flush_pending", "_loop", "_window", "closed", "conn", "stream")

    def __init__(self, stream: ByteStream, conn: h2.connection.H2Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.closed = False
        self._flush_pending = False
        self._window = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def flush_soon(self) -> None:
        """Write what h2 has queued at the end of this loop turn (one write for many frames)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.stream.write(data)
            except (ConnectionError, RuntimeError):
                self.close()

    def window_opened(self) -> None:
        """Wake every sender waiting for flow-control credit (or for the end)."""
        self._window.set()
        self._window = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self.window_opened()

    def queue_data(self, sid: int, data: bytes | memoryview, end_stream: bool) -> int:
        """Queue as much of `data` as the windows allow; the count of bytes queued."""
        view = memoryview(data)
        window = min(self.conn.local_flow_control_window(sid), len(view))
        frame = self.conn.max_outbound_frame_size
        sent = 0
        while sent < window:
            n = min(frame, window - sent)
            last = sent + n == len(view)
            self.conn.send_data(sid, view[sent : sent + n], end_stream=end_stream and last)
            sent += n
        if not view and end_stream:
            self.conn.send_data(sid, b"", end_stream=True)
        return sent

    async def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """Send all of `data`, waiting for window credit; the caller drains."""
        sent = self.queue_data(sid, data, end_stream)
        while sent < len(data):
            if self.closed:
                raise ConnectionError("HTTP/2 connection closed")
            waiter = self._window
            # Whatever is queued must leave before the peer can grant more credit.
            self.flush()
            await waiter.wait()
            sent += self.queue_data(sid, memoryview(data)[sent:], end_stream)

    async def drain(self) -> None:
        self.flush()
        if self.closed:
            raise ConnectionError("HTTP/2 connection closed")
        await self.stream.drain()

    def reset(self, sid: int, code: int) -> None:
        # The stream may be closed already (the peer reset it, or both ends ended).
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.reset_stream(sid, code)
            self.flush_soon()

    def ack(self, sid: int, size: int) -> None:
        """Give `size` bytes of credit back (the stream's too, while it is open)."""
        if size and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.acknowledge_received_data(size, sid)
                self.flush_soon()


# What a stream's queue carries: h2's events for it, None when the connection is gone.
_Item = h2.events.Event | None


class _UpstreamStream:
    """One request's stream on a shared upstream connection."""

    __slots__ = ("connection", "ended", "events", "sid")

    def __init__(self, connection: _UpstreamConnection, sid: int, ended: bool) -> None:
        self.connection = connection
        self.sid = sid
        self.ended = ended  # our side (the request) has ended
        self.events: asyncio.Queue[_Item] = asyncio.Queue()

    def release(self, code: ErrorCodes | None) -> None:
        """Done with the stream: reset it with `code` unless it finished (None)."""
        conn = self.connection
        if code is not None and not conn.wire.closed:
            conn.wire.reset(self.sid, code)
        conn.release(self.sid, self.events)


class _UpstreamConnection:
    """An h2 client connection to one endpoint, multiplexing requests of all sessions."""

    def __init__(
        self,
        stream: ByteStream,
        max_stream_id: int,
        idle_timeout: float,
        max_requests: int | None = None,
    ) -> None:
        self.wire = _Wire(stream, _new_connection(client=True))
        self.max_requests = max_requests  # maxRequestsPerConnection; None: no limit
        self.started = 0
        self.streams: dict[int, asyncio.Queue[_Item]] = {}
        self.goaway = False
        self._max_stream_id = max_stream_id
        self._idle_timeout = idle_timeout
        self._idle: asyncio.TimerHandle | None = None
        self._slot = asyncio.Event()
        self.wire.flush()
        self.reader = asyncio.get_running_loop().create_task(self._read())
        self._arm_idle()

    def _arm_idle(self) -> None:
        # An endpoint that left the mesh must not keep its connection forever.
        self._idle = asyncio.get_running_loop().call_later(self._idle_timeout, self._idle_close)

    def _idle_close(self) -> None:
        if not self.streams:
            self.shutdown()

    @property
    def usable(self) -> bool:
        """Takes new streams: alive, no GOAWAY, stream ids left."""
        last = self.wire.conn.highest_outbound_stream_id or 0
        if self.max_requests is not None and self.started >= self.max_requests:
            return False
        return not (self.wire.closed or self.goaway) and last + 2 <= self._max_stream_id

    async def start(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> _UpstreamStream:
        conn = self.wire.conn
        # Wait for a slot under the server's SETTINGS_MAX_CONCURRENT_STREAMS.
        while conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams:
            if not self.usable:
                raise ConnectionError("upstream connection closing")
            slot = self._slot
            await slot.wait()
        if not self.usable:
            raise ConnectionError("upstream connection closing")
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers, end_stream=end_stream)
        self.started += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        up = _UpstreamStream(self, sid, end_stream)
        self.streams[sid] = up.events
        self.wire.flush_soon()
        return up

    def release(self, sid: int, events: asyncio.Queue[_Item]) -> None:
        self.streams.pop(sid, None)
        # Data the request never took still counts against the connection window.
        while not events.empty():
            self.wire.ack(sid, _credit([events.get_nowait()]))
        self._free_slot()
        if not self.streams:
            if self.usable:
                self._arm_idle()
            else:
                self.shutdown()

    def _free_slot(self) -> None:
        self._slot.set()
        self._slot = asyncio.Event()

    def shutdown(self) -> None:
        """Close gracefully: GOAWAY, then our end of the stream; the reader sees the peer's."""
        if not self.wire.closed:
            self.wire.conn.close_connection()
            self.wire.flush()
            with contextlib.suppress(Exception):
                self.wire.stream.write_eof()
        self.goaway = True

    def close(self) -> None:
        if not self.reader.done():
            self.reader.cancel()

    async def _read(self) -> None:
        wire = self.wire
        try:
            while True:
                data = await wire.stream.read()
                if not data:
                    break
                try:
                    events = wire.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.debug("upstream HTTP/2 protocol error: %s", exc)
                    wire.flush()  # h2 queued the GOAWAY
                    break
                for event in events:
                    self._on_event(event)
                wire.flush()
        except (ConnectionError, OSError) as exc:
            log.debug("upstream HTTP/2 connection lost: %s", exc)
        finally:
            self._closed()

    def _closed(self) -> None:
        self.wire.close()
        for events in self.streams.values():
            events.put_nowait(None)
        self.streams.clear()
        self._free_slot()
        if self._idle is not None:
            self._idle.cancel()
        with contextlib.suppress(Exception):
            self.wire.stream.abort()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            # Streams above last_stream_id were never processed; ours stay until done.
            self.goaway = True
            last = event.last_stream_id or 0
            for sid in [s for s in self.streams if s > last]:
                self.streams.pop(sid).put_nowait(None)
            self._free_slot()
            if not self.streams:
                self.shutdown()
            return
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.wire.window_opened()
            self._free_slot()
            return
        stream_id: int | None = getattr(event, "stream_id", None)
        if stream_id is None:
            return
        events = self.streams.get(stream_id)
        if events is not None:
            events.put_nowait(event)
        elif isinstance(event, h2.events.DataReceived):
            self.wire.ack(stream_id, event.flow_controlled_length or 0)


class Http2Upstreams:
    """HTTP/2 client connections to endpoints: one per `Endpoint.key`, shared by the
    concurrent requests of every downstream session, replaced when it dies, gets a
    GOAWAY or runs out of stream ids. `aclose` when the waypoint stops."""

    def __init__(
        self, *, max_stream_id: int = MAX_STREAM_ID, idle_timeout: float = UPSTREAM_IDLE_TIMEOUT
    ) -> None:
        self._max_stream_id = max_stream_id
        self._idle_timeout = idle_timeout
        self._connections: dict[Hashable, _UpstreamConnection] = {}
        self._opening: dict[Hashable, asyncio.Task[_UpstreamConnection]] = {}
        self._retired: set[_UpstreamConnection] = set()
        self.mirrors = MirrorTasks()

    def connection_count(self) -> int:
        """Live connections (in use, or draining after a GOAWAY / the last stream id)."""
        return sum(1 for c in self._all() if not c.wire.closed)

    def _all(self) -> list[_UpstreamConnection]:
        return [*self._connections.values(), *self._retired]

    async def start(
        self,
        dispatcher: Dispatcher,
        endpoint: Endpoint,
        headers: list[tuple[bytes, bytes]],
        end_stream: bool,
    ) -> _UpstreamStream:
        """A new stream to `endpoint` with the request's headers sent; raises UpstreamError
        or OSError (ConnectionError) when no connection can be had."""
        for _ in range(2):  # a connection may die between pick and stream
            connection = await self._connection(dispatcher, endpoint)
            try:
                return await connection.start(headers, end_stream)
            except (ConnectionError, h2.exceptions.NoAvailableStreamIDError):
                continue
        raise ConnectionError("upstream HTTP/2 connection lost before the request")

    async def _connection(self, dispatcher: Dispatcher, endpoint: Endpoint) -> _UpstreamConnection:
        key = endpoint.key
        current = self._connections.get(key)
        if current is not None and current.usable:
            return current
        task = self._opening.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(dispatcher, endpoint))
            self._opening[key] = task
            task.add_done_callback(lambda t: self._opened(key, t))
        # shield: one waiter giving up must not cancel the others' connection.
        return await asyncio.shield(task)

    async def _open(self, dispatcher: Dispatcher, endpoint: Endpoint) -> _UpstreamConnection:
        stream = await dispatcher.open(endpoint, HTTP2)
        connection = _UpstreamConnection(
            stream,
            self._max_stream_id,
            endpoint.idle_timeout if endpoint.idle_timeout is not None else self._idle_timeout,
            endpoint.max_requests,
        )
        old = self._connections.get(endpoint.key)
        if old is not None:
            # It finishes its streams, then closes (release/close).
            self._retired.add(old)
            old.reader.add_done_callback(lambda _: self._retired.discard(old))
        self._connections[endpoint.key] = connection
        connection.reader.add_done_callback(lambda _: self._dropped(endpoint.key, connection))
        return connection

    def _opened(self, key: Hashable, task: asyncio.Task[_UpstreamConnection]) -> None:
        if self._opening.get(key) is task:
            del self._opening[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter saw it already

    def _dropped(self, key: Hashable, connection: _UpstreamConnection) -> None:
        if self._connections.get(key) is connection:
            del self._connections[key]

    async def aclose(self) -> None:
        tasks: list[asyncio.Task[object]] = list(self.mirrors.cancel())  # type: ignore[arg-type]
        for task in list(self._opening.values()):
            task.cancel()
            tasks.append(task)  # type: ignore[arg-type]
        for connection in self._all():
            connection.close()
            tasks.append(connection.reader)  # type: ignore[arg-type]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._connections.clear()
        self._retired.clear()


class _Exchange(RequestTally):
    """One downstream stream: the request's events and what the record needs."""

    __slots__ = (
        "client_reset",
        "clock",
        "events",
        "has_body",
        "head",
        "leftover",
        "pump",
        "response_ended",
        "sid",
        "start",
        "task",
        "upstream",
    )

    def __init__(self, sid: int, head: RequestHead, request_ended: bool, start: float) -> None:
        super().__init__()
        self.sid = sid
        self.head = head
        self.start = start
        self.events: asyncio.Queue[_Item] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.has_body = not request_ended  # fixed at the head; the clock follows events
        self.clock = RequestClock()
        if request_ended:
            self.clock.request_ended()
        self.response_ended = False
        self.client_reset = False
        self.leftover: _Item = None  # a body event taken but not kept (past the buffer limit)
        self.pump: asyncio.Task[None] | None = None
        self.upstream: _UpstreamStream | None = None  # the try whose response is sent


class _Session:
    """One downstream HTTP/2 connection."""

    def __init__(
        self, downstream: ByteStream, dispatcher: Dispatcher, upstreams: Http2Upstreams
    ) -> None:
        self.wire = _Wire(downstream, _new_connection(client=False))
        self.dispatcher = dispatcher
        self.upstreams = upstreams
        self.exchanges: dict[int, _Exchange] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()

    async def run(self, first: bytes) -> None:
        wire = self.wire
        data = first
        try:
            while True:
                if data:
                    try:
                        events = wire.conn.receive_data(data)
                    except h2.exceptions.ProtocolError as exc:
                        # h2 has queued the GOAWAY with the error code (RFC 9113 5.4.1).
                        log.debug("downstream HTTP/2 protocol error: %s", exc)
                        break
                    for event in events:
                        self._on_event(event)
                    wire.flush()
                data = await wire.stream.read()
                if not data:
                    break
        except (ConnectionError, OSError) as exc:
            log.debug("downstream HTTP/2 connection lost: %s", exc)
        finally:
            wire.flush()
            wire.close()
            for task in self.tasks:
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                wire.stream.write_eof()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(_settled)
        task.add_done_callback(self.tasks.discard)
        return task

    def _on_event(self, event: h2.events.Event) -> None:
        exchange: _Exchange | None
        if isinstance(event, h2.events.RequestReceived):
            sid = event.stream_id
            head = request_head(event.headers or [])
            exchange = _Exchange(sid, head, bool(event.stream_ended), self.loop.time())
            self.exchanges[sid] = exchange
            exchange.task = self._spawn(self._exchange(exchange))
        elif isinstance(
            event, h2.events.DataReceived | h2.events.TrailersReceived | h2.events.StreamEnded
        ):
            exchange = self.exchanges.get(event.stream_id or 0)
            if exchange is None:
                if isinstance(event, h2.events.DataReceived):
                    self.wire.ack(event.stream_id or 0, event.flow_controlled_length or 0)
                return
            if isinstance(event, h2.events.StreamEnded):
                exchange.clock.request_ended()
            exchange.events.put_nowait(event)
        elif isinstance(event, h2.events.StreamReset):
            exchange = self.exchanges.get(event.stream_id or 0)
            if exchange is not None and exchange.task is not None:
                exchange.client_reset = True
                exchange.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.wire.window_opened()

    async def _exchange(self, ex: _Exchange) -> None:
        try:
            decision = self.dispatcher.route(ex.head)
            if isinstance(decision, LocalReply):
                await self._reply(ex, decision)
                return
            ex.route = decision.route
            fault = await delay_and_abort(decision, ex)
            if fault is not None:
                await self._reply(ex, fault)
                return
            try:
                async with ex.clock.after_request(decision.timeout):
                    await self._forward(ex, decision)
            except TimeoutError:
                ex.flag("UT")
                if not ex.status:
                    await self._reply(ex, REQUEST_TIMEOUT)
                else:
                    ex.response_ended = False  # _finish resets the client's stream
        except asyncio.CancelledError:
            if not ex.flags:
                ex.flags = "DR" if ex.client_reset else "DC"
            raise
        except (ConnectionError, OSError, h2.exceptions.ProtocolError) as exc:
            log.debug("HTTP/2 stream %d: %s", ex.sid, exc)
            ex.flags = ex.flags or "DC"
        except Exception:
            log.exception("HTTP/2 stream %d failed", ex.sid)
        finally:
            if ex.pump is not None:
                ex.pump.cancel()
            self._finish(ex, ex.upstream)

    async def _forward(self, ex: _Exchange, decision: Forward) -> None:
        kept: list[h2.events.Event] = []  # the body (DATA, trailers), kept to be sent again
        complete = not ex.has_body
        if ex.has_body and (decision.retry is not None or decision.mirror):
            complete = await self._keep_body(ex, kept)
            if not complete:
                ex.note = f"no retry or mirror: request body over {BODY_BUFFER_LIMIT} bytes"
        headers = _request_headers(decision.head)

        async def try_once(endpoint: Endpoint, connected: Callable[[], None]) -> _Http2Attempt:
            return await self._try(ex, endpoint, headers, kept, complete, connected)

        if complete and decision.mirror:
            for endpoint, head in self.dispatcher.mirrors(decision):
                self.upstreams.mirrors.spawn(self._shadow(endpoint, _request_headers(head), kept))

        outcome = await run_tries(
            self.dispatcher, decision, ex, ex.clock, try_once, replayable=complete
        )
        if isinstance(outcome, LocalReply):
            await self._reply(ex, outcome)
            return
        assert isinstance(outcome, _Http2Attempt)
        ex.upstream = outcome.upstream
        await self._pump_response(ex, outcome.upstream, decision, outcome.rest)

    async def _keep_body(self, ex: _Exchange, kept: list[h2.events.Event]) -> bool:
        """Take the request body into `kept` up to BODY_BUFFER_LIMIT (acknowledged: it is ours
        to hold); False past it, the first event not kept left in `ex.leftover`."""
        size = 0
        while True:
            event = await ex.events.get()
            if event is None:
                raise ConnectionError("client stream ended")
            if isinstance(event, h2.events.DataReceived):
                data = event.data or b""
                if size + len(data) > BODY_BUFFER_LIMIT:
                    ex.leftover = event
                    return False
                size += len(data)
                ex.request_bytes += len(data)
                self.wire.ack(ex.sid, _credit([event]))
            kept.append(event)
            if isinstance(event, h2.events.StreamEnded):
                return True

    async def _try(
        self,
        ex: _Exchange,
        endpoint: Endpoint,
        headers: list[tuple[bytes, bytes]],
        kept: list[h2.events.Event],
        complete: bool,
        connected: Callable[[], None],
    ) -> _Http2Attempt:
        """One try: a stream, the request and the kept body (then the rest of a streamed one),
        up to the response head; raises AttemptFailed."""
        try:
            upstream = await self.upstreams.start(
                self.dispatcher, endpoint, headers, not ex.has_body
            )
        except UpstreamError as exc:
            raise AttemptFailed(TryFailure.CONNECT_FAILURE, exc.reply) from None
        except (OSError, h2.exceptions.ProtocolError) as exc:
            log.debug("upstream %s: %s", endpoint.address, exc)
            raise AttemptFailed(
                TryFailure.CONNECT_FAILURE, _reset_reply("UF", "connection failure")
            ) from None
        connected()
        try:
            if kept:
                await _send_kept(upstream, kept)
            if not complete:
                ex.pump = self._spawn(self._pump_request(ex, upstream))
            return await self._await_head(ex, upstream)
        except BaseException:
            upstream.release(ErrorCodes.CANCEL)
            raise

    async def _await_head(self, ex: _Exchange, upstream: _UpstreamStream) -> _Http2Attempt:
        """The endpoint's events up to its response head (1xx passed on to the client)."""
        while True:
            batch = await _batch(upstream.events)
            for i, event in enumerate(batch):
                if event is None or isinstance(event, h2.events.StreamReset):
                    upstream.connection.wire.ack(upstream.sid, _credit(batch))
                    upstream.release(ErrorCodes.CANCEL)
                    if event is None:
                        reply, failure = (
                            _reset_reply("UC", "connection termination"),
                            TryFailure.RESET,
                        )
                    elif event.error_code == ErrorCodes.REFUSED_STREAM:
                        reply, failure = (
                            _reset_reply("UR", "remote refused stream reset"),
                            TryFailure.REFUSED_STREAM,
                        )
                    else:
                        reply, failure = _reset_reply("UR", "remote reset"), TryFailure.RESET
                    raise AttemptFailed(failure, reply)
                if isinstance(event, h2.events.InformationalResponseReceived):
                    self.wire.conn.send_headers(ex.sid, list(event.headers or []))
                    self.wire.flush_soon()
                elif isinstance(event, h2.events.ResponseReceived):
                    return _Http2Attempt(upstream, batch[i:])

    async def _shadow(
        self, endpoint: Endpoint, headers: list[tuple[bytes, bytes]], kept: list[h2.events.Event]
    ) -> None:
        """A mirror copy: sent like a try, its response read and dropped."""
        status = 0
        upstream: _UpstreamStream | None = None
        try:
            upstream = await self.upstreams.start(self.dispatcher, endpoint, headers, not kept)
            if kept:
                await _send_kept(upstream, kept)
            while True:
                batch = await _batch(upstream.events)
                upstream.connection.wire.ack(upstream.sid, _credit(batch))
                for event in batch:
                    if event is None or isinstance(event, h2.events.StreamReset):
                        return
                    if isinstance(event, h2.events.ResponseReceived):
                        raw = event.headers or []
                        status = int(next((v for n, v in raw if n == b":status"), b"0"))
                    if isinstance(event, h2.events.StreamEnded):
                        upstream.release(None)
                        upstream = None
                        return
        except (UpstreamError, OSError, h2.exceptions.ProtocolError) as exc:
            log.debug("waypoint: mirror to %s: %s", endpoint.address, exc)
        finally:
            if upstream is not None:
                upstream.release(ErrorCodes.CANCEL)
            self.dispatcher.mirror_done(endpoint, status)

    def _finish(self, ex: _Exchange, upstream: _UpstreamStream | None) -> None:
        del self.exchanges[ex.sid]
        if upstream is not None:
            done = (
                ex.response_ended
                and upstream.ended
                and not _TROUBLE.intersection(ex.flags.split(","))
            )
            upstream.release(None if done else ErrorCodes.CANCEL)
        if not ex.client_reset and not self.wire.closed:
            if not ex.response_ended:
                self.wire.reset(ex.sid, ErrorCodes.INTERNAL_ERROR)
            elif not ex.clock.ended:
                # We answered before the body ended: stop the client sending (RFC 9113 8.1).
                self.wire.reset(ex.sid, ErrorCodes.NO_ERROR)
        while not ex.events.empty():
            self.wire.ack(ex.sid, _credit([ex.events.get_nowait()]))
        self.dispatcher.record(ex.record(ex.head, self.loop.time() - ex.start))

    async def _reply(self, ex: _Exchange, reply: LocalReply) -> None:
        headers = [(b":status", str(reply.status).encode())]
        headers += _encode(reply.headers)
        body = b"" if ex.head.method == "HEAD" else reply.body
        if reply.body and not any(n.lower() == "content-length" for n, _ in reply.headers):
            headers.append((b"content-length", str(len(reply.body)).encode()))
        ex.status = reply.status
        ex.flag(reply.flags)
        self.wire.conn.send_headers(ex.sid, headers, end_stream=not body)
        if body:
            await self.wire.send_data(ex.sid, body, end_stream=True)
            await self.wire.drain()
            ex.response_bytes = len(body)
        else:
            self.wire.flush_soon()
        ex.response_ended = True

    async def _pump_request(self, ex: _Exchange, upstream: _UpstreamStream) -> None:
        """Client to endpoint: DATA (acknowledged once drained upstream), trailers, end."""
        up = upstream.connection.wire
        while True:
            batch: list[_Item]
            if ex.leftover is not None:
                batch, ex.leftover = [ex.leftover], None
            else:
                batch = await _batch(ex.events)
            try:
                for event in batch:
                    if isinstance(event, h2.events.DataReceived):
                        data = event.data or b""
                        await up.send_data(upstream.sid, data)
                        ex.request_bytes += len(data)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = _encode(_decode(event.headers or []))
                        up.conn.send_headers(upstream.sid, trailers, end_stream=True)
                        upstream.ended = True
                    elif isinstance(event, h2.events.StreamEnded):
                        if not upstream.ended:
                            up.conn.send_data(upstream.sid, b"", end_stream=True)
                            upstream.ended = True
                        up.flush_soon()
                        return
                await up.drain()
            finally:
                # Also when cancelled or failed: credit taken and never returned would
                # shrink the client's connection window for good.
                self.wire.ack(ex.sid, _credit(batch))

    async def _pump_response(
        self, ex: _Exchange, upstream: _UpstreamStream, fwd: Forward, first: list[_Item]
    ) -> None:
        """Endpoint to client: head (with the route's header changes), DATA, trailers."""
        batch = first
        while not ex.response_ended:
            if not batch:
                batch = await _batch(upstream.events)
            try:
                await self._respond(ex, fwd, batch)
            finally:
                # Also when cancelled or failed (see _pump_request).
                upstream.connection.wire.ack(upstream.sid, _credit(batch))
            batch = []

    async def _respond(self, ex: _Exchange, fwd: Forward, batch: list[_Item]) -> None:
        """Pass one batch of the endpoint's events on to the client, then drain."""
        down = self.wire
        for event in batch:
            if event is None or isinstance(event, h2.events.StreamReset):
                flags, reason = (
                    ("UC", "connection termination") if event is None else ("UR", "remote reset")
                )
                if not ex.status:  # no response head yet: Envoy's 503
                    await self._reply(ex, _reset_reply(flags, reason))
                    return
                ex.flag(flags)
                code = event.error_code if event is not None else None
                down.reset(ex.sid, code or ErrorCodes.INTERNAL_ERROR)
                ex.response_ended = True  # nothing more to send: reset already
                return
            if isinstance(event, h2.events.InformationalResponseReceived):
                down.conn.send_headers(ex.sid, list(event.headers or []))
            elif isinstance(event, h2.events.ResponseReceived):
                raw = event.headers or []
                status = next((v for n, v in raw if n == b":status"), b"0")
                ex.status = int(status)
                headers = [(b":status", status)]
                headers += _encode(fwd.response_headers.apply(_decode(raw)))
                # A trailers-only response (gRPC errors) must end with its HEADERS:
                # gRPC clients refuse an empty DATA frame after it.
                down.conn.send_headers(ex.sid, headers, end_stream=bool(event.stream_ended))
                ex.response_ended = bool(event.stream_ended)
            elif isinstance(event, h2.events.DataReceived):
                data = event.data or b""
                await down.send_data(ex.sid, data)
                ex.response_bytes += len(data)
            elif isinstance(event, h2.events.TrailersReceived):
                down.conn.send_headers(ex.sid, list(event.headers or []), end_stream=True)
                ex.response_ended = True
            elif isinstance(event, h2.events.StreamEnded):
                if not ex.response_ended:
                    down.conn.send_data(ex.sid, b"", end_stream=True)
                ex.response_ended = True
        await down.drain()


class _Http2Attempt:
    """A try that got its response head: the stream and its events from the head on."""

    __slots__ = ("rest", "upstream")

    def __init__(self, upstream: _UpstreamStream, rest: list[_Item]) -> None:
        self.upstream = upstream
        self.rest = rest

    @property
    def _head(self) -> h2.events.ResponseReceived:
        head = self.rest[0]
        assert isinstance(head, h2.events.ResponseReceived)
        return head

    @property
    def status(self) -> int:
        raw = self._head.headers or []
        return int(next((v for n, v in raw if n == b":status"), b"0"))

    @property
    def grpc_status(self) -> int | None:
        head = self._head
        if not head.stream_ended:
            return None  # gRPC sends a failure's status in a trailers-only response
        value = next((v for n, v in head.headers or [] if n == b"grpc-status"), None)
        return int(value) if value is not None and value.isdigit() else None

    def discard(self) -> None:
        upstream = self.upstream
        upstream.connection.wire.ack(upstream.sid, _credit(self.rest))
        upstream.release(ErrorCodes.CANCEL)


async def _send_kept(upstream: _UpstreamStream, kept: list[h2.events.Event]) -> None:
    """The kept request body on a new stream: DATA, then trailers or the end."""
    wire = upstream.connection.wire
    for event in kept:
        if isinstance(event, h2.events.DataReceived):
            await wire.send_data(upstream.sid, event.data or b"")
        elif isinstance(event, h2.events.TrailersReceived):
            wire.conn.send_headers(
                upstream.sid, _encode(_decode(event.headers or [])), end_stream=True
            )
            upstream.ended = True
        elif isinstance(event, h2.events.StreamEnded) and not upstream.ended:
            wire.conn.send_data(upstream.sid, b"", end_stream=True)
            upstream.ended = True
    wire.flush_soon()


async def _batch(events: asyncio.Queue[_Item]) -> list[_Item]:
    """The next event and all queued behind it: their DATA leaves with one drain."""
    batch = [await events.get()]
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


def _credit(batch: Iterable[_Item]) -> int:
    """The flow-control credit (DATA with padding) the events took from their sender."""
    return sum(
        e.flow_controlled_length or 0 for e in batch if isinstance(e, h2.events.DataReceived)
    )


def _settled(task: asyncio.Task[None]) -> None:
    # A request pump that lost its stream (reset, connection gone) ends with that error;
    # the response side reports it, so it is only retrieved here.
    if not task.cancelled() and task.exception() is not None:
        log.debug("HTTP/2 task ended: %s", task.exception())


def _reset_reply(flags: str, reason: str) -> LocalReply:
    return LocalReply(
        503,
        (("content-type", "text/plain"),),
        _UPSTREAM_RESET_BODY + reason.encode(),
        flags,
    )


async def serve_http2(
    downstream: ByteStream, first: bytes, dispatcher: Dispatcher, upstreams: Http2Upstreams
) -> None:
    """Serve one downstream HTTP/2 connection until the client leaves; `first` is what was
    read already (starting with the prior-knowledge preface). A malformed connection gets
    h2's GOAWAY, a malformed stream its RST_STREAM; nothing else is affected."""
    await _Session(downstream, dispatcher, upstreams).run(first)
