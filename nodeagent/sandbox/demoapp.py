"""The demo app run in every sandbox pod: HTTP on 8080 and TCP echo on 9000.

HTTP answers every request with JSON naming the pod (name, namespace, service
account, node, ip) and the caller's address as the app sees it, which is how
the demo and the tests show whose traffic arrived and from where. Keep-alive is
supported, so load tools can reuse connections. Echo returns every byte and
half-closes when the caller does.

Behaviour switches, for resilience tests: ``POST /demo/behaviour?fail=R&status=S&delay=D``
(answered only to callers on 127.0.0.1, i.e. from inside the pod's namespace; any
other caller gets 403 for ``/demo/`` paths) makes the share R in [0, 1] of ordinary
requests fail with status S (default 500) and holds every ordinary response D
seconds. Failing is deterministic: request k (1-based, counted since the last
POST) fails when floor(k*R) > floor((k-1)*R), so R=0.5 fails every second one.
Each POST replaces all three settings (an omitted one takes its default: fail=0,
status=500, delay=0), so a bare POST resets. ``GET /demo/behaviour`` reads them.
A failed response carries the usual JSON body plus ``"failed": true``. A held
response waits on a per-connection deadline (the selector's timeout), so other
connections are served meanwhile.

With ``--log-requests`` every ordinary request is logged to stdout as one JSON
line: time, method, path, host, client_ip, client_port, status.

Run as ``python -m nodeagent.sandbox.demoapp --pod P ...`` inside the pod's
namespace. With ``--ready-fd N`` it writes ``ready`` to fd N once both ports
listen, so the sandbox starts many apps in parallel and waits for them all.

It is a single-threaded `selectors` loop on purpose: a sandbox starts one app
per pod, and importing asyncio (and with it ssl) would triple each app's
start-up cost.
"""

from __future__ import annotations

import math
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable, Sequence

MAX_HEADER_BYTES = 16384
MAX_PENDING_OUT = 1 << 20  # stop reading a connection while this much is unsent
BACKLOG = 512
CONTROL_PREFIX = "/demo/"
BEHAVIOUR_PATH = "/demo/behaviour"
CONTROL_CLIENT = "127.0.0.1"  # only callers inside the pod's namespace may flip switches
DEFAULT_FAIL_STATUS = 500
MAX_DELAY = 3600.0
MAX_SHARE_DIGITS = 9  # fail=R as a decimal with at most this many fraction digits
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


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


JsonValue = str | int | float | bool


def _json_value(v: JsonValue) -> str:
    if isinstance(v, bool):  # before int: bool is an int
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "null"
    return _json_str(v)


def to_json(obj: dict[str, JsonValue]) -> str:
    """JSON for a flat dict of strings, numbers and booleans (the json module imports re:
    +12 ms)."""
    items = (f"{_json_str(k)}: {_json_value(v)}" for k, v in obj.items())
    return "{" + ", ".join(items) + "}"


def parse_share(text: str) -> tuple[int, int]:
    """`fail=R` as an exact fraction (numerator, denominator) in [0, 1].

    Decimal text is read exactly (0.3 is 3/10, not the float nearest it), so the
    count of failures in k requests is exactly floor(k*R); ValueError otherwise.
    """
    whole, _, frac = text.strip().partition(".")
    digits = whole + frac
    if not digits or not digits.isdigit() or not digits.isascii() or len(frac) > MAX_SHARE_DIGITS:
        raise ValueError(f"fail: expected a decimal number between 0 and 1, got {text!r}")
    num, den = int(digits), 10 ** len(frac)
    if num > den:
        raise ValueError(f"fail: must be between 0 and 1, got {text!r}")
    return num, den


def parse_query(query: str) -> dict[str, str]:
    """`a=1&b=2` (no percent-decoding: the switches' values need none)."""
    out = {}
    for part in query.split("&"):
        if part:
            key, _, value = part.partition("=")
            out[key] = value
    return out


