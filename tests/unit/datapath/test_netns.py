"""Socket helpers that need no privileges: original destination fallbacks."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from nodeagent.datapath import netns
from nodeagent.datapath.netns import NetnsVanishedError, original_destination, resolve


def _pair(
    family: socket.AddressFamily, host: str
) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    return listener, client, server


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_unredirected_connection_falls_back_to_local_address(family, host) -> None:  # type: ignore[no-untyped-def]
    listener, client, server = _pair(family, host)
    try:
        assert original_destination(server) == (host, listener.getsockname()[1])
    finally:
        for s in (listener, client, server):
            s.close()


def test_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(NetnsVanishedError, match="/var/run/netns/no-such-ns-dp-test is gone"):
        resolve("no-such-ns-dp-test")


def _stuck() -> None:
    # What `entered` raises when the thread cannot get back to its own namespace.
    raise netns._Poisoned("stuck in a pod's namespace")


@pytest.mark.parametrize("how", ["call", "submit", "run"])
def test_a_poisoned_worker_thread_is_replaced_before_the_caller_hears(how: str) -> None:
    with netns.NetnsWorker("poison-test") as worker:
        first = worker.call(None, threading.current_thread)
        with pytest.raises(netns.NetnsError, match="stuck"):
            if how == "call":
                worker.call(None, _stuck)
            elif how == "submit":
                worker.submit(None, _stuck).result()
            else:
                asyncio.run(worker.run(None, _stuck))
        # The very next request runs on a fresh thread, whichever way the failure came back.
        assert worker.call(None, threading.current_thread) is not first
        assert worker.call(None, lambda: 7) == 7
