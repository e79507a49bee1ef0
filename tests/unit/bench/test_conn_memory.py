"""bench.conn_memory's report: bytes per connection by allocation site, from two snapshots."""

from __future__ import annotations

import collections
import tracemalloc

from bench.conn_memory import breakdown

ROLLUP = "55-7f ---p 00000000 00:00 0  [rollup]\nRss:  {} kB\nPss:  1 kB\n"


def _snapshot(*traces: tuple[int, list[tuple[str, int]]]) -> tracemalloc.Snapshot:
    # tracemalloc's raw traces: (domain, size, frames most recent first, total frames).
    raw = [(0, size, tuple(frames), len(frames)) for size, frames in traces]
    return tracemalloc.Snapshot(raw, 12)


def _side(rss_kib: int, types: dict[str, int], *traces: tuple[int, list[tuple[str, int]]]):
    return {
        "snapshot": _snapshot(*traces),
        "types": collections.Counter(types),
        "rollup": ROLLUP.format(rss_kib),
    }


def test_bytes_per_connection_by_our_innermost_frame_and_the_allocating_one() -> None:
    relay = [("/usr/lib/python3/asyncio/events.py", 80), ("/x/nodeagent/proxy/relay.py", 304)]
    task = [("/x/nodeagent/proxy/listeners.py", 188)]
    before = _side(1000, {"Task": 3}, (100, task))
    during = _side(
        1020,
        {"Task": 13, "TcpRelayEnd": 10, "Rare": 1},
        (100, task),
        *[(680, relay)] * 10,
        *[(300, task)] * 10,
    )
    report = breakdown(before, during, 10, top=5).splitlines()
    assert report[0].startswith("RSS 2.00 KiB/connection") and "traced 980 B" in report[0]
    assert "TcpRelayEnd 1.00" in report[1] and "Task 1.00" in report[1]
    assert "Rare" not in report[1]  # fewer than one per two connections
    assert report[3].split() == [
        "680.0",
        "1.00",
        "nodeagent/proxy/relay.py:304",
        "<-",
        "events.py:80",
    ]
    assert report[4].split()[:3] == ["300.0", "1.00", "nodeagent/proxy/listeners.py:188"]
