"""The CA gRPC service on loopback, called by the agent's CaClient and by hand."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2 as struct_pb

from nodeagent.controlplane.ca import CertificateAuthority, CertificateService, add_to_server
from nodeagent.identity import csr, tls
from nodeagent.identity.caclient import CaClient, CaClientError, open_channel
from nodeagent.identity.manager import CertificateManager
from nodeagent.model.identity import Identity
from nodeagent.pb.istio.v1.auth import ca_pb2 as ca_pb
from nodeagent.pb.istio.v1.auth import ca_pb2_grpc

ALICE = Identity("cluster.local", "ns1", "alice")
BOB = Identity("cluster.local", "ns1", "bob")
CAROL = Identity("cluster.local", "ns2", "carol")  # runs only on node2


class FakeMesh:
    """Tokens and workloads as the control plane's mesh file would give them."""

    tokens = {"token-node1": "node1", "token-node2": "node2"}
    workloads = {"node1": {ALICE, BOB}, "node2": {CAROL}}

    def node_for_token(self, token: str) -> str | None:
        return self.tokens.get(token)

    def identities_on_node(self, node: str) -> set[Identity]:
        return set(self.workloads.get(node, ()))


@contextlib.asynccontextmanager
async def ca_server(ca: CertificateAuthority | None = None):
    ca = ca or CertificateAuthority.create("cluster.local")
    server = grpc.aio.server()
    add_to_server(server, CertificateService(ca, FakeMesh()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield ca, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def ca_client(address: str, token_file: Path, ttl: float = 3600):
    client = CaClient.connect(address, token_path=str(token_file), cluster_id="Kubernetes", ttl=ttl)
    try:
        yield client
    finally:
        await client.close()


def token(tmp_path: Path, value: str = "token-node1") -> Path:
    path = tmp_path / "token"
    path.write_text(value + "\n")
    return path


async def test_certificate_is_issued_with_the_identity_and_chain(tmp_path) -> None:
    async with ca_server() as (ca, address), ca_client(address, token(tmp_path)) as client:
        cert = await client.fetch(ALICE)
    assert csr.uri_sans(cert.leaf) == [str(ALICE)]
    assert cert.roots == (ca.root_cert,)
    cert.leaf.verify_directly_issued_by(ca.root_cert)
    assert cert.not_after - cert.not_before == 3600


async def test_identity_not_on_the_callers_node_is_refused(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, "nodeagent.controlplane.ca")
    async with ca_server() as (_, address), ca_client(address, token(tmp_path)) as client:
        with pytest.raises(CaClientError, match="UNAUTHENTICATED: no workload on node 'node1'"):
            await client.fetch(CAROL)
    assert "no workload on node 'node1' has identity spiffe://cluster.local/ns/ns2/sa/carol" in (
        caplog.text
    )


async def test_unknown_token_is_refused_and_token_is_reread_each_call(tmp_path) -> None:
    path = token(tmp_path, "stolen")
    async with ca_server() as (_, address), ca_client(address, path) as client:
        with pytest.raises(CaClientError, match="UNAUTHENTICATED: unknown bearer token"):
            await client.fetch(ALICE)
        path.write_text("token-node2")
        assert (await client.fetch(CAROL)).identity == CAROL


async def raw_call(address: str, request: ca_pb.IstioCertificateRequest, metadata=None):
    async with grpc.aio.insecure_channel(address.removeprefix("http://")) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateCertificate(request, metadata=metadata, timeout=5)
    return err.value


def impersonating(identity: Identity) -> struct_pb.Struct:
    md = struct_pb.Struct()
    md.update({"ImpersonatedIdentity": str(identity)})
    return md


AUTH = (("authorization", "Bearer token-node1"),)


async def test_csr_whose_san_is_not_the_impersonated_identity_is_refused(caplog) -> None:
    caplog.set_level(logging.WARNING, "nodeagent.controlplane.ca")
    request = ca_pb.IstioCertificateRequest(
        csr=csr.build_csr(csr.generate_key(), ALICE),
        validity_duration=60,
        metadata=impersonating(BOB),  # BOB is on node1 too; the SAN still must match
    )
    async with ca_server() as (_, address):
        err = await raw_call(address, request, AUTH)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "CSR SAN spiffe://cluster.local/ns/ns1/sa/alice is not the impersonated" in err.details()
    assert "is not the impersonated identity" in caplog.text


async def test_bad_csr_and_missing_token_are_refused() -> None:
    garbage = ca_pb.IstioCertificateRequest(csr="junk", metadata=impersonating(ALICE))
    good = ca_pb.IstioCertificateRequest(
        csr=csr.build_csr(csr.generate_key(), ALICE), metadata=impersonating(ALICE)
    )
    async with ca_server() as (_, address):
        bad_csr = await raw_call(address, garbage, AUTH)
        no_token = await raw_call(address, good)
    assert bad_csr.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "bad CSR" in bad_csr.details()
    assert no_token.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "no bearer token" in no_token.details()


async def test_without_impersonation_the_csr_san_must_be_on_the_node() -> None:
    request = ca_pb.IstioCertificateRequest(csr=csr.build_csr(csr.generate_key(), CAROL))
    async with ca_server() as (_, address):
        err = await raw_call(address, request, AUTH)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "no workload on node 'node1'" in err.details()


def _serial(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_certificates_rotate_while_old_connections_stay_up(tmp_path) -> None:
    """5 s certificates: rotation at half-life; a connection made with the old
    certificate keeps passing bytes past its expiry; a new one uses the new one."""
    seen_by_server: list[int] = []
    handlers: set[asyncio.Task] = set()

    async with (
        ca_server() as (_, address),
        ca_client(address, token(tmp_path), ttl=5) as client,
    ):
        manager = CertificateManager(client)
        runner = asyncio.create_task(manager.run())

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.add(asyncio.current_task())
            try:
                # A server context per connection: each one gets the current certificate.
                await writer.start_tls(tls.server_context(manager.certificate(BOB)))
                ssl_object = writer.get_extra_info("ssl_object")
                assert tls.client_identity(ssl_object, "cluster.local") == ALICE
                seen_by_server.append(_serial(ssl_object.getpeercert(binary_form=True)))
                while data := await reader.read(1024):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def connect():
            ctx = tls.client_context(manager.certificate(ALICE))
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname=""
            )
            ssl_object = writer.get_extra_info("ssl_object")
            assert tls.verify_server_identity(ssl_object, {BOB}) == BOB
            return reader, writer, _serial(ssl_object.getpeercert(binary_form=True))

        async def echo(reader, writer, data: bytes) -> bytes:
            writer.write(data)
            await writer.drain()
            return await reader.readexactly(len(data))

        try:
            manager.add_workload_identity(ALICE)
            manager.add_workload_identity(BOB)
            async with asyncio.timeout(5):
                old_alice = await manager.wait_for(ALICE)
                old_bob = await manager.wait_for(BOB)
            old_reader, old_writer, old_server_serial = await connect()
            assert old_server_serial == old_bob.serial
            assert await echo(old_reader, old_writer, b"before") == b"before"

            def rotated_and_old_expired() -> bool:
                return (
                    manager.certificate(ALICE).serial != old_alice.serial
                    and manager.certificate(BOB).serial != old_bob.serial
                    and time.time() > max(old_alice.not_after, old_bob.not_after) + 0.2
                )

            for _ in range(80):
                if rotated_and_old_expired():
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("certificates did not rotate within 8 s")

            assert await echo(old_reader, old_writer, b"after expiry") == b"after expiry"
            new_reader, new_writer, new_server_serial = await connect()
            assert await echo(new_reader, new_writer, b"new") == b"new"
            assert new_server_serial == manager.certificate(BOB).serial != old_bob.serial
            assert seen_by_server[0] == old_alice.serial
            assert seen_by_server[1] == manager.certificate(ALICE).serial != old_alice.serial
            for writer in (old_writer, new_writer):
                writer.close()
                await writer.wait_closed()
        finally:
            server.close()
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await server.wait_closed()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


def serving_cert(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    """A root and a 127.0.0.1 serving certificate for the CA's own TLS port."""
    root = CertificateAuthority.create("cluster.local")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=True,
        )
        .sign(root.root_key, hashes.SHA256())
    )
    root_file = tmp_path / "root.pem"
    root_file.write_text(root.root_pem())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), root_file


async def test_client_reaches_the_ca_over_tls_with_a_root_file(tmp_path) -> None:
    key_pem, cert_pem, root_file = serving_cert(tmp_path)
    other_root = tmp_path / "other.pem"
    other_root.write_text(CertificateAuthority.create("cluster.local").root_pem())
    server = grpc.aio.server()
    add_to_server(server, CertificateService(CertificateAuthority.create("x"), FakeMesh()))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    await server.start()
    try:
        address = f"https://127.0.0.1:{port}"
        good = CaClient.connect(
            address, root_ca_path=str(root_file), token_path=str(token(tmp_path)), cluster_id="K"
        )
        wrong = CaClient.connect(
            address,
            root_ca_path=str(other_root),
            token_path=str(token(tmp_path)),
            cluster_id="K",
            timeout=2,
        )
        try:
            assert (await good.fetch(ALICE)).identity == ALICE
            with pytest.raises(CaClientError, match="UNAVAILABLE"):
                await wrong.fetch(ALICE)
        finally:
            await good.close()
            await wrong.close()
    finally:
        await server.stop(None)


def test_bad_ca_address_is_refused() -> None:
    with pytest.raises(ValueError, match="http\\(s\\)://host:port"):
        open_channel("istiod:15012")
