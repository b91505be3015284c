"""What every element at the farm's edge shares (node and balancer alike).

* Flow tokens (RFC 5626 5.2 style): the client connection a request must go back out on.
* Route-set handling (RFC 3261 16.4): popping the entries that name us.
* Hop branches: the previous hop of a request, signed into a stateless proxy's Via branch.
* Challenge tags: the To tag of a node's stateless 407 or 403 to an initial request, which a
  balancer recognises in the ACK of that answer and ends there (see :class:`ChallengeTags`).
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

import functools
import hashlib
import hmac
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Final

from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage
from sipfarm.sip.headers import HeaderError, first_element, parse_name_addr, via_branch
from sipfarm.sip.memo import MAX_CACHED_KEY
from sipfarm.sip.message import SipMessage
from sipfarm.sip.transaction import MAGIC_COOKIE
from sipfarm.sip.uri import SipURI
from sipfarm.sip.via import default_port

# Requests that create a dialog: a proxy staying on the path Record-Routes them (RFC 3261 16.6
# step 4; NOTIFY may create one, RFC 6665 4.2.2).
DIALOG_CREATING = frozenset({b"INVITE", b"SUBSCRIBE", b"REFER", b"NOTIFY"})
MAX_OWN_ENTRIES = 4  # a double Record-Route (RFC 5658) is two; more means a loop or junk
#: the identity headers only the farm may write (RFC 3325 5): a node strips them from what it
#: forwards, and the balancer sends a request that carries one through a node. With them, a
#: STIR ``Identity`` (RFC 8224: the farm, not a phone, is the authentication service; a
#: PASSporT copied from another call would verify downstream) and ``P-Called-Party-ID`` (RFC
#: 3455: written by the callee's proxy), which phones show (red team, 2026-12-03)
IDENTITY_HEADERS: Final = (
    "p-asserted-identity",
    "p-preferred-identity",
    "remote-party-id",
    "identity",
    "p-called-party-id",
)

__all__ = [
    "CHALLENGE_TAG_PREFIX",
    "DIALOG_CREATING",
    "HOP_PREFIX",
    "MAGIC_COOKIE",
    "NO_FLOW",
    "ChallengeTags",
    "FlowTokenError",
    "FlowTokens",
    "HopBranches",
    "OwnRoutes",
    "bracket",
    "is_ip_literal",
    "plain_route_parts",
    "route_uri",
    "transaction_key",
]


def is_ip_literal(host: str) -> bool:
    """``host`` (brackets allowed) is an IPv4 or IPv6 address, not a name."""
    # a host off the wire may be as long as a message: only short ones are remembered
    return _is_ip_literal(host) if len(host) <= MAX_CACHED_KEY else _ip_literal(host)


@functools.lru_cache(maxsize=4096)
def _is_ip_literal(host: str) -> bool:
    return _ip_literal(host)


def _ip_literal(host: str) -> bool:
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


def pack_flow(flow: Address) -> bytes:
    """transport(1) | IP version(1) | IP(4 or 16) | port(2): a flow in bytes (C primitives only:
    this runs for most messages of a busy node or balancer)."""
    host = flow.host.strip("[]")
    if ":" in host:
        version, ip = 6, socket.inet_pton(socket.AF_INET6, host)
    else:
        version, ip = 4, socket.inet_pton(socket.AF_INET, host)
    return bytes((_TRANSPORTS.index(flow.transport), version)) + ip + struct.pack("!H", flow.port)


def unpack_flow(packed: bytes) -> Address | None:
    """The flow :func:`pack_flow` packed, or None for a bad layout."""
    if len(packed) < 4:
        return None
    transport, version = packed[0], packed[1]
    size = 4 if version == 4 else 16
    if transport >= len(_TRANSPORTS) or version not in (4, 6) or len(packed) != 2 + size + 2:
        return None
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    host = socket.inet_ntop(family, packed[2 : 2 + size])
    return Address(_TRANSPORTS[transport], host, (packed[2 + size] << 8) | packed[3 + size])


def _unhex(text: str | bytes) -> bytes | None:
    try:
        return bytes.fromhex(text.decode("latin-1") if isinstance(text, bytes) else text)
    except ValueError:
        return None


DIALOG_SEALS_LIMIT: Final = 4096  # dialog seals remembered (a few seconds of calls)


class FlowTokens:
    """Flow tokens, and seals: the farm's signature on the URIs it writes (see :meth:`seal`).

    Hex, not base32: ``bytes.hex``/``bytes.fromhex`` are C, base64's base32 is Python, and a
    node decodes a token or checks a seal on nearly every in-dialog message. Decoded tokens are
    remembered (bounded), as are element seals.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("flow token secret must be at least 16 bytes")
        self._secret = secret
        self._cache: dict[tuple[Address, str, int], str] = {}  # a flow's token, for its next messages
        # a key of its own, so a seal never doubles as a flow token MAC
        self._seal_key = hmac.digest(secret, b"sipfarm uri seal", "sha256")
        self._seals: dict[tuple[str, int], str] = {}  # element seals, for the next messages
        # dialog seals: a call's Record-Route seal is checked again on its ACK and BYE (bounded)
        self._dialog_seals: dict[tuple[str, int, bytes], str] = {}
        self._decoded: dict[tuple[str, str, int], Address] = {}  # valid tokens seen, for their next messages
        # valid dialog tokens seen, under their Call-ID too (valid for that Call-ID only)
        self._decoded_dialog: dict[tuple[str, str, int, bytes], Address] = {}
        # a key of their own (keyed BLAKE2b: a third of an HMAC-SHA256's cost, and a dialog
        # token is made for every call leg, not remembered per flow)
        self._dialog_key = hmac.digest(secret, b"sipfarm dialog token", "sha256")

    def seal(self, host: str, port: int, call_id: bytes = b"") -> str:
        """The ``sf`` parameter the farm puts on URIs it writes into Record-Route and Route.

        With ``call_id``: a node's Record-Route entry of one dialog (or the Path entry a node
        routes one request through): only requests of that Call-ID carry it, so a Route copied
        from one dialog opens nothing else.  Without: a farm element's own entry (the
        balancer's node-facing Record-Route), telling nodes that hop is the farm's.
        """
        cached = self._dialog_seals.get((host, port, call_id)) if call_id else self._seals.get((host, port))
        if cached is not None:
            return cached
        text = b"%s:%d|%s" % (host.strip("[]").lower().encode("latin-1"), port, call_id)
        value = hashlib.blake2b(text, key=self._seal_key[:32], digest_size=10).hexdigest()
        # host and Call-ID come off the wire: only short ones are kept (MAX_CACHED_KEY)
        if not call_id:
            if len(host) <= MAX_CACHED_KEY:
                if len(self._seals) >= 256:
                    self._seals.clear()
                self._seals[(host, port)] = value
        elif len(host) + len(call_id) <= MAX_CACHED_KEY:
            if len(self._dialog_seals) >= DIALOG_SEALS_LIMIT:
                self._dialog_seals.clear()  # bounded whatever Call-IDs arrive; a miss is one MAC
            self._dialog_seals[(host, port, call_id)] = value
        return value

    def seal_matches(self, given: str, host: str, port: int, call_id: bytes = b"") -> bool:
        return hmac.compare_digest(given.lower(), self.seal(host, port, call_id))

    def sealed(self, uri: SipURI, call_id: bytes = b"") -> bool:
        """``uri`` carries the farm's seal for its host:port (and ``call_id``, if given)."""
        given = uri.param("sf")
        if not given:
            return False
        port = uri.port or default_port(uri.transport)
        return hmac.compare_digest(given.lower(), self.seal(uri.host, port, call_id))

    def encode(self, flow: Address, host: str, port: int, call_id: bytes = b"") -> str:
        """The token naming ``flow`` in a URI the farm writes at ``host:port`` (the element
        holding the flow): valid there only, so a token copied into a URI naming any other
        host or port is no token of ours (a token trusted wherever it was written let a URI
        of one's choosing pass for the farm's, and a node send there).

        With ``call_id``: a *dialog token*, for the Record-Route entries of one dialog: ``r``
        then hex, its MAC over the Call-ID too, valid in requests of that Call-ID only. A
        Record-Route is seen by both parties of a call, so a token valid in any request let a
        subscriber who once called bob reach bob's phone in a dialog of her own making, from
        anyone (red team, 2026-12-03). Without: the token of a Path (RFC 3327), which only the
        registering phone and the farm see, valid in any request."""
        if call_id:
            packed = pack_flow(flow)
            return "r" + (self._dialog_mac(packed, host, port, call_id) + packed).hex()
        key = (flow, host, port)
        token = self._cache.get(key)
        if token is None:
            packed = pack_flow(flow)
            token = (self._mac(packed, host, port) + packed).hex()
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()  # bounded; a miss only costs one HMAC
            self._cache[key] = token
        return token

    def _mac(self, packed: bytes, host: str, port: int) -> bytes:
        where = b"@%s:%d" % (host.strip("[]").lower().encode("latin-1"), port)
        return hmac.digest(self._secret, packed + where, "sha256")[:_MAC_LEN]

    def _dialog_mac(self, packed: bytes, host: str, port: int, call_id: bytes) -> bytes:
        where = b"@%s:%d|" % (host.strip("[]").lower().encode("latin-1"), port)
        return hashlib.blake2b(packed + where + call_id, key=self._dialog_key, digest_size=_MAC_LEN).digest()

    def decode(self, token: str | bytes, host: str, port: int, *, ours: bool = False, call_id: bytes = b"") -> Address:
        """The flow ``token`` names, when the farm wrote it in a URI at ``host:port`` (the
        port as the URI gives it, else its transport's default); FlowTokenError otherwise.
        A dialog token (see :meth:`encode`) is valid only with the ``call_id`` of the request
        that carries it.

        ``ours``: the URI names the reader itself, so where it points is not in question, and a
        token of the earlier format (its MAC over the flow alone) is taken too: the Paths and
        dialogs set up before tokens named their place go on.  A reader deciding whether a URI
        naming someone else is the farm's never passes it."""
        text = token.decode("latin-1") if isinstance(token, bytes) else token
        if text[:1] in ("r", "R"):
            return self._decode_dialog(text, host, port, call_id)
        key = (text, host, port)
        known = self._decoded.get(key)
        if known is not None:
            return known
        mac, packed = _split_token(text)
        bound = hmac.compare_digest(mac, self._mac(packed, host, port))
        if not bound and not (
            ours and hmac.compare_digest(mac, hmac.digest(self._secret, packed, "sha256")[:_MAC_LEN])
        ):
            raise FlowTokenError("bad MAC")
        flow = _flow_of(packed)
        if not bound:
            return flow  # an earlier-format token: taken where it names us, never remembered
        if len(text) + len(host) > MAX_CACHED_KEY:
            return flow  # valid, yet padded (fromhex skips whitespace): not remembered
        if len(self._decoded) >= CACHE_LIMIT:
            self._decoded.clear()  # bounded; only valid tokens get here, a miss costs one HMAC
        self._decoded[key] = flow
        return flow

    def _decode_dialog(self, text: str, host: str, port: int, call_id: bytes) -> Address:
        if not call_id:
            raise FlowTokenError("a dialog token outside a request")
        key = (text, host, port, call_id)
        known = self._decoded_dialog.get(key)
        if known is not None:
            return known
        mac, packed = _split_token(text[1:])
        if not hmac.compare_digest(mac, self._dialog_mac(packed, host, port, call_id)):
            raise FlowTokenError("bad MAC (another dialog's token?)")
        flow = _flow_of(packed)
        if len(text) + len(host) + len(call_id) <= MAX_CACHED_KEY:
            if len(self._decoded_dialog) >= CACHE_LIMIT:
                self._decoded_dialog.clear()  # bounded; a miss costs one HMAC
            self._decoded_dialog[key] = flow
        return flow


