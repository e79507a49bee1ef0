"""Benchmark: HTTP/1.1 keep-alive through our waypoint's L7 engine vs HAProxy in HTTP mode.

Three paths on this box, measured in the same run, interleaved (each round measures every
path in turn, the starting one rotating), with `wrk` as the load generator:

* `direct`: wrk -> upstream (the baseline);
* `haproxy`: wrk -> HAProxy (Debian's, `mode http`, keep-alive both sides, one process,
  `nbthread 1`, no logging) -> upstream;
* `waypoint`: wrk -> our waypoint's HTTP/1.1 engine (`serve_http1` over TCP sockets, on uvloop
  as `nodeagent waypoint` runs, with a dispatcher that forwards every request to the upstream
  and records each into the real `RequestTelemetry`; no access log, as HAProxy logs nothing)
  -> upstream.

This measures the L7 engine without HBONE on either side (HAProxy has none either), so the
comparison is like-for-like; the mesh path with HBONE both ways is not part of it. The
upstream is a small uvloop keep-alive server answering every request with a fixed 13-byte
body, in its own process. Nothing is pinned: wrk, the proxy and the upstream share the
machine's cores.

Figures per path and connection count: requests/s, wrk's p50/p99 latency, the p50 added over
`direct` (per round, against that round's direct run), and the proxy's CPU (user + system of
its process, from /proc; its user-space share too) in milliseconds per 1,000 requests; then
the ratios waypoint/HAProxy.

    python -m bench.waypoint [--rounds 3] [--seconds 4] [--connections 1,16]

Prints one JSON object. `python -m bench.waypoint upstream PORT` and
`python -m bench.waypoint proxy PORT UPSTREAM_PORT` are the two programs it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import emit

LOOPBACK = "127.0.0.1"
BODY = b"hello, world\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY
)
VARIANTS = ("direct", "haproxy", "waypoint")
PROXIES = ("haproxy", "waypoint")

# wrk's summary as one JSON line: its latency percentiles are in microseconds.
WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "socket_errors": %d, "status_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""

HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench
    bind {host}:{port}
    default_backend upstream
backend upstream
    server up {host}:{upstream}
"""

Figures = dict[str, dict[str, float]]  # variant -> figure name -> value


# -- pure parts ------------------------------------------------------------------------------


def parse_wrk(stdout: str) -> dict[str, float]:
    """requests/s, p50/p99 (microseconds) and the request count from wrk's output with
    WRK_SCRIPT (its last line starting with "{"); raises ValueError on errors or no result."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError(f"no result line in wrk's output: {stdout.strip()[-300:]!r}")
    raw = json.loads(lines[-1])
    if raw["socket_errors"] or raw["status_errors"]:
        raise ValueError(
            f"wrk saw {raw['socket_errors']} socket errors and {raw['status_errors']} "
            "non-2xx/3xx responses"
        )
    if raw["requests"] <= 0 or raw["duration_us"] <= 0:
        raise ValueError("wrk completed no requests")
    return {
        "requests": float(raw["requests"]),
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_us": float(raw["p50_us"]),
        "p99_us": float(raw["p99_us"]),
    }


def add_overheads(rnd: Figures) -> Figures:
    """One round's figures with `added_p50_us` (the proxy's p50 minus this round's direct p50)
    on each proxy."""
    direct = rnd["direct"]["p50_us"]
    return {
        name: {**figures, "added_p50_us": round(figures["p50_us"] - direct, 1)}
        if name != "direct"
        else dict(figures)
        for name, figures in rnd.items()
    }


def ratios(summary: Figures) -> dict[str, float | None]:
    """waypoint / HAProxy for requests/s, added p50 and CPU per 1,000 requests (None where
    HAProxy's figure is zero)."""
    ours, theirs = summary["waypoint"], summary["haproxy"]

    def ratio(key: str) -> float | None:
        return round(ours[key] / theirs[key], 2) if theirs.get(key) else None

    return {
        "rps": ratio("rps"),
        "added_p50": ratio("added_p50_us"),
        "cpu_per_1k_requests": ratio("cpu_ms_per_1k_req"),
    }


def median_figures(rounds: list[Figures]) -> Figures:
    """Each variant's figures: the median over rounds."""
    return {
        variant: {
            key: round(statistics.median(r[variant][key] for r in rounds), 3)
            for key in rounds[0][variant]
        }
        for variant in rounds[0]
    }


# -- the programs it starts --------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """Answers each request head (bodyless GETs, pipelined or not) with RESPONSE."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.pending + data
        heads = buf.count(b"\r\n\r\n")
        if heads:
            assert self.transport is not None
            self.transport.write(RESPONSE * heads)
            buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
        self.pending = buf


async def _serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, LOOPBACK, port, backlog=1024)
    async with server:
        await server.serve_forever()


