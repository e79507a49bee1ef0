"""The demo app run in every sandbox pod: HTTP on 8080 and TCP echo on 9000.

HTTP answers every request with JSON naming the pod (name, namespace, service
account, node, ip) and the caller's address as the app sees it, which is how
the demo and the tests show whose traffic arrived and from where. Keep-alive is
supported, so load tools can reuse connections. Echo returns every byte and
half-closes when the caller does.

Run as ``python -m nodeagent.sandbox.demoapp --pod P ...`` inside the pod's
namespace. With ``--ready-fd N`` it writes ``ready`` to fd N once both ports
listen, so the sandbox starts many apps in parallel and waits for them all.

It is a single-threaded `selectors` loop on purpose: a sandbox starts one app
per pod, and importing asyncio (and with it ssl) would triple each app's
start-up cost.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
from collections.abc import Sequence

MAX_HEADER_BYTES = 16384
MAX_PENDING_OUT = 1 << 20  # stop reading a connection while this much is unsent
BACKLOG = 512


def _json_str(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json(obj: dict[str, str | int]) -> str:
    """JSON for a flat dict of strings and ints (the json module imports re: +12 ms)."""
    items = (f"{_json_str(k)}: {v if isinstance(v, int) else _json_str(v)}" for k, v in obj.items())
    return "{" + ", ".join(items) + "}"


class Options:
    """The app's settings (a plain class: importing dataclasses pulls in inspect)."""

    def __init__(self) -> None:
        self.sandbox = ""
        self.pod = ""
        self.namespace = "default"
        self.service_account = "default"
        self.node = ""
        self.ip = ""
        self.http_port = 8080
        self.echo_port = 9000
        self.bind = "0.0.0.0"
        self.ready_fd: int | None = None


_INT_OPTIONS = ("http_port", "echo_port", "ready_fd")


def parse_args(argv: Sequence[str]) -> Options:
    """`--key=value` or `--key value` options (argparse would add ~10 ms per app start)."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, sep, value = arg.partition("=")
        name = key[2:].replace("-", "_")
        if not key.startswith("--") or name not in vars(opts):
            raise SystemExit(f"demoapp: unknown option {arg!r}")
        if not sep:
            if not args:
                raise SystemExit(f"demoapp: {key} needs a value")
            value = args.pop(0)
        if name in _INT_OPTIONS:
            try:
                setattr(opts, name, int(value))
            except ValueError:
                raise SystemExit(f"demoapp: {key} needs a number, got {value!r}") from None
        else:
            setattr(opts, name, value)
    if not opts.pod:
        raise SystemExit("demoapp: --pod is required")
    return opts


class Connection:
    """One accepted connection: its buffers and what to do when they drain."""

    def __init__(self, sock: socket.socket, kind: str, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.kind = kind  # "http" or "echo"
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.reading = True
        self.close_when_flushed = False  # HTTP Connection: close, or a bad request
        self.eof_when_flushed = False  # echo: the caller half-closed


def http_answer(identity: dict[str, str], conn: Connection) -> bool:
    """Answer every complete request in `conn.inbuf`; False once the connection must end."""
    while True:
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_HEADER_BYTES:
                conn.outbuf += b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                conn.outbuf += b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                return False
            return True
        lines = bytes(conn.inbuf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            conn.outbuf += (
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return False
        method, path, version = parts
        headers = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = -1
        if length < 0:
            conn.outbuf += (
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return False
        if len(conn.inbuf) < end + 4 + length:
            return True  # wait for the body
        del conn.inbuf[: end + 4 + length]
        body = to_json(
            {
                **identity,
                "client_ip": conn.peer[0],
                "client_port": conn.peer[1],
                "method": method,
                "path": path,
                "host": headers.get("host", ""),
            }
        ).encode()
        option = headers.get("connection", "").lower()
        keep = option != "close" and (version == "HTTP/1.1" or option == "keep-alive")
        conn.outbuf += (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + (b"" if keep else b"Connection: close\r\n")
            + b"\r\n"
            + body
        )
        if not keep:
            return False


class DemoServer:
    """Both listeners and all connections on one selector."""

    def __init__(self, args: Options) -> None:
        self.identity = {
            "pod": args.pod,
            "namespace": args.namespace,
            "service_account": args.service_account,
            "node": args.node,
            "ip": args.ip,
            "sandbox": args.sandbox,
        }
        self.sel = selectors.DefaultSelector()
        for port, kind in ((args.http_port, "http"), (args.echo_port, "echo")):
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((args.bind, port))
            lsock.listen(BACKLOG)
            lsock.setblocking(False)
            self.sel.register(lsock, selectors.EVENT_READ, kind)

    def run(self) -> None:
        while True:
            for key, mask in self.sel.select():
                if isinstance(key.data, str):
                    self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
                else:
                    self._service(key.data, mask)

    def _accept(self, lsock: socket.socket, kind: str) -> None:
        try:
            sock, peer = lsock.accept()
        except (BlockingIOError, ConnectionError):
            return
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, Connection(sock, kind, peer))

    def _service(self, conn: Connection, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and conn.reading:
                self._read(conn)
            if conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._close(conn)
            return
        if not conn.outbuf:
            if conn.close_when_flushed:
                self._close(conn)
                return
            if conn.eof_when_flushed:
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self._close(conn)
                return
        events = 0
        if conn.reading and len(conn.outbuf) < MAX_PENDING_OUT:
            events |= selectors.EVENT_READ
        if conn.outbuf:
            events |= selectors.EVENT_WRITE
        if events == 0:
            self._close(conn)
            return
        self.sel.modify(conn.sock, events, conn)

    def _read(self, conn: Connection) -> None:
        data = conn.sock.recv(65536)
        if not data:
            conn.reading = False
            if conn.kind == "echo":
                conn.eof_when_flushed = True
            else:
                conn.close_when_flushed = True
            return
        if conn.kind == "echo":
            conn.outbuf += data
            return
        conn.inbuf += data
        if not http_answer(self.identity, conn):
            conn.reading = False
            conn.close_when_flushed = True

    def _close(self, conn: Connection) -> None:
        self.sel.unregister(conn.sock)
        conn.sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    server = DemoServer(args)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
