"""What a relay knows of the farm from the membership, no I/O: the farm's own addresses, which
are never a media destination, and who may drive the relay over ng.

Theory of operation
-------------------
**The farm's addresses** (:class:`FarmAddresses`).  An SDP is written by a phone, that is by
anyone holding an account, and before a port has latched the relay sends to the address the SDP
names (:func:`media.relay.policy_predicate` decides whether it may).  Pointed at the relay's own
ports, one relay loops on itself.  Pointed at another relay's, two relays loop with each other:
call A's SDP at relay 1 names relay 2's port of call B, call B's SDP at relay 2 names relay 1's
port of call A, and one packet goes round for ever, each pass refreshing both calls' last
packet time so the media timeout never frees them.  So no relay sends media to any address of
the farm: its own media range and ng socket, every other relay's media range (the first port of
its ``addresses`` to its ``port_max``, on each host it names: bound and advertised) and ng
socket, and the nodes' and balancers' SIP listeners (an RTP stream aimed at a SIP port costs
the farm, not the sender).

They are kept as ``(host, first port, last port)`` ranges (:class:`PortRange`), a few per
member, grouped by host: a check is one dict look-up and a scan of that host's few ranges, not
a set of every port (a relay's 10,000 ports times the relays).  A member listening on a
wildcard host (``0.0.0.0``, ``::``) stands for loopback and every known farm host on its ports
(its real addresses are unknown here), as
:class:`~sipfarm.transport.destinations.DestinationPolicy` reads a wildcard listener.  A host
name is never a destination (SDPs are read for IP addresses only) and is skipped.  The relay's
own ranges are given once at construction and stay whatever the membership says;
:meth:`FarmAddresses.update` takes the membership as the asyncio layer last read it (relays
and nodes come and go).  :meth:`FarmAddresses.farm_address` is the predicate, for the SDP check
and for latching (a port should no more latch onto a farm address than send to one).

**Who may drive the relay** (:class:`NgAccess`).  The ng protocol has no authentication:
whoever reaches the control socket can list Call-IDs, read the phones' media addresses, delete
any call's media, allocate ports.  The relay's ``accept_from`` lists who may, as a node's
``accept_from`` lists who may send it requests (:mod:`sipfarm.node.accept`, the same
:class:`~sipfarm.protect.netlist.NetList` matches): networks, and the keyword ``nodes``, the
hosts the nodes of the membership heartbeat (their SIP addresses: a node's ng requests leave
from the same machine).  The default is ``nodes`` and loopback.  No entries at all: anyone
(``open``).  The asyncio layer (:class:`media.ng.NgServer`) drops a command from any other
source unanswered (an answer would make the relay a reflector) and counts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sipfarm.cluster.membership import Member, Role, parse_address
from sipfarm.config import RELAY_ACCEPT_KEYWORDS
from sipfarm.node.accept import AcceptFrom, balancer_networks
from sipfarm.protect.netlist import Network
from sipfarm.transport.destinations import IPAddress
from sipfarm.transport.destinations import _ip as _address  # an IPv4-mapped address judged as IPv4

__all__ = ["NODES", "FarmAddresses", "NgAccess", "PortRange", "member_ranges", "node_networks"]

#: the keyword of ``accept_from`` for the membership's nodes
NODES = RELAY_ACCEPT_KEYWORDS[0]

_MAX_PORT = 65535
Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class PortRange:
    """Ports ``low`` to ``high`` (both included) on ``host``, an IP address or a wildcard."""

    host: str
    low: int
    high: int


def member_ranges(member: Member) -> list[PortRange]:
    """The addresses of ``member`` no relay may send media to: its SIP or media addresses and
    the one facing the nodes, a relay's whole media range and its ng socket."""
    out: list[PortRange] = []
    texts = [*member.addresses, *([member.internal_address] if member.internal_address else [])]
    for text in texts:
        try:
            _transport, host, port = parse_address(text)
        except ValueError:
            continue
        high = port
        if member.role is Role.RELAY and member.port_max is not None:
            high = min(max(port, member.port_max), _MAX_PORT)  # a corrupt record spans no more
        out.append(PortRange(host, port, high))
    if member.control_address:
        try:
            _transport, host, port = parse_address(member.control_address)
        except ValueError:
            pass
        else:
            out.append(PortRange(host, port, port))
    return out


