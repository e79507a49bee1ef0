"""Run the shipped control plane as a process: xDS (and optionally the CA) on one port.

The CLI (`nodeagent controlplane`) only parses arguments and calls `serve()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from nodeagent.controlplane import ca as ca_mod
from nodeagent.controlplane.server import ControlPlaneServer
from nodeagent.model.constants import CONTROLPLANE_XDS_PORT

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ControlPlaneOptions:
    mesh: Path
    listen: str = f"127.0.0.1:{CONTROLPLANE_XDS_PORT}"
    ca_dir: Path | None = None
    """Serve the CA too, with its root kept in this directory (created if missing)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """Serve TLS with this certificate and key instead of plaintext."""
    require_token: bool = False
    """Refuse xDS streams whose bearer token names no node of the mesh."""


def build_server(opts: ControlPlaneOptions, *, freeze_gc: bool = False) -> ControlPlaneServer:
    """The server with its optional CA and TLS; raises MeshError/CaError/OSError.
    `freeze_gc` only where the process is the control plane alone (serve())."""
    creds = None
    if opts.tls_cert is not None or opts.tls_key is not None:
        if opts.tls_cert is None or opts.tls_key is None:
            raise ValueError("--tls-cert and --tls-key go together")
        creds = grpc.ssl_server_credentials(
            [(opts.tls_key.read_bytes(), opts.tls_cert.read_bytes())]
        )
    server = ControlPlaneServer(
        opts.mesh,
        opts.listen,
        server_credentials=creds,
        require_token=opts.require_token,
        freeze_gc=freeze_gc,
    )
    if opts.ca_dir is not None:
        authority = ca_mod.CertificateAuthority.load_or_create(
            opts.ca_dir, server.mesh_store.mesh.trust_domain
        )
        service = ca_mod.CertificateService(authority, server.mesh_store)
        server.add_servicer(lambda s: ca_mod.add_to_server(s, service))
    return server


async def serve(opts: ControlPlaneOptions) -> None:
    """Serve until SIGINT/SIGTERM, then stop cleanly."""
    # This process is only the control plane: keep the loaded mesh out of the GC's
    # full collections (server.freeze_long_lived).
    server = build_server(opts, freeze_gc=True)
    await server.start()
    # One line on stdout so scripts using port 0 learn the address.
    print(f"controlplane serving {opts.mesh} on {server.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1.0)
        print("controlplane stopped", file=sys.stderr, flush=True)