def _split_token(text: str) -> tuple[bytes, bytes]:
    """A token's hex as (MAC, packed flow); FlowTokenError when it is not hex or too short."""
    raw = _unhex(text)
    if raw is None:
        raise FlowTokenError("not hex")
    if len(raw) < _MAC_LEN + 2 + 4 + 2:
        raise FlowTokenError("too short")
    return raw[:_MAC_LEN], raw[_MAC_LEN:]


def _flow_of(packed: bytes) -> Address:
    flow = unpack_flow(packed)
    if flow is None:
        raise FlowTokenError("bad layout")
    return flow


def route_uri(msg: SipMessage, value: bytes) -> SipURI | None:
    """The SIP URI of one Route value (None for another scheme); BadMessage when malformed."""
    try:
        uri = parse_name_addr(value).uri
    except HeaderError as exc:
        raise BadMessage(f"bad Route: {exc}", partial=msg) from None
    return uri if isinstance(uri, SipURI) else None


_PLAIN_ROUTE_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789.-_:;=@"
_PLAIN_HOST_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789.-"
_PLAIN_TOKEN_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789.-_"


def plain_route_parts(value: bytes) -> tuple[bytes, str, int] | None:
    """(user, host, port) of a Route value in the plain shape farm elements write
    (``<sip:[user@]host:port[;name[=value]]...>``: lower-case letters, digits and ``.-_`` only,
    an explicit port), read without the URI parser; None for anything else.  Whatever it
    reads, :func:`route_uri` parses to the same user, host and port (a property test checks
    it): the node's sealed Record-Route entry of each dialog is read this way, never parsed
    (parsing it would only churn the parsers' memo).  The user is b"" when there is none."""
    if value[:5] != b"<sip:" or value[-1:] != b">":
        return None
    inner = value[5:-1]
    if inner.translate(None, _PLAIN_ROUTE_CHARS):
        return None  # a character outside the plain alphabet (another '<' or '>' among them)
    head, semi, params = inner.partition(b";")
    user, at, hostport = head.rpartition(b"@")
    if at and (not user or user.translate(None, _PLAIN_TOKEN_CHARS)):
        return None  # an empty user, or a second '@' or a password (':') in it
    host, colon, port_text = hostport.partition(b":")
    if (
        not colon
        or not host
        or host.translate(None, _PLAIN_HOST_CHARS)
        or not port_text.isdigit()
        or len(port_text) > 5
    ):
        return None
    port = int(port_text)
    if port > 65535:
        return None
    if semi:
        if params.find(b":") >= 0 or params.find(b"@") >= 0:
            return None
        for piece in params.split(b";"):
            name, _, param_value = piece.partition(b"=")
            if not name or param_value.find(b"=") >= 0:
                return None  # an empty name or a second '=' in a parameter
    return user, host.decode("ascii"), port


