"""The one IPv4-mapped un-mapping: text and address values, as a table."""

from __future__ import annotations

import ipaddress

import pytest

from nodeagent.model.address import unmap


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),  # an IPv4 peer on a dual-stack socket
        ("::FFFF:0a00:0001", "10.0.0.1"),  # any spelling of it
        ("10.0.0.1", "10.0.0.1"),
        ("fd00::1", "fd00::1"),
        ("FD00:0:0::1", "fd00::1"),  # canonical text
        ("fe80::1%eth0", "fe80::1"),  # zone id dropped
        ("::ffff:10.0.0.1%eth0", "10.0.0.1"),
        ("::1", "::1"),
        ("example.com", "example.com"),  # not an address: unchanged
        ("", ""),
    ],
)
def test_unmap_text(given: str, expected: str) -> None:
    assert unmap(given) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (ipaddress.ip_address("::ffff:10.0.0.1"), ipaddress.ip_address("10.0.0.1")),
        (ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.1")),
        (ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::1")),
    ],
)
def test_unmap_address_values(
    given: ipaddress.IPv4Address | ipaddress.IPv6Address,
    expected: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert unmap(given) == expected
