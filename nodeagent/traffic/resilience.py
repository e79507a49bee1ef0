"""Faults, retries and mirrors for one HTTP request at the waypoint, as Istio asks Envoy for them.

Pure decisions: no I/O, no clock, and every random number is passed in, so each
outcome can be tested exactly. The waypoint's exchange loop does the waiting,
the sending and the reading; it asks here what to do next.

Sources followed (reference reading, not copied):

* `RetryPolicy.of` is istiod's `ConvertPolicy` in istio/istio
  pilot/pkg/networking/core/route/retry/retry.go: no `retries` written gives
  the default policy (2 retries on connect-failure, refused-stream,
  unavailable, cancelled, retriable-status-codes); `attempts: 0` gives none;
  numbers in `retryOn` become retriable status codes and add the
  retriable-status-codes condition. Since Istio 1.24 (istio/istio#52111,
  "exclude unsafe 503 from default RetryPolicy") the default policy carries no
  status codes, so a 503 is no longer retried by default; before, it was
  {503}. We follow the current source.
* `retriable` is Envoy's `RetryStateImpl::wouldRetryFromHeaders` /
  `wouldRetryFromReset` (source/common/router/retry_state_impl.cc) with the
  meanings in docs/root/configuration/http/http_filters/router_filter.rst.
  Any attempt without a response head (a reset, a connect failure, a refused
  stream, a per-try timeout, which Envoy handles as a local reset) is retried
  under `5xx`, `gateway-error` and `reset` alike: Envoy counts a reset as a
  5xx. `connect-failure` and `refused-stream` cover only their own failure;
  `reset-before-request` only a connect failure (the one failure known to
  have sent no request bytes).
* `RetryState.backoff` is `JitteredExponentialBackOffStrategy`
  (source/common/common/backoff_strategy.cc): the n-th retry waits
  `random % interval` ms, the interval starting at 25 ms and doubling while
  below half the 250 ms maximum, then held at 250 ms (25, 50, 100, 200, 250...).
  The docs' `(2^N-1)B` range describes an older version of that code.
* `draw_fault` is Envoy's fault filter (fault_filter.cc: the reply is
  `sendLocalReply(code, "fault filter abort", ...)`, flag FI) and, for a gRPC
  abort, sendLocalReply's gRPC form (source/common/http/utility.cc): HTTP 200,
  the status and message in grpc-status / grpc-message headers, no body.
* `shadow_authority` is `shadowAppendedHost` in
  source/common/router/shadow_writer_impl.cc with `HeaderUtility::getPortStart`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nodeagent.model.routing import HttpFault, HttpMirror, HttpRetry
from nodeagent.traffic.http import LocalResponse

__all__ = [
    "ISTIO_DEFAULT_RETRY",
    "FaultDecision",
    "RetryPolicy",
    "RetryState",
    "TryFailure",
    "Verdict",
    "draw_fault",
    "mirrored",
    "retriable",
    "shadow_authority",
]

# Istio's default retryOn (retry.go `defaultRetryOn`); also used when `retryOn` is empty.
ISTIO_DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)
ISTIO_DEFAULT_RETRIES = 2

# Envoy's retry backoff defaults (upstream.base_retry_backoff_ms; max is 10x the base).
BACKOFF_BASE_MS = 25
BACKOFF_MAX_MS = 10 * BACKOFF_BASE_MS

FAULT_ABORT_BODY = "fault filter abort"

# gRPC status numbers of the retry_on names that look at grpc-status in the response head.
_GRPC_CONDITIONS = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_CONFLICT = 409


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The retry policy of a route as Envoy receives it from istiod."""

    retries: int  # retries after the first try
    per_try_timeout: float | None  # seconds; None: only the route timeout bounds a try
    retry_on: frozenset[str]  # Envoy retry_on / retry-grpc-on names
    status_codes: frozenset[int]  # used by "retriable-status-codes"

    @classmethod
    def of(cls, written: HttpRetry | None) -> RetryPolicy | None:
        """istiod's conversion of a route's `retries` (None: not written)."""
        if written is None:
            return ISTIO_DEFAULT_RETRY
        if written.attempts <= 0:
            return None  # istiod: attempts 0 disables retries entirely
        retry_on = ISTIO_DEFAULT_RETRY_ON
        codes: frozenset[int] = frozenset()
        if written.retry_on or written.status_codes:
            retry_on = frozenset(written.retry_on)
            codes = frozenset(written.status_codes)
            if codes:
                # Codes alone would never match without the condition that reads them.
                retry_on |= {"retriable-status-codes"}
        return cls(written.attempts, written.per_try_timeout, retry_on, codes)


ISTIO_DEFAULT_RETRY = RetryPolicy(
    retries=ISTIO_DEFAULT_RETRIES,
    per_try_timeout=None,
    retry_on=ISTIO_DEFAULT_RETRY_ON,
    status_codes=frozenset(),  # {503} before Istio 1.24 (istio/istio#52111)
)


class TryFailure(enum.Enum):
    """An attempt that got no response head."""

    CONNECT_FAILURE = "connect-failure"  # no connection or stream to the endpoint
    REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM
    RESET = "reset"  # reset or closed before the response head
    TIMEOUT = "timeout"  # the per-try timeout fired before the head