def first_value_at(msg: SipMessage, key: str) -> tuple[int, bytes, bytes]:
    """(index of the first ``key`` line, its first element, what follows that element's comma
    on the line, stripped) with one ``first_element``: what ``first_value`` reads and
    ``pop_first_value`` leaves.  Index ``NO_VALUE`` when there is no such header;
    ``GENERAL`` when a line of it needs the general reader (a quoted string on any of them, an
    empty element): the caller then uses ``first_value``/``pop_first_value``, as they do."""
    at = NO_VALUE
    first = rest = b""
    headers = msg.headers
    for i in range(len(headers)):
        header = headers[i]
        if header[0] != key:
            continue
        value = header[2]
        if value.find(b'"') >= 0:
            return GENERAL, b"", b""  # first_value reads (and judges) every line of it then
        if at == NO_VALUE:
            found = first_element(value)
            if found is None:
                return GENERAL, b"", b""
            at = i
            first, rest = found
    return at, first, rest


def pop_value_at(msg: SipMessage, key: str, at: int, rest: bytes) -> None:
    """Remove the first element of ``key`` read by :func:`first_value_at` (``at`` >= 0, or
    ``GENERAL``: ``pop_first_value`` does it)."""
    if at < 0:
        msg.pop_first_value(key)
    elif rest:
        header = msg.headers[at]
        msg.headers[at] = (header[0], header[1], rest)
    else:
        del msg.headers[at]


