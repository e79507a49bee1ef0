"""The small clients the benchmarks run inside pods, as `python -m bench.probe COMMAND ...`.

* `ping HOST PORT COUNT`: COUNT 64-byte round trips on one connection; prints each one's time
  in nanoseconds. The harness runs it in short blocks that alternate between the variants
  (`harness.latency_round`), so a drift of the machine's speed (up to 3x within an hour here)
  lands on every variant alike instead of on whichever ran during it. A fresh process and
  connection per block, as in the single-block runs before: a client kept running settles on
  one core beside its peer or not, and the direct path's p50 then sits at about 30 or about
  95 us for many blocks in a row (docs/performance.md).
* `connrate HOST PORT SECONDS`: short HTTP/1.1 requests, one connection each; prints the rate
  per second.
* `hold HOST PORT`: one echoed 64-byte message, then prints "ok" and keeps the connection open
  until stdin closes (the path checks look at the sockets meanwhile).
* `wait HOST PORT TIMEOUT`: exits 0 as soon as HOST:PORT accepts a connection, 1 at TIMEOUT.

Standard library only, so a block's process starts as fast as the inline programs did.
"""

from __future__ import annotations

import socket
import sys
import time

MESSAGE = b"x" * 64


def echo_once(s: socket.socket) -> None:
    s.sendall(MESSAGE)
    got = 0
    while got < len(MESSAGE):
        chunk = s.recv(len(MESSAGE) - got)
        if not chunk:
            sys.exit("echo closed")
        got += len(chunk)


def ping(host: str, port: int, count: int) -> None:
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for _ in range(count):
        t = time.perf_counter_ns()
        echo_once(s)
        out.append(time.perf_counter_ns() - t)
    print(" ".join(map(str, out)))


def connrate(host: str, port: int, seconds: float) -> None:
    req = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = socket.create_connection((host, port))
        s.sendall(req)
        while s.recv(65536):
            pass
        s.close()
        n += 1
    print(n / seconds)


def hold(host: str, port: int) -> None:
    s = socket.create_connection((host, port))
    echo_once(s)
    print("ok", flush=True)
    sys.stdin.read()


def wait(host: str, port: int, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection((host, port), 1).close()
            sys.exit(0)
        except OSError:
            time.sleep(0.05)
    sys.exit(1)


def main(argv: list[str]) -> None:
    command, host, port, *rest = argv
    if command == "ping":
        ping(host, int(port), int(rest[0]))
    elif command == "connrate":
        connrate(host, int(port), float(rest[0]))
    elif command == "hold":
        hold(host, int(port))
    elif command == "wait":
        wait(host, int(port), float(rest[0]))
    else:
        sys.exit(f"unknown probe command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
