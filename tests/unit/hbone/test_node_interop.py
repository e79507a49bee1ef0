"""Interop over real TLS 1.3 (ALPN h2) on loopback with an independent HTTP/2 implementation:
Node.js's built-in `http2` module, as client of our server and as server for our client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import ssl
from pathlib import Path

import pytest

from nodeagent.hbone.aio import HboneConnection, TunnelStream
from tests.builders import self_signed

NODE = shutil.which("node")
PEER_JS = Path(__file__).with_name("node_peer.js")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.fixture
def cert_files(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, "hbone-test")


def tls_context(purpose: ssl.Purpose, cert: Path, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    if key is not None:
        ctx.load_cert_chain(cert, key)
    else:
        ctx.load_verify_locations(cert)
    return ctx


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()  # by PID
    await proc.wait()


async def test_node_http2_client_tunnels_through_our_server(cert_files):
    cert, key = cert_files
    seen: list[TunnelStream] = []

    def on_request(stream: TunnelStream) -> None:
        seen.append(stream)
        stream.respond(200, [("baggage", "service.name=ours")])
        stream.on_data = stream.write  # echo, zero-copy: the received views go straight back out
        stream.on_end = stream.write_eof

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HboneConnection(client_side=False, on_request=on_request),
        "127.0.0.1",
        0,
        ssl=tls_context(ssl.Purpose.CLIENT_AUTH, cert, key),
    )
    port = server.sockets[0].getsockname()[1]
    size = 6 * 1024 * 1024 + 17  # beyond Node's 64 KiB default windows and our 4 MiB stream window
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(PEER_JS),
        "client",
        str(port),
        str(cert),
        str(size),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await stop(proc)
        server.close()
        await server.wait_closed()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["status"] == 200 and result["baggage"] == "service.name=ours"
    assert result["alpn"] == "h2"
    assert result["length"] == size and result["received"] == result["sent"]
    (stream,) = seen
    assert stream.authority == "10.9.8.7:8080"
    assert ("baggage", "k8s.namespace.name=node") in stream.headers


async def test_our_client_tunnels_through_node_http2_server(cert_files):
    cert, key = cert_files
    proc = await asyncio.create_subprocess_exec(
        NODE, str(PEER_JS), "server", str(cert), str(key), stdout=asyncio.subprocess.PIPE
    )
    conn = None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        port = json.loads(line)["port"]
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_connection(
            lambda: HboneConnection(client_side=True),
            "127.0.0.1",
            port,
            ssl=tls_context(ssl.Purpose.SERVER_AUTH, cert),
            server_hostname="127.0.0.1",
        )
        assert transport.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        answers: list = []
        stream = await asyncio.wait_for(
            conn.open_tunnel(
                "[fd00::7]:8080", [("forwarded", 'for="10.0.0.1:4444"')], answers=answers
            ),
            10,
        )
        [response] = answers
        assert response.status == 200
        assert ("x-authority", "[fd00::7]:8080") in response.headers
        assert ("x-forwarded", 'for="10.0.0.1:4444"') in response.headers
        payload = os.urandom(5 * 1024 * 1024 + 3)

        async def send() -> None:
            view = memoryview(payload)
            for off in range(0, len(payload), 256 * 1024):
                stream.write(view[off : off + 256 * 1024])
                await stream.drain()
            stream.write_eof()  # half-close; the echo keeps coming

        async def receive() -> bytes:
            got = bytearray()
            while chunk := await stream.read():
                got += chunk
            return bytes(got)

        _, echoed = await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        # a second tunnel on the same connection, then a graceful close
        second = await asyncio.wait_for(conn.open_tunnel("10.0.0.9:80"), 10)
        second.write(b"ping")
        second.write_eof()
        assert await asyncio.wait_for(second.read(), 10) == b"ping"
        assert await asyncio.wait_for(second.read(), 10) == b""
    finally:
        if conn is not None:
            conn.close()
            await asyncio.wait_for(conn.closed, 10)
        await stop(proc)


@pytest.mark.parametrize("status", [401, 503])
async def test_node_http2_client_sees_our_refusal(cert_files, status):
    cert, key = cert_files
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HboneConnection(client_side=False, on_request=lambda s: s.respond(status)),
        "127.0.0.1",
        0,
        ssl=tls_context(ssl.Purpose.CLIENT_AUTH, cert, key),
    )
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        NODE, str(PEER_JS), "client", str(port), str(cert), "0", stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await stop(proc)
        server.close()
        await server.wait_closed()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert (result["status"], result["length"]) == (status, 0)
