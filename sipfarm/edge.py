"""What every element at the farm's edge shares (node and balancer alike).

* Flow tokens (RFC 5626 5.2 style): the client connection a request must go back out on.
* Route-set handling (RFC 3261 16.4): popping the entries that name us.
* The dialog-creating set, the RFC 3261 magic cookie, the IP-literal check, host bracketing
  (RFC 3261 25.1: an IPv6 reference in a URI or Via is ``[...]``).

Flow tokens
-----------

The balancer puts a token in the user part of the URIs it adds to Path (REGISTER) and
Record-Route (dialogs): ``<sip:TOKEN@balancer:port;lr;ob>``.  When a request comes back with
that URI as its top Route, the token names the exact flow (transport, client address) to send
it on.  The token is authenticated (truncated HMAC-SHA256 with a farm-wide secret) so a client
cannot make the balancer send to an arbitrary address, and carries no state: any balancer with
the secret decodes it, so balancers can run side by side.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import struct
from collections.abc import Callable

from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage
from sipfarm.sip.headers import HeaderError, parse_name_addr
from sipfarm.sip.message import SipMessage
from sipfarm.sip.transaction import MAGIC_COOKIE
from sipfarm.sip.uri import SipURI

# Requests that create a dialog: a proxy staying on the path Record-Routes them (RFC 3261 16.6
# step 4; NOTIFY may create one, RFC 6665 4.2.2).
DIALOG_CREATING = frozenset({b"INVITE", b"SUBSCRIBE", b"REFER", b"NOTIFY"})
MAX_OWN_ENTRIES = 4  # a double Record-Route (RFC 5658) is two; more means a loop or junk

__all__ = [
    "DIALOG_CREATING",
    "MAGIC_COOKIE",
    "FlowTokenError",
    "FlowTokens",
    "bracket",
    "is_ip_literal",
    "pop_own_routes",
    "route_uri",
]


@functools.lru_cache(maxsize=4096)
def is_ip_literal(host: str) -> bool:
    """``host`` (brackets allowed) is an IPv4 or IPv6 address, not a name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def bracket(host: str) -> str:
    """``host`` as written in a URI, Via or Path (RFC 3261 25.1: ``[v6]``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


_TRANSPORTS = ("udp", "tcp", "tls", "ws", "wss")
_MAC_LEN = 8
CACHE_LIMIT = 100_000


class FlowTokenError(ValueError):
    """Not a token of ours (forged, truncated, other secret)."""


class FlowTokens:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("flow token secret must be at least 16 bytes")
        self._secret = secret
        self._cache: dict[Address, str] = {}  # a flow's token, for its next messages

    def encode(self, flow: Address) -> str:
        token = self._cache.get(flow)
        if token is None:
            token = self._encode(flow)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()  # bounded; a miss only costs one HMAC
            self._cache[flow] = token
        return token

    def _encode(self, flow: Address) -> str:
        ip = ipaddress.ip_address(flow.host.strip("[]"))
        packed = bytes([_TRANSPORTS.index(flow.transport), ip.version]) + ip.packed + struct.pack("!H", flow.port)
        mac = hmac.digest(self._secret, packed, "sha256")[:_MAC_LEN]
        return base64.b32encode(mac + packed).decode("ascii").rstrip("=").lower()

    def decode(self, token: str | bytes) -> Address:
        text = token.decode("latin-1") if isinstance(token, bytes) else token
        try:
            raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
        except (ValueError, TypeError) as exc:
            raise FlowTokenError("not base32") from exc
        if len(raw) < _MAC_LEN + 2 + 4 + 2:
            raise FlowTokenError("too short")
        mac, packed = raw[:_MAC_LEN], raw[_MAC_LEN:]
        expected = hmac.digest(self._secret, packed, "sha256")[:_MAC_LEN]
        if not hmac.compare_digest(mac, expected):
            raise FlowTokenError("bad MAC")
        transport_index, version = packed[0], packed[1]
        size = 4 if version == 4 else 16
        if transport_index >= len(_TRANSPORTS) or version not in (4, 6) or len(packed) != 2 + size + 2:
            raise FlowTokenError("bad layout")
        host = str(ipaddress.ip_address(packed[2 : 2 + size]))
        (port,) = struct.unpack("!H", packed[2 + size :])
        return Address(_TRANSPORTS[transport_index], host, port)


def route_uri(msg: SipMessage, value: bytes) -> SipURI | None:
    """The SIP URI of one Route value (None for another scheme); BadMessage when malformed."""
    try:
        uri = parse_name_addr(value).uri
    except HeaderError as exc:
        raise BadMessage(f"bad Route: {exc}", partial=msg) from None
    return uri if isinstance(uri, SipURI) else None


def pop_own_routes(msg: SipMessage, names_us: Callable[[SipURI], bool], tokens: FlowTokens) -> Address | None:
    """RFC 3261 16.4: remove the leading Route entries that name us; the flow a token in them
    names, if any."""
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


def flow_uri(tokens: FlowTokens, flow: Address, host: str, port: int, *, outbound: bool = False) -> bytes:
    """Our Path (``ob``, RFC 5626 5.1) or Record-Route entry naming ``flow``: requests routed
    through it come back here and leave on that connection or NAT binding."""
    params = ";lr" + ("" if flow.transport == "udp" else f";transport={flow.transport}")
    if outbound:
        params += ";ob"
    return f"<sip:{tokens.encode(flow)}@{bracket(host)}:{port}{params}>".encode()
