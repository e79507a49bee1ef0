"""Pure L4 authorization (Istio semantics): `evaluate` decides, `Decision.explain` says why."""

from nodeagent.policy.checker import PolicyChecker, PolicyLookup, Revocation
from nodeagent.policy.engine import (
    Decision,
    DecisionReason,
    PolicyMatch,
    applicable_policies,
    evaluate,
    matching_rule,
)
from nodeagent.policy.trace import (
    PolicyTrace,
    UnselectedPolicy,
    match_mismatch,
    trace,
    trace_policy,
    unselected,
)

__all__ = [
    "Decision",
    "DecisionReason",
    "PolicyChecker",
    "PolicyLookup",
    "PolicyMatch",
    "PolicyTrace",
    "Revocation",
    "UnselectedPolicy",
    "applicable_policies",
    "evaluate",
    "match_mismatch",
    "matching_rule",
    "trace",
    "trace_policy",
    "unselected",
]
