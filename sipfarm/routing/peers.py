"""The gateways and trunks of a routing table, as networks, no I/O.

The farm's own peers: the ``trusted`` networks (gateways and trunks whose calls to the farm's
users need no digest) and the IP literals of the URIs the table forwards to. A node takes
requests from them (``accept_from = ["peers"]``, :mod:`sipfarm.node.accept`); a balancer
spares them its per-source rate limits and bans (one gateway carries many callers' calls).
"""

from __future__ import annotations

import ipaddress

from sipfarm.protect.netlist import Network
from sipfarm.routing.table import Action, RoutingTable
from sipfarm.sip.errors import SipError
from sipfarm.sip.uri import SipURI, parse_uri

__all__ = ["host_network", "peer_networks"]


def host_network(host: str) -> Network | None:
    """An IP literal as a one-address network; None for a name or a wildcard (0.0.0.0, ::)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if address.is_unspecified:
        return None
    return ipaddress.ip_network(address)


def peer_networks(table: RoutingTable) -> list[Network]:
    """The routing table's trusted networks and the IP literals of the URIs it forwards to
    (forward rules, the unknown rule's forward, alias targets outside the farm): the gateways
    and trunks that send the farm calls or continue its dialogs."""
    out: list[Network] = list(table.trusted)
    uris: list[str] = []
    for rule in table.rules:
        if rule.action is Action.FORWARD:
            uris.append(rule.uri)
        elif rule.action is Action.ALIAS:
            uris.extend(rule.targets)
    if table.unknown.action is Action.FORWARD:
        uris.append(table.unknown.uri)
    for text in uris:
        try:
            uri = parse_uri(text.encode())
        except (SipError, ValueError):
            continue
        if isinstance(uri, SipURI):
            net = host_network(uri.host)
            if net is not None and net not in out:
                out.append(net)
    return out
