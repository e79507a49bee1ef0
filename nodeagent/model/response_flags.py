"""Envoy's response flags joined as Envoy writes them.

Envoy prints a request's or connection's flags (`%RESPONSE_FLAGS%`, and Istio's
`response_flags` metric label) in one fixed order, its table in
source/common/stream_info/utility.h (ResponseFlagUtils::ALL_RESPONSE_STRINGS_FLAGS),
not in the order they were set: a timed-out request whose retries ran out is `UT,URX`.
"""

from __future__ import annotations

__all__ = ["ENVOY_ORDER", "join_flags"]

ENVOY_ORDER: tuple[str, ...] = (
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX",
    "RLSE", "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC",
    "OM", "DF", "DO", "DR",
)  # fmt: skip

_RANK = {flag: rank for rank, flag in enumerate(ENVOY_ORDER)}


def join_flags(flags: str, more: str) -> str:
    """Both comma-joined sets of flags, each once, in Envoy's order (a flag Envoy does not
    have, such as ztunnel's, after Envoy's, in name order)."""
    if not more:
        return flags
    if not flags:
        return more
    union = set(flags.split(",")) | set(more.split(","))
    return ",".join(sorted(union, key=lambda flag: (_RANK.get(flag, len(_RANK)), flag)))
