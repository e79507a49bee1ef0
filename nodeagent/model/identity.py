"""SPIFFE workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`."""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.model.constants import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN

_SCHEME = "spiffe://"


class IdentityError(ValueError):
    """A string is not a SPIFFE identity of the Istio shape."""


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, service_account: str) -> Identity:
        """The identity of a workload record; empty fields take Istio's defaults."""
        return cls(
            trust_domain or DEFAULT_TRUST_DOMAIN,
            namespace,
            service_account or DEFAULT_SERVICE_ACCOUNT,
        )

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse a URI; exactly `<td>/ns/<ns>/sa/<sa>` after the scheme, as Istio requires."""
        if not uri.startswith(_SCHEME):
            raise IdentityError(f"not a SPIFFE URI (no spiffe:// scheme): {uri!r}")
        parts = uri[len(_SCHEME) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            raise IdentityError(f"not of the form spiffe://TD/ns/NS/sa/SA: {uri!r}")
        return cls(parts[0], parts[2], parts[4])

    @property
    def principal(self) -> str:
        """The identity without the scheme, as authorization policies name it."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return _SCHEME + self.principal