NO_VALUE = -1
GENERAL = -2


class OwnRoutes:
    """What the Route entries that name us say: ``route value -> the flow its token names``
    (``NO_FLOW``: ours, without a token), remembered for the values that recur (the balancer's
    Record-Route entries of one client flow come back in every dialog of that flow).  Only
    entries that name us and carry a valid token (or none) are remembered, under their exact
    bytes: a look-up answers what parsing and verifying them again would.  Bounded: cleared
    when full (a miss only costs the parse and the token's MAC).  ``ours(host, port)`` tells
    whether a host and port (the port defaulted by transport) name us.  An entry in the plain
    shape that is not ours (the next hop's) is read by :func:`plain_route_parts`, not parsed."""

    __slots__ = ("_known", "limit", "ours", "tokens")

    def __init__(self, ours: Callable[[str, int], bool], tokens: FlowTokens, limit: int = CACHE_LIMIT) -> None:
        self.ours = ours
        self.tokens = tokens
        self.limit = limit
        self._known: dict[bytes, Address] = {}

    def __len__(self) -> int:
        return len(self._known)

    def _plain_entry(self, top: bytes, plain: tuple[bytes, str, int], call_id: bytes) -> Address | None:
        """A Route entry the cache did not know, read in the plain shape (``plain``, from
        :func:`plain_route_parts`): None when it does not name us (the next hop's), else what
        :meth:`_learn` says of it.  FlowTokenError on an invalid token."""
        if not self.ours(plain[1], plain[2]):
            return None
        return self._learn(top, plain[0], plain[1], plain[2], call_id)

    def _learn(self, top: bytes, user: bytes, host: str, port: int, call_id: bytes) -> Address:
        """The flow the token in the user part of our entry ``top`` (at ``host:port``) names
        (``NO_FLOW``: no token), remembered under ``top``.  FlowTokenError on an invalid token
        (a dialog token of another Call-ID than the request's ``call_id`` included)."""
        named = self.tokens.decode(user, host, port, ours=True, call_id=call_id) if user else NO_FLOW
        # the sender may pad its entry (long ones are not kept); a sealed entry is one
        # dialog's or request's, as is one with a dialog token (not kept either: their
        # validity depends on the Call-ID; the token cache keeps those under it)
        if len(top) <= MAX_CACHED_KEY and top.find(b";sf=") < 0 and user[:1] not in (b"r", b"R"):
            known = self._known
            if len(known) >= self.limit:
                known.clear()
            known[top] = named
        return named

    def pop(self, msg: SipMessage) -> tuple[Address | None, bytes | None, tuple[bytes, str, int] | None]:
        """RFC 3261 16.4: remove the leading Route entries that name us.  The flow a token in
        them names (None: none), the first Route value left (None: none left), and what
        :func:`plain_route_parts` read of it when it was read (else None)."""
        flow: Address | None = None
        known = self._known
        plain: tuple[bytes, str, int] | None = None
        at, top_value, rest = first_value_at(msg, "route")
        top = top_value if at >= 0 else (None if at == NO_VALUE else msg.first_value("route"))
        for _ in range(MAX_OWN_ENTRIES):
            if top is None:
                break
            named = known.get(top)
            if named is None:
                # the plain shape is read without the parser (the same user, host and port)
                plain = plain_route_parts(top)
                try:
                    if plain is not None:
                        named = self._plain_entry(top, plain, msg.call_id)
                        if named is None:
                            break  # the next hop's entry
                        plain = None
                    else:
                        uri = route_uri(msg, top)
                        port = uri.port or default_port(uri.transport) if uri is not None else 0
                        if uri is None or not self.ours(uri.host, port):
                            break
                        user = uri.user.encode("latin-1") if uri.user else b""
                        named = self._learn(top, user, uri.host, port, msg.call_id)
                except FlowTokenError:
                    raise BadMessage("invalid flow token in Route", partial=msg) from None
            pop_value_at(msg, "route", at, rest)
            if named is not NO_FLOW:
                flow = named
            at, top_value, rest = first_value_at(msg, "route")
            top = top_value if at >= 0 else (None if at == NO_VALUE else msg.first_value("route"))
        return flow, top, plain

    def pop_values(
        self, values: tuple[bytes, ...], call_id: bytes
    ) -> tuple[Address | None, int, bytes | None, tuple[bytes, str, int] | None] | None:
        """:meth:`pop` on a request's Route elements in order (``values``, as the balancer's
        request fast path reads them): (flow, how many leading elements are ours, the first
        one left, its :func:`plain_route_parts` when read), the same answers with the same
        cache; None where :meth:`pop` would parse a URI or raise (an entry not in the plain
        shape, an invalid token): the caller then takes the general path."""
        flow: Address | None = None
        known = self._known
        plain: tuple[bytes, str, int] | None = None
        n = len(values)
        i = 0
        for _ in range(MAX_OWN_ENTRIES):
            if i >= n:
                break
            top = values[i]
            named = known.get(top)
            if named is None:
                plain = plain_route_parts(top)
                if plain is None:
                    return None  # the URI parser's case
                try:
                    named = self._plain_entry(top, plain, call_id)
                except FlowTokenError:
                    return None  # BadMessage there
                if named is None:
                    break  # the next hop's entry
                plain = None
            i += 1
            if named is not NO_FLOW:
                flow = named
        return flow, i, values[i] if i < n else None, plain


