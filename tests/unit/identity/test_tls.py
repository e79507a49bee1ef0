"""Mutual TLS between a client and a server context over a loopback socket pair."""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.identity import csr, tls
from nodeagent.model.identity import Identity

T0 = 1_800_000_000.0
CLIENT = Identity("cluster.local", "ns1", "client")
SERVER = Identity("cluster.local", "ns2", "server")


def issue(ca: CertificateAuthority, identity: Identity, ttl: float = 3600):
    key = csr.generate_key()
    now = ca.clock()
    return csr.check_chain(ca.sign(csr.build_csr(key, identity), ttl), identity, key, now)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local")


@dataclass
class Outcome:
    peer: Identity | None = None
    error: Exception | None = None
    version: str | None = None
    alpn: str | None = None
    cipher: str | None = None


def handshake(
    client_ctx: ssl.SSLContext,
    server_ctx: ssl.SSLContext,
    expected: set[Identity],
    trust_domain: str = "cluster.local",
) -> tuple[Outcome, Outcome]:
    """Handshake over a socketpair, then the SPIFFE checks, then one byte each way."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    client, server = Outcome(), Outcome()

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as s:
                server.peer = tls.client_identity(s, trust_domain)
                server.version, server.alpn = s.version(), s.selected_alpn_protocol()
                if s.recv(1) == b"?":
                    s.sendall(b"!")
        except Exception as e:
            server.error = e

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(a) as c:
            client.peer = tls.verify_server_identity(c, expected)
            client.version, client.alpn = c.version(), c.selected_alpn_protocol()
            client.cipher = c.cipher()[0]
            c.sendall(b"?")
            if c.recv(1) != b"!":
                raise ConnectionError("server closed without answering")
    except Exception as e:
        client.error = e
    finally:
        thread.join(10)
        a.close()
        b.close()
    return client, server


def test_mutual_tls_succeeds_for_matching_identities(ca: CertificateAuthority) -> None:
    client_cert, server_cert = issue(ca, CLIENT), issue(ca, SERVER)
    client, server = handshake(
        tls.client_context(client_cert), tls.server_context(server_cert), {SERVER}
    )
    assert client.error is None and server.error is None
    assert client.peer == SERVER
    assert server.peer == CLIENT
    assert client.version == server.version == "TLSv1.3"
    assert client.alpn == server.alpn == "h2"
    assert client.cipher is not None and "GCM" in client.cipher


def test_client_refuses_a_server_with_another_identity(ca: CertificateAuthority) -> None:
    impostor = Identity("cluster.local", "ns2", "impostor")
    client, _ = handshake(
        tls.client_context(issue(ca, CLIENT)), tls.server_context(issue(ca, impostor)), {SERVER}
    )
    assert isinstance(client.error, tls.PeerIdentityError)
    assert "spiffe://cluster.local/ns/ns2/sa/impostor" in str(client.error)
    assert "not one of the expected" in str(client.error)


def test_server_refuses_a_client_from_another_trust_domain(ca: CertificateAuthority) -> None:
    foreign = Identity("other.domain", "ns1", "client")
    _, server = handshake(
        tls.client_context(issue(ca, foreign)), tls.server_context(issue(ca, SERVER)), {SERVER}
    )
    assert isinstance(server.error, tls.PeerIdentityError)
    assert "not in trust domain 'cluster.local'" in str(server.error)


def test_peers_from_another_root_are_refused(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create("cluster.local")
    client, server = handshake(
        tls.client_context(issue(other, CLIENT)), tls.server_context(issue(ca, SERVER)), {SERVER}
    )
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(client.error)
    assert server.error is not None


def stale(ca: CertificateAuthority) -> CertificateAuthority:
    """The same CA with its clock two minutes back, to issue already-expired leaves."""
    return dataclasses.replace(ca, clock=lambda: time.time() - 120)


def test_expired_client_certificate_is_refused(ca: CertificateAuthority) -> None:
    old = issue(stale(ca), CLIENT, ttl=60)
    _, server = handshake(tls.client_context(old), tls.server_context(issue(ca, SERVER)), {SERVER})
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert "certificate has expired" in str(server.error)


def test_expired_server_certificate_is_refused(ca: CertificateAuthority) -> None:
    old = issue(stale(ca), SERVER, ttl=60)
    client, _ = handshake(tls.client_context(issue(ca, CLIENT)), tls.server_context(old), {SERVER})
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert "certificate has expired" in str(client.error)


def test_client_without_certificate_is_refused(ca: CertificateAuthority) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.root_pem())
    _, server = handshake(bare, tls.server_context(issue(ca, SERVER)), {SERVER})
    assert isinstance(server.error, ssl.SSLError)
    assert "certificate" in str(server.error)


def test_private_key_goes_through_a_closed_memory_file(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert = issue(ca, CLIENT)
    made: list[str] = []
    real = os.memfd_create

    def spy(name: str, flags: int = 0) -> int:
        made.append(name)
        return real(name, flags)

    monkeypatch.setattr(os, "memfd_create", spy)
    tls.client_context(cert)
    tls.server_context(cert)
    assert made == ["workload-cert", "workload-cert"]
    open_files = [str(fd.readlink()) for fd in Path("/proc/self/fd").iterdir() if _is_link(fd)]
    assert not any("workload-cert" in target for target in open_files)


def _is_link(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:
        return False
