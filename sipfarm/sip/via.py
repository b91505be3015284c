"""What a server transport does to and with the top Via (RFC 3261 18.2.1, 18.2.2; RFC 3581).

Sans-IO: the transport passes the address a request came from; these functions edit the
message or compute an address, nothing more.

Receiving a request (RFC 3261 18.2.1): when the sent-by host of the top Via differs from the
packet's source address, the server adds ``received=<source address>``.  With RFC 3581 the
client may ask for symmetric response routing with a bare ``rport``; the server then fills in
``rport=<source port>`` and MUST add ``received`` even when the host matches (RFC 3581 4).

Sending a response (RFC 3261 18.2.2, RFC 3581 4): over a reliable transport the response goes
back over the connection the request arrived on; otherwise to ``received`` (or the sent-by
host, or ``maddr``) at ``rport`` when present, else the sent-by port, else the transport's
default port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage, SipError
from sipfarm.sip.headers import HeaderError, HeaderParams, Via, parse_via
from sipfarm.sip.message import SipMessage

try:  # built by scripts/build-compiled.sh only: the interpreted build stamps in Python
    from sipfarm.sip._fastparse import stamp_via as _stamp_c

    HAVE_STAMP_C = True
except ImportError:  # pragma: no cover - which branch runs depends on the build
    HAVE_STAMP_C = False

SIP_PORT = 5060  # RFC 3261 19.1.2
SIPS_PORT = 5061


def default_port(transport: str) -> int:
    """The port a sent-by without one implies (RFC 3261 18.2.2, 19.1.2)."""
    return SIPS_PORT if transport.lower() in ("tls", "wss") else SIP_PORT


def _bare_host(host: str) -> str:
    return host[1:-1] if host[:1] == "[" and host[-1:] == "]" else host


def same_host(via_host: str, source_host: str) -> bool:
    """Whether a Via sent-by host names the source address (IPv6 brackets and forms aside)."""
    a = _bare_host(via_host).lower()
    b = _bare_host(source_host).lower()
    if a == b:
        return True
    if ":" not in a and ":" not in b:
        return False  # IPv4 or host names: the textual comparison is the comparison
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _with_param(params: HeaderParams, name: str, value: str) -> HeaderParams:
    """``params`` with ``name`` set to ``value``, in place when present, appended otherwise."""
    out: list[tuple[str, str | None]] = []
    found = False
    for key, old in params:
        if key == name and not found:
            out.append((key, value))
            found = True
        else:
            out.append((key, old))
    if not found:
        out.append((name, value))
    return tuple(out)


def stamp_received(msg: SipMessage, source: Address) -> None:
    """Add ``received``/``rport`` to the top Via of request ``msg`` received from ``source``.

    Only the top via-parm is rewritten; the message is left untouched when nothing is to be
    added.  Responses are not stamped.  Raises BadMessage when the top Via is malformed (and
    the fast path could not read it).
    """
    if not msg.is_request:
        return
    top = msg.top_via_value
    if HAVE_STAMP_C:
        # _stamp_fast in C (sipfarm/sip/_fastparse.c): False where it would answer _SLOW
        stamped = _stamp_c(top, source.host.encode("ascii"), source.port)
        if stamped is None:
            return
        if isinstance(stamped, bytes):
            msg.replace_first_value("via", stamped)
            return
    edited = _stamp_fast(top, source)
    if edited is _SLOW:
        edited = _stamp_parsed(msg.top_via, source)
    if edited is not None:
        msg.replace_first_value("via", edited)


_SLOW = b"\0slow"  # sentinel: the via-parm needs the full parser


def _split_fast(raw: bytes) -> tuple[bytes, bytes, bytes, bytes, list[bytes]] | None:
    """(sent-protocol, sent-by, host, port, [param...]) of a simple via-parm, else None.

    "Simple": IPv4 or host-name sent-by and no quoted parameter value; the rest (IPv6,
    quoted strings, whitespace inside sent-by) goes through the full parser.
    """
    if raw[:8] != b"SIP/2.0/" or raw.find(b'"') >= 0 or raw.find(b"[") >= 0:
        return None
    protocol, space, rest = raw.partition(b" ")
    if not space:
        return None
    sent_by, _, params = rest.partition(b";")
    host, colon, port = sent_by.strip().partition(b":")
    if not host or host.find(b" ") >= 0 or host.find(b"\t") >= 0 or (colon and not (port.isdigit() and len(port) <= 5)):
        return None
    return protocol, sent_by, host, port, params.split(b";") if params else []


def _stamp_fast(raw: bytes, source: Address) -> bytes | None:
    """Stamping done on the bytes of a simple via-parm (see ``_split_fast``).

    Everything else of the header (case, spacing, parameter order) is kept as received.
    Returns the new via-parm, None when nothing changes, or ``_SLOW``.
    """
    parts = _split_fast(raw)
    if parts is None:
        return _SLOW
    protocol, sent_by, host, _, pieces = parts
    rport_at = received_at = -1
    rport_bare = False
    received = b""
    for i, piece in enumerate(pieces):
        name, eq, value = piece.partition(b"=")
        key = name.strip().lower()
        if key == b"rport" and rport_at < 0:
            rport_at, rport_bare = i, not eq
        elif key == b"received" and received_at < 0:
            received_at, received = i, value.strip()
    source_host = source.host.encode("ascii")
    # RFC 3581 4: with rport present, received is added even when it matches sent-by.
    add_received = (rport_at >= 0 or host.lower() != source_host) and received != source_host
    if not add_received and not rport_bare:
        return None
    if rport_bare:
        pieces[rport_at] = b"rport=%d" % source.port
    if add_received:
        if received_at >= 0:
            pieces[received_at] = b"received=" + source_host
        else:
            pieces.append(b"received=" + source_host)
    return protocol + b" " + sent_by + b";" + b";".join(pieces)


def _stamp_parsed(via: Via, source: Address) -> bytes | None:
    """The general case on the parsed via-parm (IPv6 sent-by, quoted parameters, odd spacing)."""
    rport = via.rport
    params = via.params
    changed = False
    if (rport is not None or not same_host(via.host, source.host)) and via.received != source.host:
        params = _with_param(params, "received", _bare_host(source.host))
        changed = True
    if rport == "":  # the bare flag: RFC 3581 4 fills in the source port
        params = _with_param(params, "rport", str(source.port))
        changed = True
    return replace(via, params=params).to_bytes() if changed else None


def via_target(via: Via) -> Address:
    """Where a response to a request with top Via ``via`` goes, absent a connection to reuse.

    RFC 3261 18.2.2 (received, maddr, sent-by port or the transport's default port) with
    RFC 3581 4 (rport overrides the port).
    """
    maddr = None
    for key, value in via.params:
        if key == "maddr":
            maddr = value
            break
    return _target(via.transport.lower(), via.host, via.port, via.received, via.rport, maddr)


def _target(
    transport: str, host: str, port: int | None, received: str | None, rport: str | None, maddr: str | None
) -> Address:
    sent_by_port = port or default_port(transport)
    if received:
        target_port = sent_by_port
        if rport:
            try:
                target_port = int(rport)
            except ValueError:
                pass  # malformed rport: fall back to the sent-by port
        return Address(transport, _bare_host(received), target_port)
    if maddr:
        # RFC 3261 18.2.2: maddr with the sent-by port
        return Address(transport, _bare_host(maddr), sent_by_port)
    if rport and rport.isdigit():
        return Address(transport, _bare_host(host), int(rport))
    return Address(transport, _bare_host(host), sent_by_port)


def _target_fast(raw: bytes) -> Address | None:
    parts = _split_fast(raw)
    if parts is None:
        return None
    protocol, _, host, port, pieces = parts
    received = rport = maddr = None
    for piece in pieces:
        name, _, value = piece.partition(b"=")
        key = name.strip().lower()
        if key == b"received":
            received = received or value.strip().decode("latin-1")
        elif key == b"rport":
            rport = rport or value.strip().decode("latin-1")
        elif key == b"maddr":
            maddr = maddr or value.strip().decode("latin-1")
    return _target(
        protocol[8:].decode("latin-1").lower(),
        host.decode("latin-1").lower(),
        int(port) if port else None,
        received,
        rport,
        maddr,
    )


def via_value_target(raw: bytes) -> Address:
    """``via_target`` of one raw via-parm, on the bytes when it is simple. Raises BadMessage."""
    target = _target_fast(raw)
    if target is not None:
        return target
    try:
        return via_target(parse_via(raw))
    except HeaderError as exc:
        raise BadMessage(f"Via: {exc}") from None


def via_sent_by(raw: bytes) -> tuple[str, int]:
    """(host, port) of a via-parm's sent-by, the port defaulted by transport. Raises BadMessage."""
    parts = _split_fast(raw)
    if parts is not None:
        protocol, _, host, port, _ = parts
        return host.decode("latin-1").lower(), int(port) if port else default_port(
            protocol[8:].decode("latin-1").lower()
        )
    try:
        via = parse_via(raw)
    except HeaderError as exc:
        raise BadMessage(f"Via: {exc}") from None
    return via.host.strip("[]"), via.port or default_port(via.transport.lower())


def response_target(response: SipMessage, default: Address) -> Address:
    """Where to send ``response``; ``default`` is the address its request came from.

    Over a reliable transport that is the connection the request used (RFC 3261 18.2.2: "the
    response MUST be sent using the existing connection"), so ``default`` is returned when it
    is reliable.  Otherwise the top Via decides (:func:`via_target`); a response whose top Via
    cannot be read goes back to ``default``.
    """
    if default.reliable:
        return default
    try:
        target = _target_fast(response.top_via_value) or via_target(response.top_via)
    except SipError:  # an unreadable Via: answer where the request came from
        return default
    if target.transport != default.transport:
        # The Via names another transport than the one the request used (a client behind a
        # misconfigured proxy): answer on the transport we have.
        return Address(default.transport, target.host, target.port)
    return target


__all__ = [
    "SIPS_PORT",
    "SIP_PORT",
    "default_port",
    "response_target",
    "same_host",
    "stamp_received",
    "via_sent_by",
    "via_target",
    "via_value_target",
]