#: what :class:`OwnRoutes` remembers for a Route entry of ours without a flow token
NO_FLOW = Address("", "", 0)


def flow_uri(
    tokens: FlowTokens,
    flow: Address,
    host: str,
    port: int,
    *,
    outbound: bool = False,
    seal: str = "",
    call_id: bytes = b"",
) -> bytes:
    """Our Path (``ob``, RFC 5626 5.1) or Record-Route entry naming ``flow``: requests routed
    through it come back here and leave on that connection or NAT binding. ``call_id``: a
    Record-Route's, whose token is valid in that dialog only (:meth:`FlowTokens.encode`)."""
    params = ";lr" + ("" if flow.transport == "udp" else f";transport={flow.transport}")
    if outbound:
        params += ";ob"
    if seal:
        params += f";sf={seal}"
    return f"<sip:{tokens.encode(flow, host, port, call_id)}@{bracket(host)}:{port}{params}>".encode()


def add_uri_param(value: bytes, param: bytes) -> bytes:
    """``value`` (a name-addr such as a Route value) with ``;param`` appended to its URI."""
    gt = value.rfind(b">")
    if gt < 0:
        return b"<" + value + param + b">"
    return value[:gt] + param + value[gt:]


# -- hop branches ---------------------------------------------------------------------------------
#
# The balancer's Via branch: the previous hop of a request, signed, so a response needs no state.
#
# A stateless proxy must send a response where its request came from (RFC 3261 16.7 step 3,
# 18.2.2), and the only thing that comes back with the response is the Via the proxy added.  The
# next Via down is written by whoever sent the request -- or by whoever forges a response -- so it
# must not name the destination.  Instead the balancer records the previous hop itself when it
# forwards a request: its branch is ::
#
#     z9hG4bK lb- base32( MAC(10) | transport(1) | IP version(1) | IP(4 or 16) | port(2) )
#
# with the MAC a keyed BLAKE2b over the packed hop and the *transaction key*: the branch of the
# Via below ours (the request's own branch), or Call-ID + CSeq number for an RFC 2543 client
# without one.  So:
#
# * the branch is deterministic (RFC 3261 16.11): a retransmission, the CANCEL and the ACK of a
#   non-2xx carry their INVITE's branch and source, and get the very same branch upstream, which
#   is what the next element matches them on (RFC 3261 9.2, 17.2.3);
# * a response is sent to the recorded hop only, and only when the MAC verifies against the Via
#   below ours; nothing in a forged response can name another destination;
# * any balancer holding the farm-wide secret can route the response (workers sharing a port,
#   balancers side by side).
#
# A node reads the same branch to learn which client a request from a balancer came from (the
# address brute-force bans and logs are about), since the balancer's own address is every
# client's source as the node sees it.

