"""Istio config resources in istiod's xDS envelope (`istio.mcp.v1alpha1.Resource`).

istiod serves Istio kinds over xDS under type URLs such as
`networking.istio.io/v1alpha3/VirtualService`; each resource is a `Resource`
whose metadata names it `namespace/name` (with labels and annotations) and
whose body is an `Any` holding the kind's spec message. Specs cross this module
in Istio's JSON shape (camelCase, durations as "1.5s"), exactly what
`json_format.MessageToDict` gives, so the model's parsers never see protobuf.
Pure: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from nodeagent.model import routing as rm
from nodeagent.model.constants import (
    TYPE_URL_DESTINATION_RULE,
    TYPE_URL_DESTINATION_RULE_V1,
    TYPE_URL_MCP_RESOURCE,
    TYPE_URL_VIRTUAL_SERVICE,
    TYPE_URL_VIRTUAL_SERVICE_V1,
)
from nodeagent.pb.istio.mcp.v1alpha1 import resource_pb2 as mcp_pb
from nodeagent.pb.istio.networking.v1alpha3 import destination_rule_pb2 as dr_pb
from nodeagent.pb.istio.networking.v1alpha3 import virtual_service_pb2 as vs_pb
from nodeagent.pb.istio.security.v1beta1 import authorization_pb2 as authz_pb

log = logging.getLogger(__name__)

_ANY_PREFIX = "type.googleapis.com/"

# istiod's type URL for AuthorizationPolicy config (its gvk, security.istio.io/v1), the
# spec being istio.security.v1beta1.AuthorizationPolicy. The control plane serves only
# the policies attached to waypoints under it (their rules need HTTP).
TYPE_URL_AUTHORIZATION_POLICY = "security.istio.io/v1/AuthorizationPolicy"

# The spec message of each config type URL.
SPEC_MESSAGES: Mapping[str, type[Message]] = {
    TYPE_URL_VIRTUAL_SERVICE: vs_pb.VirtualService,
    TYPE_URL_DESTINATION_RULE: dr_pb.DestinationRule,
    TYPE_URL_VIRTUAL_SERVICE_V1: vs_pb.VirtualService,
    TYPE_URL_DESTINATION_RULE_V1: dr_pb.DestinationRule,
    TYPE_URL_AUTHORIZATION_POLICY: authz_pb.AuthorizationPolicy,
}
CONFIG_TYPE_URLS = tuple(SPEC_MESSAGES)
VIRTUAL_SERVICE_TYPE_URLS = frozenset((TYPE_URL_VIRTUAL_SERVICE, TYPE_URL_VIRTUAL_SERVICE_V1))
DESTINATION_RULE_TYPE_URLS = frozenset((TYPE_URL_DESTINATION_RULE, TYPE_URL_DESTINATION_RULE_V1))


class EnvelopeError(ValueError):
    """A config resource does not decode or encode; the message says why."""


def resource_type_url(type_url: str) -> str:
    """The type URL of each resource's `Any` in a response of `type_url`: the
    envelope's for config kinds, the response's own for everything else."""
    return TYPE_URL_MCP_RESOURCE if type_url in SPEC_MESSAGES else type_url


def body_type_url(type_url: str) -> str:
    """The type URL of the envelope's body for config kind `type_url`."""
    return _ANY_PREFIX + SPEC_MESSAGES[type_url].DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)
class ConfigEnvelope:
    """One decoded config resource: who it is and its spec in Istio's JSON shape."""

    namespace: str
    name: str
    spec: Mapping[str, Any]
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    version: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def encode(type_url: str, envelope: ConfigEnvelope) -> bytes:
    """Serialize `envelope` as the `Resource` istiod would send under `type_url`.

    Raises EnvelopeError if the spec is not of the kind's JSON shape."""
    spec_cls = SPEC_MESSAGES.get(type_url)
    if spec_cls is None:
        raise EnvelopeError(f"{type_url!r} is not a config type URL")
    spec_json = _protobuf_durations(envelope.spec, spec_cls.DESCRIPTOR)
    try:
        spec = json_format.ParseDict(spec_json, spec_cls())
    except json_format.ParseError as e:
        # A field Istio added after our copy of its protos has no number here, so it
        # cannot travel; the model reads such fields only to report them as needing a
        # waypoint. Send the rest rather than nothing; a wrong value is still an error.
        try:
            spec = json_format.ParseDict(
                dict(envelope.spec), spec_cls(), ignore_unknown_fields=True
            )
        except json_format.ParseError:
            raise EnvelopeError(f"{envelope.key}: spec: {e}") from None
        log.warning("%s: a field the wire form lacks is not sent: %s", envelope.key, e)
    out = mcp_pb.Resource()
    out.metadata.name = envelope.key
    out.metadata.version = envelope.version
    out.metadata.labels.update(envelope.labels)
    out.metadata.annotations.update(envelope.annotations)
    out.body.Pack(spec)
    return out.SerializeToString(deterministic=True)


