"""The tries of one forwarded request, shared by both codecs: retries, per-try timeouts, faults.

A codec hands `run_tries` a `try_once(endpoint)` of its own (open or reuse a stream,
send the head and the kept body, wait for the response head) and gets back either the
`Attempt` whose response goes to the client, or the `LocalReply` to answer instead. In
between, as Envoy's router does:

* each try goes to the endpoint `Dispatcher.pick` gives (the plan remembers the ones
  tried, so a retry goes elsewhere when it can, and on to the route's next subset);
* a try that fails before its response head (`AttemptFailed`), times out
  (`RetryPolicy.per_try_timeout`: 504 UT) or answers a status the policy retries is
  fed to `RetryState`; on RETRY the try is dropped and, after the jittered backoff,
  the next one starts; when the retries are used up the last outcome goes to the
  client, flagged URX;
* every try's outcome reaches `Dispatcher.attempt_done` (outlier detection, slots).

The route's whole-request timeout and injected faults are the codec's (they frame
this loop); `delay_and_abort` is the fault part, the same for both.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

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


async def run_tries(
    dispatcher: Dispatcher,
    forward: Forward,
    tally: RequestTally,
    try_once: Callable[[Endpoint], Awaitable[Attempt]],
    *,
    replayable: bool,
    draw: Callable[[], float] = random.random,
) -> Attempt | LocalReply:
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
        try:
            if per_try is not None:
                async with asyncio.timeout(per_try):
                    attempt = await try_once(picked)
            else:
                attempt = await try_once(picked)
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
            if verdict is Verdict.RETRY and not _budget(forward):
                return attempt  # Envoy: over maxRetries the response goes on, not retried
            if verdict is not Verdict.RETRY:
                tally.flag(state.flags)
                return attempt  # its outcome is recorded when its response has ended
            attempt.discard()
            dispatcher.attempt_done(picked, attempt.status, local_origin=False)
        if verdict is not Verdict.RETRY or not _budget(forward):
            tally.flag(state.flags)
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
