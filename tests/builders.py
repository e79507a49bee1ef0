"""Shared test builders: one per model type, and the one fake certificate source.

Tests of every tier import these instead of keeping private copies; a test
file may still wrap `workload` with its own defaults (a namespace, an
identity) in one line.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from nodeagent.controlplane.ca import CertificateAuthority
from nodeagent.identity import csr
from nodeagent.identity.csr import WorkloadCertificate
from nodeagent.model.identity import Identity
from nodeagent.model.workload import TunnelProtocol, Workload


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
