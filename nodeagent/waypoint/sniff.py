"""What protocol a tunnel carries, from its first bytes (pure).

The waypoint reads a little of each tunnel before choosing a codec: the HTTP/2
prior-knowledge preface goes to http2.py, an HTTP/1.x request line to http1.py, and
anything else (TLS, a database protocol) is relayed as TCP under the L4 rules.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["H2_PREFACE", "MAX_SNIFF", "Protocol", "classify"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4
MAX_SNIFF = 8 * 1024  # a request line longer than this is not worth waiting for

Protocol = Literal["h2", "http1", "opaque", "more"]

# RFC 9110 §5.6.2 tchar: a method is a token.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_VERSION = b"HTTP/1."


def classify(first: bytes) -> Protocol:
    """ "h2", "http1", "opaque", or "more" when `first` is too short to tell."""
    if not first:
        return "more"
    head = first[: len(H2_PREFACE)]
    if H2_PREFACE.startswith(head):
        return "h2" if len(head) == len(H2_PREFACE) else "more"
    space = first.find(b" ", 0, MAX_SNIFF)
    method = first if space < 0 else first[:space]
    # Judge the method as soon as its bytes arrive: TLS and most binary protocols fail here
    # on the first byte instead of waiting for 8 KiB that never come.
    if not all(c in _TCHAR for c in method[:64]) or (space < 0 and len(method) >= 64):
        return "opaque"
    if space <= 0:
        return "more" if space < 0 else "opaque"
    end = first.find(b"\r\n", space)
    if end < 0:
        if len(first) >= MAX_SNIFF or b"\n" in first[space:]:
            return "opaque"
        return "more"
    line = first[:end]
    version = line[line.rfind(b" ") + 1 :]
    if (
        line.count(b" ") >= 2
        and len(version) == len(_VERSION) + 1
        and version.startswith(_VERSION)
        and version[-1:].isdigit()
    ):
        return "http1"
    return "opaque"
