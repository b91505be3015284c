"""Which sources a node takes requests from (``[node] accept_from``), no I/O.

Theory of operation
-------------------
Behind balancers a node has no business with phones: its requests come from the balancers,
from the gateways and trunks of its routing table, and from networks the operator names.
:class:`AcceptFrom` turns the configured entries into one allow list
(:class:`~sipfarm.protect.netlist.NetList`):

- a network (``10.0.0.0/8``, ``192.0.2.7``) as written;
- ``balancers``: the hosts the live balancers of the membership heartbeat (their public
  addresses and the one facing the nodes), handed in with :meth:`AcceptFrom.set_balancers` by
  the asyncio layer whenever the membership changes;
- ``peers``: the routing table's ``trusted`` networks and the IP literals of its forward and
  alias URIs (:func:`peer_networks`), handed in with :meth:`AcceptFrom.set_peers` when the
  table is read or reloaded.

:meth:`AcceptFrom.screen` runs on the raw bytes before parsing: a response always passes (the
transaction layer drops one that matches no transaction, and a gateway found by DNS answers
from an address no list names); a request from a source outside the list is dropped,
unanswered, and counted (``stats["unknown_source"]``).  :meth:`AcceptFrom.allow_source` refuses the
same sources' TCP/TLS connections as they are accepted, and their UDP keep-alives.  No
entries at all (the default): everyone is accepted (``open``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from sipfarm.cluster.membership import Member, parse_address
from sipfarm.config import ACCEPT_KEYWORDS as KEYWORDS
from sipfarm.protect.netlist import NetList, Network, parse_network
from sipfarm.routing.peers import host_network, peer_networks
from sipfarm.routing.table import RoutingTable
from sipfarm.sip.address import Address

__all__ = ["KEYWORDS", "AcceptFrom", "anyone", "balancer_networks", "host_network", "nobody", "peer_networks"]

_UNKNOWN_SOURCE = "unknown_source"


def balancer_networks(members: Iterable[Member]) -> list[Network]:
    """The hosts the balancers among ``members`` send from: their addresses and the address
    facing the nodes.  A name or a wildcard (a balancer on 0.0.0.0 without ``internal``) tells
    nothing: such a balancer's network must be listed in accept_from as a CIDR."""
    out: list[Network] = []
    for member in members:
        for text in (*member.addresses, *([member.internal_address] if member.internal_address else [])):
            try:
                _transport, host, _port = parse_address(text)
            except ValueError:
                continue
            net = host_network(host)
            if net is not None and net not in out:
                out.append(net)
    return out


def anyone(_host: str) -> bool:
    return True


def nobody(_host: str) -> bool:
    return False


class AcceptFrom:
    """The sources a node takes requests from; see the module docstring."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = tuple(entries)
        self.want_balancers = "balancers" in entries
        self.want_peers = "peers" in entries
        self.networks = [parse_network(e) for e in entries if e not in KEYWORDS]
        self.balancers: list[Network] = []
        self.peers: list[Network] = []
        self._acl = NetList()
        self._accepts: Callable[[str], bool] = anyone
        self.stats: dict[str, int] = {}
        self._rebuild()

    @property
    def open(self) -> bool:
        """No entries: every source is accepted."""
        return not self.entries

    @property
    def accepted(self) -> list[Network]:
        """The networks requests are taken from now."""
        out = list(self.networks)
        for net in (*self.balancers, *self.peers):
            if net not in out:
                out.append(net)
        return out

    def set_balancers(self, members: Iterable[Member]) -> bool:
        """The balancers of the membership now; True when the accepted hosts changed."""
        nets = balancer_networks(members) if self.want_balancers else []
        if nets == self.balancers:
            return False
        self.balancers = nets
        self._rebuild()
        return True

    def set_peers(self, table: RoutingTable) -> bool:
        """The routing table now (read at start or reloaded); True when the peers changed."""
        nets = peer_networks(table) if self.want_peers else []
        if nets == self.peers:
            return False
        self.peers = nets
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        accepted = self.accepted
        self._acl.replace(allow=accepted)
        if self.open:
            self._accepts = anyone
        elif not accepted:
            self._accepts = nobody  # an empty allow list (no balancer yet): nobody, not anyone
        else:
            self._accepts = self._acl.allows

    # -- the transport's hooks (hot path) -----------------------------------------------------

    def accepts(self, host: str) -> bool:
        return self._accepts(host)

    def screen(self, data: bytes, source: Address, local: Address | None = None) -> bool:
        """Before parsing: whether to go on with a message from ``source`` (False: drop it);
        every socket of a node is judged alike (``local`` unused)."""
        if self._accepts(source.host) or data.startswith(b"SIP/"):
            return True
        self.stats[_UNKNOWN_SOURCE] = self.stats.get(_UNKNOWN_SOURCE, 0) + 1
        return False

    def allow_source(self, host: str) -> bool:
        """A connection accepted from ``host``, or a keep-alive: whether to keep it."""
        if self._accepts(host):
            return True
        self.stats[_UNKNOWN_SOURCE] = self.stats.get(_UNKNOWN_SOURCE, 0) + 1
        return False