def retriable(
    policy: RetryPolicy,
    *,
    status: int = 0,
    grpc_status: int | None = None,
    failure: TryFailure | None = None,
) -> bool:
    """Whether Envoy would retry this attempt's outcome under `policy` (retries left aside).

    With `failure` the attempt had no response head and `status` is ignored.
    "envoy-ratelimited" and "retriable-headers" need response headers this does
    not see; they never match here.
    """
    on = policy.retry_on
    if failure is not None:
        if failure is TryFailure.CONNECT_FAILURE and on & {
            "connect-failure",
            "reset-before-request",
        }:
            return True
        if failure is TryFailure.REFUSED_STREAM and "refused-stream" in on:
            return True
        # Envoy counts any reset (a per-try timeout is a local reset) as a 5xx.
        return bool(on & {"reset", "5xx", "gateway-error"})
    if "5xx" in on and 500 <= status <= 599:
        return True
    if "gateway-error" in on and status in _GATEWAY_ERRORS:
        return True
    if "retriable-4xx" in on and status == _CONFLICT:
        return True
    if "retriable-status-codes" in on and status in policy.status_codes:
        return True
    if grpc_status is not None:
        return any(name in on and grpc_status == code for name, code in _GRPC_CONDITIONS.items())
    return False


class Verdict(enum.Enum):
    RETRY = "retry"  # try again (after `backoff`)
    DONE = "done"  # not retriable: pass this result on
    EXHAUSTED = "exhausted"  # retriable, no retries left: pass it on with flag URX


class RetryState:
    """One request's retries: feed each attempt's result; it says whether to try again."""

    def __init__(self, policy: RetryPolicy | None, replayable: bool = True) -> None:
        # Not replayable (body over the buffer bound): Envoy drops its retry state.
        self._policy = policy if replayable else None
        self._retries_left = self._policy.retries if self._policy is not None else 0
        self._granted = 0
        self._finished: Verdict | None = None
        self.attempts = 0  # attempts made so far (results fed)

    def result(
        self,
        *,
        status: int = 0,
        grpc_status: int | None = None,
        failure: TryFailure | None = None,
    ) -> Verdict:
        """The verdict on the latest attempt; after DONE or EXHAUSTED nothing more may be fed."""
        if self._finished is not None:
            raise RuntimeError(f"request already finished: {self._finished.value}")
        self.attempts += 1
        policy = self._policy
        if policy is None or not retriable(
            policy, status=status, grpc_status=grpc_status, failure=failure
        ):
            self._finished = Verdict.DONE
            return Verdict.DONE
        if self._retries_left == 0:
            self._finished = Verdict.EXHAUSTED
            return Verdict.EXHAUSTED
        self._retries_left -= 1
        self._granted += 1
        return Verdict.RETRY

    def backoff(self, draw: float) -> float:
        """Seconds to wait before the retry just granted; `draw` in [0, 1) is Envoy's random.

        The interval is 25 ms for the first retry and doubles per retry while it is
        below half the maximum, then stays at the 250 ms maximum; the wait is a whole
        number of ms in [0, interval), as `random % interval` gives.
        """
        interval = BACKOFF_BASE_MS
        for _ in range(max(self._granted, 1) - 1):
            if interval >= BACKOFF_MAX_MS // 2:
                interval = BACKOFF_MAX_MS
                break
            interval *= 2
        draw = min(max(draw, 0.0), 1.0)
        return min(int(draw * interval), interval - 1) / 1000.0

    @property
    def flags(self) -> str:
        """Envoy's response flag: "URX" once EXHAUSTED was returned, else ""."""
        return "URX" if self._finished is Verdict.EXHAUSTED else ""


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float = 0.0  # seconds to hold the request (flag DI when > 0)
    abort: LocalResponse | None = None  # the reply instead of forwarding (flag FI)


def draw_fault(fault: HttpFault | None, draw: Callable[[], float]) -> FaultDecision:
    """The fault for one request: one draw for the delay, then one for the abort.

    A draw is made only for a part that is configured, so scripted draws line up.
    """
    if fault is None:
        return FaultDecision()
    delay = 0.0
    if fault.delay_percent is not None and draw() < fault.delay_percent.fraction:
        delay = fault.delay
    abort = None
    if fault.abort_percent is not None and draw() < fault.abort_percent.fraction:
        abort = _abort_reply(fault)
    return FaultDecision(delay, abort)


def _abort_reply(fault: HttpFault) -> LocalResponse:
    if fault.abort_grpc is not None:
        # gRPC clients read the status from headers; Envoy answers trailers-only with HTTP 200.
        return LocalResponse(
            200,
            (
                ("content-type", "application/grpc"),
                ("grpc-status", str(fault.abort_grpc)),
                ("grpc-message", FAULT_ABORT_BODY),
            ),
            b"",
            flags="FI",
        )
    return LocalResponse(
        fault.abort_status,
        (("content-type", "text/plain"),),
        FAULT_ABORT_BODY.encode(),
        flags="FI",
    )


def mirrored(mirrors: Sequence[HttpMirror], draw: Callable[[], float]) -> tuple[HttpMirror, ...]:
    """The mirrors this request is copied to: one draw per mirror against its percent."""
    return tuple(m for m in mirrors if draw() < m.percent.fraction)


def shadow_authority(authority: str) -> str:
    """Envoy's authority for a mirrored request: "-shadow" after the host, before any port.

    A port starts at the last ":" unless a "]" follows it (an IPv6 literal without port).
    """
    colon = authority.rfind(":")
    if colon == -1 or authority.rfind("]") > colon:
        return authority + "-shadow"
    return authority[:colon] + "-shadow" + authority[colon:]