class FarmAddresses:
    """The farm's addresses as ranges of ports by host; see the module docstring."""

    __slots__ = ("_by_host", "_own", "_wildcard", "ranges")

    def __init__(self, own: Iterable[PortRange] = ()) -> None:
        self._own = tuple(dict.fromkeys(own))
        #: every range known now: the relay's own first, then the membership's
        self.ranges: tuple[PortRange, ...] = ()
        self._by_host: dict[IPAddress, tuple[Span, ...]] = {}
        self._wildcard: tuple[Span, ...] = ()
        self._index(self._own)

    def add_own(self, own: Iterable[PortRange]) -> None:
        """Add ranges of the relay's own (a port bound as 0 is known once bound), kept
        whatever the membership says."""
        self._own = tuple(dict.fromkeys((*self._own, *own)))
        self._index(tuple(dict.fromkeys((*self._own, *self.ranges))))

    def update(self, members: Iterable[Member]) -> bool:
        """The membership now (every role, draining members too: their calls go on); True
        when the ranges changed."""
        ranges = dict.fromkeys(self._own)
        for member in members:
            ranges.update(dict.fromkeys(member_ranges(member)))
        if tuple(ranges) == self.ranges:
            return False
        self._index(tuple(ranges))
        return True

    def farm_address(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is an address of the farm (a relay's media or ng port, a node's
        or a balancer's SIP listener): never a media destination, nor a source to latch onto."""
        ip = _address(host)
        if ip is None:
            return False
        spans = self._by_host.get(ip)
        if spans is not None and _within(spans, port):
            return True
        # a wildcard listener takes loopback and the unspecified address (which reaches local
        # listeners), and any host the farm is known to have
        if self._wildcard and (spans is not None or ip.is_loopback or ip.is_unspecified):
            return _within(self._wildcard, port)
        return False

    def _index(self, ranges: tuple[PortRange, ...]) -> None:
        by_host: dict[IPAddress, list[Span]] = {}
        wildcard: list[Span] = []
        for r in ranges:
            ip = _address(r.host)
            if ip is None:
                continue  # a name: SDP destinations are IP addresses, and never judged as names
            if ip.is_unspecified:
                wildcard.append((r.low, r.high))
            else:
                by_host.setdefault(ip, []).append((r.low, r.high))
        self.ranges = ranges
        self._by_host = {ip: tuple(spans) for ip, spans in by_host.items()}
        self._wildcard = tuple(wildcard)


def _within(spans: tuple[Span, ...], port: int) -> bool:
    return any(low <= port <= high for low, high in spans)


def node_networks(members: Iterable[Member]) -> list[Network]:
    """The hosts the nodes among ``members`` heartbeat (their SIP addresses), where their ng
    requests come from.  A name or a wildcard (a node on 0.0.0.0 without ``advertise``) tells
    nothing: such a node's network must be listed in ``accept_from``."""
    return balancer_networks(m for m in members if m.role is Role.NODE)  # the same reading of a record


class NgAccess:
    """The sources the relay takes ng commands from; see the module docstring.  The node's
    :class:`~sipfarm.node.accept.AcceptFrom` does the matching: the relay's ``nodes`` is
    its ``balancers`` keyword, fed with the membership's nodes instead."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = tuple(entries)
        self.want_nodes = NODES in self.entries
        self._acl = AcceptFrom(["balancers" if e == NODES else e for e in self.entries])

    @property
    def open(self) -> bool:
        """No entries: every source is accepted."""
        return self._acl.open

    @property
    def accepted(self) -> list[Network]:
        """The networks commands are taken from now."""
        return self._acl.accepted

    def update(self, members: Iterable[Member]) -> bool:
        """The membership now; True when the accepted hosts changed."""
        return self._acl.set_balancers(m for m in members if m.role is Role.NODE)

    def accepts(self, host: str) -> bool:
        """Whether a command from ``host`` (an IP address as the socket gave it) is executed."""
        return self._acl.accepts(host)
