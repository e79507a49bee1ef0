"""The tries of one forwarded request, shared by both codecs: retries, per-try timeouts, faults.

A codec hands `run_tries` a `try_once(endpoint, connected)` of its own (open or reuse a
stream and say `connected()`, send the head and the kept body, wait for the response head)
and gets back either the `Attempt` whose response goes to the client, or the `LocalReply`
to answer instead. In between, as Envoy's router does:

* each try goes to the endpoint `Dispatcher.pick` gives (the plan remembers the ones
  tried, so a retry goes elsewhere when it can, and on to the route's next subset);
* a try that fails before its response head (`AttemptFailed`), times out
  (`RetryPolicy.per_try_timeout`: 504 UT) or answers a status the policy retries is
  fed to `RetryState`; on RETRY the try is dropped and, after the jittered backoff,
  the next one starts; when the retries are used up the last outcome goes to the
  client, flagged URX, and when the cluster's maxRetries refuses one, flagged UO;
* every try's outcome reaches `Dispatcher.attempt_done` (outlier detection, slots).

Timeouts start as Envoy's router starts them, at the end of the downstream request (a
codec makes one `RequestClock` per request and says `request_ended()` when the client's
end of stream has been read; an upgrade's request never ends): the route's
(RouteAction.timeout) runs from there to the end of the response, and the codec frames
this loop with it (`clock.after_request(timeout)`); a try's (per_try_timeout) from there,
or from its upstream connection if that is later (Envoy's onPoolReady), to its response
head. Envoy ignores a per-try timeout once the response has started downstream
(upstream_request.cc, onPerTryTimeout), and here the head goes downstream as it comes.
Injected faults are the codec's too; `delay_and_abort` is the fault part, the same for
both.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, TypeVar

from nodeagent.model.constants import OVERFLOW
from nodeagent.traffic.resilience import RetryState, TryFailure, Verdict
from nodeagent.waypoint.exchange import Dispatcher, Endpoint, Forward, LocalReply, RequestTally

__all__ = [
    "BODY_BUFFER_LIMIT",
    "MAX_MIRRORS",
    "PER_TRY_TIMEOUT",
    "REQUEST_TIMEOUT",
    "Attempt",
    "AttemptFailed",
    "MirrorTasks",
    "RequestClock",
    "delay_and_abort",
    "run_tries",
]

# What a request body may take in memory so it can be sent again (Envoy's default buffer
# limit per request is the listener's per-connection limit, 1 MiB).
BODY_BUFFER_LIMIT = 1 << 20

# Mirror copies in flight at once per codec's upstreams; a copy past it is dropped (counted).
MAX_MIRRORS = 256

_TEXT = (("content-type", "text/plain"),)
# Envoy's local replies when the route's timeout or a try's fires (router.cc).
REQUEST_TIMEOUT = LocalReply(504, _TEXT, b"upstream request timeout", flags="UT")
PER_TRY_TIMEOUT = REQUEST_TIMEOUT


class Attempt(Protocol):
    """One try that got its response head (the codec's own state behind it)."""

    @property
    def status(self) -> int: ...

    @property
    def grpc_status(self) -> int | None:
        """grpc-status of a trailers-only response (gRPC errors come so), else None."""
        ...

    def discard(self) -> None:
        """Drop the try: reset its stream or close its connection (never reused)."""
        ...


class RequestClock:
    """When the downstream request ended, and the timeouts that start then."""

    __slots__ = ("_waiting", "ended")

    def __init__(self) -> None:
        self.ended = False
        self._waiting: set[_AfterRequest] = set()

    def request_ended(self) -> None:
        """The client's end of stream was read: start every timeout waiting for it."""
        if self.ended:
            return
        self.ended = True
        if self._waiting:  # (get_running_loop costs a getpid on Python 3.11: only when needed)
            now = asyncio.get_running_loop().time()
            for timeout in list(self._waiting):
                timeout.poke(now)

    def after_request(
        self, seconds: float | None, *, connecting: bool = False
    ) -> _AfterRequest | _NoTimeout:
        """A timeout context of `seconds` (None: none) from the request's end, or from
        `connected()` when `connecting` and that is later (Envoy starts a try's at
        onPoolReady, or at the request's end)."""
        if seconds is None:
            return _NO_TIMEOUT  # the common case (Istio sets none): no object per request
        return _AfterRequest(self, seconds, connecting)


class _NoTimeout:
    """`after_request(None)`: a context that never fires, shared by every request."""

    __slots__ = ()

    def when(self) -> float | None:
        return None

    def connected(self) -> None:
        pass

    async def __aenter__(self) -> _NoTimeout:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_TIMEOUT = _NoTimeout()


class _AfterRequest:
    """One timeout on a RequestClock: an asyncio.Timeout armed once its conditions hold."""

    __slots__ = ("_active", "_clock", "_connecting", "_timeout", "seconds")

    def __init__(self, clock: RequestClock, seconds: float, connecting: bool) -> None:
        self._clock = clock
        self.seconds = seconds
        self._connecting = connecting
        self._active = False
        self._timeout = asyncio.timeout(None)

    def when(self) -> float | None:
        """Loop time it fires at; None while not started (or without one)."""
        return self._timeout.when()

    def connected(self) -> None:
        """The try has its upstream connection (or stream)."""
        self._connecting = False
        if self._active:
            self.poke(asyncio.get_running_loop().time())

    def poke(self, now: float) -> None:
        """Start it if it is due to start."""
        if self._connecting or not self._clock.ended:
            return
        if self._timeout.when() is None:
            self._timeout.reschedule(now + self.seconds)
        self._clock._waiting.discard(self)

    async def __aenter__(self) -> _AfterRequest:
        await self._timeout.__aenter__()
        self._active = True
        self._clock._waiting.add(self)
        self.poke(asyncio.get_running_loop().time())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._active = False
        self._clock._waiting.discard(self)
        await self._timeout.__aexit__(kind, error, trace)


class AttemptFailed(Exception):
    """A try that got no response head: why (for the retry policy) and the reply it gives."""

    def __init__(self, failure: TryFailure, reply: LocalReply) -> None:
        super().__init__(f"{failure.value}: {reply.status} {reply.flags}")
        self.failure = failure
        self.reply = reply


async def delay_and_abort(forward: Forward, tally: RequestTally) -> LocalReply | None:
    """The route's injected fault: hold the request, then maybe answer it ourselves."""
    if forward.delay > 0:
        tally.flag("DI")
        await asyncio.sleep(forward.delay)
    if forward.abort is not None:
        tally.flag("FI")
        return forward.abort
    return None


A = TypeVar("A", bound=Attempt)


async def run_tries(
    dispatcher: Dispatcher,
    forward: Forward,
    tally: RequestTally,
    clock: RequestClock,
    try_once: Callable[[Endpoint, Callable[[], None]], Awaitable[A]],
    *,
    replayable: bool,
    draw: Callable[[], float] = random.random,
) -> A | LocalReply:
    """Try endpoints until one answers for good or the retry policy gives up."""
    state = RetryState(forward.retry, replayable)
    per_try = forward.retry.per_try_timeout if forward.retry is not None else None
    while True:
        picked = await dispatcher.pick(forward)
        if isinstance(picked, LocalReply):
            tally.flag(state.flags)
            return picked
        tally.endpoint = picked
        tally.attempts += 1
        timer = clock.after_request(per_try, connecting=True)
        try:
            async with timer:
                attempt = await try_once(picked, timer.connected)
        except AttemptFailed as failed:
            dispatcher.attempt_done(picked, 0, local_origin=True)
            verdict = state.result(failure=failed.failure)
            reply = failed.reply
        except TimeoutError:
            # A local-origin failure of the endpoint (Envoy: a 504 of its own; unsplit, both
            # count on the 5xx and gateway counters).
            dispatcher.attempt_done(picked, 0, local_origin=True)
            verdict = state.result(failure=TryFailure.TIMEOUT)
            reply = PER_TRY_TIMEOUT
        else:
            verdict = state.result(status=attempt.status, grpc_status=attempt.grpc_status)
            if verdict is Verdict.RETRY and _budget(forward):
                attempt.discard()
                dispatcher.attempt_done(picked, attempt.status, local_origin=False)
                await asyncio.sleep(state.backoff(draw()))
                continue
            # Envoy (router.cc, RetryStatus::NoOverflow): over maxRetries the response goes
            # on, not retried, flagged UO.
            tally.flag(OVERFLOW if verdict is Verdict.RETRY else state.flags)
            return attempt  # its outcome is recorded when its response has ended
        if verdict is not Verdict.RETRY:
            tally.flag(state.flags)
            return reply
        if not _budget(forward):
            tally.flag(OVERFLOW)
            return reply
        await asyncio.sleep(state.backoff(draw()))


class MirrorTasks:
    """The mirror copies in flight: each on its own task, never awaited by the request."""

    def __init__(self, limit: int = MAX_MIRRORS) -> None:
        self.limit = limit
        self.dropped = 0  # copies not sent: too many in flight
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, shadow: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= self.limit:
            shadow.close()
            self.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(shadow)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> list[asyncio.Task[None]]:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks


def _budget(forward: Forward) -> bool:
    return forward.may_retry is None or forward.may_retry()
