"""The shipped control plane's certificate authority and its gRPC service.

`CertificateAuthority` holds one self-signed root (made at first start, or
loaded from `root-cert.pem` / `root-key.pem` in its directory; the key file is
mode 0600) and signs workload CSRs for a requested lifetime under a cap.

`CertificateService` serves `istio.v1.auth.IstioCertificateService`. A node
agent asks on behalf of a pod, naming the pod's identity in the metadata key
`ImpersonatedIdentity`, and authenticates with `authorization: Bearer <token>`.
How the caller's node is known: the token maps to a node (the shipped control
plane reads a `token` per node from its mesh file), and the request is signed
only if some workload on that node has the requested identity, as istiod's
node authorizer does. Without `ImpersonatedIdentity` the CSR's own SAN is the
requested identity and the same node check applies. Every refusal is logged
with its reason and returned as a gRPC error whose details say it.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.identity.csr import CsrError, parse_csr
from nodeagent.model.identity import Identity, IdentityError
from nodeagent.pb.istio.v1.auth import ca_pb2 as ca_pb
from nodeagent.pb.istio.v1.auth import ca_pb2_grpc

log = logging.getLogger(__name__)

ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
DEFAULT_MAX_TTL = 24 * 3600.0
ROOT_LIFETIME = datetime.timedelta(days=3650)
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"


class CaError(ValueError):
    """The CA cannot load its root, or a signing request is out of bounds."""


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A root key and certificate that sign workload certificates."""

    root_cert: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    max_ttl: float = DEFAULT_MAX_TTL
    clock: Callable[[], float] = time.time
    # Leaf validity starts this many (whole) seconds before issue. OpenSSL checks validity
    # against time(2), which reads the kernel's coarse clock and can show the previous second
    # for a few milliseconds after time.time() has passed it: a certificate used at once
    # would otherwise sometimes be "not yet valid". The validity still lasts exactly the TTL.
    not_before_skew: int = 1

    @classmethod
    def load_or_create(
        cls,
        directory: Path,
        trust_domain: str,
        *,
        max_ttl: float = DEFAULT_MAX_TTL,
        clock: Callable[[], float] = time.time,
    ) -> CertificateAuthority:
        """Load the root from `directory`, or make one there if neither file exists."""
        cert_path, key_path = directory / ROOT_CERT_FILE, directory / ROOT_KEY_FILE
        if cert_path.exists() != key_path.exists():
            raise CaError(f"{directory}: found only one of {ROOT_CERT_FILE} and {ROOT_KEY_FILE}")
        if cert_path.exists():
            return cls.load(directory, max_ttl=max_ttl, clock=clock)
        ca = cls.create(trust_domain, max_ttl=max_ttl, clock=clock)
        directory.mkdir(parents=True, exist_ok=True)
        # Create the key file 0600 from the start: it must never be readable by others.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                ca.root_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        cert_path.write_bytes(ca.root_pem().encode())
        log.info("created CA root for %s in %s", trust_domain, directory)
        return ca

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        max_ttl: float = DEFAULT_MAX_TTL,
        clock: Callable[[], float] = time.time,
    ) -> CertificateAuthority:
        cert_path, key_path = directory / ROOT_CERT_FILE, directory / ROOT_KEY_FILE
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as e:
            raise CaError(f"{cert_path}: cannot load the root certificate: {e}") from e
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise CaError(f"{key_path}: cannot load the root key: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"{key_path}: the root key is not an EC key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CaError(f"{key_path} does not match {cert_path}")
        return cls(cert, key, max_ttl, clock)

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        max_ttl: float = DEFAULT_MAX_TTL,
        clock: Callable[[], float] = time.time,
        not_before_skew: int = 1,
    ) -> CertificateAuthority:
        """A new self-signed root (in memory only)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "nodeagent root CA"),
            ]
        )
        now = datetime.datetime.fromtimestamp(clock(), tz=datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, max_ttl, clock, not_before_skew)

    def root_pem(self) -> str:
        return self.root_cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, csr_pem: str, ttl: float) -> list[str]:
        """Sign a checked CSR for `ttl` seconds (capped; 0 means the cap); leaf, then root."""
        parsed = parse_csr(csr_pem)
        if ttl < 0:
            raise CaError(f"validity_duration must not be negative, got {ttl}")
        ttl = min(ttl or self.max_ttl, self.max_ttl)
        # Whole seconds: X.509 times have no fractions, and half-life scheduling
        # on the agent side wants not_after - not_before to equal the TTL.
        start = int(self.clock()) - self.not_before_skew
        not_before = datetime.datetime.fromtimestamp(start, tz=datetime.UTC)
        not_after = datetime.datetime.fromtimestamp(start + max(1, int(ttl)), tz=datetime.UTC)
        not_after = min(not_after, self.root_cert.not_valid_after_utc)
        public_key = parsed.csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # parse_csr checked it
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(parsed.identity))])
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # An empty subject requires the SAN to be critical (RFC 5280 4.2.1.6).
            .add_extension(san, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # Workload certificates serve both ends of mutual TLS.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key()),
                critical=False,
            )
            .sign(self.root_key, hashes.SHA256())
        )
        return [leaf.public_bytes(serialization.Encoding.PEM).decode(), self.root_pem()]


class NodeAuthorizer(Protocol):
    """Maps a caller's credentials to its node, and a node to the identities it runs."""

    def node_for_token(self, token: str) -> str | None: ...

    def identities_on_node(self, node: str) -> set[Identity]: ...


