"""Allow and deny lists of networks: which sources may talk to a process, no I/O.

Theory of operation
-------------------
A :class:`NetList` holds two lists of networks (CIDR, IPv4 and IPv6; a bare address is its
own /32 or /128).  :meth:`NetList.verdict` classifies a source address:

1. in a ``deny`` network: :attr:`Verdict.DENIED` (deny wins over allow);
2. else, when ``allow`` is not empty and the source is in none of its networks:
   :attr:`Verdict.NOT_ALLOWED`;
3. else :attr:`Verdict.ALLOWED`.

An IPv4-mapped IPv6 source (``::ffff:192.0.2.1``, from a dual-stack socket) is matched as the
IPv4 address it carries.  A source that is not an IP address at all matches no network.

The verdict of every source is cached (a dict look-up per message after the first), bounded
by ``cache_limit``: a flood of spoofed sources clears the cache, it never grows without end.
:meth:`NetList.replace` swaps the lists (a node's set of balancers changes as they come and
go) and forgets the cache.  Single addresses are kept in a set apart from the networks, so a
long list of peers costs one set look-up to classify, not a scan.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from typing import Final

from sipfarm.transport.destinations import _ip as _address  # an IPv4-mapped address judged as IPv4

__all__ = ["NetList", "Network", "Verdict", "parse_network"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: sources whose verdict is remembered before the cache starts over
DEFAULT_CACHE_LIMIT: Final = 65_536


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"  # in a deny network
    NOT_ALLOWED = "not_allowed"  # an allow list is set and the source is in none of it


_ALLOWED: Final = Verdict.ALLOWED


def parse_network(text: str) -> Network:
    """``"10.0.0.0/8"``, ``"192.0.2.7"``, ``"2001:db8::/32"``, ``"[::1]"`` -> a network; host
    bits are ignored (``10.1.2.3/8`` is 10.0.0.0/8).  ``ValueError`` naming ``text`` otherwise."""
    try:
        return ipaddress.ip_network(text.strip().removeprefix("[").replace("]", ""), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network (CIDR) or address") from None


class _Networks:
    """One list: single addresses in a set, wider networks scanned."""

    __slots__ = ("hosts", "nets")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.hosts: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self.nets: list[Network] = []
        for net in networks:
            if net.num_addresses == 1:
                self.hosts.add(net.network_address)
            else:
                self.nets.append(net)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.nets)

    def __contains__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if address in self.hosts:
            return True
        return any(address in net for net in self.nets)  # another family: simply False


class NetList:
    """Allow and deny networks, and the cached verdict of each source seen (see the module
    docstring)."""

    def __init__(
        self,
        allow: Iterable[Network | str] = (),
        deny: Iterable[Network | str] = (),
        *,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
    ) -> None:
        self._cache_limit = cache_limit
        self._cache: dict[str, Verdict] = {}
        self._allow = _Networks(())
        self._deny = _Networks(())
        self.replace(allow, deny)

    def replace(self, allow: Iterable[Network | str] = (), deny: Iterable[Network | str] = ()) -> None:
        """New lists (strings are parsed: ``ValueError`` on a bad one, the old lists kept)."""
        new_allow = _Networks(n if not isinstance(n, str) else parse_network(n) for n in allow)
        new_deny = _Networks(n if not isinstance(n, str) else parse_network(n) for n in deny)
        self._allow, self._deny = new_allow, new_deny
        self._cache = {}

    @property
    def active(self) -> bool:
        """Whether any source can be refused (an allow or a deny list is set)."""
        return bool(self._allow or self._deny)

    def verdict(self, source: str) -> Verdict:
        """The verdict on ``source`` (an IP address as the socket gave it)."""
        verdict = self._cache.get(source)
        if verdict is None:
            verdict = self._classify(source)
            if len(self._cache) >= self._cache_limit:
                self._cache = {}
            self._cache[source] = verdict
        return verdict

    def allows(self, source: str) -> bool:
        verdict = self._cache.get(source)
        if verdict is None:
            verdict = self.verdict(source)
        return verdict is _ALLOWED

    def _classify(self, source: str) -> Verdict:
        address = _address(source)
        if address is not None and address in self._deny:
            return Verdict.DENIED
        if self._allow and (address is None or address not in self._allow):
            return Verdict.NOT_ALLOWED
        return Verdict.ALLOWED
