"""Keys, certificate signing requests and chain checks for workload certificates (pure).

What the CA and the agent agree on (Istio's shape):

* key: ECDSA P-256, kept in memory as PKCS#8 PEM, never written to disk;
* CSR: SHA-256 signature, empty subject, exactly one *critical* SubjectAltName
  extension holding exactly one URI, the SPIFFE identity;
* response chain: leaf first, intermediates, and the root(s) last; the last
  element may hold several concatenated root PEMs.

The agent checks each response before using it: the leaf carries the identity
it asked for and the key it generated, and the chain verifies to the returned
roots. Those roots become the trust bundle for workload mTLS.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from nodeagent.model.identity import Identity, IdentityError

_PEM_END = b"-----END CERTIFICATE-----"


class CsrError(ValueError):
    """A certificate signing request is malformed or not of the expected shape."""


class ChainError(ValueError):
    """A certificate chain from the CA cannot be used; the message says why."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (for in-memory use only)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def build_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> str:
    """A PEM CSR: empty subject, one critical SAN with one URI = `identity`, SHA-256."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(san, critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True, slots=True)
class ParsedCsr:
    """A CSR that parsed, whose signature is good and that names one SPIFFE identity."""

    csr: x509.CertificateSigningRequest
    identity: Identity


def parse_csr(pem: str) -> ParsedCsr:
    """Parse and check a CSR as the CA receives it; raise CsrError naming the problem."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as e:
        raise CsrError(f"CSR does not parse as PEM PKCS#10: {e}") from e
    if not csr.is_signature_valid:
        raise CsrError("CSR signature does not verify against its own public key")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise CsrError("CSR key is not an EC key (ECDSA P-256 expected)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound as e:
        raise CsrError("CSR has no SubjectAltName extension") from e
    except ValueError as e:
        raise CsrError(f"CSR extensions do not parse: {e}") from e
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(san.value)) != 1:
        raise CsrError(f"CSR SubjectAltName must hold exactly one URI, found {list(san.value)}")
    try:
        identity = Identity.parse(uris[0])
    except IdentityError as e:
        raise CsrError(f"CSR SAN is not a SPIFFE identity: {e}") from e
    return ParsedCsr(csr, identity)


def split_pem_certificates(pem: str) -> list[x509.Certificate]:
    """Every certificate in a PEM string (one or several concatenated)."""
    data = pem.encode()
    if _PEM_END not in data:
        raise ChainError("chain element holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ChainError(f"chain element does not parse as PEM certificates: {e}") from e


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SubjectAltNames of a certificate (empty if it has none)."""
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    value = ext.value
    assert isinstance(value, x509.SubjectAlternativeName)
    return list(value.get_values_for_type(x509.UniformResourceIdentifier))


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)


def to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True, slots=True, eq=False)
class WorkloadCertificate:
    """A checked certificate for one identity: key, chain (leaf first) and trust bundle."""

    identity: Identity
    key_pem: bytes
    chain: tuple[x509.Certificate, ...]  # leaf, then intermediates; no roots
    roots: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    @property
    def half_life(self) -> float:
        """When a refresh is due: not_before + (not_after - not_before) / 2."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def expired(self, now: float) -> bool:
        return now >= self.not_after

    def chain_pem(self) -> bytes:
        """Leaf and intermediates, PEM, as a TLS endpoint presents them."""
        return to_pem(self.chain)

    def roots_pem(self) -> bytes:
        return to_pem(self.roots)


def check_chain(
    cert_chain: Sequence[str],
    identity: Identity,
    key: ec.EllipticCurvePrivateKey,
    now: float,
) -> WorkloadCertificate:
    """Check a CA response for `identity` and build the certificate to use.

    The leaf must carry `identity` as a URI SAN and the public half of `key`;
    each certificate must be signed by the next, the last non-root by one of
    the roots in the last element, and every certificate valid at `now`.
    """
    if len(cert_chain) < 2:
        raise ChainError(f"chain has {len(cert_chain)} element(s); need a leaf and root(s)")
    certs = [c for pem in cert_chain[:-1] for c in split_pem_certificates(pem)]
    roots = split_pem_certificates(cert_chain[-1])
    leaf = certs[0]
    sans = uri_sans(leaf)
    if str(identity) not in sans:
        raise ChainError(f"leaf SAN {sans} is not the identity asked for ({identity})")
    want = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    got = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if want != got:
        raise ChainError("leaf public key is not the key of our CSR")
    at = _utc(now)
    for cert in [*certs, *roots]:
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise ChainError(
                f"certificate {cert.subject.rfc4514_string() or '(leaf)'} serial "
                f"{cert.serial_number:x} is not valid now (valid from "
                f"{cert.not_valid_before_utc.isoformat()} to "
                f"{cert.not_valid_after_utc.isoformat()})"
            )
    for child, parent in itertools.pairwise(certs):
        _verify_issued_by(child, parent)
    last = certs[-1]
    if not any(_issued_by(last, root) for root in roots):
        raise ChainError(f"chain does not verify to any of the {len(roots)} returned root(s)")
    return WorkloadCertificate(identity, key_to_pem(key), tuple(certs), tuple(roots))


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _verify_issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    if not _issued_by(child, parent):
        raise ChainError(
            f"certificate serial {child.serial_number:x} is not signed by the next in the chain "
            f"({parent.subject.rfc4514_string()})"
        )