class Behaviour:
    """The switches set by POST /demo/behaviour: which ordinary requests fail, and how
    long every ordinary response is held. Pure: it counts requests, the caller keeps time."""

    def __init__(self) -> None:
        self.fail = (0, 1)  # the share R as numerator, denominator
        self.status = DEFAULT_FAIL_STATUS
        self.delay = 0.0
        self.count = 0  # ordinary requests since the settings were set

    def set(self, query: dict[str, str]) -> None:
        """Replace all settings from a query (omitted ones take their defaults), and
        restart the count; ValueError naming the bad parameter changes nothing."""
        unknown = sorted(set(query) - {"fail", "status", "delay"})
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r} (use fail, status, delay)")
        fail = parse_share(query.get("fail", "0"))
        try:
            status = int(query.get("status", str(DEFAULT_FAIL_STATUS)))
        except ValueError:
            raise ValueError(f"status: expected an HTTP status, got {query['status']!r}") from None
        if not 200 <= status <= 599:
            raise ValueError(f"status: must be between 200 and 599, got {status}")
        try:
            delay = float(query.get("delay", "0"))
        except ValueError:
            raise ValueError(f"delay: expected seconds, got {query['delay']!r}") from None
        if not 0 <= delay <= MAX_DELAY:  # also refuses nan
            raise ValueError(f"delay: must be between 0 and {MAX_DELAY:.0f} seconds, got {delay}")
        self.fail, self.status, self.delay, self.count = fail, status, delay, 0

    def next_fails(self) -> bool:
        """Count one ordinary request; True if it is to fail:
        floor(k*R) > floor((k-1)*R) for request k, in exact integer arithmetic."""
        self.count += 1
        num, den = self.fail
        return (self.count * num) // den > ((self.count - 1) * num) // den

    def view(self) -> dict[str, JsonValue]:
        num, den = self.fail
        return {
            "fail": num / den,
            "status": self.status,
            "delay": self.delay,
            "requests": self.count,
        }


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
        self.log_requests = False


_INT_OPTIONS = ("http_port", "echo_port", "ready_fd")
_FLAG_OPTIONS = ("log_requests",)


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
        if name in _FLAG_OPTIONS:
            if sep:
                raise SystemExit(f"demoapp: {key} takes no value")
            setattr(opts, name, True)
            continue
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
        # Responses not yet due (a delay is set), oldest first, as (due, bytes): they
        # leave in order, each once its time has come and all before it have left.
        self.held: list[tuple[float, bytes]] = []
        self.registered = True

    def queue(self, data: bytes, due: float | None = None) -> None:
        """Send `data` after the responses before it, and not before `due` (monotonic)."""
        if not self.held and due is None:
            self.outbuf += data
            return
        last = self.held[-1][0] if self.held else 0.0
        self.held.append((max(due or 0.0, last), data))

    def release(self, now: float) -> bool:
        """Move the held responses due by `now` to the send buffer; True if any moved."""
        moved = False
        while self.held and self.held[0][0] <= now:
            self.outbuf += self.held.pop(0)[1]
            moved = True
        return moved

    def next_due(self) -> float | None:
        return self.held[0][0] if self.held else None

    def pending(self) -> int:
        return len(self.outbuf) + sum(len(d) for _, d in self.held)


RequestLog = Callable[[dict[str, JsonValue]], None]


def _response(
    status: int, body: bytes, keep: bool, content_type: bytes = b"application/json"
) -> bytes:
    reason = REASONS.get(status, "Status")
    return (
        f"HTTP/1.1 {status} {reason}\r\n".encode()
        + b"Content-Type: "
        + content_type
        + b"\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + (b"" if keep else b"Connection: close\r\n")
        + b"\r\n"
        + body
    )


def control_answer(
    behaviour: Behaviour, method: str, path: str, client_ip: str
) -> tuple[int, dict[str, JsonValue]]:
    """The status and JSON body for a request to a /demo/ path."""
    if client_ip != CONTROL_CLIENT:
        return 403, {"error": f"{CONTROL_PREFIX} paths are answered only to {CONTROL_CLIENT}"}
    route, _, query = path.partition("?")
    if route != BEHAVIOUR_PATH:
        return 404, {"error": f"no such control path {route!r} (try {BEHAVIOUR_PATH})"}
    if method == "GET":
        if query:
            return 400, {"error": "GET reads the settings; use POST to change them"}
        return 200, behaviour.view()
    if method != "POST":
        return 405, {"error": f"{method} not allowed (GET or POST)"}
    try:
        behaviour.set(parse_query(query))
    except ValueError as exc:
        return 400, {"error": str(exc)}
    return 200, behaviour.view()


