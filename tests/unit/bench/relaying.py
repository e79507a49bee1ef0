"""Helpers for the tests of the benchmark's relay pairs (`bench.tls_relay`, `bench.py_h2_pair`)."""

from __future__ import annotations

import socket
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_through(port: int, payload: bytes) -> bytes:
    """What comes back of `payload` sent to a loopback echo through the relay on `port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()  # send and read at once: the echo fills the windows otherwise
        got = bytearray()
        while len(got) < len(payload) and (data := s.recv(1 << 20)):
            got += data
        sender.join()
    return bytes(got)
