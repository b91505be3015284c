"""Route-set handling shared by every proxy in the farm (node and balancer).

RFC 3261 16.4: a proxy removes the Route entries that name it before choosing the next hop.
In this farm such an entry may carry a flow token in its user part (RFC 5626 5.1, see
:mod:`sipfarm.balancer.flowtoken`) naming the client connection a request must go out on.
"""

from __future__ import annotations

from collections.abc import Callable

from sipfarm.balancer.flowtoken import FlowTokenError, FlowTokens
from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage
from sipfarm.sip.headers import HeaderError, parse_name_addr
from sipfarm.sip.message import SipMessage
from sipfarm.sip.uri import SipURI

MAX_OWN_ENTRIES = 4  # a double Record-Route (RFC 5658) is two; more means a loop or junk


def route_uri(msg: SipMessage, value: bytes) -> SipURI | None:
    """The SIP URI of one Route value (None for another scheme); BadMessage when malformed."""
    try:
        uri = parse_name_addr(value).uri
    except HeaderError as exc:
        raise BadMessage(f"bad Route: {exc}", partial=msg) from None
    return uri if isinstance(uri, SipURI) else None


def pop_own_routes(msg: SipMessage, names_us: Callable[[SipURI], bool], tokens: FlowTokens) -> Address | None:
    """Remove the leading Route entries that name us; the flow a token in them names, if any."""
    flow: Address | None = None
    for _ in range(MAX_OWN_ENTRIES):
        routes = msg.values("route")
        if not routes:
            break
        uri = route_uri(msg, routes[0])
        if uri is None or not names_us(uri):
            break
        msg.pop_first_value("route")
        if uri.user:
            try:
                flow = tokens.decode(uri.user)
            except FlowTokenError:
                raise BadMessage("invalid flow token in Route", partial=msg) from None
    return flow
