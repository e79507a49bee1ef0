"""gRPC client for the CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`.

Each fetch makes a fresh P-256 key and CSR for one identity, asks the CA on
the identity's behalf (`ImpersonatedIdentity` metadata), and checks the chain
it gets back (`csr.check_chain`). The bearer token is read from its file on
every call because projected service-account tokens rotate. `https://`
addresses use TLS verified with a root CA file (or the system roots);
`http://` is plaintext, for local use only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from google.protobuf import struct_pb2 as struct_pb

from nodeagent.identity import csr
from nodeagent.model.identity import Identity
from nodeagent.pb.istio.v1.auth import ca_pb2 as ca_pb
from nodeagent.pb.istio.v1.auth import ca_pb2_grpc

DEFAULT_TTL = 24 * 3600.0


class CaClientError(Exception):
    """A certificate request failed; the message names the identity and the cause."""


def open_channel(address: str, root_ca_path: str = "") -> grpc.aio.Channel:
    """A grpc.aio channel to `https://host:port` (TLS) or `http://host:port` (plaintext)."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"CA address must be http(s)://host:port, got {address!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    target = f"{host}:{parts.port}"
    if parts.scheme == "http":
        return grpc.aio.insecure_channel(target)
    roots = Path(root_ca_path).read_bytes() if root_ca_path else None
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))


class CaClient:
    """Fetches checked workload certificates from the CA."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        token_path: str,
        cluster_id: str,
        ttl: float = DEFAULT_TTL,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._channel = channel
        self._stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        self._token_path = token_path
        self._cluster_id = cluster_id
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        root_ca_path: str = "",
        token_path: str,
        cluster_id: str,
        ttl: float = DEFAULT_TTL,
        timeout: float = 10.0,
    ) -> CaClient:
        """A client on a new channel to `address` (see `open_channel`)."""
        return cls(
            open_channel(address, root_ca_path),
            token_path=token_path,
            cluster_id=cluster_id,
            ttl=ttl,
            timeout=timeout,
        )

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        md = [("clusterid", self._cluster_id)]
        if self._token_path:
            try:
                token = Path(self._token_path).read_text().strip()
            except OSError as e:
                raise CaClientError(f"cannot read token file {self._token_path}: {e}") from e
            md.append(("authorization", f"Bearer {token}"))
        return tuple(md)

    async def fetch(self, identity: Identity) -> csr.WorkloadCertificate:
        """A new key and certificate for `identity`; raises CaClientError on any failure."""
        key = csr.generate_key()
        metadata = struct_pb.Struct()
        metadata.update({"ImpersonatedIdentity": str(identity)})
        request = ca_pb.IstioCertificateRequest(
            csr=csr.build_csr(key, identity),
            validity_duration=int(self._ttl),
            metadata=metadata,
        )
        try:
            response = await self._stub.CreateCertificate(
                request, metadata=self._call_metadata(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as e:
            raise CaClientError(f"CA refused {identity}: {e.code().name}: {e.details()}") from e
        try:
            return csr.check_chain(list(response.cert_chain), identity, key, self._clock())
        except csr.ChainError as e:
            raise CaClientError(f"CA response for {identity} rejected: {e}") from e

    async def close(self) -> None:
        await self._channel.close(None)
