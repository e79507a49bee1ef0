"""Shared test builders: one per model type, and the one fake certificate source.

Tests of every tier import these instead of keeping private copies; a test
file may still wrap `workload` with its own defaults (a namespace, an
identity) in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.identity import csr
from nodeagent.identity.csr import WorkloadCertificate
from nodeagent.model.identity import Identity
from nodeagent.model.routing import (
    DestinationRule,
    VirtualService,
    parse_destination_rule,
    parse_virtual_service,
)
from nodeagent.model.workload import NetworkAddress, Port, Service, TunnelProtocol, Workload


def workload(
    name: str,
    *addresses: str,
    uid: str | None = None,
    namespace: str = "default",
    hbone: bool = False,
    **fields: Any,
) -> Workload:
    """A Workload named `name` (uid defaults to the name) at `addresses`."""
    return Workload(
        uid=name if uid is None else uid,
        name=name,
        namespace=namespace,
        addresses=tuple(ipaddress.ip_address(a) for a in addresses),
        tunnel_protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.NONE,
        **fields,
    )


def service(
    name: str, *vips: str, namespace: str = "default", ports: tuple[Port, ...] = (), **fields: Any
) -> Service:
    """A Service `name` in `namespace` (hostname `name.namespace.svc.cluster.local`) at `vips`."""
    return Service(
        name=name,
        namespace=namespace,
        hostname=f"{name}.{namespace}.svc.cluster.local",
        addresses=tuple(NetworkAddress("", ipaddress.ip_address(v)) for v in vips),
        ports=ports,
        **fields,
    )


def virtual_service(
    name: str,
    namespace: str = "default",
    *,
    spec: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> VirtualService:
    """A VirtualService read from Istio's JSON shape; by default one tcp route to host `name`."""
    if spec is None:
        spec = {"hosts": [name], "tcp": [{"route": [{"destination": {"host": name}}]}]}
    return parse_virtual_service(namespace, name, spec, annotations or {})


def destination_rule(
    name: str,
    namespace: str = "default",
    *,
    spec: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> DestinationRule:
    """A DestinationRule read from Istio's JSON shape; by default host `name`, subsets v1 and v2
    by their `version` label."""
    if spec is None:
        spec = {
            "host": name,
            "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")],
        }
    return parse_destination_rule(namespace, name, spec, annotations or {})


class FakeCertificates:
    """A CertificateManager stand-in: issues from a real CA on first request."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca
        self._certs: dict[Identity, WorkloadCertificate] = {}

    def issue(self, identity: Identity) -> WorkloadCertificate:
        if identity not in self._certs:
            key = csr.generate_key()
            chain = self._ca.sign(csr.build_csr(key, identity), 3600)
            self._certs[identity] = csr.check_chain(chain, identity, key, self._ca.clock())
        return self._certs[identity]

    async def wait_for(self, identity: Identity) -> WorkloadCertificate:
        return self.issue(identity)


def self_signed(directory: Path, name: str = "kube-apiserver") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA): (cert, key) files."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.asynccontextmanager
async def loopback_acceptor(
    serve: Callable[[socket.socket], Awaitable[None]],
) -> AsyncIterator[tuple[str, int]]:
    """A 127.0.0.1 listener that hands each accepted (non-blocking) socket to
    `serve` in its own task, as PodListeners does; yields its address and
    cancels everything on exit."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    lsock.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            task = asyncio.create_task(serve(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.create_task(accept())
    try:
        yield lsock.getsockname()
    finally:
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        lsock.close()


async def wait_until(predicate: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Poll a condition that spans several components (no single event covers it)."""
    try:
        async with asyncio.timeout(seconds):
            while not predicate():  # noqa: ASYNC110 (see the docstring)
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class MeshFile:
    """A mesh file whose every write gets a new mtime, so the poller sees it."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self._stamp = 1_000_000_000_000_000_000
        self.write(text)

    def write(self, text: str) -> None:
        self.path.write_text(text)
        self._stamp += 1_000_000_000
        os.utime(self.path, ns=(self._stamp, self._stamp))
