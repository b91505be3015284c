"""GRUUs (RFC 5627) without state: the URIs the registrar hands out, and what a GRUU names.

Public GRUU (RFC 5627 3.1.1, 5.4): ``sip:alice@farm.test;gr=urn:uuid:X``: the AOR with the
instance ID (its angle brackets removed) in ``gr``.  It reveals the AOR and is valid for ever;
a request to it reaches the instance's binding, or gets 480 while the instance is not
registered (RFC 5627 6.1).

Temporary GRUU (RFC 5627 3.1.2, 5.4): ``sip:tgruu.<opaque>@farm.test;gr``, the opaque part an
authenticated encryption of (user, instance, Call-ID digest, serial) under a key derived from
the farm-wide secret, so any node resolves it with no table of issued GRUUs:

* SIV-style: ``tag = BLAKE2b-MAC(domain | plaintext)`` (8 bytes), the plaintext XORed with a
  BLAKE2b keystream seeded by the tag, ``base32(tag | ciphertext)`` in lower case (case does
  not matter to a decoder: a URI user part is case-sensitive, but some clients are careless).
  Anything altered, truncated or made up fails the tag check: the proxy answers it like a user
  that does not exist (404), so a temporary GRUU tells nothing about who exists.
* The serial is the REGISTER's CSeq: each refresh gets a new temporary GRUU (RFC 5627 5.4),
  and every one issued stays valid while the instance stays registered.
* The Call-ID digest binds it to the registration (RFC 5627 5.4: a UA that reboots registers
  with a new Call-ID, which invalidates its earlier temporary GRUUs): a temporary GRUU reaches
  the instance only while its live binding has that Call-ID.  Until then, and once the
  registration is gone, it is like a device not registered now: 480.  Stateless, the farm
  cannot tell "invalidated" from "not registered at the moment"; both fail the request.
* The AOR is encrypted, not merely signed: a temporary GRUU does not reveal its user
  (RFC 5627 3.1.2: anonymity).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

from sipfarm.sip.uri import SipURI
from sipfarm.store.location import Binding

TEMP_PREFIX: Final = "tgruu."
_TAG_LEN: Final = 8
_SERIAL_LEN: Final = 4
_CALL_ID_LEN: Final = 4
_UUID_URN: Final = "urn:uuid:"
_UUID_FLAG: Final = 1  # the instance is <urn:uuid:...>, packed as its 16 bytes
# RFC 3261 25.1 paramchar (param-unreserved / unreserved): left as they are in ``gr``
_GR_SAFE: Final = "-_.!~*'()[]/:&+$"


class GruuError(ValueError):
    """Not a temporary GRUU of this farm (forged, altered, truncated, another secret)."""


@dataclass(frozen=True, slots=True)
class GruuTarget:
    """What a GRUU Request-URI names: one instance of one AOR (RFC 5627 6.1)."""

    user: str
    domain: str
    instance: str  # as stored in bindings: ``<urn:uuid:...>``
    call_id_digest: bytes | None = None  # temporary GRUUs: the registration's Call-ID

    @property
    def aor(self) -> str:
        return f"{self.user}@{self.domain}"

    def select(self, bindings: Iterable[Binding]) -> list[Binding]:
        """The bindings a request to this GRUU goes to: the instance's, never another device's
        (RFC 5627 6.1).  An outbound instance with several flows (reg-id) gets one: the first in
        lookup order, the most recently refreshed (RFC 5626 5.3)."""
        wanted = instance_key(self.instance)
        digest = self.call_id_digest
        for binding in bindings:
            if binding.instance is None or instance_key(binding.instance) != wanted:
                continue
            if digest is not None and not hmac.compare_digest(call_id_digest(binding.call_id), digest):
                continue
            return [binding]
        return []


def instance_key(instance: str) -> str:
    """An instance ID for comparison: without ``<>``; a UUID URN in lower case (RFC 4122 3)."""
    bare = instance[1:-1] if instance[:1] == "<" and instance[-1:] == ">" else instance
    return bare.lower() if bare[: len(_UUID_URN)].lower() == _UUID_URN else bare


def call_id_digest(call_id: str) -> bytes:
    return hashlib.blake2b(call_id.encode("utf-8", "surrogateescape"), digest_size=_CALL_ID_LEN).digest()


def public_gruu(user_part: str, domain: str, instance: str) -> str:
    """RFC 5627 3.1.1: the AOR with ``gr`` set to the instance ID without its angle brackets."""
    return f"sip:{user_part}@{domain};gr={quote(instance_key(instance), safe=_GR_SAFE)}"


class TempGruus:
    """Temporary GRUUs sealed with the farm secret (see the module docstring)."""

    __slots__ = ("_enc_key", "_mac_key")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("GRUU secret must be at least 16 bytes")
        # keys of their own, so nothing here doubles as a flow token or a seal
        self._mac_key = hmac.digest(secret, b"sipfarm temp gruu mac", "sha256")
        self._enc_key = hmac.digest(secret, b"sipfarm temp gruu enc", "sha256")

    def _tag(self, domain: str, plain: bytes) -> bytes:
        data = domain.lower().encode("utf-8") + b"\x00" + plain
        return hashlib.blake2b(data, key=self._mac_key, digest_size=_TAG_LEN).digest()

    def _xor(self, tag: bytes, data: bytes) -> bytes:
        stream = b""
        block = 0
        while len(stream) < len(data):
            stream += hashlib.blake2b(tag + block.to_bytes(4, "big"), key=self._enc_key).digest()
            block += 1
        size = len(data)
        return (int.from_bytes(data, "big") ^ int.from_bytes(stream[:size], "big")).to_bytes(size, "big")

    def encode(self, user: str, domain: str, instance: str, call_id: str, serial: int) -> str:
        """The user part of a temporary GRUU (``tgruu.`` and the opaque part)."""
        bare = instance_key(instance)
        packed_instance = b""
        flags = 0
        if bare.startswith(_UUID_URN):
            try:
                packed_instance = bytes.fromhex(bare[len(_UUID_URN) :].replace("-", ""))
            except ValueError:
                packed_instance = b""
            if len(packed_instance) == 16 and _uuid_text(packed_instance) == bare[len(_UUID_URN) :]:
                flags = _UUID_FLAG
        if flags != _UUID_FLAG:
            raw = instance.encode("utf-8")
            if len(raw) > 255:
                raise ValueError("instance ID too long for a temporary GRUU")
            packed_instance = bytes((len(raw),)) + raw
        plain = (
            bytes((flags,))
            + (serial & 0xFFFFFFFF).to_bytes(_SERIAL_LEN, "big")
            + call_id_digest(call_id)
            + packed_instance
            + user.encode("utf-8")
        )
        tag = self._tag(domain, plain)
        opaque = base64.b32encode(tag + self._xor(tag, plain)).decode("ascii").rstrip("=").lower()
        return TEMP_PREFIX + opaque

    def uri(self, user: str, domain: str, instance: str, call_id: str, serial: int) -> str:
        """RFC 5627 3.1.2: ``sip:tgruu.<opaque>@domain;gr``."""
        return f"sip:{self.encode(user, domain, instance, call_id, serial)}@{domain};gr"

    def decode(self, user_part: str, domain: str) -> GruuTarget:
        """What the user part of a temporary GRUU names; GruuError when it is not one of ours."""
        if not user_part.lower().startswith(TEMP_PREFIX):
            raise GruuError("not a temporary GRUU")
        text = user_part[len(TEMP_PREFIX) :].upper()
        if not text or len(text) > 800:
            raise GruuError("bad length")
        try:
            raw = base64.b32decode(text + "=" * (-len(text) % 8))
        except (binascii.Error, ValueError):
            raise GruuError("not base32") from None
        if base64.b32encode(raw).decode("ascii").rstrip("=") != text:
            raise GruuError("not canonical")  # unused low bits set: one GRUU, one spelling
        header = 1 + _SERIAL_LEN + _CALL_ID_LEN
        if len(raw) < _TAG_LEN + header + 1:
            raise GruuError("too short")
        tag, plain = raw[:_TAG_LEN], self._xor(raw[:_TAG_LEN], raw[_TAG_LEN:])
        if not hmac.compare_digest(tag, self._tag(domain, plain)):
            raise GruuError("bad tag")
        flags, digest, rest = plain[0], plain[1 + _SERIAL_LEN : header], plain[header:]
        try:
            if flags == _UUID_FLAG:
                instance, user = f"<{_UUID_URN}{_uuid_text(rest[:16])}>", rest[16:].decode("utf-8")
            else:
                size = rest[0]
                instance, user = rest[1 : 1 + size].decode("utf-8"), rest[1 + size :].decode("utf-8")
        except (IndexError, UnicodeDecodeError):
            raise GruuError("bad layout") from None  # authentic yet malformed: a bug, not an attack
        if not instance or not user:
            raise GruuError("bad layout")
        return GruuTarget(user, domain, instance, digest)


def _uuid_text(packed: bytes) -> str:
    h = packed.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def read_gruu(uri: SipURI, gruus: TempGruus) -> GruuTarget | None:
    """The GRUU a Request-URI of a served domain is (RFC 5627 6.1), or None when it has no
    ``gr`` parameter.  A ``gr`` without a value is a temporary GRUU; GruuError when it is not
    one of ours."""
    gr = uri.param("gr")
    if gr is None or uri.user is None:
        return None
    if gr:
        return GruuTarget(uri.user_unescaped or "", uri.host, f"<{unquote(gr)}>")
    return gruus.decode(uri.user_unescaped or "", uri.host)
