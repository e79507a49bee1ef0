"""A load client for the traffic e2e tests, run inside a sandbox pod's namespace.

Usage:
  python traffic_client.py calls HOST PORT COUNT [CONCURRENCY]
      COUNT new connections, each one HTTP/1.0 request to the demo app; prints
      {"pods": {pod: n}, "failures": n, "errors": [first few], "seconds": s}.
  python traffic_client.py hold HOST PORT COUNT WAIT
      opens COUNT connections at once, sends a request on each and waits up to
      WAIT seconds for each answer; prints {"answered": n, "refused": n,
      "refused_within": [seconds per refusal]}.
  python traffic_client.py first-byte HOST PORT COUNT
      prints {"seconds": [time from connect() to the answer's first byte]}.
  python traffic_client.py echo HOST PORT FILE
      sends FILE's bytes to an echo server, half-closes, reads the echo;
      prints {"ok": echo == sent, "sent": n}.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import threading
import time
from collections import Counter

REQUEST = b"GET / HTTP/1.0\r\nHost: backend\r\n\r\n"


def one_call(host: str, port: int, timeout: float = 5.0) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(REQUEST)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        raise ConnectionError(f"answer: {head[:40]!r}")
    return str(json.loads(body)["pod"])


def calls(host: str, port: int, count: int, concurrency: int = 4) -> dict[str, object]:
    pods: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(count))

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            try:
                pod = one_call(host, port)
            except (OSError, ValueError, KeyError) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                pods[pod] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "pods": dict(pods),
        "failures": len(errors),
        "errors": errors[:5],
        "seconds": round(time.monotonic() - start, 3),
    }


def hold(host: str, port: int, count: int, wait: float) -> dict[str, object]:
    opened = time.monotonic()
    answered, refused, within = 0, 0, []
    kept: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    for _ in range(count):
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")  # keep-alive: stays open
        except OSError:  # refused so fast that connect() or the request already saw the reset
            refused += 1
            within.append(round(time.monotonic() - opened, 3))
            continue
        selector.register(s, selectors.EVENT_READ, s)
    # Every socket watched at once: a refusal is timed when it arrives, not after the
    # answers of the sockets opened before it.
    while selector.get_map() and (left := wait - (time.monotonic() - opened)) > 0:
        for key, _ in selector.select(left):
            s = key.data
            selector.unregister(s)
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 200"):
                answered += 1
                kept.append(s)  # held open to the end: the agent counts it against the limit
            else:
                refused += 1
                within.append(round(time.monotonic() - opened, 3))
                s.close()
    for key in list(selector.get_map().values()):  # no answer within WAIT: refused late
        refused += 1
        within.append(round(time.monotonic() - opened, 3))
        kept.append(key.data)
    selector.close()
    for s in kept:
        s.close()
    return {"answered": answered, "refused": refused, "refused_within": within}


def first_byte(host: str, port: int, count: int) -> dict[str, object]:
    seconds = []
    for _ in range(count):
        start = time.monotonic()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(REQUEST)
            sock.recv(1)
        seconds.append(round(time.monotonic() - start, 3))
    return {"seconds": seconds}


def echo(host: str, port: int, path: str) -> dict[str, object]:
    with open(path, "rb") as f:
        payload = f.read()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return {"ok": data == payload, "sent": len(payload), "received": len(data)}


def main(argv: list[str]) -> int:
    what, host, port = argv[0], argv[1], int(argv[2])
    if what == "calls":
        out = calls(host, port, int(argv[3]), int(argv[4]) if len(argv) > 4 else 4)
    elif what == "hold":
        out = hold(host, port, int(argv[3]), float(argv[4]))
    elif what == "first-byte":
        out = first_byte(host, port, int(argv[3]))
    elif what == "echo":
        out = echo(host, port, argv[3])
    else:
        print(f"unknown command {what!r}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
