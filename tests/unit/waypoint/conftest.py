"""Helpers for the waypoint's codec tests: everything runs over real loopback sockets.

* `FakeDispatcher`: routing is logic, so a small fake decides (a `route` callable), picks
  endpoints round-robin, opens a TCP `SocketByteStream` to the endpoint's "ip:port", and keeps
  the records.
* `codec_server(dispatcher)`: a 127.0.0.1 listener that serves each connection with
  `serve_http1` after a first read, as the waypoint does after sniffing.
* `echo_upstream(name)`: an h11 upstream that answers at once and streams the request body
  back as it arrives (content-length when the request had one, else chunked).
* `Client`: an h11 client over a socket, for keep-alive request/response tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import h11

from nodeagent.waypoint.exchange import (
    HTTP1,
    ByteStream,
    Dispatcher,
    Endpoint,
    Forward,
    LocalReply,
    RequestHead,
    RequestRecord,
    UpstreamError,
)
from nodeagent.waypoint.http1 import Http1Upstreams, serve_http1
from nodeagent.waypoint.streams import READ_SIZE, SocketByteStream

LOOPBACK = "127.0.0.1"


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    """Wait until `check()` holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@dataclass
class FakeDispatcher:
    endpoints: list[Endpoint]
    route_fn: Callable[[RequestHead], Forward | LocalReply] = field(
        default=lambda head: Forward(head)
    )
    fail_open: UpstreamError | None = None
    routed: list[RequestHead] = field(default_factory=list)
    picked: list[Endpoint] = field(default_factory=list)
    opened: list[Endpoint] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)
    tries: list[tuple[str, int, bool]] = field(default_factory=list)
    mirror_to: list[tuple[Endpoint, RequestHead]] = field(default_factory=list)
    mirrored: list[tuple[str, int]] = field(default_factory=list)
    _next: itertools.count[int] = field(default_factory=itertools.count)

    def route(self, head: RequestHead) -> Forward | LocalReply:
        self.routed.append(head)
        return self.route_fn(head)

    async def pick(self, forward: Forward) -> Endpoint | LocalReply:
        endpoint = self.endpoints[next(self._next) % len(self.endpoints)]
        self.picked.append(endpoint)
        return endpoint

    def record(self, record: RequestRecord) -> None:
        self.records.append(record)

    def attempt_done(self, endpoint: Endpoint, status: int, *, local_origin: bool) -> None:
        self.tries.append((str(endpoint.key), status, local_origin))

    def mirrors(self, forward: Forward) -> list[tuple[Endpoint, RequestHead]]:
        return list(self.mirror_to)

    def mirror_done(self, endpoint: Endpoint, status: int) -> None:
        self.mirrored.append((str(endpoint.key), status))

    async def open(self, endpoint: Endpoint, protocol: str) -> ByteStream:
        assert protocol == HTTP1
        self.opened.append(endpoint)
        if self.fail_open is not None:
            raise self.fail_open
        host, port = endpoint.address.rsplit(":", 1)
        try:
            return await SocketByteStream.connect(host, int(port))
        except OSError as error:
            raise UpstreamError(LocalReply(503, flags="UF"), str(error)) from error


def endpoint(address: tuple[str, int], name: str = "") -> Endpoint:
    text = f"{address[0]}:{address[1]}"
    return Endpoint(key=name or text, address=text)


@contextlib.asynccontextmanager
async def listener(
    serve: Callable[[SocketByteStream], object],
) -> AsyncIterator[tuple[str, int]]:
    """A loopback server handing each connection, as a SocketByteStream, to `serve`."""
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = SocketByteStream(reader, writer)
        try:
            await serve(stream)  # type: ignore[misc]
        except ConnectionError:
            pass
        finally:
            stream.close()

    def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(spawn, LOOPBACK, 0, limit=2 * READ_SIZE)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@contextlib.asynccontextmanager
async def codec_server(
    dispatcher: FakeDispatcher, upstreams: Http1Upstreams | None = None
) -> AsyncIterator[tuple[str, int]]:
    pool = upstreams if upstreams is not None else Http1Upstreams()
    _: Dispatcher = dispatcher  # the fake keeps to the protocol

    async def serve(stream: SocketByteStream) -> None:
        first = await stream.read()  # what sniffing would have read
        if first:
            await serve_http1(stream, first, dispatcher, pool)

    try:
        async with listener(serve) as address:
            yield address
    finally:
        pool.close()


async def _h11_serve(
    stream: SocketByteStream,
    answer: Callable[[h11.Request], Iterable[tuple[str, str]]],
    counter: list[int],
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    counter.append(1)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.read())
            continue
        if type(event) is not h11.Request:
            return
        length = dict(event.headers).get(b"content-length")
        headers = [(b"x-method", event.method), (b"x-path", event.target)]
        headers.extend((n.encode(), v.encode()) for n, v in answer(event))
        headers.append((b"x-request-headers", b";".join(n + b"=" + v for n, v in event.headers)))
        if length is not None:
            headers.append((b"content-length", length))
        stream.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.read())
            elif type(event) is h11.Data:
                stream.write(conn.send(event) or b"")
                await stream.drain()
            else:
                break
        stream.write(conn.send(h11.EndOfMessage()) or b"")
        await stream.drain()
        if conn.our_state is not h11.DONE:
            stream.write_eof()
            return
        conn.start_next_cycle()