class Refusal(Exception):
    """A request the CA will not sign, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _bearer_token(metadata: tuple[tuple[str, str | bytes], ...]) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """grpc.aio servicer for CreateCertificate with node-scoped impersonation checks."""

    def __init__(self, ca: CertificateAuthority, authorizer: NodeAuthorizer) -> None:
        self._ca = ca
        self._authorizer = authorizer

    def authorize(
        self,
        token: str | None,
        request: ca_pb.IstioCertificateRequest,
    ) -> tuple[str, Identity]:
        """The caller's node and the identity to sign, or a Refusal saying why not."""
        unauth = grpc.StatusCode.UNAUTHENTICATED
        if token is None:
            raise Refusal(unauth, "no bearer token in the authorization metadata")
        node = self._authorizer.node_for_token(token)
        if node is None:
            raise Refusal(unauth, "unknown bearer token")
        try:
            parsed = parse_csr(request.csr)
        except CsrError as e:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"bad CSR: {e}") from e
        fields = request.metadata.fields
        if IMPERSONATED_IDENTITY in fields:
            raw = fields[IMPERSONATED_IDENTITY].string_value
            try:
                wanted = Identity.parse(raw)
            except IdentityError as e:
                raise Refusal(unauth, f"bad {IMPERSONATED_IDENTITY}: {e}") from e
            if parsed.identity != wanted:
                raise Refusal(
                    unauth,
                    f"CSR SAN {parsed.identity} is not the impersonated identity {wanted}",
                )
        else:
            wanted = parsed.identity
        if wanted not in self._authorizer.identities_on_node(node):
            raise Refusal(unauth, f"no workload on node {node!r} has identity {wanted}")
        return node, wanted

    async def CreateCertificate(
        self,
        request: ca_pb.IstioCertificateRequest,
        context: grpc.aio.ServicerContext[ca_pb.IstioCertificateRequest, object],
    ) -> ca_pb.IstioCertificateResponse:
        token = _bearer_token(tuple(context.invocation_metadata() or ()))
        try:
            node, identity = self.authorize(token, request)
            chain = self._ca.sign(request.csr, float(request.validity_duration))
        except Refusal as r:
            log.warning("CreateCertificate refused (%s): %s", r.code.name, r.reason)
            await context.abort(r.code, r.reason)
            raise  # abort raises; this keeps type checkers content
        except (CaError, CsrError) as e:
            log.warning("CreateCertificate refused (INVALID_ARGUMENT): %s", e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        log.info("signed %s for node %s (ttl %ss)", identity, node, request.validity_duration)
        return ca_pb.IstioCertificateResponse(cert_chain=chain)


def add_to_server(server: grpc.aio.Server, service: CertificateService) -> None:
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