def http_answer(
    identity: dict[str, str],
    conn: Connection,
    behaviour: Behaviour | None = None,
    now: float = 0.0,
    log: RequestLog | None = None,
) -> bool:
    """Answer every complete request in `conn.inbuf`; False once the connection must end.

    `behaviour` decides which ordinary requests fail and how long their answers are
    held (from `now`, monotonic); `log` gets one record per ordinary request."""
    while True:
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_HEADER_BYTES:
                conn.queue(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                return False
            return True
        lines = bytes(conn.inbuf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            conn.queue(
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
            conn.queue(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return False
        if len(conn.inbuf) < end + 4 + length:
            return True  # wait for the body
        del conn.inbuf[: end + 4 + length]
        option = headers.get("connection", "").lower()
        keep = option != "close" and (version == "HTTP/1.1" or option == "keep-alive")
        if path.startswith(CONTROL_PREFIX):
            status, answer = control_answer(behaviour or Behaviour(), method, path, conn.peer[0])
            conn.queue(_response(status, to_json(answer).encode(), keep))
        else:
            status = 200
            fields: dict[str, JsonValue] = {
                **identity,
                "client_ip": conn.peer[0],
                "client_port": conn.peer[1],
                "method": method,
                "path": path,
                "host": headers.get("host", ""),
            }
            due = None
            if behaviour is not None:
                if behaviour.next_fails():
                    status = behaviour.status
                    fields["failed"] = True
                if behaviour.delay > 0:
                    due = now + behaviour.delay
            conn.queue(_response(status, to_json(fields).encode(), keep), due)
            if log is not None:
                log(
                    {
                        "time": round(time.time(), 6),
                        "method": method,
                        "path": path,
                        "host": headers.get("host", ""),
                        "client_ip": conn.peer[0],
                        "client_port": conn.peer[1],
                        "status": status,
                    }
                )
        if not keep:
            return False


class DemoServer:
    """Both listeners and all connections on one selector; held responses leave on
    their deadlines, which bound the selector's wait."""

    def __init__(self, args: Options, clock: Callable[[], float] = time.monotonic) -> None:
        self.identity = {
            "pod": args.pod,
            "namespace": args.namespace,
            "service_account": args.service_account,
            "node": args.node,
            "ip": args.ip,
            "sandbox": args.sandbox,
        }
        self.behaviour = Behaviour()
        self.clock = clock
        self.log: RequestLog | None = self._log_request if args.log_requests else None
        self.holding: set[Connection] = set()  # connections with held responses
        self.sel = selectors.DefaultSelector()
        for port, kind in ((args.http_port, "http"), (args.echo_port, "echo")):
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((args.bind, port))
            lsock.listen(BACKLOG)
            lsock.setblocking(False)
            self.sel.register(lsock, selectors.EVENT_READ, kind)

    @staticmethod
    def _log_request(record: dict[str, JsonValue]) -> None:
        sys.stdout.write(to_json(record) + "\n")
        sys.stdout.flush()

    def run(self) -> None:
        while True:
            self.step()

    def step(self) -> None:
        """One select and what it found, then every held response that is due."""
        for key, mask in self.sel.select(self.timeout()):
            if isinstance(key.data, str):
                self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
            else:
                self._service(key.data, mask)
        if self.holding:
            now = self.clock()
            for conn in list(self.holding):
                if conn.release(now):
                    self._service(conn, 0)

    def timeout(self) -> float | None:
        """How long the selector may wait: until the earliest held response is due."""
        dues = [d for d in (c.next_due() for c in self.holding) if d is not None]
        return max(0.0, min(dues) - self.clock()) if dues else None

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
        if conn.held:
            self.holding.add(conn)
        else:
            self.holding.discard(conn)
        if not conn.outbuf and not conn.held:
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
        if conn.reading and conn.pending() < MAX_PENDING_OUT:
            events |= selectors.EVENT_READ
        if conn.outbuf:
            events |= selectors.EVENT_WRITE
        if events == 0:
            if conn.held:
                # Nothing to watch until a held response is due: off the selector till then.
                if conn.registered:
                    self.sel.unregister(conn.sock)
                    conn.registered = False
                return
            self._close(conn)
            return
        if conn.registered:
            self.sel.modify(conn.sock, events, conn)
        else:
            self.sel.register(conn.sock, events, conn)
            conn.registered = True

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
        if not http_answer(self.identity, conn, self.behaviour, self.clock(), self.log):
            conn.reading = False
            conn.close_when_flushed = True

    def _close(self, conn: Connection) -> None:
        self.holding.discard(conn)
        if conn.registered:
            self.sel.unregister(conn.sock)
            conn.registered = False
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
