"""SDP (RFC 8866, formerly RFC 4566) as an RTP relay sees it: parse, read, anchor at the relay.

Theory of operation
-------------------
An SDP body is a list of ``<type>=<value>`` lines: a session part, then one section per ``m=``
line.  :class:`SessionDescription` keeps every line as written (decoded as latin-1, so any byte
survives) and derives at parse time typed views of the lines a relay interprets: ``o=``, ``c=``,
``m=`` and the attributes for direction, RTCP (RFC 3605), rtcp-mux (RFC 5761), ICE (RFC 8839),
SDES (RFC 4568), DTLS (RFC 8842, RFC 8122) and ptime.  Every other line is kept verbatim and in
order, so ``SessionDescription.parse(body).to_bytes()`` is the body with its line ends made CRLF.

Values are immutable.  Rewriting (:func:`anchor`, :func:`continue_session`) builds new lines and
parses them again, so a rewritten description always says exactly what its bytes say.

Only what a relay acts on is validated: the ``o=``, ``c=`` and ``m=`` lines and the attributes
with a typed view.  A defect raises :class:`SdpError` with a message naming the line; nothing else
escapes :meth:`SessionDescription.parse`.  Input is bounded (:data:`MAX_SDP_BYTES`,
:data:`MAX_SDP_LINES`, :data:`MAX_MEDIA_SECTIONS`) and read in time linear in its size.

What an ng ``offer``/``answer`` does with it::

    sdp = SessionDescription.parse(body)
    targets = endpoints_of(sdp)                      # where the phone receives, per m= line
    ports = [relay.allocate(...) for t in targets]   # the relay's side facing the other party
    out = anchor(sdp, [RelayEndpoint(ip, p) for p in ports], ice=IceMode.REMOVE)
    out = continue_session(out, last_sent_on_that_leg)   # RFC 3264 8 o= version
    forward(out.to_bytes())
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

# Bounds on untrusted input: an offer is a few kB; these leave room for WebRTC's long ones.
MAX_SDP_BYTES = 64 * 1024
MAX_SDP_LINES = 10_000
MAX_MEDIA_SECTIONS = 64


class SdpError(ValueError):
    """An SDP body the relay cannot use; the message names the defect and its line."""


class Direction(enum.Enum):
    """RFC 3264 5.1 / RFC 8866 6.7: media direction, from the point of view of the SDP's author."""

    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"

    @property
    def sends(self) -> bool:
        return self in (Direction.SENDRECV, Direction.SENDONLY)

    @property
    def receives(self) -> bool:
        return self in (Direction.SENDRECV, Direction.RECVONLY)


class IceMode(enum.Enum):
    """rtpengine's ``ICE=`` flag, the subset a relay that does not speak ICE itself can honour."""

    REMOVE = "remove"  # strip every ICE attribute: the other side sees a plain RTP peer (the relay)
    KEEP = "keep"  # pass ICE attributes through untouched


class RtcpMuxMode(enum.Enum):
    """rtpengine's ``rtcp-mux`` flag, the subset that only rewrites the SDP (RFC 5761)."""

    KEEP = "keep"  # a=rtcp-mux as the phone wrote it
    OFFER = "offer"  # add a=rtcp-mux towards the other side (a=rtcp still names a fallback port)
    DEMUX = "demux"  # remove a=rtcp-mux / a=rtcp-mux-only: the other side gets separate RTCP


