"""The CA's root: made at first start, loaded afterwards, key file 0600."""

from __future__ import annotations

import stat

import pytest

from nodeagent.controlplane.ca import ROOT_CERT_FILE, ROOT_KEY_FILE, CaError, CertificateAuthority
from nodeagent.identity import csr
from nodeagent.model.identity import Identity

ALICE = Identity("cluster.local", "ns1", "alice")


def test_root_is_made_at_first_start_and_loaded_after(tmp_path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "ca", "example.org")
    key_mode = stat.S_IMODE((tmp_path / "ca" / ROOT_KEY_FILE).stat().st_mode)
    assert key_mode == 0o600
    second = CertificateAuthority.load_or_create(tmp_path / "ca", "ignored.org")
    assert second.root_cert == first.root_cert
    assert "O=example.org" in first.root_cert.subject.rfc4514_string()
    # A certificate signed by the reloaded CA verifies to the first one's root.
    key = csr.generate_key()
    chain = second.sign(csr.build_csr(key, ALICE), 60)
    assert csr.check_chain([chain[0], first.root_pem()], ALICE, key, second.clock()).roots == (
        first.root_cert,
    )


def test_half_a_root_is_refused(tmp_path) -> None:
    CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    (tmp_path / ROOT_KEY_FILE).unlink()
    with pytest.raises(CaError, match="only one of"):
        CertificateAuthority.load_or_create(tmp_path, "cluster.local")


def test_mismatched_root_files_are_refused(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    CertificateAuthority.load_or_create(a, "cluster.local")
    CertificateAuthority.load_or_create(b, "cluster.local")
    (a / ROOT_CERT_FILE).write_bytes((b / ROOT_CERT_FILE).read_bytes())
    with pytest.raises(CaError, match="does not match"):
        CertificateAuthority.load(a)


def test_unreadable_root_is_refused_naming_the_file(tmp_path) -> None:
    CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    (tmp_path / ROOT_CERT_FILE).write_text("garbage")
    with pytest.raises(CaError, match=ROOT_CERT_FILE):
        CertificateAuthority.load(tmp_path)


def test_negative_ttl_is_refused() -> None:
    ca = CertificateAuthority.create("cluster.local")
    with pytest.raises(CaError, match="negative"):
        ca.sign(csr.build_csr(csr.generate_key(), ALICE), -1)


def test_leaf_validity_starts_a_second_before_issue_and_lasts_the_ttl() -> None:
    # OpenSSL's time(2) may still show the previous second just after time.time() passed
    # it; a leaf valid from the issuing second would be "not yet valid" when used at once.
    ca = CertificateAuthority.create("cluster.local", clock=lambda: 1_800_000_000.004)
    key = csr.generate_key()
    cert = csr.check_chain(ca.sign(csr.build_csr(key, ALICE), 3600), ALICE, key, ca.clock())
    assert cert.not_before == 1_799_999_999
    assert cert.not_after - cert.not_before == 3600
