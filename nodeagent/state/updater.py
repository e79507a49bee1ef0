"""Apply one delta-xDS response to the `StateStore`: convert, then apply atomically.

Each upsert is converted on its own; a bad one is rejected by name (that becomes
the NACK) while the good ones and the removals are applied in one step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from nodeagent.model.constants import TYPE_URL_ADDRESS, TYPE_URL_AUTHORIZATION
from nodeagent.model.policy import Authorization, HttpAuthorization
from nodeagent.model.routing import DestinationRule, VirtualService
from nodeagent.model.workload import Service, Workload
from nodeagent.state.convert import (
    ConversionError,
    address_from_bytes,
    authorization_from_bytes,
    destination_rule_from_bytes,
    http_authorization_from_bytes,
    virtual_service_from_bytes,
)
from nodeagent.state.mcp import (
    DESTINATION_RULE_TYPE_URLS,
    TYPE_URL_AUTHORIZATION_POLICY,
    VIRTUAL_SERVICE_TYPE_URLS,
)
from nodeagent.state.store import StateBatch, StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class StateUpdater:
    """The xDS client's entry point into the state."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    @property
    def store(self) -> StateStore:
        return self._store

    def apply_delta(
        self, type_url: str, upserts: Sequence[tuple[str, bytes]], removals: Sequence[str]
    ) -> dict[str, str]:
        """Convert every upsert (resource name, serialized resource bytes = Any.value) on its own;
        apply the good ones and the removals to the store in one synchronous step;
        return {resource_name: reason} for each rejected resource (empty dict = ACK).
        Unknown type_url: apply nothing, return {} (ACK) and log."""
        rejected: dict[str, str] = {}
        if type_url == TYPE_URL_ADDRESS:
            workloads: list[Workload] = []
            services: list[Service] = []
            for name, data in upserts:
                value = _convert(address_from_bytes, name, data, rejected)
                if value is None:
                    continue
                if isinstance(value, Workload):
                    workloads.append(value)
                else:
                    services.append(value)
            batch = StateBatch(
                workloads=tuple(workloads),
                services=tuple(services),
                removed_addresses=tuple(removals),
            )
        elif type_url == TYPE_URL_AUTHORIZATION:
            policies: list[Authorization] = []
            for name, data in upserts:
                policy = _convert(authorization_from_bytes, name, data, rejected)
                if policy is not None:
                    policies.append(policy)
            batch = StateBatch(policies=tuple(policies), removed_policies=tuple(removals))
        elif type_url in VIRTUAL_SERVICE_TYPE_URLS:
            virtual_services: list[VirtualService] = []
            for name, data in upserts:
                vs = _convert(virtual_service_from_bytes, name, data, rejected)
                if vs is not None:
                    virtual_services.append(vs)
            batch = StateBatch(
                virtual_services=tuple(virtual_services),
                removed_virtual_services=tuple(removals),
            )
        elif type_url in DESTINATION_RULE_TYPE_URLS:
            destination_rules: list[DestinationRule] = []
            for name, data in upserts:
                dr = _convert(destination_rule_from_bytes, name, data, rejected)
                if dr is not None:
                    destination_rules.append(dr)
            batch = StateBatch(
                destination_rules=tuple(destination_rules),
                removed_destination_rules=tuple(removals),
            )
        elif type_url == TYPE_URL_AUTHORIZATION_POLICY:
            http_policies: list[HttpAuthorization] = []
            for name, data in upserts:
                hp = _convert(http_authorization_from_bytes, name, data, rejected)
                if hp is not None:
                    http_policies.append(hp)
            batch = StateBatch(
                http_policies=tuple(http_policies), removed_http_policies=tuple(removals)
            )
        else:
            log.warning(
                "ignoring %d resources of unknown type %s", len(upserts) + len(removals), type_url
            )
            return {}
        for name, reason in rejected.items():
            log.warning("rejected %s: %s", name, reason)
        self._store.apply(batch)
        return rejected


def _convert(
    convert: Callable[[str, bytes], T], name: str, data: bytes, rejected: dict[str, str]
) -> T | None:
    """Convert one resource; on failure record why under its name and return None."""
    try:
        return convert(name, data)
    except ConversionError as e:
        rejected[name] = str(e)
    except Exception as e:  # a converter bug must cost one resource, not the stream
        log.exception("converting %s failed unexpectedly", name)
        rejected[name] = f"internal error converting the resource: {e!r}"
    return None
