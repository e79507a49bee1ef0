"""Loopback harness for the HTTP/2 codec tests: a socket ByteStream, a fake router,
a waypoint listener served by serve_http2, and grpcio servers as independent upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from nodeagent.waypoint.exchange import (
    ByteStream,
    Endpoint,
    Forward,
    HeaderOps,
    LocalReply,
    RequestHead,
    RequestRecord,
    UpstreamError,
)
from nodeagent.waypoint.http2 import PREFACE, Http2Upstreams, serve_http2

GRPC_LIMITS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class SocketStream:
    """ByteStream over asyncio streams (tests only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(1 << 16)

    def write(self, data: bytes) -> object:
        self.writer.write(data)
        return None

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if not self.writer.is_closing() and self.writer.can_write_eof():
            self.writer.write_eof()

    def abort(self) -> None:
        self.writer.transport.abort()


class CountingStream(SocketStream):
    """Counts the bytes read, under `name` in `tally` (to see backpressure upstream)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tally: dict[str, int],
        name: str,
    ) -> None:
        super().__init__(reader, writer)
        self.tally = tally
        self.name = name

    async def read(self) -> bytes:
        data = await super().read()
        self.tally[self.name] = self.tally.get(self.name, 0) + len(data)
        return data


@dataclass
class FakeDispatcher:
    """Routes by the `x-user` header to the upstream of that name (default "v1"); paths
    under /local/ get a LocalReply. Records every request."""

    upstreams: dict[str, int]  # name -> port on 127.0.0.1
    received: dict[str, int] = field(default_factory=dict)  # name -> bytes read from upstream
    response_headers: HeaderOps = field(default_factory=HeaderOps)
    records: list[RequestRecord] = field(default_factory=list)
    tries: list[tuple[str, int, bool]] = field(default_factory=list)
    mirror_to: list[tuple[Endpoint, RequestHead]] = field(default_factory=list)
    mirrored: list[tuple[str, int]] = field(default_factory=list)
    opened: list[str] = field(default_factory=list)
    picked: list[str] = field(default_factory=list)
    # Resilience tests: what the route adds to its Forward (retry, timeout, faults, mirror),
    # upstream names picked round-robin instead of by x-user, and maxRequestsPerConnection.
    forward_fn: Callable[[Forward], Forward] | None = None
    rotate: list[str] = field(default_factory=list)
    max_requests: dict[str, int] = field(default_factory=dict)

    def route(self, head: RequestHead) -> Forward | LocalReply:
        if head.path.startswith("/local/"):
            return LocalReply(418, (("x-local", "yes"),), b"local " + head.path.encode(), "XX")
        name = head.header("x-user") or "v1"
        rewritten = replace(head, headers=(*head.headers, ("x-routed-to", name)))
        forward = Forward(rewritten, self.response_headers, route=name, plan=name)
        return self.forward_fn(forward) if self.forward_fn is not None else forward

    async def pick(self, forward: Forward) -> Endpoint | LocalReply:
        name = str(forward.plan)
        if self.rotate:
            name = self.rotate[len(self.picked) % len(self.rotate)]
        if name == "none":
            return LocalReply(503, body=b"no healthy upstream", flags="UH")
        self.picked.append(name)
        port = self.upstreams.get(name, 1)  # port 1: nothing listens (connect refused)
        limit = self.max_requests.get(name)
        return Endpoint(key=name, address=f"127.0.0.1:{port}", max_requests=limit)

    async def open(self, endpoint: Endpoint, protocol: str) -> ByteStream:
        self.opened.append(str(endpoint.key))
        host, port = endpoint.address.rsplit(":", 1)
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            raise UpstreamError(
                LocalReply(503, body=b"upstream connect error", flags="UF"), str(exc)
            ) from exc
        return CountingStream(reader, writer, self.received, str(endpoint.key))

    def record(self, record: RequestRecord) -> None:
        self.records.append(record)

    def attempt_done(self, endpoint: Endpoint, status: int, *, local_origin: bool) -> None:
        self.tries.append((str(endpoint.key), status, local_origin))

    def mirrors(self, forward: Forward) -> list[tuple[Endpoint, RequestHead]]:
        return list(self.mirror_to)

    def mirror_done(self, endpoint: Endpoint, status: int) -> None:
        self.mirrored.append((str(endpoint.key), status))


@contextlib.asynccontextmanager
async def waypoint(
    dispatcher: FakeDispatcher, upstreams: Http2Upstreams | None = None
) -> AsyncIterator[tuple[int, Http2Upstreams]]:
    """A loopback listener whose connections are served by serve_http2: (port, upstreams)."""
    pool = upstreams or Http2Upstreams()
    sessions: set[asyncio.Task[None]] = set()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = SocketStream(reader, writer)
        try:
            first = await reader.readexactly(len(PREFACE))
            await serve_http2(stream, first, dispatcher, pool)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(session(reader, writer))
        sessions.add(task)
        task.add_done_callback(sessions.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, pool
    finally:
        server.close()
        for task in list(sessions):
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await pool.aclose()
        await server.wait_closed()


# --- grpcio upstreams -------------------------------------------------------------

ECHO = "/echo.Echo/Echo"  # answers the request bytes, prefixed by the server's name and "|"
WHO = "/echo.Echo/Who"  # answers the server's name and the x-routed-to metadata


def _identity(data: bytes) -> bytes:
    return data


@contextlib.contextmanager
def grpc_server(name: str, *options: tuple[str, int]) -> Iterator[int]:
    """A grpcio server on 127.0.0.1 (an independent HTTP/2 implementation): its port."""

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-served-by", name),))
        return name.encode() + b"|" + request

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        routed = [str(v) for k, v in context.invocation_metadata() if k == "x-routed-to"]
        return f"{name} {','.join(routed)}".encode()

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no " + name)
        raise AssertionError  # abort raises

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=_identity, response_serializer=_identity
        ),
        "Who": grpc.unary_unary_rpc_method_handler(
            who, request_deserializer=_identity, response_serializer=_identity
        ),
        "Fail": grpc.unary_unary_rpc_method_handler(
            fail, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), options=[*GRPC_LIMITS, *options]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait()


def grpc_call(
    port: int, method: str, request: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[bytes, dict[str, str]]:
    """A real gRPC unary call (blocking: run it in a thread): the reply and trailing metadata."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_LIMITS) as channel:
        call: Callable[..., tuple[bytes, grpc.Call]] = unary(channel, method).with_call
        reply, info = call(request, metadata=metadata, timeout=30)
        return reply, {k: str(v) for k, v in info.trailing_metadata() or ()}


def unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A unary method of `channel` whose messages are raw bytes."""
    return channel.unary_unary(
        method, request_serializer=_identity, response_deserializer=_identity
    )


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


@dataclass
class CurlResult:
    returncode: int
    head: str  # the header dump (response headers, then trailers)
    body: bytes


async def curl(url: str, *args: str, data: bytes | None = None) -> CurlResult:
    """/usr/bin/curl --http2-prior-knowledge (an independent HTTP/2 client)."""
    with tempfile.TemporaryDirectory() as tmp:
        heads = Path(tmp) / "head"
        body = Path(tmp) / "body"
        argv = ["/usr/bin/curl", "-sS", "--http2-prior-knowledge", "-D", str(heads)]
        argv += ["-o", str(body), "--max-time", "60", *args]
        if data is not None:
            payload = Path(tmp) / "payload"
            payload.write_bytes(data)
            argv += ["--data-binary", f"@{payload}"]
        proc = await asyncio.create_subprocess_exec(*argv, url, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return CurlResult(
            proc.returncode,
            heads.read_text() if heads.exists() else "",
            body.read_bytes() if body.exists() else b"",
        )


@contextlib.asynccontextmanager
async def scripted_upstream() -> AsyncIterator[int]:
    """A small h2 server (h2's own server side) for what grpcio will not do on cue. By path:
    /before: RST_STREAM ENHANCE_YOUR_CALM at once; /after: a 200 head, some DATA, then that
    reset; anything else: 200 with the request body echoed and the request's trailers
    returned as the response's (x-echo: yes when it had none). Yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bodies: dict[int, bytearray] = {}
        trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    sid = event.stream_id
                    path = dict(event.headers)[b":path"]
                    if path.startswith(b"/before"):
                        conn.reset_stream(sid, ErrorCodes.ENHANCE_YOUR_CALM)
                    elif path.startswith(b"/after"):
                        conn.send_headers(sid, [(":status", "200")])
                        conn.send_data(sid, b"partial")
                        conn.reset_stream(sid, ErrorCodes.ENHANCE_YOUR_CALM)
                    else:
                        bodies[sid] = bytearray()
                elif isinstance(event, h2.events.DataReceived) and event.stream_id in bodies:
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers[event.stream_id] = list(event.headers)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in bodies:
                    sid = event.stream_id  # small bodies: within the default windows
                    conn.send_headers(sid, [(":status", "200")])
                    conn.send_data(sid, bytes(bodies.pop(sid)))
                    conn.send_headers(sid, trailers.pop(sid, [(b"x-echo", b"yes")]), True)
            writer.write(conn.data_to_send())
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Seen:
    """What a raw h2 client received, per stream id."""

    status: dict[int, bytes] = field(default_factory=dict)
    body: dict[int, bytearray] = field(default_factory=dict)
    trailers: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
    resets: dict[int, int] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    goaway: list[int] = field(default_factory=list)  # error codes

    def add(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.ResponseReceived):
            self.status[sid] = dict(event.headers or [])[b":status"]
        elif isinstance(event, h2.events.DataReceived):
            self.body.setdefault(sid, bytearray()).extend(event.data or b"")
        elif isinstance(event, h2.events.TrailersReceived):
            self.trailers[sid] = dict(event.headers or [])
        elif isinstance(event, h2.events.StreamReset):
            self.resets[sid] = event.error_code or 0
        elif isinstance(event, h2.events.StreamEnded):
            self.ended.add(sid)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway.append(event.error_code or 0)


async def _read_once(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h2.connection.H2Connection,
    seen: Seen,
) -> bool:
    """One read's events into `seen` (DATA acknowledged); False when the peer left."""
    data = await asyncio.wait_for(reader.read(65536), 10)
    for event in conn.receive_data(data):
        seen.add(event)
        if isinstance(event, h2.events.DataReceived) and event.stream_id:
            conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
    writer.write(conn.data_to_send())
    return bool(data)


async def receive(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h2.connection.H2Connection,
    done: Callable[[Seen], bool],
    seen: Seen | None = None,
) -> Seen:
    """Read with a raw h2 client (acknowledging DATA) until `done` holds or the peer leaves."""
    seen = seen or Seen()
    while not done(seen) and await _read_once(reader, writer, conn, seen):
        pass
    return seen


async def send_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h2.connection.H2Connection,
    sid: int,
    body: bytes,
    seen: Seen,
    end_stream: bool = True,
) -> None:
    """Send `body` on a raw h2 client's stream within the peer's windows, reading (into
    `seen`) while there is no credit."""
    view = memoryview(body)
    while view:
        n = min(len(view), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if n <= 0:
            assert await _read_once(reader, writer, conn, seen)
            continue
        conn.send_data(sid, view[:n], end_stream=end_stream and n == len(view))
        view = view[n:]
        writer.write(conn.data_to_send())


# --- resilience: a scripted h2 upstream and a raw h2 client ----------------------------

STALL = -1  # a script step: take the request, never answer
STALL_BODY = -2  # a script step: a 200 head and part of a body, then nothing more
GRPC_UNAVAILABLE = -3  # a script step: a trailers-only gRPC answer, grpc-status 14
REFUSE = -4  # a script step: RST_STREAM REFUSED_STREAM
RESET = -5  # a script step: RST_STREAM INTERNAL_ERROR


@dataclass
class ScriptedH2:
    """What a scripted h2 upstream saw: one entry per connection, each whole request."""

    port: int = 0
    connections: list[int] = field(default_factory=list)
    requests: list[tuple[dict[bytes, bytes], bytes]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def scripted_h2_upstream(
    name: str, script: Sequence[int] = (200,)
) -> AsyncIterator[ScriptedH2]:
    """An h2 server (h2's own) that reads each whole request (acknowledging its DATA), then
    answers the next step of `script` (the last one repeats): a status with body `name`
    (header x-upstream), STALL or STALL_BODY."""
    state = ScriptedH2()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections.append(1)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        heads: dict[int, dict[bytes, bytes]] = {}
        bodies: dict[int, bytearray] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        heads[event.stream_id] = dict(event.headers or [])
                        bodies[event.stream_id] = bytearray()
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data or b""
                        conn.acknowledge_received_data(
                            event.flow_controlled_length or 0, event.stream_id
                        )
                    if isinstance(event, h2.events.StreamEnded) or (
                        isinstance(event, h2.events.RequestReceived) and event.stream_ended
                    ):
                        sid = event.stream_id
                        if sid not in heads:
                            continue
                        step = script[min(len(state.requests), len(script) - 1)]
                        state.requests.append((heads.pop(sid), bytes(bodies.pop(sid))))
                        if step == STALL:
                            continue
                        if step in (REFUSE, RESET):
                            code = ErrorCodes.REFUSED_STREAM if step == REFUSE else None
                            conn.reset_stream(sid, code or ErrorCodes.INTERNAL_ERROR)
                            continue
                        if step == GRPC_UNAVAILABLE:
                            grpc_head = [(":status", "200"), ("content-type", "application/grpc")]
                            grpc_head.append(("grpc-status", "14"))
                            conn.send_headers(sid, grpc_head, end_stream=True)
                            continue
                        if step == STALL_BODY:
                            conn.send_headers(sid, [(":status", "200")])
                            conn.send_data(sid, b"partial")
                            continue
                        conn.send_headers(sid, [(":status", str(step)), ("x-upstream", name)])
                        conn.send_data(sid, name.encode(), end_stream=True)
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(serve(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


class H2Client:
    """A raw h2 client on one connection to the waypoint (requests one at a time)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.seen = Seen()

    @classmethod
    async def connect(cls, port: int) -> H2Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        writer.write(client.conn.data_to_send())
        return client

    async def request(
        self, method: str = "GET", path: str = "/r", body: bytes = b"", authority: str = "svc"
    ) -> int:
        """Send a request and read until its stream ends or is reset: its stream id."""
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "http"), (":authority", authority)]
        headers.append((":path", path))
        self.conn.send_headers(sid, headers, end_stream=not body)
        self.writer.write(self.conn.data_to_send())
        if body:
            await send_body(self.reader, self.writer, self.conn, sid, body, self.seen)
        await receive(
            self.reader,
            self.writer,
            self.conn,
            lambda seen: sid in seen.ended or sid in seen.resets,
            self.seen,
        )
        return sid

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