HOP_PREFIX = MAGIC_COOKIE + b"lb-"  # "-" is outside hex: never confused with a probe's branch
_HOP_MAC_LEN = 10
_HOP_CACHE_LIMIT = 4096
# Branches known good, per generation (two generations: at most twice this many entries).  A
# request's branch is remembered when it is made, so the responses to it (100, 180, 200...)
# are matched by a dict look-up instead of a MAC each; the oldest generation is dropped whole.
VERIFIED_LIMIT = 16_384


class HopBranches:
    """Encode and verify branches naming a previous hop; see the module docstring.

    Verified branches are remembered (bounded): ``branch -> (transaction key, hop)`` for the
    branches this object made or verified.  A look-up matches only the very branch bytes with
    the very transaction key they were made for, so it answers exactly what recomputing the
    MAC would (anything else, forged or not, is verified the long way).
    """

    __slots__ = ("_hops", "_keyed", "_packed", "_verified", "_verified_old")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("branch secret must be at least 16 bytes")
        # a key of its own, so a branch MAC never doubles as a flow token MAC
        key = hmac.digest(secret, b"sipfarm balancer via branch", "sha256")
        # the keyed state, copied for each MAC: a third cheaper than keying a new one each time
        self._keyed = hashlib.blake2b(key=key, digest_size=_HOP_MAC_LEN)
        # a hop -> (its packed form, the Address a branch of it decodes to), for its next requests
        self._packed: dict[Address, tuple[bytes, Address]] = {}
        self._hops: dict[bytes, Address] = {}  # verified packed hops, for their next responses
        self._verified: dict[bytes, tuple[bytes, Address]] = {}  # see the class docstring
        self._verified_old: dict[bytes, tuple[bytes, Address]] = {}

    def _pack(self, hop: Address) -> tuple[bytes, Address]:
        known = self._packed.get(hop)
        if known is None:
            packed = pack_flow(hop)
            decoded = unpack_flow(packed)
            if decoded is None:  # never: pack_flow's output unpacks
                raise ValueError(f"hop {hop} cannot be packed")
            known = (packed, decoded)
            if len(self._packed) >= _HOP_CACHE_LIMIT:
                self._packed.clear()  # bounded; a miss only costs packing again
            self._packed[hop] = known
        return known

    def _mac(self, packed: bytes, transaction_key: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(packed + transaction_key)
        return mac.digest()

    def _remember(self, branch: bytes, transaction_key: bytes, hop: Address) -> None:
        if len(branch) + len(transaction_key) > MAX_CACHED_KEY:
            return  # the client's branch (or Call-ID) may be as long as a message: not kept
        verified = self._verified
        if len(verified) >= VERIFIED_LIMIT:
            self._verified_old = verified
            verified = self._verified = {}
        verified[branch] = (transaction_key, hop)

    def encode(self, hop: Address, transaction_key: bytes) -> bytes:
        """The branch for a request from ``hop`` whose transaction key is ``transaction_key``.
        ``hop.host`` must be an IP address and ``hop.transport`` one of udp/tcp/tls/ws/wss."""
        packed, decoded = self._pack(hop)
        branch = HOP_PREFIX + (self._mac(packed, transaction_key) + packed).hex().encode("ascii")
        self._remember(branch, transaction_key, decoded)
        return branch

    def decode(self, branch: bytes, transaction_key: bytes) -> Address | None:
        """The hop a branch of ours names, or None (not ours, forged, or for another request)."""
        known = self._verified.get(branch)
        if known is None:
            known = self._verified_old.get(branch)
        if known is not None and known[0] == transaction_key:
            return known[1]
        if not branch.startswith(HOP_PREFIX):
            return None
        raw = _unhex(branch[len(HOP_PREFIX) :])
        if raw is None:
            return None
        mac, packed = raw[:_HOP_MAC_LEN], raw[_HOP_MAC_LEN:]
        if len(packed) not in (2 + 4 + 2, 2 + 16 + 2):
            return None
        if not hmac.compare_digest(mac, self._mac(packed, transaction_key)):
            return None
        hop = self._hops.get(packed)
        if hop is None:
            hop = unpack_flow(packed)
            if hop is None:
                return None
            if len(self._hops) >= _HOP_CACHE_LIMIT:
                self._hops.clear()  # bounded (only MAC-verified hops get here); a miss unpacks again
            self._hops[packed] = hop
        self._remember(branch, transaction_key, hop)
        return hop


CHALLENGE_TAG_PREFIX: Final = b"ch-"  # "-" is outside hex: never an Element.tag
_CHALLENGE_TAG_LEN = 8


class ChallengeTags:
    """The To tag of a node's answer to an initial request that no transaction keeps (the
    stateless 407 challenge, the 403 to a banned source): ``ch-`` and a MAC, with the farm's
    secret, of the client's address (the balancer's hop), the Call-ID and the CSeq number.
    The ACK of that answer comes from that client and repeats both (RFC 3261 17.1.1.3), so any
    balancer of the farm recognises it and ends it at the edge: the node it would go to holds
    nothing it could match (it drops it after parsing it).  Keyed, so that a To tag chosen
    outside the farm (a gateway's 407 a node forwards, whose ACK its server transaction must
    absorb) is never taken for one; with the client's address, so that a callee who learnt the
    tag of a call's Call-ID and CSeq (by sending the farm an INVITE with them) and answers that
    call with it cannot have the caller's ACK ended (the node would retransmit its final
    answer until Timer H)."""

    __slots__ = ("_keyed",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("challenge tag secret must be at least 16 bytes")
        key = hmac.digest(secret, b"sipfarm stateless challenge to-tag", "sha256")
        self._keyed = hashlib.blake2b(key=key, digest_size=_CHALLENGE_TAG_LEN)

    def tag(self, client: Address, call_id: bytes, seq: int) -> bytes:
        mac = self._keyed.copy()
        try:
            mac.update(pack_flow(client))
        except (OSError, ValueError):
            mac.update(f"{client.transport} {client.host} {client.port}".encode())  # not an IP
        mac.update(b" %d " % seq + call_id)
        return CHALLENGE_TAG_PREFIX + mac.hexdigest().encode()

    def matches(self, to_tag: bytes | None, client: Address, call_id: bytes, seq: int) -> bool:
        """``to_tag`` is the tag this farm's stateless answer to that client's request carries."""
        if to_tag is None or not to_tag.startswith(CHALLENGE_TAG_PREFIX):
            return False
        return hmac.compare_digest(to_tag, self.tag(client, call_id, seq))


def transaction_key(msg: SipMessage, via_value: bytes) -> bytes:
    """What identifies the request a Via belongs to: its branch, or for an RFC 2543 client
    without one, Call-ID and CSeq number (the same for the INVITE, its CANCEL and ACK)."""
    return via_branch(via_value) or msg.call_id + b" %d" % msg.cseq[0]


def sealed_route_parts(value: bytes) -> tuple[bytes, str, int, str] | None:
    """(user, host, port, seal) of a Route value in the exact shape the farm writes it
    (``<sip:[user@]host:port;...;sf=SEAL...>``), read without the URI parser; None for anything
    else (the caller parses it). Sealed entries are unique per dialog: parsing them would only
    churn the parsers' memo, which the values that do recur (Contacts, element entries) need."""
    if value[:5] != b"<sip:" or value[-1:] != b">":
        return None
    inner = value[5:-1]
    at = inner.find(b";sf=")
    if at < 0:
        return None
    head, _, _ = inner.partition(b";")
    user, _, hostport = head.rpartition(b"@")
    if hostport[:1] == b"[":
        close = hostport.find(b"]")
        host, rest = hostport[1:close], hostport[close + 1 :]
    else:
        host, colon, port_text = hostport.partition(b":")
        rest = colon + port_text
    if rest[:1] != b":" or not rest[1:].isdigit() or not host:
        return None
    seal = inner[at + 4 :].partition(b";")[0]
    return user, host.decode("latin-1").lower(), int(rest[1:]), seal.decode("latin-1")
