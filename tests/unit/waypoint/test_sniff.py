"""sniff.classify: which codec a tunnel's first bytes call for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.waypoint.sniff import H2_PREFACE, MAX_SNIFF, classify


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (H2_PREFACE, "h2"),
        (H2_PREFACE + b"\x00\x00\x12\x04", "h2"),
        (H2_PREFACE[:10], "more"),
        (b"P", "more"),
        (b"", "more"),
        (b"GET / HTTP/1.1\r\n", "http1"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http1"),
        (b"POST /a?b=c HTTP/1.0\r\n", "http1"),
        (b"M-SEARCH * HTTP/1.1\r\n", "http1"),
        (b"OPTIONS * HTTP/1.1\r\n", "http1"),
        (b"GET / HTTP/1.1", "more"),
        (b"GET /very/long", "more"),
        (b"GET", "more"),
        (b"GET / HTTP/2.0\r\n", "opaque"),
        (b"GET /\r\n", "opaque"),  # HTTP/0.9
        (b"GET / HTTP/1.x\r\n", "opaque"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "opaque"),  # TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.6\r\n", "opaque"),
        (b" GET / HTTP/1.1\r\n", "opaque"),
        (b"GET / HTTP/1.1\n", "opaque"),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "opaque"),  # PostgreSQL SSLRequest
        (b"A" * 64, "opaque"),  # no method is that long
    ],
)
def test_classify(first: bytes, expected: str) -> None:
    assert classify(first) == expected


def test_a_request_line_longer_than_the_cap_is_opaque() -> None:
    line = b"GET /" + b"a" * MAX_SNIFF
    assert classify(line[: MAX_SNIFF - 1]) == "more"
    assert classify(line) == "opaque"
    assert classify(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n") == "http1"


@given(st.binary(max_size=200))
def test_a_prefix_never_contradicts_its_extension(data: bytes) -> None:
    """Whatever a prefix decided (except "more") holds for every longer input."""
    for cut in range(len(data) + 1):
        verdict = classify(data[:cut])
        if verdict != "more":
            assert classify(data) == verdict
            return


@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    st.text("abc/?=&", max_size=50),
)
def test_every_prefix_of_a_request_line_waits(method: str, path: str) -> None:
    line = f"{method} /{path} HTTP/1.1\r\n".encode()
    for cut in range(1, len(line) - 1):
        assert classify(line[:cut]) == "more"
    assert classify(line) == "http1"
