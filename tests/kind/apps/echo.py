"""Tiny TCP app for the kind e2e test (stdlib only; runs in the nodeagent image).

  echo.py serve PORT               answer each connection with one line:
                                   "<pod> saw <peer ip> said <first line>"
  echo.py call HOST PORT MESSAGE   send MESSAGE, print the reply; exit 1 when
                                   the connection fails or no reply comes
                                   (how a DENY policy shows up behind capture)
  echo.py sleep                    idle until SIGTERM (the client pods)

The peer IP the server prints shows whether the original source survived the
tunnel; the message lets a packet capture look for plaintext on the wire.
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import sys

REPLY_TIMEOUT = 5.0
MAX_LINE = 4096


class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE).decode(errors="replace").strip()
        pod = os.environ.get("POD_NAME", socket.gethostname())
        self.wfile.write(f"{pod} saw {self.client_address[0]} said {line}\n".encode())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(port: int) -> int:
    with Server(("0.0.0.0", port), EchoHandler) as server:
        print(f"serving on {port}", flush=True)
        server.serve_forever()
    return 0


def call(host: str, port: int, message: str) -> int:
    try:
        with socket.create_connection((host, port), timeout=REPLY_TIMEOUT) as sock:
            sock.sendall(message.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(MAX_LINE):
                chunks.append(chunk)
    except OSError as exc:
        print(f"call {host}:{port} failed: {exc}", file=sys.stderr)
        return 1
    reply = b"".join(chunks).decode(errors="replace").strip()
    if not reply:
        print(f"call {host}:{port}: no reply", file=sys.stderr)
        return 1
    print(reply)
    return 0


def sleep() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 2:
        return serve(int(argv[1]))
    if argv[:1] == ["call"] and len(argv) == 4:
        return call(argv[1], int(argv[2]), argv[3])
    if argv == ["sleep"]:
        return sleep()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
