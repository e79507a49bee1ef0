"""Pure endpoint selection: health, locality (STRICT/FAILOVER), capacity weights, outliers."""

from nodeagent.traffic.endpoints import Skipped, candidates_for
from nodeagent.traffic.outlier import Clock, OutlierDetector, OutlierSettings
from nodeagent.traffic.selection import (
    Candidate,
    EndpointSelector,
    Selection,
    SelectionOutcome,
    SourceLocation,
    rank,
    scope_matches,
)

__all__ = [
    "Candidate",
    "Clock",
    "EndpointSelector",
    "OutlierDetector",
    "OutlierSettings",
    "Selection",
    "SelectionOutcome",
    "Skipped",
    "SourceLocation",
    "candidates_for",
    "rank",
    "scope_matches",
]