async def _serve_waypoint(port: int, upstream_port: int) -> None:
    """Our HTTP/1.1 engine as a plain TCP proxy to one upstream."""
    from nodeagent.model.identity import Identity
    from nodeagent.waypoint.exchange import (
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
    from nodeagent.waypoint.router import CONNECT_FAILURE, TunnelCaller
    from nodeagent.waypoint.streams import READ_SIZE, SocketByteStream
    from nodeagent.waypoint.telemetry import RequestTelemetry

    upstream = Endpoint(key="upstream", address=f"{LOOPBACK}:{upstream_port}")
    telemetry = RequestTelemetry()
    caller = TunnelCaller(
        identity=Identity("cluster.local", "bench", "client"),
        address=(LOOPBACK, 0),
        workload=None,
        forwarded="",
        baggage="",
    )

    class ToUpstream:
        def route(self, head: RequestHead) -> Forward | LocalReply:
            return Forward(head)

        async def pick(self, forward: Forward) -> Endpoint | LocalReply:
            return upstream

        def attempt_done(self, endpoint: Endpoint, status: int, *, local_origin: bool) -> None:
            pass

        def mirrors(self, forward: Forward) -> list[tuple[Endpoint, RequestHead]]:
            return []

        def mirror_done(self, endpoint: Endpoint, status: int) -> None:
            pass

        async def open(self, endpoint: Endpoint, protocol: str) -> ByteStream:
            try:
                return await SocketByteStream.connect(LOOPBACK, upstream_port)
            except OSError as error:
                raise UpstreamError(CONNECT_FAILURE, str(error)) from error

        def record(self, record: RequestRecord) -> None:
            telemetry.request_done(record, caller, None, None)

    dispatcher: Dispatcher = ToUpstream()
    pool = Http1Upstreams()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = SocketByteStream(reader, writer)
        try:
            first = await stream.read()
            if first:
                await serve_http1(stream, first, dispatcher, pool)
        except ConnectionError:
            pass
        finally:
            stream.close()

    server = await asyncio.start_server(handle, LOOPBACK, port, limit=2 * READ_SIZE, backlog=1024)
    async with server:
        await server.serve_forever()


def _run_program(argv: list[str]) -> int:
    from nodeagent.cli.run import event_loop_runner

    with event_loop_runner() as runner:  # uvloop, as the waypoint and agent run
        if argv[0] == "upstream":
            runner.run(_serve_upstream(int(argv[1])))
        else:
            runner.run(_serve_waypoint(int(argv[1]), int(argv[2])))
    return 0


# -- the benchmark ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {LOOPBACK}:{port}") from None
            time.sleep(0.05)


def _wrk(script: Path, port: int, connections: int, seconds: float) -> dict[str, float]:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://{LOOPBACK}:{port}/",
    ]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"wrk failed: {run.stderr.strip()[-300:]}")
    return parse_wrk(run.stdout)


