"""IP address text and values as the mesh compares them: IPv4-mapped IPv6 un-mapped.

A dual-stack (AF_INET6) socket reports an IPv4 peer as `::ffff:a.b.c.d`, while
workload records, policies and the kernel's IPv4 rules name it `a.b.c.d`. Every
address taken from a socket goes through `unmap` before it is compared, logged
or connected to, so there is one spelling of each address.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import overload

from nodeagent.model.workload import IPAddress


@overload
def unmap(address: str) -> str: ...


@overload
def unmap(address: IPAddress) -> IPAddress: ...


def unmap(address: str | IPAddress) -> str | IPAddress:
    """`::ffff:a.b.c.d` -> `a.b.c.d`. Text comes back in canonical form with any zone id
    (`%eth0`) dropped, or unchanged when it is not an IP address (a host name)."""
    if isinstance(address, str):
        return _unmap_text(address)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# Every connection passes its peer's and destination's text through `unmap`; the set of
# addresses a node sees is small next to its connection count, so parse each once.
@functools.lru_cache(maxsize=8192)
def _unmap_text(address: str) -> str:
    try:
        parsed: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    return str(unmap(parsed))


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> IPAddress:
    """`ipaddress.ip_address`, remembered: the proxy parses its peers' addresses on every
    connection. Raises ValueError for text that is not an address."""
    return ipaddress.ip_address(text)
