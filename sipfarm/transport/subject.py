"""What a source address is judged as: counted, rate-limited, banned, its connections limited.

An IPv4 address is its own subject.  An IPv6 address is judged as its /64: one subscriber (a
phone, a home router's LAN, a rented server) is given a whole /64 and picks addresses in it at
will (RFC 4941 privacy addresses, or 2^64 made up by an attacker), so counting connections,
failures, rates or bans per IPv6 address would give one host every connection slot, unlimited
guesses, unlimited request budget and a fresh Redis counter per address (red team,
2026-12-02).  Per /64 it has what one IPv4 address has (RFC 6583's advice; a NAT'd office of
IPv4 phones shares one address the same way).  An IPv4-mapped IPv6 source (``::ffff:192.0.2.1``,
from a dual-stack socket) is the IPv4 address it carries.

:func:`source_subject` is applied wherever a source becomes a key: the transport's connections
per source, the guard's Redis keys and ban index (:mod:`sipfarm.protect.guard`), the local ban
caches, the balancer's front door (bans and rate budgets) and ``sipfarm ban``.  A subject is its
own subject (``2001:db8:1:2::/64`` stays itself), so a key made from a subject and one made from
an address in it are the same key.  Nonces stay bound to the address, and exempt and allow/deny
networks are matched against the address itself.
"""

from __future__ import annotations

import ipaddress
from typing import Final

__all__ = ["IPV6_PREFIX", "source_subject"]

IPV6_PREFIX: Final = 64
_MEMO_LIMIT: Final = 4096

_memo: dict[str, str] = {}


def source_subject(host: str) -> str:
    """``host`` (an IP address as the transport reports it) as counted and banned: an IPv4 address
    itself, an IPv6 address as its /64 (``2001:db8:1:2::/64``), a subject as itself; text that is
    no address at all is returned unchanged (it matches nothing a socket reports)."""
    if ":" not in host or "/" in host:
        return host
    subject = _memo.get(host)
    if subject is not None:
        return subject
    subject = _v6_subject(host)
    if len(_memo) >= _MEMO_LIMIT:
        _memo.clear()  # a flood of addresses (one /64's worth) costs a re-parse, never memory
    _memo[host] = subject
    return subject


def _v6_subject(host: str) -> str:
    try:
        address = ipaddress.IPv6Address(host.strip("[]").partition("%")[0])
    except ValueError:
        return host
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
