"""Which destinations an element may send a request to, when the destination came from outside.

A Request-URI (or a Contact, a Route) is written by whoever sent the request: forwarding to it
blindly makes the farm an open relay into its own network (Redis on loopback, an admin port, a
node's own listener, which loops).  :class:`DestinationPolicy` is the one check, used wherever
a destination is taken from a message rather than chosen by the farm (a flow the farm signed,
a node of the membership):

1. an ``allow`` entry naming exactly ``host:port`` permits it (the operator's explicit word);
2. the farm's ``own`` listeners are refused (a request to ourselves is a loop), and so are the
   unspecified address (``0.0.0.0`` reaches local listeners), multicast and broadcast;
3. an ``allow`` network permits it (e.g. ``127.0.0.0/8`` for tests whose peers are loopback);
4. a link-local address refuses it (169.254.0.0/16, where clouds serve instance metadata, and
   fe80::/10), and so does a ``deny`` network (loopback and the operator's internal networks);
5. anything else is permitted.

Host names are refused: resolution happens before this check, never on the hot path.
IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) and NAT64 ones (``64:ff9b::7f00:1``) are
judged as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from sipfarm.sip.address import Address
from sipfarm.sip.memo import MAX_CACHED_KEY

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_JUDGED_LIMIT = 10_000

__all__ = ["LOOPBACK_NETWORKS", "DestinationPolicy", "parse_destination"]


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix


def _ip(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:  # a NAT64 gateway would take it to the IPv4 address inside
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def parse_destination(entry: str) -> IPNetwork | tuple[IPAddress, int]:
    """One ``allow``/``deny`` entry: a network (``10.0.0.0/8``, a bare IP is a /32 or /128) or
    ``host:port`` (``192.0.2.1:5060``, ``[2001:db8::1]:5060``).  Raises ValueError."""
    text = entry.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad destination {entry!r}: expected [IPv6]:PORT")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"bad destination {entry!r}: expected a network (CIDR) or IP:PORT") from None
    ip = _ip(host)
    if ip is None or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad destination {entry!r}: expected IP:PORT with an IP address")
    return ip, int(port)


def _split(entries: Iterable[str]) -> tuple[list[IPNetwork], set[tuple[IPAddress, int]]]:
    networks: list[IPNetwork] = []
    exact: set[tuple[IPAddress, int]] = set()
    for entry in entries:
        parsed = parse_destination(entry)
        if isinstance(parsed, tuple):
            exact.add(parsed)
        else:
            networks.append(parsed)
    return networks, exact


class DestinationPolicy:
    """See the module docstring.  ``allow`` and ``deny`` are strings (networks or ``IP:PORT``;
    ``deny`` entries are networks); ``own`` the farm's listening addresses (a wildcard host such
    as ``0.0.0.0`` stands for loopback and every other own host on that port)."""

    __slots__ = ("_allow_exact", "_allow_nets", "_deny_nets", "_judged", "_own", "_own_hosts", "_own_wildcard_ports")

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        deny: Iterable[str] = LOOPBACK_NETWORKS,
        own: Iterable[Address | tuple[str, int]] = (),
    ) -> None:
        self._allow_nets, self._allow_exact = _split(allow)
        self._deny_nets, deny_exact = _split(deny)
        if deny_exact:
            raise ValueError("deny entries are networks, not IP:PORT")
        self._own: set[tuple[IPAddress, int]] = set()
        self._own_hosts: set[IPAddress] = set()
        self._own_wildcard_ports: set[int] = set()
        # verdicts by (host, port): ipaddress is pure Python, and a node judges the same few
        # destinations (its phones, the balancers) on every message; bounded
        self._judged: dict[tuple[str, int], bool] = {}
        self.add_own(own)

    def add_own(self, own: Iterable[Address | tuple[str, int]]) -> None:
        """Add listening addresses (a process learns its bound ports after listening)."""
        self._judged = {}
        for item in own:
            host, port = (item.host, item.port) if isinstance(item, Address) else item
            ip = _ip(host)
            if ip is None:
                continue  # a name (an advertised host name) is never a destination here
            if ip.is_unspecified:
                self._own_wildcard_ports.add(port)
            else:
                self._own.add((ip, port))
                self._own_hosts.add(ip)

    def refuse(self, endpoints: Iterable[tuple[str, int]]) -> None:
        """Never send to these exact addresses (the farm's Redis, its relays' ng ports):
        services of the farm's, not listeners of this process, so their hosts stay other
        hosts."""
        for host, port in endpoints:
            ip = _ip(host)
            if ip is not None and (ip, port) not in self._own:
                self._own.add((ip, port))
                self._judged = {}  # only when something new is refused (a node calls this on every relay change)

    def allow(self, entries: Iterable[str]) -> None:
        """Permit more destinations (networks or ``IP:PORT``), e.g. a test's loopback peers."""
        nets, exact = _split(entries)
        self._judged = {}
        self._allow_nets.extend(nets)
        self._allow_exact |= exact

    def permits(self, dest: Address) -> bool:
        """Whether a request may be sent to ``dest`` (see the module docstring for the order)."""
        key = (dest.host, dest.port)
        verdict = self._judged.get(key)
        if verdict is None:
            verdict = self._judge(dest)
            if len(dest.host) <= MAX_CACHED_KEY:  # a host off the wire: a long one is not kept
                if len(self._judged) >= _JUDGED_LIMIT:
                    self._judged.clear()
                self._judged[key] = verdict
        return verdict

    def _judge(self, dest: Address) -> bool:
        ip = _ip(dest.host)
        if ip is None:
            return False
        port = dest.port
        if (ip, port) in self._allow_exact:
            return True
        if (ip, port) in self._own or (port in self._own_wildcard_ports and (ip.is_loopback or ip in self._own_hosts)):
            return False
        if ip.is_unspecified or ip.is_multicast or ip == _BROADCAST:
            return False
        if any(ip in net for net in self._allow_nets):
            return True
        if ip.is_link_local:
            return False  # 169.254/16 (a cloud's metadata service), fe80::/10: never a SIP peer
        return not any(ip in net for net in self._deny_nets)
