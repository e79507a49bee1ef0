"""`ssl.SSLContext`s for workload mutual TLS, and the SPIFFE checks after the handshake.

Both ends: TLS 1.3 only, ALPN `h2`, no session tickets (ztunnel does not
resume). Python cannot choose TLS 1.3 cipher suites per context; OpenSSL's
default TLS 1.3 list (AES-256-GCM, ChaCha20-Poly1305, AES-128-GCM) is used,
and AES-GCM is negotiated first.

Python's ssl verifies the chain to the trust bundle; the identity checks run
right after the handshake:

* the client requires one of the server leaf's URI SANs to equal one of the
  identities it expects (`verify_server_identity`); host names and SNI play
  no part;
* the server requires a SPIFFE URI SAN in its own trust domain and reports
  that identity (`client_identity`); authorization decides the rest.

Private keys stay off disk: `load_cert_chain` wants a path, so the PEM goes
into an anonymous memory file (`memfd_create`) read via `/proc/self/fd/N`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from typing import Any

from nodeagent.identity.csr import WorkloadCertificate
from nodeagent.model.identity import Identity, IdentityError

ALPN_H2 = "h2"


class PeerIdentityError(Exception):
    """The peer's certificate does not carry an acceptable SPIFFE identity."""


def _load_key_and_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    fd = os.memfd_create("workload-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.key_pem + cert.chain_pem())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _base_context(protocol: int, cert: WorkloadCertificate) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.options |= ssl.OP_NO_TICKET
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.roots_pem().decode())
    _load_key_and_chain(ctx, cert)
    return ctx


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """Client side of workload mTLS as `cert`'s identity; check the server with
    `verify_server_identity` after the handshake."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, cert)
    # The server is identified by its SPIFFE SAN, not a host name.
    ctx.check_hostname = False
    return ctx


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """Server side of workload mTLS as `cert`'s identity; a client certificate that
    chains to the bundle is required, then checked by `client_identity`."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, cert)
    ctx.num_tickets = 0
    return ctx


def _peer_uris(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[str]:
    peer: dict[str, Any] | None = ssl_object.getpeercert()
    if not peer:
        raise PeerIdentityError("peer presented no verified certificate")
    return [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]


def peer_identities(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[Identity]:
    """Every SPIFFE identity among the verified peer leaf's URI SANs."""
    out = []
    for uri in _peer_uris(ssl_object):
        try:
            out.append(Identity.parse(uri))
        except IdentityError:
            continue
    return out


def verify_server_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: Iterable[Identity]
) -> Identity:
    """The server's identity if it is one of `expected`; else PeerIdentityError."""
    wanted = set(expected)
    for identity in peer_identities(ssl_object):
        if identity in wanted:
            return identity
    raise PeerIdentityError(
        f"server identity {_peer_uris(ssl_object)} is not one of the expected "
        f"{sorted(str(i) for i in wanted)}"
    )


def client_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str) -> Identity:
    """The client's SPIFFE identity if it is in `trust_domain`; else PeerIdentityError."""
    uris = _peer_uris(ssl_object)
    found = peer_identities(ssl_object)
    for identity in found:
        if identity.trust_domain == trust_domain:
            return identity
    if not found:
        raise PeerIdentityError(f"client certificate has no SPIFFE URI SAN (URIs: {uris})")
    raise PeerIdentityError(
        f"client identity {[str(i) for i in found]} is not in trust domain {trust_domain!r}"
    )
