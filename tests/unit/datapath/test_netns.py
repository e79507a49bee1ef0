"""Socket helpers that need no privileges: original destination fallbacks."""

from __future__ import annotations

import socket

import pytest

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
