"""Faults, retries and mirrors for one request, with scripted random draws."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.model.routing import (
    GRPC_RETRY_ON,
    HTTP_RETRY_ON,
    Destination,
    HttpFault,
    HttpMirror,
    HttpRetry,
    Percent,
)
from nodeagent.traffic.http import LocalResponse
from nodeagent.traffic.resilience import (
    ISTIO_DEFAULT_RETRY,
    FaultDecision,
    RetryPolicy,
    RetryState,
    TryFailure,
    Verdict,
    draw_fault,
    mirrored,
    retriable,
    shadow_authority,
)

DEFAULT_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)


def script(*values: float) -> Callable[[], float]:
    """A draw function returning `values` in order; running out fails the test."""
    it = iter(values)
    return lambda: next(it)


def policy(*retry_on: str, retries: int = 2, codes: Iterable[int] = ()) -> RetryPolicy:
    return RetryPolicy(retries, None, frozenset(retry_on), frozenset(codes))


# --- RetryPolicy.of -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        pytest.param(None, ISTIO_DEFAULT_RETRY, id="not-written-is-istio-default"),
        pytest.param(HttpRetry(0), None, id="attempts-0-disables"),
        pytest.param(
            HttpRetry(0, retry_on=("5xx",)), None, id="attempts-0-with-retry-on-still-disables"
        ),
        pytest.param(
            HttpRetry(3),
            RetryPolicy(3, None, DEFAULT_ON, frozenset()),
            id="empty-retry-on-is-istio-default-list",
        ),
        pytest.param(
            HttpRetry(4, per_try_timeout=1.5, retry_on=("5xx", "reset")),
            RetryPolicy(4, 1.5, frozenset({"5xx", "reset"}), frozenset()),
            id="names-as-given-per-try-timeout-kept",
        ),
        pytest.param(
            HttpRetry(1, retry_on=("gateway-error",), status_codes=(409, 429)),
            RetryPolicy(
                1,
                None,
                frozenset({"gateway-error", "retriable-status-codes"}),
                frozenset({409, 429}),
            ),
            id="codes-add-retriable-status-codes",
        ),
        pytest.param(
            HttpRetry(2, status_codes=(503,)),
            RetryPolicy(2, None, frozenset({"retriable-status-codes"}), frozenset({503})),
            id="codes-only",
        ),
        pytest.param(
            HttpRetry(2, retry_on=("retriable-status-codes",), status_codes=(500,)),
            RetryPolicy(2, None, frozenset({"retriable-status-codes"}), frozenset({500})),
            id="condition-written-once",
        ),
    ],
)
def test_retry_policy_of_converts_as_istiod(
    written: HttpRetry | None, expected: RetryPolicy | None
) -> None:
    assert RetryPolicy.of(written) == expected


def test_istio_default_is_two_retries_without_503_since_istio_1_24() -> None:
    p = ISTIO_DEFAULT_RETRY
    assert (p.retries, p.per_try_timeout, p.retry_on, p.status_codes) == (
        2,
        None,
        DEFAULT_ON,
        frozenset(),
    )
    assert not retriable(ISTIO_DEFAULT_RETRY, status=503)
    assert retriable(ISTIO_DEFAULT_RETRY, failure=TryFailure.CONNECT_FAILURE)
    assert retriable(ISTIO_DEFAULT_RETRY, failure=TryFailure.REFUSED_STREAM)
    assert not retriable(ISTIO_DEFAULT_RETRY, failure=TryFailure.RESET)
    assert retriable(ISTIO_DEFAULT_RETRY, status=200, grpc_status=14)


# --- retriable: every retry_on name x every outcome ------------------------------------------

CF, RS, RE, TO = (
    TryFailure.CONNECT_FAILURE,
    TryFailure.REFUSED_STREAM,
    TryFailure.RESET,
    TryFailure.TIMEOUT,
)
# An outcome: an HTTP status, a TryFailure, or ("grpc", n) for HTTP 200 with grpc-status n.
OUTCOMES: tuple[object, ...] = (
    200,
    409,
    500,
    502,
    503,
    504,
    CF,
    RS,
    RE,
    TO,
    ("grpc", 0),
    ("grpc", 1),
    ("grpc", 4),
    ("grpc", 8),
    ("grpc", 13),
    ("grpc", 14),
)
ALL_FAILURES = {CF, RS, RE, TO}
RETRIED_BY: dict[str, set[object]] = {
    # Envoy counts any reset (incl. a per-try timeout) as a 5xx.
    "5xx": {500, 502, 503, 504} | ALL_FAILURES,
    "gateway-error": {502, 503, 504} | ALL_FAILURES,
    "reset": set(ALL_FAILURES),
    "reset-before-request": {CF},
    "connect-failure": {CF},
    "refused-stream": {RS},
    "retriable-4xx": {409},
    "retriable-status-codes": {409, 503},  # the policy's codes below
    "envoy-ratelimited": set(),  # needs x-envoy-ratelimited, not seen here
    "retriable-headers": set(),  # needs header matchers, not seen here
    "http3-post-connect-failure": set(),  # no HTTP/3 upstreams
    "cancelled": {("grpc", 1)},
    "deadline-exceeded": {("grpc", 4)},
    "resource-exhausted": {("grpc", 8)},
    "internal": {("grpc", 13)},
    "unavailable": {("grpc", 14)},
}


def test_the_table_covers_every_name_the_model_accepts() -> None:
    assert set(RETRIED_BY) == set(HTTP_RETRY_ON) | set(GRPC_RETRY_ON)


def _ask(p: RetryPolicy, outcome: object) -> bool:
    if isinstance(outcome, TryFailure):
        return retriable(p, failure=outcome)
    if isinstance(outcome, tuple):
        return retriable(p, status=200, grpc_status=outcome[1])
    assert isinstance(outcome, int)
    return retriable(p, status=outcome)


@pytest.mark.parametrize("name", sorted(RETRIED_BY))
@pytest.mark.parametrize("outcome", OUTCOMES, ids=str)
def test_retriable_follows_envoy_retry_on(name: str, outcome: object) -> None:
    p = policy(name, codes=(409, 503))
    assert _ask(p, outcome) is (outcome in RETRIED_BY[name])


def test_retriable_status_codes_without_codes_matches_nothing() -> None:
    p = policy("retriable-status-codes")
    assert not any(_ask(p, o) for o in OUTCOMES)


def test_a_failure_ignores_the_status_argument() -> None:
    assert not retriable(policy("retriable-4xx"), status=409, failure=TryFailure.RESET)


# --- RetryState -----------------------------------------------------------------------------


def test_retries_are_counted_and_the_last_retriable_result_is_exhausted() -> None:
    state = RetryState(policy("5xx", retries=2))
    assert state.result(status=503) is Verdict.RETRY
    assert state.result(failure=TryFailure.RESET) is Verdict.RETRY
    assert state.flags == ""
    assert state.result(status=502) is Verdict.EXHAUSTED
    assert state.attempts == 3
    assert state.flags == "URX"


def test_a_success_after_a_retry_is_done_without_flags() -> None:
    state = RetryState(policy("gateway-error", retries=3))
    assert state.result(status=504) is Verdict.RETRY
    assert state.result(status=200) is Verdict.DONE
    assert (state.attempts, state.flags) == (2, "")


def test_a_non_retriable_failure_is_done() -> None:
    state = RetryState(policy("connect-failure"))
    assert state.result(failure=TryFailure.RESET) is Verdict.DONE
    assert state.flags == ""


def test_zero_retries_exhausts_at_once() -> None:
    state = RetryState(policy("5xx", retries=0))
    assert state.result(status=500) is Verdict.EXHAUSTED
    assert state.flags == "URX"


def test_no_policy_never_retries() -> None:
    state = RetryState(None)
    assert state.result(failure=TryFailure.CONNECT_FAILURE) is Verdict.DONE
    assert (state.attempts, state.flags) == (1, "")


def test_a_body_that_cannot_be_replayed_is_never_retried() -> None:
    state = RetryState(policy("5xx", retries=5), replayable=False)
    assert state.result(status=503) is Verdict.DONE
    assert state.flags == ""


def test_feeding_after_the_end_is_an_error() -> None:
    state = RetryState(policy("5xx"))
    state.result(status=200)
    with pytest.raises(RuntimeError):
        state.result(status=200)


@pytest.mark.parametrize(
    ("retry", "draw", "seconds"),
    [
        (1, 0.0, 0.0),
        (1, 0.5, 0.012),  # interval 25 ms
        (1, 0.9999, 0.024),
        (2, 0.5, 0.025),  # 50 ms
        (2, 0.999, 0.049),
        (3, 0.5, 0.05),  # 100 ms
        (4, 0.5, 0.1),  # 200 ms
        (5, 0.5, 0.125),  # capped at 250 ms
        (5, 0.999, 0.249),
        (9, 0.999, 0.249),
    ],
)
def test_backoff_is_envoys_jittered_exponential(retry: int, draw: float, seconds: float) -> None:
    state = RetryState(policy("5xx", retries=10))
    for _ in range(retry):
        assert state.result(status=503) is Verdict.RETRY
    assert state.backoff(draw) == pytest.approx(seconds)


def test_backoff_stays_below_the_maximum_for_any_draw() -> None:
    state = RetryState(policy("5xx", retries=20))
    for _ in range(20):
        state.result(status=503)
        assert 0.0 <= state.backoff(0.0) <= state.backoff(0.999999) < 0.25
    assert state.backoff(1.0) == pytest.approx(0.249)  # a draw of 1 is clamped


# --- faults ---------------------------------------------------------------------------------

ABORT_503 = LocalResponse(503, (("content-type", "text/plain"),), b"fault filter abort", flags="FI")


@pytest.mark.parametrize(
    ("fault", "draws", "expected"),
    [
        (None, (), FaultDecision()),
        (HttpFault(delay=2.0, delay_percent=Percent(50)), (0.49,), FaultDecision(delay=2.0)),
        (HttpFault(delay=2.0, delay_percent=Percent(50)), (0.5,), FaultDecision()),
        (
            HttpFault(abort_status=503, abort_percent=Percent(10)),
            (0.05,),
            FaultDecision(abort=ABORT_503),
        ),
        (HttpFault(abort_status=503, abort_percent=Percent(10)), (0.1,), FaultDecision()),
        (
            HttpFault(1.0, Percent(100), 503, None, Percent(100)),
            (0.99, 0.99),
            FaultDecision(1.0, ABORT_503),
        ),
        (
            HttpFault(1.0, Percent(30), 503, None, Percent(60)),
            (0.5, 0.2),
            FaultDecision(0.0, ABORT_503),
        ),
        (HttpFault(1.0, Percent(30), 503, None, Percent(60)), (0.2, 0.7), FaultDecision(1.0)),
        (HttpFault(1.0, Percent(0), 503, None, Percent(0)), (0.0, 0.0), FaultDecision()),
    ],
)
def test_draw_fault_with_scripted_draws(
    fault: HttpFault | None, draws: tuple[float, ...], expected: FaultDecision
) -> None:
    assert draw_fault(fault, script(*draws)) == expected


def test_a_grpc_abort_is_http_200_with_the_status_in_headers() -> None:
    fault = HttpFault(abort_grpc=14, abort_percent=Percent(100))
    decision = draw_fault(fault, script(0.3))
    assert decision.abort == LocalResponse(
        200,
        (
            ("content-type", "application/grpc"),
            ("grpc-status", "14"),
            ("grpc-message", "fault filter abort"),
        ),
        b"",
        flags="FI",
    )
    assert decision.delay == 0.0


# --- mirrors --------------------------------------------------------------------------------

M_ALL = HttpMirror(Destination("shadow-a"), Percent(100))
M_HALF = HttpMirror(Destination("shadow-b"), Percent(50))
M_NONE = HttpMirror(Destination("shadow-c"), Percent(0))


@pytest.mark.parametrize(
    ("draws", "expected"),
    [
        ((0.0, 0.0, 0.0), (M_ALL, M_HALF)),
        ((0.99, 0.49, 0.0), (M_ALL, M_HALF)),
        ((0.99, 0.5, 0.0), (M_ALL,)),
    ],
)
def test_each_mirror_draws_against_its_own_percent(
    draws: tuple[float, ...], expected: tuple[HttpMirror, ...]
) -> None:
    assert mirrored((M_ALL, M_HALF, M_NONE), script(*draws)) == expected


def test_no_mirrors_draw_nothing() -> None:
    assert mirrored((), script()) == ()


@pytest.mark.parametrize(
    ("authority", "shadow"),
    [
        ("backend", "backend-shadow"),
        ("backend:8080", "backend-shadow:8080"),
        ("backend.ns.svc.cluster.local:80", "backend.ns.svc.cluster.local-shadow:80"),
        ("10.0.0.1:9080", "10.0.0.1-shadow:9080"),
        ("[::1]:80", "[::1]-shadow:80"),
        ("[::1]", "[::1]-shadow"),
        ("[fd00::2]", "[fd00::2]-shadow"),
    ],
)
def test_shadow_authority_is_envoys_shadow_host(authority: str, shadow: str) -> None:
    assert shadow_authority(authority) == shadow


# --- properties -----------------------------------------------------------------------------

RESULTS: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.builds(dict, status=st.sampled_from([200, 404, 409, 500, 502, 503, 504])),
    st.builds(dict, failure=st.sampled_from(list(TryFailure))),
    st.builds(dict, status=st.just(200), grpc_status=st.sampled_from([0, 1, 4, 8, 13, 14])),
)
POLICIES = st.builds(
    RetryPolicy,
    retries=st.integers(0, 6),
    per_try_timeout=st.none(),
    retry_on=st.frozensets(st.sampled_from(sorted(RETRIED_BY))),
    status_codes=st.frozensets(st.sampled_from([409, 500, 503])),
)


@settings(max_examples=300, deadline=None)
@given(
    POLICIES,
    st.booleans(),
    st.lists(RESULTS, min_size=1, max_size=12),
    st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=12, max_size=12),
)
def test_retry_state_invariants(
    p: RetryPolicy,
    replayable: bool,
    results: list[dict[str, Any]],
    draws: list[float],
) -> None:
    state = RetryState(p, replayable)
    verdicts: list[Verdict] = []
    for result, draw in zip(results, draws, strict=False):
        before = state.attempts
        verdict = state.result(**result)
        verdicts.append(verdict)
        assert state.attempts == before + 1 <= p.retries + 1
        if state.attempts == p.retries + 1:
            assert verdict is not Verdict.RETRY
        if verdict is not Verdict.RETRY:
            break
        assert 0.0 <= state.backoff(draw) <= 0.25
    assert (state.flags == "URX") is (Verdict.EXHAUSTED in verdicts)
    if not replayable:
        assert verdicts == [Verdict.DONE]
    assert verdicts.count(Verdict.RETRY) <= p.retries
