"""The limited STUN server of a SIP UDP port (RFC 5626 8, RFC 5389 12.3), without I/O.

Theory of operation
-------------------
A phone using SIP outbound keeps its NAT binding open with STUN Binding requests sent to the
very port it sends SIP to (RFC 5626 4.4.2), and reads the XOR-MAPPED-ADDRESS of the answer to
learn whether its public address changed.  SIP and STUN share the port, told apart by the
first two bits of a datagram (RFC 5389 6: always 0 for STUN; a SIP message starts with a
letter or CRLF) and the magic cookie.

:func:`is_stun` is that test (a few byte compares, run only for datagrams whose first byte is
below 0x40).  :func:`parse_header` reads the 20-byte header and checks the rules a receiver
must (RFC 5389 7.3: length a multiple of 4 and matching the datagram, cookie); it raises
:class:`StunError` and nothing else on any input.  :func:`binding_response` answers a Binding
request with a success response naming the request's source in XOR-MAPPED-ADDRESS
(RFC 5389 15.2), with a FINGERPRINT when the request had one (15.5).  No authentication: the
outbound usage needs none (RFC 5626 8), and the answer only tells a sender its own address.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass

MAGIC_COOKIE = 0x2112A442  # RFC 5389 6
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_SIZE = 20
BINDING_REQUEST = 0x0001  # method Binding (0x001), class request
BINDING_SUCCESS = 0x0101  # method Binding, class success response
XOR_MAPPED_ADDRESS = 0x0020  # RFC 5389 15.2
FINGERPRINT = 0x8028  # RFC 5389 15.5
_FINGERPRINT_XOR = 0x5354554E  # "STUN"
_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02

__all__ = [
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "MAGIC_COOKIE",
    "StunError",
    "StunHeader",
    "binding_response",
    "fingerprint",
    "is_stun",
    "parse_header",
    "xor_mapped_address",
]


class StunError(ValueError):
    """Not a well-formed STUN message; ``reason`` is the counter it is dropped under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StunHeader:
    """The 20-byte STUN header (RFC 5389 6) and whether the message carries a FINGERPRINT."""

    type: int  # message type: method and class bits interleaved
    length: int  # of the attributes, bytes after the header
    transaction_id: bytes  # 12 bytes
    has_fingerprint: bool


def is_stun(data: bytes) -> bool:
    """``data`` is shaped like a STUN message (RFC 5389 6/7.3): first two bits 0, the magic
    cookie at offset 4, a length that is a multiple of 4.  SIP never is."""
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[4:8] == _COOKIE_BYTES and data[3] & 0x03 == 0


def parse_header(data: bytes) -> StunHeader:
    """The header of a STUN message; :class:`StunError` when it is not one (RFC 5389 7.3)."""
    if len(data) < HEADER_SIZE:
        raise StunError("stun_truncated", f"STUN message of {len(data)} bytes is shorter than its header")
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    if msg_type & 0xC000:
        raise StunError("stun_malformed", "first two bits of a STUN message are not 0")
    if cookie != MAGIC_COOKIE:
        raise StunError("stun_malformed", "STUN message without the magic cookie")
    if length % 4:
        raise StunError("stun_malformed", f"STUN message length {length} is not a multiple of 4")
    if HEADER_SIZE + length != len(data):
        raise StunError("stun_truncated", f"STUN length {length} does not match {len(data) - HEADER_SIZE} bytes")
    # RFC 5389 15.5: FINGERPRINT, when present, is the last attribute (type, length 4, CRC)
    has_fingerprint = length >= 8 and data[-8:-6] == b"\x80\x28" and data[-6:-4] == b"\x00\x04"
    if has_fingerprint and struct.unpack_from("!I", data, len(data) - 4)[0] != fingerprint(data[:-8]):
        raise StunError("stun_bad_fingerprint", "STUN FINGERPRINT does not match")
    return StunHeader(msg_type, length, bytes(data[8:20]), has_fingerprint)


def fingerprint(message: bytes) -> int:
    """RFC 5389 15.5: CRC-32 of the message up to the FINGERPRINT attribute, XOR 0x5354554e.
    ``message`` must already carry the length that includes the FINGERPRINT attribute."""
    return (zlib.crc32(message) & 0xFFFFFFFF) ^ _FINGERPRINT_XOR


def xor_mapped_address(host: str, port: int, transaction_id: bytes) -> bytes:
    """The XOR-MAPPED-ADDRESS attribute (type, length and value) for ``host``:``port``
    (RFC 5389 15.2): the port XORed with the cookie's top 16 bits, an IPv4 address with the
    cookie, an IPv6 address with the cookie followed by the transaction id."""
    ip = ipaddress.ip_address(host.strip("[]"))
    xport = port ^ (MAGIC_COOKIE >> 16)
    if ip.version == 4:
        xaddr = struct.pack("!I", int(ip) ^ MAGIC_COOKIE)
        family = _FAMILY_V4
    else:
        key = int.from_bytes(_COOKIE_BYTES + transaction_id, "big")
        xaddr = (int(ip) ^ key).to_bytes(16, "big")
        family = _FAMILY_V6
    value = struct.pack("!BBH", 0, family, xport) + xaddr
    return struct.pack("!HH", XOR_MAPPED_ADDRESS, len(value)) + value


def binding_response(request: StunHeader, host: str, port: int) -> bytes:
    """The Binding success response to ``request`` (from ``host``:``port``): same transaction
    id, XOR-MAPPED-ADDRESS, and a FINGERPRINT if the request had one (RFC 5389 7.3.1)."""
    attributes = xor_mapped_address(host, port, request.transaction_id)
    length = len(attributes) + (8 if request.has_fingerprint else 0)
    message = struct.pack("!HHI", BINDING_SUCCESS, length, MAGIC_COOKIE) + request.transaction_id + attributes
    if request.has_fingerprint:
        message += struct.pack("!HHI", FINGERPRINT, 4, fingerprint(message))
    return message