@contextlib.asynccontextmanager
async def echo_upstream(
    name: str = "echo",
    answer: Callable[[h11.Request], Iterable[tuple[str, str]]] | None = None,
) -> AsyncIterator[tuple[tuple[str, int], list[int]]]:
    """Yields its address and a list that grows by one per accepted connection."""
    counter: list[int] = []

    def tag(_: h11.Request) -> Iterable[tuple[str, str]]:
        return [("x-upstream", name)]

    async def serve(stream: SocketByteStream) -> None:
        await _h11_serve(stream, answer or tag, counter)

    async with listener(serve) as address:
        yield address, counter


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class Client:
    """An h11 client on one keep-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> Client:
        reader, writer = await asyncio.open_connection(*address, limit=2 * READ_SIZE)
        return cls(reader, writer)

    async def _event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.reader.read(READ_SIZE))

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | Iterable[bytes] = b"",
        *,
        host: str = "svc.example",
        chunked: bool = False,
    ) -> Response:
        all_headers = [("host", host), *headers]
        if chunked:
            all_headers.append(("transfer-encoding", "chunked"))
        elif isinstance(body, bytes) and (body or method in ("POST", "PUT")):
            all_headers.append(("content-length", str(len(body))))
        self.writer.write(
            self.conn.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
        )
        parts = [body] if isinstance(body, bytes) else body

        async def send_body() -> None:
            for part in parts:
                if part:
                    self.writer.write(self.conn.send(h11.Data(data=part)) or b"")
                    await self.writer.drain()
            self.writer.write(self.conn.send(h11.EndOfMessage()) or b"")
            await self.writer.drain()

        sender = asyncio.create_task(send_body())
        try:
            head = await self._event()
            assert isinstance(head, h11.Response), head
            chunks = []
            while True:
                event = await self._event()
                if type(event) is h11.Data:
                    chunks.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    break
                else:
                    raise AssertionError(event)
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Response(
            head.status_code,
            [(n.decode(), v.decode("latin-1")) for n, v in head.headers],
            b"".join(chunks),
        )

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def raw_exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` and read everything until the server closes."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5.0):
            return await _read_all(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while chunk := await reader.read(READ_SIZE):
        chunks.append(chunk)
    return b"".join(chunks)


# --- scripted upstreams for the resilience tests --------------------------------------

STALL = -1  # a script step: read the request, never answer
STALL_BODY = -2  # a script step: a 200 head and part of its body, then nothing more
CLOSE = -3  # a script step: read the request, close the connection without an answer


@dataclass
class Scripted:
    """What a scripted upstream saw: its address, one entry per accepted connection, and
    each complete request with its body."""

    address: tuple[str, int]
    connections: list[int] = field(default_factory=list)
    requests: list[tuple[h11.Request, bytes]] = field(default_factory=list)

    def host(self, index: int) -> str:
        request = self.requests[index][0]
        return dict(request.headers)[b"host"].decode()


@contextlib.asynccontextmanager
async def scripted_upstream(name: str, script: Sequence[int] = (200,)) -> AsyncIterator[Scripted]:
    """An h11 upstream that reads each whole request, then answers the next step of `script`
    (the last step repeats): a status (body: its name; header x-upstream), STALL or STALL_BODY."""
    state = Scripted(("", 0))

    async def serve(stream: SocketByteStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        state.connections.append(1)
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return  # the client left mid-request
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.read())
                elif type(event) is h11.Request:
                    request = event
                elif type(event) is h11.Data:
                    body += event.data
                elif type(event) is h11.EndOfMessage:
                    break
                else:
                    return  # the client closed
            assert request is not None
            step = script[min(len(state.requests), len(script) - 1)]
            state.requests.append((request, bytes(body)))
            if step == STALL:
                await asyncio.sleep(30)
                return
            if step == CLOSE:
                stream.write_eof()
                return
            if step == STALL_BODY:
                head = h11.Response(status_code=200, headers=[("content-length", "100")])
                stream.write(
                    (conn.send(head) or b"") + (conn.send(h11.Data(data=b"partial")) or b"")
                )
                await stream.drain()
                await asyncio.sleep(30)
                return
            payload = name.encode()
            headers = [("x-upstream", name), ("content-length", str(len(payload)))]
            out = conn.send(h11.Response(status_code=step, headers=headers)) or b""
            out += conn.send(h11.Data(data=payload)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            stream.write(out)
            await stream.drain()
            if conn.our_state is not h11.DONE:
                stream.write_eof()
                return
            conn.start_next_cycle()

    async with listener(serve) as address:
        state.address = address
        yield state


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port
