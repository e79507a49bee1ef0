"""Keys, CSRs and CA-response chain checks."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.identity import csr
from nodeagent.model.identity import Identity

T0 = 1_800_000_000.0
ALICE = Identity("cluster.local", "ns1", "alice")


def make_ca(trust_domain: str = "cluster.local") -> CertificateAuthority:
    return CertificateAuthority.create(trust_domain, clock=lambda: T0)


def test_csr_has_empty_subject_and_one_critical_uri_san() -> None:
    key = csr.generate_key()
    request = x509.load_pem_x509_csr(csr.build_csr(key, ALICE).encode())
    assert request.subject == x509.Name([])
    assert isinstance(request.signature_hash_algorithm, hashes.SHA256)
    public = request.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    [ext] = list(request.extensions)
    assert ext.critical
    assert isinstance(ext.value, x509.SubjectAlternativeName)
    assert list(ext.value) == [x509.UniformResourceIdentifier(str(ALICE))]
    assert csr.parse_csr(csr.build_csr(key, ALICE)).identity == ALICE


def test_key_pem_is_pkcs8() -> None:
    assert csr.key_to_pem(csr.generate_key()).startswith(b"-----BEGIN PRIVATE KEY-----")


def _csr_with(san: list[x509.GeneralName] | None) -> str:
    key = csr.generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        ("not a csr", "does not parse"),
        (_csr_with(None), "no SubjectAltName"),
        (
            _csr_with(
                [
                    x509.UniformResourceIdentifier(str(ALICE)),
                    x509.UniformResourceIdentifier("spiffe://cluster.local/ns/x/sa/y"),
                ]
            ),
            "exactly one URI",
        ),
        (_csr_with([x509.DNSName("example.com")]), "exactly one URI"),
        (_csr_with([x509.UniformResourceIdentifier("https://x/y")]), "not a SPIFFE identity"),
    ],
)
def test_bad_csrs_are_refused_with_the_reason(pem: str, reason: str) -> None:
    with pytest.raises(csr.CsrError, match=reason):
        csr.parse_csr(pem)


def test_csr_with_a_broken_signature_is_refused() -> None:
    good = x509.load_pem_x509_csr(csr.build_csr(csr.generate_key(), ALICE).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(csr.CsrError, match="signature"):
        csr.parse_csr(pem)


def test_chain_is_checked_and_trust_bundle_is_its_tail() -> None:
    ca = make_ca()
    key = csr.generate_key()
    chain = ca.sign(csr.build_csr(key, ALICE), 3600)
    cert = csr.check_chain(chain, ALICE, key, T0 + 10)
    assert csr.uri_sans(cert.leaf) == [str(ALICE)]
    assert cert.roots == (ca.root_cert,)
    assert cert.not_after - cert.not_before == 3600
    assert cert.half_life == cert.not_before + 1800


def test_last_element_may_hold_several_roots() -> None:
    ca, other = make_ca(), make_ca()
    key = csr.generate_key()
    leaf, root = ca.sign(csr.build_csr(key, ALICE), 3600)
    cert = csr.check_chain([leaf, other.root_pem() + root], ALICE, key, T0)
    assert cert.roots == (other.root_cert, ca.root_cert)


def test_chain_with_another_identity_is_refused() -> None:
    ca = make_ca()
    key = csr.generate_key()
    chain = ca.sign(csr.build_csr(key, ALICE), 3600)
    with pytest.raises(csr.ChainError, match="not the identity asked for"):
        csr.check_chain(chain, Identity("cluster.local", "ns1", "bob"), key, T0)


def test_chain_for_another_key_is_refused() -> None:
    ca = make_ca()
    chain = ca.sign(csr.build_csr(csr.generate_key(), ALICE), 3600)
    with pytest.raises(csr.ChainError, match="public key"):
        csr.check_chain(chain, ALICE, csr.generate_key(), T0)


def test_chain_that_does_not_verify_to_the_roots_is_refused() -> None:
    ca, other = make_ca(), make_ca()
    key = csr.generate_key()
    leaf, _ = ca.sign(csr.build_csr(key, ALICE), 3600)
    with pytest.raises(csr.ChainError, match="does not verify"):
        csr.check_chain([leaf, other.root_pem()], ALICE, key, T0)


def test_expired_chain_and_short_chain_are_refused() -> None:
    ca = make_ca()
    key = csr.generate_key()
    chain = ca.sign(csr.build_csr(key, ALICE), 60)
    with pytest.raises(csr.ChainError, match="not valid now"):
        csr.check_chain(chain, ALICE, key, T0 + 61)
    with pytest.raises(csr.ChainError, match="need a leaf and root"):
        csr.check_chain(chain[:1], ALICE, key, T0)
    with pytest.raises(csr.ChainError, match="no PEM"):
        csr.check_chain(["junk", chain[1]], ALICE, key, T0)


def test_ttl_is_capped() -> None:
    ca = dataclasses.replace(make_ca(), max_ttl=600)
    key = csr.generate_key()
    cert = csr.check_chain(ca.sign(csr.build_csr(key, ALICE), 10**6), ALICE, key, T0)
    assert cert.not_after - cert.not_before == 600
    cert = csr.check_chain(ca.sign(csr.build_csr(key, ALICE), 0), ALICE, key, T0)
    assert cert.not_after - cert.not_before == 600
