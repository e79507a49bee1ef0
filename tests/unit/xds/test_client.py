"""The client edge's small parts: backoff, address parsing, node message, token, TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.config import Config
from nodeagent.controlplane.server import ControlPlaneServer
from nodeagent.xds.client import (
    ExponentialBackoff,
    XdsAddressError,
    XdsClient,
    node_message,
    open_channel,
    read_token,
)


class RecordingSink:
    """A fake state sink: remembers what it was given, rejects nothing."""

    def __init__(self) -> None:
        self.names: dict[str, set[str]] = {}

    def apply_delta(self, type_url: str, upserts: object, removals: object) -> dict[str, str]:
        held = self.names.setdefault(type_url, set())
        held.update(n for n, _ in upserts)  # type: ignore[attr-defined]
        held.difference_update(removals)  # type: ignore[arg-type]
        return {}


def test_backoff_doubles_to_the_cap_with_bounded_jitter() -> None:
    exact = ExponentialBackoff(initial=0.1, cap=15.0, jitter=0.0)
    assert [exact.delay(i) for i in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert exact.delay(30) == 15.0
    low = ExponentialBackoff(initial=1.0, jitter=0.2, rng=lambda: 0.0)
    high = ExponentialBackoff(initial=1.0, jitter=0.2, rng=lambda: 1.0)
    assert low.delay(0) == pytest.approx(0.8) and high.delay(0) == pytest.approx(1.2)
    assert high.delay(100) == 15.0


@pytest.mark.parametrize("address", ["istiod:15012", "ftp://x:1", "http://host", "https://:15012"])
def test_bad_address_is_refused_with_a_clear_error(address: str) -> None:
    with pytest.raises(XdsAddressError, match="expected http://HOST:PORT"):
        open_channel(address)


def test_node_message_has_ztunnel_id_and_metadata() -> None:
    cfg = Config(
        pod_name="p", pod_namespace="ns", instance_ip="10.0.0.1", node_name="n", extra={"K": "v"}
    )
    node = node_message(cfg)
    assert node.id == "ztunnel~10.0.0.1~p.ns~ns.svc.cluster.local"
    md = dict(node.metadata)
    assert md["NAME"] == "p" and md["NAMESPACE"] == "ns" and md["INSTANCE_IPS"] == "10.0.0.1"
    assert md["NODE_NAME"] == "n" and md["K"] == "v"


def test_token_is_read_stripped_and_missing_means_none(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("abc\n")
    assert read_token(str(tmp_path / "t")) == "abc"
    assert read_token(str(tmp_path / "missing")) == ""


def _tls_pair(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    """A root CA and a localhost serving certificate it signed."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    root = tmp_path / "root.pem"
    root.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), root


async def test_client_connects_over_tls_verified_by_root_file(tmp_path: Path) -> None:
    key, cert, root = _tls_pair(tmp_path)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        "nodes: [{name: n1, token: t}]\nworkloads: [{name: a, node: n1, ip: 10.0.0.1}]\n"
    )
    server = ControlPlaneServer(
        mesh, "127.0.0.1:0", server_credentials=grpc.ssl_server_credentials([(key, cert)])
    )
    await server.start()
    try:
        cfg = Config(
            xds_address=f"https://localhost:{server.port}",
            xds_root_ca=str(root),
            auth_token_path="",
        )
        sink = RecordingSink()
        async with XdsClient(cfg, sink) as client:
            await asyncio.wait_for(client.wait_ready(), 10)
        assert sink.names["type.googleapis.com/istio.workload.Address"] == {
            "Kubernetes//Pod/default/a"
        }
        # Without the root the server is not trusted and nothing arrives.
        untrusted = RecordingSink()
        (tmp_path / "other").mkdir()
        _, _, other_root = _tls_pair(tmp_path / "other")
        cfg2 = Config(xds_address=f"https://localhost:{server.port}", xds_root_ca=str(other_root))
        delays: list[float] = []

        async def sleep(d: float) -> None:
            delays.append(d)
            await asyncio.sleep(0.01)

        async with XdsClient(cfg2, untrusted, sleep=sleep) as bad:
            while len(delays) < 2:  # noqa: ASYNC110 (the fake sleep records the retries)
                await asyncio.sleep(0.02)
        assert untrusted.names == {} and not bad.stats.connected and bad.stats.last_error
        assert delays[1] > delays[0]  # failing connections back off
    finally:
        await server.stop(grace=None)


async def test_stop_ends_the_client_when_an_attempt_swallowed_its_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stop() that lands while a stream attempt is failing can reach the loop as an error,
    # not a CancelledError (a gRPC call ending as CANCELLED; asyncio.wait_for in 3.11 when
    # its inner call finishes in the same turn). The waypoint then hung in shutdown for ever.
    client = XdsClient(Config(xds_address="http://127.0.0.1:1"), RecordingSink())
    attempting = asyncio.Event()
    attempts = 0
    sleeps: list[float] = []

    async def attempt_that_swallows() -> None:
        nonlocal attempts
        attempts += 1
        attempting.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if attempts > 1:
                raise  # only the first is lost, so a failing run still ends
            raise RuntimeError("the call ended: cancelled") from None

    async def sleep(delay: float) -> None:  # back off at once: a lost stop would retry
        sleeps.append(delay)

    monkeypatch.setattr(client, "_run_stream", attempt_that_swallows)
    monkeypatch.setattr(client, "_sleep", sleep)
    client.start()
    await asyncio.wait_for(attempting.wait(), 5)
    await asyncio.wait_for(client.stop(), 5)
    assert attempts == 1 and sleeps == []  # it ended, without a backoff or another attempt