def decode(type_url: str, name: str, data: bytes) -> ConfigEnvelope:
    """Unwrap one `Resource` (Any.value) received under `type_url`, named `name`.

    Raises EnvelopeError naming what is wrong: not an envelope, a body of
    another kind, a metadata name that is not `namespace/name` or differs from
    the xDS resource name (removals name the resource, so they must agree)."""
    spec_cls = SPEC_MESSAGES.get(type_url)
    if spec_cls is None:
        raise EnvelopeError(f"{type_url!r} is not a config type URL")
    resource = mcp_pb.Resource()
    try:
        resource.ParseFromString(data)
    except DecodeError as e:
        raise EnvelopeError(f"does not decode as istio.mcp.v1alpha1.Resource: {e}") from None
    key = resource.metadata.name
    namespace, sep, short = key.partition("/")
    if not sep or not namespace or not short or "/" in short:
        raise EnvelopeError(f"metadata.name {key!r} is not namespace/name")
    if name and name != key:
        raise EnvelopeError(f"resource name {name!r} differs from metadata.name {key!r}")
    expected = body_type_url(type_url)
    if resource.body.type_url != expected:
        raise EnvelopeError(f"body is {resource.body.type_url or 'empty'!r}, expected {expected!r}")
    spec = spec_cls()
    try:
        spec.ParseFromString(resource.body.value)
    except DecodeError as e:
        raise EnvelopeError(f"body does not decode as {expected}: {e}") from None
    try:
        # Defaults are left out, as Istio's own JSON leaves them out.
        spec_json = json_format.MessageToDict(spec)
    except json_format.Error as e:  # e.g. a Duration whose nanos exceed a second
        raise EnvelopeError(f"body has no JSON form: {e}") from None
    return ConfigEnvelope(
        namespace=namespace,
        name=short,
        spec=spec_json,
        annotations=dict(resource.metadata.annotations),
        labels=dict(resource.metadata.labels),
        version=resource.metadata.version,
    )


def _protobuf_durations(value: Mapping[str, Any], descriptor: Any) -> dict[str, Any]:
    """`value` with every Duration field rewritten from Istio's YAML form (Go's: `250ms`,
    `1m30s`) to the only form protobuf's JSON accepts (`0.250s`); the rest as it is."""
    fields = {f.json_name: f for f in descriptor.fields}
    fields.update((f.name, f) for f in descriptor.fields)
    out: dict[str, Any] = {}
    for key, item in value.items():
        f = fields.get(key)
        kind = f.message_type if f is not None else None
        if kind is None:
            out[key] = item
        elif kind.GetOptions().map_entry:
            entry = kind.fields_by_name["value"].message_type
            out[key] = (
                {k: _duration_or_message(v, entry) for k, v in item.items()}
                if entry is not None and isinstance(item, Mapping)
                else item
            )
        elif isinstance(item, list):
            out[key] = [_duration_or_message(v, kind) for v in item]
        else:
            out[key] = _duration_or_message(item, kind)
    return out


def _duration_or_message(item: Any, descriptor: Any) -> Any:
    if descriptor.full_name == "google.protobuf.Duration":
        if isinstance(item, str):
            try:
                return rm.format_duration(rm.parse_duration(item, ""))
            except rm.RoutingSpecError:
                return item  # ParseDict names the field and the bad value
        return item
    if isinstance(item, Mapping):
        return _protobuf_durations(item, descriptor)
    return item
