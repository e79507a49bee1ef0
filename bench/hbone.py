"""Benchmark: in-memory HTTP/2 DATA throughput of our HBONE framing vs the `h2` package.

One CONNECT stream; the client sends N MiB to a server connection, the server acknowledges
what it reads (so WINDOW_UPDATEs flow back) and the client keeps its window full. Between the
two, the bytes are cut into 256 KiB "reads" as a socket would deliver them (the join that does
this stands in for the kernel copy and is paid by both implementations alike).
Both sides are ours, then both sides are h2 with the same settings (4 MiB stream window,
16 MiB connection window, 1 MiB max frame size). CPU time of the whole exchange is measured
on one core, so Gbit/s here is "payload per CPU-second of framing".

    python -m bench.hbone [--mib 512] [--chunk-kib 256] [--rounds 3] [--tls]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

from bench.report import emit
from nodeagent.hbone.connection import (
    ConnectionConfig,
    DataReceived,
    ResponseReceived,
    TunnelConnection,
)

READ_SIZE = 256 * 1024
MIB = 1 << 20


def as_reads(buffers: list) -> list[memoryview]:
    """What the peer's socket would hand over: the bytes in READ_SIZE pieces."""
    if not buffers:
        return []
    wire = memoryview(b"".join(buffers))
    return [wire[i : i + READ_SIZE] for i in range(0, len(wire), READ_SIZE)]


