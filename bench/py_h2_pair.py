"""A bare Python HTTP/2 CONNECT pair (uvloop, asyncio's TLS, Protocol API), for
`bench.connections`' `py_h2`: the floor under a Python HBONE tunnel's new connections.

The HBONE shape and nothing else: the client side listens in plain TCP and carries each
accepted connection as one CONNECT stream on ONE pooled mutual TLS 1.3 HTTP/2 connection; the
server side answers a CONNECT by dialling its `:authority` and replying 200, then both relay.
What it leaves out, so that it is a floor and not a rival: capture and the original
destination, policy, identities, routing, telemetry, and sending-side flow control (windows
are 4 MiB per stream and 64 MiB per connection, and a receiver credits every byte back at
once, so a sender never waits). Its header blocks are fixed: the client's CONNECT is encoded
once per target, the server decodes it with `hpack` and answers with the indexed `:status 200`
(a client decodes any other answer).
Set beside `bench/h2_connect_pair.js` (the same shape in Node's C++ http2) and the mesh, it
splits "a Python tunnel opening a stream at all" from "ours".

    python -m bench.py_h2_pair client CERT KEY CA SERVER_HOST:PORT LISTEN_PORT=TARGET ...
    python -m bench.py_h2_pair server CERT KEY CA LISTEN_HOST:PORT

TARGET is host:port as the server side dials it. Runs until killed.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import struct
import sys
from collections.abc import Callable

import hpack
import uvloop

from bench.tls_relay import address, context

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id: RFC 9113 §4.1
SETTING = struct.Struct(">HI")
WINDOW = 4 << 20  # SETTINGS_INITIAL_WINDOW_SIZE
CONNECTION_WINDOW = 64 << 20
MAX_FRAME = 16384  # the peer's SETTINGS_MAX_FRAME_SIZE is left at its default
CANCEL, REFUSED = 0x8, 0x7
STATUS_200 = b"\x88"  # static table entry 8: :status 200 (RFC 7541 appendix A)
STATUS_502 = hpack.Encoder().encode([(":status", "502")])


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return HEAD.pack(len(payload) << 8 | ftype, flags, sid) + payload


def settings_frame() -> bytes:
    return frame(SETTINGS, 0, 0, SETTING.pack(0x4, WINDOW) + SETTING.pack(0x3, 1 << 20))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, increment.to_bytes(4, "big"))


def data_frames(sid: int, data: bytes, end: bool) -> list[bytes]:
    """`data` cut to the default maximum frame size; END_STREAM on the last one."""
    if len(data) <= MAX_FRAME:
        return [frame(DATA, END_STREAM if end else 0, sid, data)]
    view = memoryview(data)
    cuts = range(0, len(data), MAX_FRAME)
    last = cuts[-1]
    return [
        frame(DATA, END_STREAM if end and at == last else 0, sid, bytes(view[at : at + MAX_FRAME]))
        for at in cuts
    ]


def connect_block(target: str) -> bytes:
    """The CONNECT request's header block (RFC 9113 §8.5), encoded once per target."""
    return hpack.Encoder().encode([(":method", "CONNECT"), (":authority", target)])


def decoded(decoder: hpack.Decoder, block: bytes) -> dict[str, str]:
    """A header block's fields as text (`hpack` gives str; its type stubs say bytes)."""

    def text(value: str | bytes) -> str:
        return value.decode() if isinstance(value, bytes) else value

    return {text(name): text(value) for name, value in decoder.decode(block)}


class FrameReader:
    """Whole frames out of a byte stream: `feed` returns (type, flags, stream id, payload)."""

    def __init__(self, preface: bool) -> None:
        self.buf = bytearray()
        self.preface = preface  # a server's first 24 bytes are the client's preface

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        buf = self.buf
        buf += data
        pos = 0
        if self.preface:
            if len(buf) < len(PREFACE):
                return []
            if bytes(buf[: len(PREFACE)]) != PREFACE:
                raise ValueError("not an HTTP/2 connection preface")
            pos, self.preface = len(PREFACE), False
        out = []
        end = len(buf)
        while end - pos >= HEAD.size:
            head, flags, sid = HEAD.unpack_from(buf, pos)
            length = head >> 8
            if end - pos - HEAD.size < length:
                break
            start = pos + HEAD.size
            out.append((head & 0xFF, flags, sid & 0x7FFFFFFF, bytes(buf[start : start + length])))
            pos = start + length
        del buf[:pos]
        return out


def nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Session(asyncio.Protocol):
    """One pooled HTTP/2 connection over TLS, either side. Streams are `Tunnel`s by id."""

    def __init__(self, client: bool, on_connect: Callable[[Session, int, bytes], None]) -> None:
        self.client = client
        self.on_connect = on_connect  # server side: (session, stream id, header block)
        self.reader = FrameReader(preface=not client)
        self.decoder = hpack.Decoder()
        self.streams: dict[int, Tunnel] = {}
        self.next_id = 1
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] | None = None  # frames held until a read's frames are all handled
        self.unacked = 0  # connection-level bytes not yet credited back
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        nodelay(transport)
        opening = [settings_frame(), window_update(0, CONNECTION_WINDOW - 65535)]
        transport.writelines([PREFACE, *opening] if self.client else opening)  # type: ignore[attr-defined]

    def send(self, *frames: bytes) -> None:
        if self.out is not None:
            self.out.extend(frames)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(frames)

    def data_received(self, data: bytes) -> None:
        self.out = []
        try:
            for ftype, flags, sid, payload in self.reader.feed(data):
                self.handle(ftype, flags, sid, payload)
        finally:
            out, self.out = self.out, None
            if out:
                self.send(*out)

    def handle(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == DATA:
            tunnel = self.streams.get(sid)
            self.unacked += len(payload)
            if self.unacked >= 1 << 20:
                self.send(window_update(0, self.unacked))
                self.unacked = 0
            if tunnel is not None:
                tunnel.from_peer(payload, flags & END_STREAM)
        elif ftype == HEADERS:
            tunnel = self.streams.get(sid)
            if isinstance(tunnel, Accepted):
                tunnel.response(payload)
            elif tunnel is None and not self.client:
                self.on_connect(self, sid, payload)
        elif ftype == RST_STREAM:
            tunnel = self.streams.pop(sid, None)
            if tunnel is not None:
                tunnel.abort()
        elif ftype == SETTINGS and not flags & ACK:
            self.send(frame(SETTINGS, ACK, 0))
        elif ftype == PING and not flags & ACK:
            self.send(frame(PING, ACK, 0, payload))
        elif ftype == GOAWAY and self.transport is not None:
            self.transport.close()

    def open(self, tunnel: Tunnel, block: bytes) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.streams[sid] = tunnel
        self.send(frame(HEADERS, END_HEADERS, sid, block))
        return sid

    def connection_lost(self, exc: Exception | None) -> None:
        for tunnel in list(self.streams.values()):
            tunnel.abort()
        self.streams.clear()
        if not self.lost.done():
            self.lost.set_result(None)


class Tunnel(asyncio.Protocol):
    """The plain TCP end of one stream: the accepted app connection on the client side, the
    connection to the target on the server side. Half-closes travel as END_STREAM / FIN."""

    def __init__(self, session: Session, sid: int = 0) -> None:
        self.session = session
        self.sid = sid
        self.transport: asyncio.Transport | None = None
        self.ended_here = self.ended_there = False
        self.unacked = 0
        self.held: list[bytes] = []  # server side: the peer's bytes that came while dialling
        self.held_end = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.session.send(*data_frames(self.sid, data, False))

    def eof_received(self) -> bool:
        self.ended_here = True
        self.session.send(frame(DATA, END_STREAM, self.sid))
        self.finish()
        return True  # the other direction may still flow

    def from_peer(self, data: bytes, end: int) -> None:
        transport = self.transport
        if transport is None:
            if data:
                self.held.append(data)
            self.held_end = self.held_end or bool(end)
            return
        if data:
            transport.write(data)
            self.unacked += len(data)
            if self.unacked >= 1 << 20:
                self.session.send(window_update(self.sid, self.unacked))
                self.unacked = 0
        if end:
            self.ended_there = True
            transport.write_eof()
            self.finish()

    def finish(self) -> None:
        if self.ended_here and self.ended_there:
            self.session.streams.pop(self.sid, None)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.ended_here = self.ended_there = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        ended = self.ended_here and self.ended_there
        if not ended and self.session.streams.pop(self.sid, None) is not None:
            self.session.send(frame(RST_STREAM, 0, self.sid, CANCEL.to_bytes(4, "big")))
        self.transport = None


class Accepted(Tunnel):
    """Client side: an app connection, carried as a CONNECT stream; what the app sends before
    the 200 is held (uvloop does not honour a pause asked for inside `connection_made`)."""

    def __init__(self, pool: Pool, block: bytes) -> None:
        super().__init__(pool.session())
        self.block = block
        self.answered = False
        self.early: list[bytes] = []
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.sid = self.session.open(self, self.block)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            super().data_received(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        if self.answered:
            return super().eof_received()
        self.early_eof = True
        return True

    def response(self, block: bytes) -> None:
        # The indexed :status 200 alone (ours) leaves the HPACK table as it is; anything else
        # (Node adds a date) is decoded, so the table stays in step with the peer's.
        ok = block == STATUS_200 or decoded(self.session.decoder, block).get(":status") == "200"
        if not ok or self.transport is None:
            self.session.streams.pop(self.sid, None)
            self.abort()
            return
        self.answered = True
        for chunk in self.early:
            super().data_received(chunk)
        self.early.clear()
        if self.early_eof:
            super().eof_received()


class Pool:
    """The client side's one HTTP/2 connection, dialled again if it closes."""

    def __init__(self, ctx: ssl.SSLContext, server: tuple[str, int]) -> None:
        self.ctx, self.server = ctx, server
        self.current: Session | None = None

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        _, session = await loop.create_connection(
            lambda: Session(True, lambda *_: None),
            *self.server,
            ssl=self.ctx,
            server_hostname="h2",
        )
        self.current = session
        session.lost.add_done_callback(lambda _: self._forget(session))

    def _forget(self, session: Session) -> None:
        if self.current is session:
            self.current = None
            asyncio.get_running_loop().create_task(self.dial())

    def session(self) -> Session:
        if self.current is None:
            raise ConnectionError("no HTTP/2 connection to the server side")
        return self.current


class Dialled(Tunnel):
    """Server side: the connection to a CONNECT's target; once it is made, the 200."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.session.send(frame(HEADERS, END_HEADERS, self.sid, STATUS_200))
        held, self.held = self.held, []
        for chunk in held:
            self.from_peer(chunk, 0)
        if self.held_end:
            self.from_peer(b"", END_STREAM)


def serve_connect(session: Session, sid: int, block: bytes) -> None:
    """Server side: dial the CONNECT's authority, then relay (or answer 502)."""
    host, port = address(decoded(session.decoder, block).get(":authority", ""))
    tunnel = Dialled(session, sid)
    session.streams[sid] = tunnel
    loop = asyncio.get_running_loop()

    def dialled(task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> None:
        if task.cancelled() or task.exception() is not None:
            session.streams.pop(sid, None)
            session.send(frame(HEADERS, END_HEADERS | END_STREAM, sid, STATUS_502))

    dial = loop.create_task(loop.create_connection(lambda: tunnel, host, port))
    dial.add_done_callback(dialled)


async def main(argv: list[str]) -> None:
    if len(argv) < 5 or argv[0] not in ("client", "server"):
        raise SystemExit(__doc__)
    role, cert, key, ca, where, *maps = argv
    ctx = context(role, cert, key, ca)
    ctx.set_alpn_protocols(["h2"])
    loop = asyncio.get_running_loop()
    if role == "server":
        await loop.create_server(
            lambda: Session(False, serve_connect), *address(where), ssl=ctx, reuse_address=True
        )
    else:
        pool = Pool(ctx, address(where))
        await pool.dial()
        for mapping in maps:
            port, target = mapping.split("=")
            block = connect_block(target)
            accept = functools.partial(Accepted, pool, block)
            await loop.create_server(accept, "127.0.0.1", int(port), reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))