def bench(rounds: int, seconds: float, connections: list[int]) -> dict[str, object]:
    from bench.harness import Procs, cpu_seconds, cpu_split

    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found (scripts/setup.sh installs it)")
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="bench-waypoint-"))
    try:
        up_port, hap_port, wp_port = _free_port(), _free_port(), _free_port()
        script = workdir / "report.lua"
        script.write_text(WRK_SCRIPT)
        config = workdir / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(host=LOOPBACK, port=hap_port, upstream=up_port))
        me = [sys.executable, "-m", "bench.waypoint"]
        upstream = procs.start([*me, "upstream", str(up_port)])
        _wait_port(up_port)
        haproxy = procs.start(["haproxy", "-db", "-f", str(config)])
        waypoint = procs.start([*me, "proxy", str(wp_port), str(up_port)])
        _wait_port(hap_port)
        _wait_port(wp_port)
        ports = {"direct": up_port, "haproxy": hap_port, "waypoint": wp_port}
        pids = {"direct": [], "haproxy": [haproxy.pid], "waypoint": [waypoint.pid]}

        def measure(variant: str, conns: int, secs: float) -> dict[str, float]:
            (user0, sys0), up0 = cpu_split(pids[variant]), cpu_seconds([upstream.pid])
            figures = _wrk(script, ports[variant], conns, secs)
            (user1, sys1), up1 = cpu_split(pids[variant]), cpu_seconds([upstream.pid])
            per_1k = 1e6 / figures.pop("requests")  # CPU seconds -> ms per 1,000 requests
            if variant != "direct":
                cpu = user1 - user0 + sys1 - sys0
                figures["cpu_ms_per_1k_req"] = round(cpu * per_1k, 2)
                # user space (HTTP parsing, routing, telemetry) vs the kernel's socket work
                figures["user_cpu_ms_per_1k_req"] = round((user1 - user0) * per_1k, 2)
            figures["upstream_cpu_ms_per_1k_req"] = round((up1 - up0) * per_1k, 2)
            return figures

        for variant in VARIANTS:  # warm-up: connections made, code paths hot
            measure(variant, max(connections), 1)
        per_conns: dict[int, list[Figures]] = {c: [] for c in connections}
        for i in range(rounds):
            for conns in connections:
                order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
                rnd = add_overheads({v: measure(v, conns, seconds) for v in order})
                rnd = {v: rnd[v] for v in VARIANTS}
                for v, figures in rnd.items():
                    print(f"round {i + 1} c={conns} {v}: {figures}", file=sys.stderr, flush=True)
                per_conns[conns].append(rnd)
        for name, p in (("upstream", upstream), ("haproxy", haproxy), ("waypoint", waypoint)):
            if p.poll() is not None:
                raise RuntimeError(f"the {name} process exited during the run ({p.returncode})")
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, object] = {}
    for conns, rnds in per_conns.items():
        summary = median_figures(rnds)
        results[f"c{conns}"] = {**summary, "waypoint_over_haproxy": ratios(summary)}
    haproxy_version = subprocess.run(
        ["haproxy", "-v"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    return {
        "what": (
            "HTTP/1.1 keep-alive GET, 13-byte body, wrk -t1 on loopback; waypoint = our "
            "serve_http1 engine over TCP on uvloop (no HBONE either side, like HAProxy), "
            "telemetry on, no access log"
        ),
        "haproxy": haproxy_version,
        "rounds": rounds,
        "seconds": seconds,
        "cpu_unit": (
            "CPU ms (user+system; user_ alone) of the proxy process per 1,000 requests, "
            "from /proc; upstream_ the upstream's"
        ),
        **results,
    }


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("upstream", "proxy"):
        return _run_program(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="per wrk run")
    ap.add_argument("--connections", default="1,16", help="keep-alive connections per run")
    args = ap.parse_args(argv)
    connections = [int(c) for c in args.connections.split(",")]
    emit(bench(args.rounds, args.seconds, connections), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
