"""The balancer's Via branch: the previous hop of a request, signed, so a response needs no state.

A stateless proxy must send a response where its request came from (RFC 3261 16.7 step 3,
18.2.2), and the only thing that comes back with the response is the Via the proxy added.  The
next Via down is written by whoever sent the request -- or by whoever forges a response -- so it
must not name the destination.  Instead the balancer records the previous hop itself when it
forwards a request: its branch is ::

    z9hG4bK lb- base32( MAC(10) | transport(1) | IP version(1) | IP(4 or 16) | port(2) )

with the MAC a keyed BLAKE2b over the packed hop and the *transaction key*: the branch of the
Via below ours (the request's own branch), or Call-ID + CSeq number for an RFC 2543 client
without one.  So:

* the branch is deterministic (RFC 3261 16.11): a retransmission, the CANCEL and the ACK of a
  non-2xx carry their INVITE's branch and source, and get the very same branch upstream, which
  is what the next element matches them on (RFC 3261 9.2, 17.2.3);
* a response is sent to the recorded hop only, and only when the MAC verifies against the Via
  below ours; nothing in a forged response can name another destination;
* any balancer holding the farm-wide secret can route the response (workers sharing a port,
  balancers side by side).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import struct

from sipfarm.edge import MAGIC_COOKIE
from sipfarm.sip.address import Address

PREFIX = MAGIC_COOKIE + b"lb-"  # "-" is outside base32: never confused with a probe's branch
_TRANSPORTS = ("udp", "tcp", "tls", "ws", "wss")
_MAC_LEN = 10
CACHE_LIMIT = 4096

__all__ = ["PREFIX", "HopBranches"]


class HopBranches:
    """Encode and verify branches naming a previous hop; see the module docstring."""

    __slots__ = ("_key", "_packed")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("branch secret must be at least 16 bytes")
        # a key of its own, so a branch MAC never doubles as a flow token MAC
        self._key = hmac.digest(secret, b"sipfarm balancer via branch", "sha256")
        self._packed: dict[Address, bytes] = {}  # a hop's packed form, for its next requests

    def _pack(self, hop: Address) -> bytes:
        packed = self._packed.get(hop)
        if packed is None:
            ip = ipaddress.ip_address(hop.host.strip("[]"))
            packed = bytes([_TRANSPORTS.index(hop.transport), ip.version]) + ip.packed + struct.pack("!H", hop.port)
            if len(self._packed) >= CACHE_LIMIT:
                self._packed.clear()  # bounded; a miss only costs packing again
            self._packed[hop] = packed
        return packed

    def _mac(self, packed: bytes, transaction_key: bytes) -> bytes:
        return hashlib.blake2b(packed + transaction_key, key=self._key, digest_size=_MAC_LEN).digest()

    def encode(self, hop: Address, transaction_key: bytes) -> bytes:
        """The branch for a request from ``hop`` whose transaction key is ``transaction_key``.
        ``hop.host`` must be an IP address and ``hop.transport`` one of udp/tcp/tls/ws/wss."""
        packed = self._pack(hop)
        raw = self._mac(packed, transaction_key) + packed
        return PREFIX + base64.b32encode(raw).rstrip(b"=").lower()

    def decode(self, branch: bytes, transaction_key: bytes) -> Address | None:
        """The hop a branch of ours names, or None (not ours, forged, or for another request)."""
        if not branch.startswith(PREFIX):
            return None
        text = branch[len(PREFIX) :].upper()
        try:
            raw = base64.b32decode(text + b"=" * (-len(text) % 8))
        except (binascii.Error, ValueError):
            return None
        mac, packed = raw[:_MAC_LEN], raw[_MAC_LEN:]
        if len(packed) not in (2 + 4 + 2, 2 + 16 + 2):
            return None
        if not hmac.compare_digest(mac, self._mac(packed, transaction_key)):
            return None
        transport, version = packed[0], packed[1]
        size = 4 if version == 4 else 16
        if transport >= len(_TRANSPORTS) or version not in (4, 6) or len(packed) != 2 + size + 2:
            return None
        host = str(ipaddress.ip_address(packed[2 : 2 + size]))
        (port,) = struct.unpack("!H", packed[2 + size :])
        return Address(_TRANSPORTS[transport], host, port)