# RFC 8866 9: token = 1*(token-char); token-char = %x21 / %x23-27 / %x2A-2B / %x2D-2E / %x30-39 /
# %x41-5A / %x5E-7E
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
# RFC 8866 9: proto = token *("/" token)
_PROTO = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+(/[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+)*")
# o= fields: RFC 8866 9 non-ws-string (the address may be a host name, IPv6, or anything a phone writes)
_NON_WS = re.compile(r"[^\x00-\x20\x7f]+")
# port = 1*DIGIT (RFC 8866 9); a sess-version is also digits, bounded to keep int() cheap.
_DIGITS = re.compile(r"[0-9]{1,20}")
# RFC 8866 5: "<type>=<value>", <type> exactly one case-significant character; we accept a-z.
_LINE_TYPE = re.compile(r"[a-z]")
# RFC 8866 6.4 ptime: a positive number of milliseconds, integer or decimal.
_PTIME = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
# RFC 4568 9.1: tag = 1*9DIGIT
_CRYPTO_TAG = re.compile(r"[0-9]{1,9}")

_DIRECTIONS = {d.value: d for d in Direction}
# RFC 8839 5 (and RFC 8445's ice-lite, RFC 8840's end-of-candidates): what ICE=remove strips.
ICE_ATTRIBUTES = frozenset(
    {
        "ice-ufrag",
        "ice-pwd",
        "ice-options",
        "ice-lite",
        "ice-mismatch",
        "ice-pacing",
        "candidate",
        "end-of-candidates",
        "remote-candidates",
    }
)
_MUX_ATTRIBUTES = frozenset({"rtcp-mux", "rtcp-mux-only"})  # RFC 5761, RFC 8858
# Keys and certificates on a plain RTP/AVP(F) stream (RFC 4568 a=crypto, RFC 8122 a=fingerprint,
# RFC 8842 a=tls-id): the profile decides what a stream is, and the relay carries plain RTP, so
# :func:`anchor` drops them (a phone's "best-effort SRTP" offer goes plain through the relay; a
# made-up attribute is no way to have a call's media go end to end, unanchored); an SRTP or DTLS
# stream (never the sipfarm relay's: secure_media) keeps them
KEY_ATTRIBUTES = frozenset({"crypto", "fingerprint", "tls-id"})
_SETUP_ROLES = frozenset({"active", "passive", "actpass", "holdconn"})  # RFC 4145 4


def _port(text: str, what: str) -> int:
    if not _DIGITS.fullmatch(text) or int(text) > 65535:
        raise SdpError(f"{what} has a bad port {text!r}")
    return int(text)


def _fields(value: str) -> list[str]:
    # Fields are separated by one space (RFC 8866 5); tolerate runs of spaces, never tabs.
    return [f for f in value.split(" ") if f]


def _ip(addrtype: str, address: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if "%" in address:  # an IPv6 zone means nothing to the peer that reads the SDP
        raise SdpError(f"{what} has a bad {addrtype} address {address!r}")
    try:
        if addrtype == "IP4":
            return ipaddress.IPv4Address(address)
        if addrtype == "IP6":
            return ipaddress.IPv6Address(address)
    except ValueError:
        raise SdpError(f"{what} has a bad {addrtype} address {address!r}") from None
    raise SdpError(f"{what} has address type {addrtype!r}, not IP4 or IP6")


def _addrtype_of(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"relay address {address!r} is not an IPv4 or IPv6 address") from None
    return "IP4" if ip.version == 4 else "IP6"


@dataclass(frozen=True, slots=True)
class Origin:
    """RFC 8866 5.2: ``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address>``.

    The address is informational (phones write host names, ``127.0.0.1``...), so it is kept as text.
    """

    username: str
    session_id: str
    session_version: int
    nettype: str
    addrtype: str
    address: str

    @classmethod
    def parse(cls, value: str) -> Origin:
        fields = _fields(value)
        if len(fields) != 6:
            raise SdpError(f"o= line has {len(fields)} fields, not 6")
        username, session_id, version, nettype, addrtype, address = fields
        for field in (username, session_id, nettype, addrtype, address):
            if not _NON_WS.fullmatch(field):
                raise SdpError(f"o= line has a bad field {field!r}")
        if not _DIGITS.fullmatch(version):
            raise SdpError(f"o= line has a bad sess-version {version!r}")
        return cls(username, session_id, int(version), nettype, addrtype, address)

    def serialize(self) -> str:
        return f"{self.username} {self.session_id} {self.session_version} {self.nettype} {self.addrtype} {self.address}"


@dataclass(frozen=True, slots=True)
class Connection:
    """RFC 8866 5.7: ``c=IN <IP4|IP6> <address>[/<ttl>][/<count>]`` (TTL and count: multicast only).

    ``address`` is the literal as written; host names are refused, a relay needs an address.
    """

    addrtype: str
    address: str
    ttl: int | None = None
    count: int | None = None

    @classmethod
    def parse(cls, value: str, what: str = "c= line") -> Connection:
        fields = _fields(value)
        if len(fields) != 3:
            raise SdpError(f"{what} has {len(fields)} fields, not 3")
        nettype, addrtype, text = fields
        if nettype != "IN":
            raise SdpError(f"{what} has network type {nettype!r}, not IN")
        address, *suffix = text.split("/")
        ip = _ip(addrtype, address, what)
        numbers = []
        for part in suffix:
            if not _DIGITS.fullmatch(part):
                raise SdpError(f"{what} has a bad TTL or address count {part!r}")
            numbers.append(int(part))
        if numbers and not ip.is_multicast:
            raise SdpError(f"{what} has a TTL or address count on a unicast address")
        if addrtype == "IP4":
            # RFC 8866 5.7: IP4 multicast takes <ttl>[/<count>]
            if len(numbers) > 2:
                raise SdpError(f"{what} has too many '/' parts")
            ttl = numbers[0] if numbers else None
            count = numbers[1] if len(numbers) == 2 else None
            return cls(addrtype, address, ttl, count)
        # ... and IP6 multicast only [/<count>]
        if len(numbers) > 1:
            raise SdpError(f"{what} has too many '/' parts")
        return cls(addrtype, address, None, numbers[0] if numbers else None)

    @classmethod
    def of(cls, address: str) -> Connection:
        """A unicast connection to ``address`` (an IPv4 or IPv6 literal)."""
        return cls(_addrtype_of(address), address)

    def serialize(self) -> str:
        suffix = "".join(f"/{n}" for n in (self.ttl, self.count) if n is not None)
        return f"IN {self.addrtype} {self.address}{suffix}"

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.IPv4Address(self.address) if self.addrtype == "IP4" else ipaddress.IPv6Address(self.address)

    @property
    def unspecified(self) -> bool:
        """``0.0.0.0`` (or ``::``): RFC 2543-style hold, "do not send to me" (RFC 3264 8.4)."""
        return self.ip.is_unspecified


@dataclass(frozen=True, slots=True)
class MediaLine:
    """RFC 8866 5.14: ``m=<media> <port>[/<number of ports>] <proto> <fmt> ...``; port 0 = disabled."""

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    port_count: int | None = None

    @classmethod
    def parse(cls, value: str) -> MediaLine:
        fields = _fields(value)
        if len(fields) < 3:
            raise SdpError(f"m= line has {len(fields)} fields, fewer than 3")
        media, port_text, proto, *formats = fields
        port_part, slash, count_text = port_text.partition("/")
        port = _port(port_part, "m= line")
        count = None
        if slash:
            if not _DIGITS.fullmatch(count_text) or int(count_text) == 0:
                raise SdpError(f"m= line has a bad number of ports {count_text!r}")
            count = int(count_text)
        if not _PROTO.fullmatch(proto):
            raise SdpError(f"m= line has a bad transport protocol {proto!r}")
        for field in (media, *formats):
            if not _TOKEN.fullmatch(field):
                raise SdpError(f"m= line has a bad field {field!r}")
        return cls(media, port, proto, tuple(formats), count)

    def serialize(self) -> str:
        port = self.port if self.port_count is None else f"{self.port}/{self.port_count}"
        return " ".join((self.media, str(port), self.proto, *self.formats))


@dataclass(frozen=True, slots=True)
class Attribute:
    """``a=<name>`` (a flag, ``value`` None) or ``a=<name>:<value>`` (RFC 8866 5.13)."""

    name: str
    value: str | None

    @classmethod
    def parse(cls, value: str) -> Attribute:
        name, colon, rest = value.partition(":")
        if not _TOKEN.fullmatch(name):
            raise SdpError(f"a= line has a bad attribute name {name!r}")
        return cls(name, rest if colon else None)

    def serialize(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value}"


@dataclass(frozen=True, slots=True)
class Rtcp:
    """RFC 3605 2.1: ``a=rtcp:<port> [IN <IP4|IP6> <address>]``."""

    port: int
    connection: Connection | None = None

    @classmethod
    def parse(cls, value: str) -> Rtcp:
        port_text, _, rest = value.strip(" ").partition(" ")
        port = _port(port_text, "a=rtcp")
        connection = Connection.parse(rest, "a=rtcp") if rest.strip(" ") else None
        return cls(port, connection)

    def serialize(self) -> str:
        if self.connection is None:
            return f"rtcp:{self.port}"
        return f"rtcp:{self.port} {self.connection.serialize()}"


@dataclass(frozen=True, slots=True)
class Crypto:
    """RFC 4568 9.1: ``a=crypto:<tag> <crypto-suite> <key-params> [<session-param> ...]`` (SDES)."""

    tag: int
    suite: str
    key_params: str
    session_params: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str) -> Crypto:
        fields = _fields(value)
        if len(fields) < 3 or not _CRYPTO_TAG.fullmatch(fields[0]):
            raise SdpError(f"a=crypto is malformed: {value!r}")
        return cls(int(fields[0]), fields[1], fields[2], tuple(fields[3:]))


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """RFC 8122 5: ``a=fingerprint:<hash-func> <fingerprint>`` (DTLS-SRTP)."""

    hash_function: str
    fingerprint: str

    @classmethod
    def parse(cls, value: str) -> Fingerprint:
        fields = _fields(value)
        if len(fields) != 2 or not _TOKEN.fullmatch(fields[0]):
            raise SdpError(f"a=fingerprint is malformed: {value!r}")
        return cls(fields[0], fields[1])


class _Attributes:
    """Typed views shared by the session part and media sections, read from ``attributes``."""

    __slots__ = ()
    attributes: tuple[Attribute, ...]

    def attribute(self, name: str) -> str | None:
        """Value of the first ``a=name`` ("" for a flag attribute), None when absent."""
        for attribute in self.attributes:
            if attribute.name == name:
                return "" if attribute.value is None else attribute.value
        return None

    def attribute_values(self, name: str) -> tuple[str, ...]:
        """Values of every ``a=name`` in order ("" for flags): candidates, rtpmaps, fmtps..."""
        return tuple("" if a.value is None else a.value for a in self.attributes if a.name == name)

    def has_attribute(self, name: str) -> bool:
        return any(a.name == name for a in self.attributes)

    @property
    def rtcp_mux(self) -> bool:
        return self.has_attribute("rtcp-mux")

    @property
    def ice_ufrag(self) -> str | None:
        return self.attribute("ice-ufrag")

    @property
    def ice_pwd(self) -> str | None:
        return self.attribute("ice-pwd")

    @property
    def ice_options(self) -> tuple[str, ...]:
        return tuple(_fields(self.attribute("ice-options") or ""))

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.attribute_values("candidate")

    @property
    def crypto(self) -> tuple[Crypto, ...]:
        return tuple(Crypto.parse(v) for v in self.attribute_values("crypto"))

    @property
    def fingerprints(self) -> tuple[Fingerprint, ...]:
        return tuple(Fingerprint.parse(v) for v in self.attribute_values("fingerprint"))

    @property
    def setup(self) -> str | None:
        """RFC 4145 4 / RFC 8842: active, passive, actpass or holdconn."""
        return self.attribute("setup")

    @property
    def mid(self) -> str | None:
        return self.attribute("mid")

    @property
    def ptime(self) -> float | None:
        value = self.attribute("ptime")
        return None if value is None else float(value)


def _direction_of(attributes: tuple[Attribute, ...], where: str) -> Direction | None:
    found = [a for a in attributes if a.name in _DIRECTIONS]
    if len(found) > 1:
        raise SdpError(f"{where} has more than one direction attribute")
    if not found:
        return None
    if found[0].value is not None:
        raise SdpError(f"{where} has a value on a={found[0].name}")
    return _DIRECTIONS[found[0].name]


def _check_attributes(attributes: tuple[Attribute, ...], where: str) -> None:
    """Validate the attributes with a typed view so that reading the view never raises."""
    for attribute in attributes:
        name, value = attribute.name, attribute.value
        if name == "crypto":
            Crypto.parse(value or "")
        elif name == "fingerprint":
            Fingerprint.parse(value or "")
        elif name == "setup" and value not in _SETUP_ROLES:
            raise SdpError(f"{where} has a bad a=setup {value!r}")
        elif name == "ptime" and (value is None or not _PTIME.fullmatch(value)):
            raise SdpError(f"{where} has a bad a=ptime {value!r}")
        elif name in ("rtcp-mux", "ice-lite", "end-of-candidates") and value is not None:
            raise SdpError(f"{where} has a value on a={name}")


@dataclass(frozen=True, slots=True)
class MediaDescription(_Attributes):
    """One media section: its ``m=`` line and every line up to the next ``m=``.

    ``lines`` are the section's lines as written (without CRLF); the other fields are views of them.
    """

    lines: tuple[str, ...]
    line: MediaLine
    connection: Connection | None
    attributes: tuple[Attribute, ...]
    direction: Direction | None  # a media-level direction attribute; see SessionDescription.direction_of
    rtcp: Rtcp | None

    @classmethod
    def _from_lines(cls, lines: Sequence[str], first_line: int, index: int) -> MediaDescription:
        where = f"media section {index}"
        line = MediaLine.parse(lines[0][2:])
        connection: Connection | None = None
        attributes: list[Attribute] = []
        for number, text in enumerate(lines[1:], first_line + 1):
            kind, value = text[0], text[2:]
            if kind == "c":
                if connection is not None:
                    raise SdpError(f"{where} has more than one c= line (line {number})")
                connection = Connection.parse(value)
            elif kind == "a":
                attributes.append(Attribute.parse(value))
        attrs = tuple(attributes)
        _check_attributes(attrs, where)
        rtcp_values = [a.value for a in attrs if a.name == "rtcp"]
        if len(rtcp_values) > 1:
            raise SdpError(f"{where} has more than one a=rtcp")
        rtcp = Rtcp.parse(rtcp_values[0] or "") if rtcp_values else None
        return cls(tuple(lines), line, connection, attrs, _direction_of(attrs, where), rtcp)

    @property
    def port(self) -> int:
        return self.line.port

    @property
    def disabled(self) -> bool:
        """RFC 3264 6/8.2: port 0 is a rejected or removed stream; it stays in the SDP, unrelayed."""
        return self.line.port == 0


@dataclass(frozen=True, slots=True)
class SessionDescription(_Attributes):
    """A whole SDP body: the session part (``session`` lines) and its media sections."""

    session: tuple[str, ...]
    origin: Origin
    connection: Connection | None
    attributes: tuple[Attribute, ...]
    direction: Direction | None  # session-level direction attribute, the default for every section
    media: tuple[MediaDescription, ...]

    @classmethod
    def parse(cls, data: bytes) -> SessionDescription:
        """Parse an SDP body; LF or CRLF line ends; raises :class:`SdpError`."""
        if len(data) > MAX_SDP_BYTES:
            raise SdpError(f"SDP body is {len(data)} bytes, more than {MAX_SDP_BYTES}")
        if data.count(b"\n") > MAX_SDP_LINES:
            raise SdpError(f"SDP body has more than {MAX_SDP_LINES} lines")
        lines = data.decode("latin-1").split("\n")
        for i, text in enumerate(lines):
            if text.endswith("\r"):
                lines[i] = text[:-1]
        while lines and not lines[-1]:  # the final CRLF, and the blank lines some stacks add
            lines.pop()
        return cls._from_lines(lines)

    @classmethod
    def _from_lines(cls, lines: Sequence[str]) -> SessionDescription:
        if not lines:
            raise SdpError("SDP body is empty")
        if len(lines) > MAX_SDP_LINES:
            raise SdpError(f"SDP body has more than {MAX_SDP_LINES} lines")
        starts: list[int] = []
        for number, text in enumerate(lines, 1):
            if len(text) < 2 or text[1] != "=" or not _LINE_TYPE.fullmatch(text[0]):
                raise SdpError(f"SDP line {number} is not <type>=<value>: {text[:40]!r}")
            if "\r" in text or "\x00" in text:
                raise SdpError(f"SDP line {number} has a stray CR or NUL")
            if text[0] == "m":
                starts.append(number - 1)
                if len(starts) > MAX_MEDIA_SECTIONS:
                    raise SdpError(f"SDP has more than {MAX_MEDIA_SECTIONS} media sections")
        if lines[0] != "v=0":  # RFC 8866 5.1: the first line, and the only version there is
            raise SdpError(f"SDP does not start with v=0: {lines[0][:40]!r}")
        session = lines[: starts[0]] if starts else lines
        origin: Origin | None = None
        connection: Connection | None = None
        attributes: list[Attribute] = []
        for number, text in enumerate(session[1:], 2):
            kind, value = text[0], text[2:]
            if kind == "o":
                if origin is not None:
                    raise SdpError(f"SDP has more than one o= line (line {number})")
                origin = Origin.parse(value)
            elif kind == "c":
                if connection is not None:
                    raise SdpError(f"SDP session part has more than one c= line (line {number})")
                connection = Connection.parse(value)
            elif kind == "a":
                attributes.append(Attribute.parse(value))
        if origin is None:
            raise SdpError("SDP has no o= line")
        attrs = tuple(attributes)
        _check_attributes(attrs, "session part")
        media = []
        for index, start in enumerate(starts):
            end = starts[index + 1] if index + 1 < len(starts) else len(lines)
            section = MediaDescription._from_lines(lines[start:end], start + 1, index)
            if section.connection is None and connection is None and not section.disabled:
                # RFC 8866 5.7: a c= in every section or at session level
                raise SdpError(f"media section {index} has no c= line and the session has none")
            media.append(section)
        return cls(tuple(session), origin, connection, attrs, _direction_of(attrs, "session part"), tuple(media))

    def to_bytes(self) -> bytes:
        lines = [*self.session]
        for section in self.media:
            lines.extend(section.lines)
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    def connection_of(self, index: int) -> Connection | None:
        """The connection that applies to media section ``index``: its own c=, else the session's."""
        return self.media[index].connection or self.connection

    def direction_of(self, index: int) -> Direction:
        """RFC 8866 6.7: the media-level direction, else the session-level one, else sendrecv."""
        return self.media[index].direction or self.direction or Direction.SENDRECV

    @property
    def ice_lite(self) -> bool:
        return self.has_attribute("ice-lite")

    def with_origin(self, origin: Origin) -> SessionDescription:
        """A copy whose o= line is ``origin``."""
        session = ["o=" + origin.serialize() if text[0] == "o" else text for text in self.session]
        return self._rebuild(session, [m.lines for m in self.media])

    def _rebuild(self, session: Sequence[str], media: Sequence[Sequence[str]]) -> SessionDescription:
        lines = [*session]
        for section in media:
            lines.extend(section)
        return SessionDescription._from_lines(lines)


# ---------------------------------------------------------------------------------------------
# What the phone says: where the relay sends before latching.


@dataclass(frozen=True, slots=True)
class MediaEndpoint:
    """Where the author of an SDP receives one stream (before latching on what it really sends from).

    ``rtcp_port`` is a=rtcp's port, else RTP + 1 (RFC 3605 2.1, RFC 3550 11); when rtcp-mux is
    negotiated (``rtcp_mux`` here and in the other side's SDP) RTCP goes to the RTP port instead.
    """

    index: int
    media: str
    proto: str
    address: str | None  # the media c=, else the session c=; None only for a disabled stream
    rtp_port: int
    rtcp_address: str | None
    rtcp_port: int
    rtcp_mux: bool
    direction: Direction
    disabled: bool  # port 0: keep it in the SDP, relay nothing

    @property
    def zero_address(self) -> bool:
        """c=0.0.0.0 (or ::): RFC 2543-style hold, never a destination (RFC 3264 8.4)."""
        return self.address is not None and ipaddress.ip_address(self.address).is_unspecified

    @property
    def receives(self) -> bool:
        """The author accepts media on this stream: enabled, a real address, sendrecv or recvonly."""
        return not self.disabled and not self.zero_address and self.direction.receives

    @property
    def sends(self) -> bool:
        return not self.disabled and self.direction.sends

    @property
    def on_hold(self) -> bool:
        """Held by its author: sendonly/inactive (RFC 3264 8.4) or the old c=0.0.0.0."""
        return not self.disabled and (self.zero_address or not self.direction.receives)

    @property
    def rtp_destination(self) -> tuple[str, int] | None:
        if not self.receives or self.address is None:
            return None
        return (self.address, self.rtp_port)

    @property
    def rtcp_destination(self) -> tuple[str, int] | None:
        if not self.receives or self.rtcp_address is None:
            return None
        if ipaddress.ip_address(self.rtcp_address).is_unspecified:  # Chrome's a=rtcp:9 IN IP4 0.0.0.0
            return None
        return (self.rtcp_address, self.rtcp_port)


def endpoints_of(sdp: SessionDescription) -> list[MediaEndpoint]:
    """For each media section, where its author says it receives RTP and RTCP."""
    result = []
    for index, section in enumerate(sdp.media):
        connection = sdp.connection_of(index)
        address = None if connection is None else connection.address
        port = section.line.port
        rtcp_port = port + 1 if 0 < port < 65535 else port
        rtcp_address = address
        if section.rtcp is not None:
            rtcp_port = section.rtcp.port
            if section.rtcp.connection is not None:
                rtcp_address = section.rtcp.connection.address
        result.append(
            MediaEndpoint(
                index=index,
                media=section.line.media,
                proto=section.line.proto,
                address=address,
                rtp_port=port,
                rtcp_address=rtcp_address,
                rtcp_port=rtcp_port,
                rtcp_mux=section.rtcp_mux,
                direction=sdp.direction_of(index),
                disabled=section.disabled,
            )
        )
    return result


def secure_media(sdp: SessionDescription) -> str | None:
    """What in ``sdp`` asks for encrypted media on an enabled stream, or None for plain RTP.

    SRTP profiles (RFC 3711 ``RTP/SAVP``, RFC 5124 ``RTP/SAVPF``) and DTLS-SRTP (RFC 5764
    ``UDP/TLS/RTP/SAVP(F)``).  sipfarm's relay terminates none of them: it refuses such SDP
    (one rule for proxies: encrypted media goes to rtpengine, which terminates SRTP per leg),
    rather than forward SDES-keyed SRTP opaquely, which would work only while both legs want
    the same keys and profile.  The profile alone decides: keys or a fingerprint on a plain
    ``RTP/AVP`` stream (best-effort SRTP, or an attribute made up to keep a call's media off
    the relay: red team, 2026-12-03) are dropped by :func:`anchor` (``KEY_ATTRIBUTES``)."""
    for section in sdp.media:
        if section.disabled:
            continue
        if not _plain(section):
            return section.line.proto.upper()
    return None


# ---------------------------------------------------------------------------------------------
# What the relay says instead: anchoring.


@dataclass(frozen=True, slots=True)
class RelayEndpoint:
    """The relay's address and ports for one stream, as the *other* party must see them.

    ``rtcp_port`` None means RTP + 1 (RFC 3550 11); equal to ``rtp_port`` means the relay has one
    port for the stream (rtcp-mux only).
    """

    address: str
    rtp_port: int
    rtcp_port: int | None = None

    def __post_init__(self) -> None:
        _addrtype_of(self.address)
        if not 0 < self.rtp_port < 65536:
            raise ValueError(f"relay RTP port {self.rtp_port} is out of range")
        if not 0 < self.rtcp < 65536:
            raise ValueError(f"relay RTCP port {self.rtcp} is out of range")

    @property
    def rtcp(self) -> int:
        return self.rtp_port + 1 if self.rtcp_port is None else self.rtcp_port

    @property
    def connection(self) -> Connection:
        return Connection.of(self.address)


def _attribute_name(line: str) -> str:
    return line[2:].partition(":")[0]


def _unspecified_like(address: str) -> Connection:
    return Connection.of("0.0.0.0" if _addrtype_of(address) == "IP4" else "::")


def _unspecified_line(text: str) -> str:
    """A c= line of a disabled stream, its address unspecified (same family)."""
    try:
        connection = Connection.parse(text[2:])
    except SdpError:
        return text  # not reached: the description parsed
    return "c=" + _unspecified_like(connection.address).serialize()


def anchor(
    sdp: SessionDescription,
    endpoints: Sequence[RelayEndpoint | None],
    *,
    replace_origin: bool = True,
    replace_session_connection: bool = True,
    ice: IceMode = IceMode.REMOVE,
    rtcp_mux: RtcpMuxMode = RtcpMuxMode.KEEP,
    direction: Direction | None = None,
) -> SessionDescription:
    """The SDP to forward once every enabled stream is anchored at the relay (an ng offer/answer).

    ``endpoints[i]`` is the relay's side for media section ``i`` (None, or anything, for a
    disabled one: port 0 sections are copied, their own c= made unspecified; with every stream
    disabled, o= and the session c= name the unspecified address: nothing shows the party's
    own).  For every enabled section the result
    has: the m= port of the relay (a ``/<number of ports>`` dropped); a c= naming the relay
    (media-level, unless the session-level c= already says so); a=rtcp naming the relay's RTCP
    port, or no a=rtcp when the relay muxes on one port; a=rtcp-mux per ``rtcp_mux``; no ICE
    attributes with ``IceMode.REMOVE``; the direction forced to ``direction`` when given.

    A stream held the old way (c=0.0.0.0, RFC 3264 8.4) keeps the unspecified address, in the
    relay's family, so the other side still sees the hold and nothing is relayed to 0.0.0.0.

    ``replace_session_connection`` rewrites an existing session-level c= to the first relayed
    stream's relay; ``replace_origin`` puts that address in o=.  The o= sess-version is left as it
    was: pass the result through :func:`continue_session` with what was last sent on the leg.
    Raises ValueError when ``endpoints`` does not fit ``sdp``.
    """
    if len(endpoints) != len(sdp.media):
        raise ValueError(f"{len(endpoints)} relay endpoints for {len(sdp.media)} media sections")
    relays: list[RelayEndpoint | None] = []
    for index, (section, endpoint) in enumerate(zip(sdp.media, endpoints, strict=True)):
        if section.disabled:
            relays.append(None)
            continue
        if endpoint is None:
            raise ValueError(f"media section {index} is enabled but has no relay endpoint")
        if endpoint.rtcp == endpoint.rtp_port and not _mux_out(section.rtcp_mux, rtcp_mux):
            raise ValueError(f"media section {index}: RTCP on the RTP port needs rtcp-mux")
        relays.append(endpoint)
    first = next((r for r in relays if r is not None), None)
    strip_ice = ice is IceMode.REMOVE
    all_plain = all(section.disabled or _plain(section) for section in sdp.media)

    session: list[str] = []
    session_connection = sdp.connection
    for text in sdp.session:
        kind = text[0]
        if kind == "o" and replace_origin and first is not None:
            origin = replace(sdp.origin, nettype="IN", addrtype=first.connection.addrtype, address=first.address)
            session.append("o=" + origin.serialize())
        elif kind == "o" and replace_origin:
            # every stream disabled (port 0): no relay address to name, and the party's own is
            # not shown either (red team, 2026-12-03: an all-port-0 offer went on with it)
            unspecified = "::" if sdp.origin.addrtype == "IP6" else "0.0.0.0"
            session.append("o=" + replace(sdp.origin, address=unspecified).serialize())
        elif kind == "c" and replace_session_connection and first is not None and sdp.connection is not None:
            held = sdp.connection.unspecified
            session_connection = _unspecified_like(first.address) if held else first.connection
            session.append("c=" + session_connection.serialize())
        elif kind == "c" and replace_session_connection and sdp.connection is not None:
            session.append("c=" + _unspecified_like(sdp.connection.address).serialize())
        elif kind == "a" and all_plain and _attribute_name(text) in KEY_ATTRIBUTES:
            continue
        elif not (kind == "a" and strip_ice and _attribute_name(text) in ICE_ATTRIBUTES):
            session.append(text)

    media: list[Sequence[str]] = []
    for index, (section, relay) in enumerate(zip(sdp.media, relays, strict=True)):
        if relay is None:  # disabled: its own c=, if any, names nobody
            media.append([_unspecified_line(t) if t[0] == "c" else t for t in section.lines])
            continue
        connection = sdp.connection_of(index)
        held = connection is not None and connection.unspecified
        wanted = _unspecified_like(relay.address) if held else relay.connection
        media.append(
            _anchor_section(
                section,
                relay,
                wanted,
                own_connection=section.connection is not None or session_connection != wanted,
                strip_ice=strip_ice,
                mux=_mux_out(section.rtcp_mux, rtcp_mux),
                add_mux=rtcp_mux is RtcpMuxMode.OFFER and not section.rtcp_mux,
                direction=direction,
            )
        )
    return sdp._rebuild(session, media)


def _plain(section: MediaDescription) -> bool:
    """A plain RTP profile (RTP/AVP, RTP/AVPF): neither SRTP nor DTLS (see :func:`secure_media`)."""
    proto = section.line.proto.upper()
    return "SAVP" not in proto and "TLS" not in proto


def _mux_out(phone_muxes: bool, mode: RtcpMuxMode) -> bool:
    if mode is RtcpMuxMode.KEEP:
        return phone_muxes
    return mode is RtcpMuxMode.OFFER


def _anchor_section(
    section: MediaDescription,
    relay: RelayEndpoint,
    wanted: Connection,
    *,
    own_connection: bool,
    strip_ice: bool,
    mux: bool,
    add_mux: bool,
    direction: Direction | None,
) -> list[str]:
    lines = ["m=" + replace(section.line, port=relay.rtp_port, port_count=None).serialize()]
    connection_written = not own_connection
    rtcp_written = False
    direction_written = False
    one_port = relay.rtcp == relay.rtp_port
    plain = _plain(section)
    for text in section.lines[1:]:
        kind = text[0]
        # RFC 8866 5: c= comes after m= and i=, before b=, k= and a=
        if not connection_written and kind not in ("i", "c"):
            lines.append("c=" + wanted.serialize())
            connection_written = True
        if kind == "c":
            if not connection_written:
                lines.append("c=" + wanted.serialize())
                connection_written = True
            continue
        if kind == "a":
            name = _attribute_name(text)
            if (strip_ice and name in ICE_ATTRIBUTES) or (plain and name in KEY_ATTRIBUTES):
                continue
            if name in _MUX_ATTRIBUTES and not mux:
                continue
            if name == "rtcp":
                if one_port:
                    continue
                # RFC 3605 2.1: keep the explicit-address form when the phone used it
                has_address = section.rtcp is not None and section.rtcp.connection is not None
                lines.append("a=" + Rtcp(relay.rtcp, relay.connection if has_address else None).serialize())
                rtcp_written = True
                continue
            if name in _DIRECTIONS and direction is not None:
                lines.append("a=" + direction.value)
                direction_written = True
                continue
        lines.append(text)
    if not connection_written:
        lines.append("c=" + wanted.serialize())
    if add_mux:
        lines.append("a=rtcp-mux")
    if not rtcp_written and not one_port and relay.rtcp != relay.rtp_port + 1:
        lines.append(f"a=rtcp:{relay.rtcp}")
    if direction is not None and not direction_written:
        lines.append("a=" + direction.value)
    return lines


def continue_session(sdp: SessionDescription, last_sent: SessionDescription | None) -> SessionDescription:
    """The SDP to send on a leg after ``last_sent`` (None for the first one): RFC 3264 8.

    Successive SDPs on a leg keep the o= line of the first one but for sess-version, which goes
    up by one exactly when anything else changed; an unchanged body (a session refresh) keeps the
    version.  The caller keeps ``last_sent`` per leg and direction (e.g. ``to_bytes()`` in Redis).
    """
    if last_sent is None:
        return sdp
    if _body(sdp) == _body(last_sent):
        return sdp.with_origin(last_sent.origin)
    origin = replace(last_sent.origin, session_version=last_sent.origin.session_version + 1)
    return sdp.with_origin(origin)


def _body(sdp: SessionDescription) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    return tuple(t for t in sdp.session if t[0] != "o"), tuple(m.lines for m in sdp.media)