def bench_ours(total: int, chunk: int) -> tuple[float, float]:
    client = TunnelConnection(ConnectionConfig(client_side=True))
    server = TunnelConnection(ConnectionConfig(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    sid = client.open_tunnel("10.0.0.1:5201")
    for r in as_reads(client.data_to_send()):
        server.receive_data(r)
    server.send_response(sid, 200)
    for r in as_reads(server.data_to_send()):
        events = client.receive_data(r)
    assert any(isinstance(e, ResponseReceived) for e in events)

    payload = memoryview(bytes(chunk))
    sent = received = 0
    frame_cpu = 0.0
    start = time.process_time()
    while received < total:
        while sent < total and client.buffered_bytes(sid) == 0:
            client.send_data(sid, payload)
            sent += chunk
        t0 = time.process_time()
        out = client.data_to_send()
        frame_cpu += time.process_time() - t0
        for r in as_reads(out):
            for ev in server.receive_data(r):
                if isinstance(ev, DataReceived):
                    received += len(ev.data)
                    server.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
        for r in as_reads(server.data_to_send()):
            client.receive_data(r)
    return time.process_time() - start, frame_cpu


def bench_sender_only(total: int, chunk: int) -> float:
    """Our sender's cost alone: send_data + data_to_send with windows always open, no receiver."""
    client = TunnelConnection(ConnectionConfig(client_side=True))
    client.initiate_connection()
    sid = client.open_tunnel("10.0.0.1:5201")
    client._conn_outbound_window = 1 << 62  # bench only: a peer that never runs dry
    client._streams[sid].outbound_window = 1 << 62
    client.remote_settings[5] = MIB
    payload = memoryview(bytes(chunk))
    start = time.process_time()
    for _ in range(total // chunk):
        client.send_data(sid, payload)
        client.data_to_send()
    return time.process_time() - start


def bench_h2(total: int, chunk: int) -> float:
    ccfg = h2.config.H2Configuration(client_side=True)
    scfg = h2.config.H2Configuration(client_side=False)
    client = h2.connection.H2Connection(ccfg)
    server = h2.connection.H2Connection(scfg)
    for conn in (client, server):
        conn.initiate_connection()
        conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4 * MIB,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MIB,
            }
        )
        conn.increment_flow_control_window(16 * MIB - 65535)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:5201")])

    def shuttle(src: h2.connection.H2Connection, dst: h2.connection.H2Connection) -> list:
        events = []
        for r in as_reads([src.data_to_send()]):
            events += dst.receive_data(bytes(r))
        return events

    for _ in range(3):
        shuttle(client, server)
        shuttle(server, client)
    server.send_headers(sid, [(":status", "200")])
    shuttle(server, client)

    payload = bytes(chunk)
    sent = received = 0
    start = time.process_time()
    while received < total:
        while sent < total:
            window = min(client.local_flow_control_window(sid), client.max_outbound_frame_size)
            if window <= 0:
                break
            n = min(window, chunk)
            client.send_data(sid, payload[:n] if n < chunk else payload)
            sent += n
        for ev in shuttle(client, server):
            if isinstance(ev, h2.events.DataReceived):
                received += len(ev.data)
                server.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        shuttle(server, client)
    return time.process_time() - start


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The agents' own mutual-TLS contexts, with workload certificates from the control
    plane's CA (what two agents present to each other). Imported here: only `--tls` needs
    them, and the framing figures are better taken without gRPC and the CA loaded."""
    from nodeagent.controlplane.ca import CertificateAuthority
    from nodeagent.identity import csr, tls
    from nodeagent.model.identity import Identity

    ca = CertificateAuthority.create("cluster.local")
    certs = []
    for sa in ("backend", "frontend"):
        identity = Identity("cluster.local", "bench", sa)
        key = csr.generate_key()
        chain = ca.sign(csr.build_csr(key, identity), 3600)
        certs.append(csr.check_chain(chain, identity, key, ca.clock()))
    return tls.server_context(certs[0]), tls.client_context(certs[1])


class _Sink(asyncio.Protocol):
    def __init__(self, total: int, done: asyncio.Future[None]) -> None:
        self.left, self.done = total, done

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)


class _Source(asyncio.Protocol):
    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


async def _tls_run(total: int, chunk: int, hbone: bool) -> float:
    """Wall time to push `total` bytes client -> server over loopback TLS 1.3 in this process."""
    from nodeagent.hbone.aio import HboneConnection, TunnelStream

    server_ctx, client_ctx = _tls_contexts()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    got = [0]

    def on_request(stream: TunnelStream) -> None:
        stream.respond(200)

        def count(data: memoryview) -> None:
            got[0] += len(data)
            if got[0] >= total and not done.done():
                done.set_result(None)

        stream.on_data = count

    factory = (
        (lambda: HboneConnection(client_side=False, on_request=on_request))
        if hbone
        else (lambda: _Sink(total, done))
    )
    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    payload = memoryview(bytes(chunk))
    if hbone:
        transport, conn = await loop.create_connection(
            lambda: HboneConnection(client_side=True),
            "127.0.0.1",
            port,
            ssl=client_ctx,
            server_hostname="127.0.0.1",
        )
        stream = await conn.open_tunnel("10.0.0.1:5201")
        start = time.perf_counter()
        for _ in range(total // chunk):
            stream.write(payload)
            await stream.drain()
    else:
        transport, source = await loop.create_connection(
            _Source, "127.0.0.1", port, ssl=client_ctx, server_hostname="127.0.0.1"
        )
        start = time.perf_counter()
        for _ in range(total // chunk):
            transport.write(payload)
            await source.writable.wait()
    await done
    elapsed = time.perf_counter() - start
    transport.close()
    server.close()
    await server.wait_closed()
    return elapsed


class _MemoryTransport:
    """Delivers writes to the peer connection on the next loop turn, as a socket would."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.peer: asyncio.BaseProtocol | None = None

    def write(self, data: bytes) -> None:
        assert self.peer is not None
        self.loop.call_soon(self.peer.data_received, bytes(data))  # type: ignore[attr-defined]

    def writelines(self, buffers: list) -> None:
        assert self.peer is not None
        self.loop.call_soon(self.peer.data_received, b"".join(buffers))  # type: ignore[attr-defined]

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def _pingpong(round_trips: int) -> float:
    """Microseconds of our Python per 64-byte round trip through one tunnel, both HBONE ends
    (send, receive, echo, receive), over in-memory transports: the part of an agent's latency
    cost that is ours, without sockets, TLS or wake-ups."""
    from nodeagent.hbone.aio import HboneConnection, TunnelStream

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_request(stream: TunnelStream) -> None:
        stream.respond(200)
        stream.on_data = stream.write  # type: ignore[assignment]  # echo (its bool unused)

    server = HboneConnection(client_side=False, on_request=on_request)
    client = HboneConnection(client_side=True)
    to_server, to_client = _MemoryTransport(loop), _MemoryTransport(loop)
    to_server.peer, to_client.peer = server, client
    server.connection_made(to_client)  # type: ignore[arg-type]
    client.connection_made(to_server)  # type: ignore[arg-type]
    stream = await client.open_tunnel("10.0.0.1:9000")
    message, count = b"x" * 64, [0]

    def echoed(_data: memoryview) -> None:
        count[0] += 1
        if count[0] >= round_trips:
            done.set_result(None)
        else:
            stream.write(message)

    stream.on_data = echoed
    start = time.process_time()
    stream.write(message)
    await done
    return (time.process_time() - start) / round_trips * 1e6


def gbps(total: int, seconds: float) -> float:
    return round(total * 8 / seconds / 1e9, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="payload per run, MiB")
    parser.add_argument("--chunk-kib", type=int, default=256, help="size of each send_data call")
    parser.add_argument("--rounds", type=int, default=3, help="runs per implementation (best kept)")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also time our tunnel vs bare TLS over loopback (one process)",
    )
    parser.add_argument("--round-trips", type=int, default=20000, help="64-byte ping-pongs")
    args = parser.parse_args()
    total, chunk = args.mib * MIB, args.chunk_kib * 1024
    pingpong = min(asyncio.run(_pingpong(args.round_trips)) for _ in range(args.rounds))
    ours = min(bench_ours(total, chunk)[0] for _ in range(args.rounds))
    sender = min(bench_sender_only(total, chunk) for _ in range(args.rounds))
    theirs = min(bench_h2(total, chunk) for _ in range(args.rounds))
    extra = {}
    if args.tls:
        bare = min(asyncio.run(_tls_run(total, chunk, hbone=False)) for _ in range(args.rounds))
        tunnel = min(asyncio.run(_tls_run(total, chunk, hbone=True)) for _ in range(args.rounds))
        extra = {
            "tls_loopback_one_process": {
                "bare_tls_gbps": gbps(total, bare),
                "hbone_gbps": gbps(total, tunnel),
            }
        }
    emit(
        {
            **extra,
            "payload_mib": args.mib,
            "chunk_kib": args.chunk_kib,
            "read_kib": READ_SIZE // 1024,
            "ours_gbps": gbps(total, ours),
            "ours_sender_only_gbps": gbps(total, sender),
            "h2_gbps": gbps(total, theirs),
            "speedup_vs_h2": round(theirs / ours, 1),
            "pingpong_cpu_us_per_round_trip": round(pingpong, 2),
            "cpu_seconds": {
                "ours": round(ours, 3),
                "ours_sender_only": round(sender, 4),
                "h2": round(theirs, 3),
            },
        },
        indent=2,
    )


if __name__ == "__main__":
    main()
