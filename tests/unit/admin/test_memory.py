"""When the agent gives memory back after a burst of connections closes."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.admin.memory import BurstTrim, trim_after_bursts, trim_heap


@pytest.mark.parametrize(
    ("counts", "trims"),
    [
        ([0, 10, 200, 300, 100], [False] * 5),  # fell 200 from 300: not a burst's end
        ([0, 5000, 5000, 4000, 0], [False, False, False, True, True]),  # and again as it falls
        # 300 below the peak; once the count stops falling, once more (the close ended)
        ([1000, 700, 744, 744], [False, True, True, False]),
        ([0, 600, 300, 290, 290, 290], [False, False, True, False, True, False]),
        ([0, 600, 300, 900, 600, 643], [False, False, True, True, True, True]),
    ],
)
def test_trims_once_the_count_falls_a_burst_below_its_peak(
    counts: list[int], trims: list[bool]
) -> None:
    policy = BurstTrim(drop=256)
    assert [policy.observe(n) for n in counts] == trims


def test_trim_heap_calls_glibc() -> None:
    assert trim_heap() is True  # Debian's glibc has malloc_trim


async def test_the_loop_trims_after_a_burst_and_keeps_watching() -> None:
    live = iter([0, 3000, 3000, 10, 10, 2000, 0])
    trimmed: list[int] = []

    def trim() -> bool:
        trimmed.append(1)
        return True

    task = asyncio.create_task(trim_after_bursts(lambda: next(live, 0), interval=0, trim=trim))
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # At 10 (a burst's end) and once more as it stays there; at 0 and as it stays there.
    assert len(trimmed) == 4


async def test_the_loop_releases_before_it_trims() -> None:
    live = iter([0, 3000, 10])
    calls: list[str] = []

    def trim() -> bool:
        calls.append("trim")
        return True

    task = asyncio.create_task(
        trim_after_bursts(
            lambda: next(live, 10), interval=0, trim=trim, release=lambda: calls.append("release")
        )
    )
    for _ in range(8):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[:4] == ["release", "trim", "release", "trim"]
