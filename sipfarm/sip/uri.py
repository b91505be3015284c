"""SIP, SIPS and TEL URIs (RFC 3261 19.1, RFC 3966).

Parsing is on ``str`` (URIs are ASCII; non-ASCII bytes are kept through latin-1 so nothing is lost).
A syntax error raises :class:`URIError`, a scheme other than sip/sips/tel :class:`UnknownScheme`;
callers map them to 400 / 416.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

from sipfarm.sip.memo import BoundedMemo

Params = tuple[tuple[str, str | None], ...]

# What one URI may cost to parse is bounded before any split or scan (red team, 2026-12-02: a
# From URI of 14,000 ";x=y" params cost a node 8-9 ms, 20x a benign message of its size).
# Real URIs are far below both: a WebRTC Contact with +sip.instance, reg-id, ob and a
# transport is ~200 bytes and 5 params; a farm's sealed Record-Route/Path entry with its flow
# token ~250 bytes and 3 params; the longest the test corpus and the RFC 4475 vectors hold are
# under 1 KB.  Over either bound is abuse: URIError, a 400 to the request.
MAX_URI: Final = 4096  # bytes of one URI (sip, sips, tel)
MAX_PARAMS: Final = 64  # ';' parameters of one URI (the header parameters of one value too)

_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
# RFC 3261 25.1: user = 1*( unreserved / escaped / user-unreserved ); we accept these plus the
# escaped octets as they stand.
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()%&=+$,;?/")
_PASSWORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()%&=+$,")
_PARAM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()%[]/:&+$")


# space and the control characters (RFC 3986 2.1: escaped as %XX, never raw), and what ends a
# URI in a name-addr
_BAD_SIP_CHARS = re.compile(r'[\x00-\x20\x7f<>"]').search


class URIError(ValueError):
    """A URI that does not follow the RFC 3261 25.1 grammar."""


class UnknownScheme(URIError):
    """A well-formed URI whose scheme sipfarm does not serve (answer 416 to a Request-URI)."""


# RFC 3261 25.1: IPv6reference = "[" IPv6address "]". Its IPv6address production, inherited from
# RFC 2373, is wrong: ``hexpart [ ":" IPv4address ]`` with a hexpart ending in "::" derives
# ``2001:db8:::192.0.2.1`` (three colons before an embedded IPv4 address), which RFC 4291 (and
# RFC 5954's correction of RFC 3261) does not. RFC 5118 4.10: an implementation "may exhibit
# robustness by successfully parsing the IPv6 reference (it can choose to ignore the extra colon
# ...)". So the address inside the brackets is RFC 4291's, the one tolerance being that derivation:
# ":::" right before an IPv4 address that ends the reference reads as "::".
_ABNF_BUG_COLON = re.compile(r":::(?=(?:[0-9]{1,3}\.){3}[0-9]{1,3}\Z)")


def ipv6_reference(text: str) -> str:
    """``text``, an ``[IPv6address]`` reference, lower-cased (RFC 3261's extra colon removed, see
    ``_ABNF_BUG_COLON``): what a URI or Via host holds, so that every reader of it finds an
    IPv6 address between the brackets. Raises :class:`URIError`."""
    if len(text) < 4 or text[0] != "[" or text[-1] != "]":
        raise URIError("bad IPv6 reference")
    inner = _ABNF_BUG_COLON.sub("::", text[1:-1].lower(), count=1)
    # ipaddress takes a zone ("%eth0") that no IPv6reference has: the character check first
    if inner.strip("0123456789abcdef:."):
        raise URIError("bad IPv6 reference")
    try:
        ipaddress.IPv6Address(inner)
    except ValueError:
        raise URIError("bad IPv6 reference") from None
    return f"[{inner}]"


@dataclass(frozen=True, slots=True)
class SipURI:
    scheme: str  # "sip" or "sips", lower case
    host: str  # lower case; IPv6 with brackets
    user: str | None = None  # as written (escapes kept): compare with .user_unescaped
    password: str | None = None
    port: int | None = None
    params: Params = ()
    headers: str = ""  # raw text after '?', empty when absent

    def param(self, name: str) -> str | None:
        """Value of a URI parameter ('' for a flag parameter like ``lr``), None when absent."""
        for key, value in self.params:
            if key == name:
                return "" if value is None else value
        return None

    def has_param(self, name: str) -> bool:
        return any(key == name for key, _ in self.params)

    @property
    def user_unescaped(self) -> str | None:
        user = self.user
        if user is None or user.find("%") < 0:
            return user  # nothing escaped: no interpreted unquote() frame
        return unquote(user)

    @property
    def transport(self) -> str:
        """Transport named by the URI: the transport param, else TLS for sips, UDP for sip."""
        explicit = self.param("transport")
        if explicit:
            return explicit.lower()
        return "tls" if self.scheme == "sips" else "udp"

    @property
    def aor(self) -> str:
        """Address-of-record key: ``user@host`` with escapes resolved (RFC 3261 10.3 step 5)."""
        user = self.user_unescaped
        return self.host if user is None else f"{user}@{self.host}"

    @property
    def hostport(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def replace(self, **changes: object) -> SipURI:
        values: dict[str, object] = {
            "scheme": self.scheme,
            "host": self.host,
            "user": self.user,
            "password": self.password,
            "port": self.port,
            "params": self.params,
            "headers": self.headers,
        }
        values.update(changes)
        return SipURI(**values)  # type: ignore[arg-type]

    def with_param(self, name: str, value: str | None = None) -> SipURI:
        kept = tuple(p for p in self.params if p[0] != name)
        return self.replace(params=(*kept, (name, value)))

    def without_param(self, name: str) -> SipURI:
        return self.replace(params=tuple(p for p in self.params if p[0] != name))

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":")
                out.append(self.password)
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out.append(f":{self.port}")
        for key, value in self.params:
            out.append(f";{key}" if value is None else f";{key}={value}")
        if self.headers:
            out.append("?")
            out.append(self.headers)
        return "".join(out)

    def to_bytes(self) -> bytes:
        return str(self).encode("latin-1")


@dataclass(frozen=True, slots=True)
class TelURI:
    number: str
    params: Params = field(default=())

    @property
    def aor(self) -> str:
        return self.number

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return "" if value is None else value
        return None

    def __str__(self) -> str:
        return "tel:" + self.number + "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params)

    def to_bytes(self) -> bytes:
        return str(self).encode("latin-1")


URI = SipURI | TelURI


def parse_params(text: str) -> Params:
    """``;a=b;c`` style parameters (leading ';' already removed); names lower-cased."""
    if not text:
        return ()
    if text.count(";") >= MAX_PARAMS:  # a count first: no split of an unbounded list
        raise URIError(f"more than {MAX_PARAMS} URI parameters")
    out: list[tuple[str, str | None]] = []
    for piece in text.split(";"):
        name, eq, value = piece.partition("=")
        name = name.strip().lower()
        if not name:
            raise URIError("empty URI parameter")
        if not _PARAM_CHARS.issuperset(name):
            raise URIError(f"bad character in URI parameter {name!r}")
        if eq:
            value = value.strip()
            if not _PARAM_CHARS.issuperset(value):
                raise URIError(f"bad character in URI parameter value {name}")
            out.append((name, value))
        else:
            out.append((name, None))
    return tuple(out)


def _parse_host(text: str) -> tuple[str, int | None]:
    if not text:
        raise URIError("URI has no host")
    port: int | None = None
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            raise URIError("unterminated IPv6 reference")
        host = ipv6_reference(text[: end + 1])
        rest = text[end + 1 :]
        if rest:
            if rest[0] != ":":
                raise URIError("junk after IPv6 reference")
            port = _parse_port(rest[1:])
        return host, port
    host, colon, port_text = text.partition(":")
    if colon:
        port = _parse_port(port_text)
    if not host or not _HOSTNAME_CHARS.issuperset(host):
        raise URIError(f"bad host {host!r}")
    return host.lower(), port


def _parse_port(text: str) -> int:
    # str.isdigit() takes other scripts' digits too ("²", a latin-1 byte 0xB2), which int() refuses
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise URIError(f"bad port {text!r}")
    port = int(text)
    if port > 65535:
        raise URIError(f"port {port} out of range")
    return port


def parse_uri(value: str | bytes) -> URI:
    """Parse a sip:, sips: or tel: URI. Raises URIError / UnknownScheme.

    Results are immutable and memoised by their text (:class:`~sipfarm.sip.memo.BoundedMemo`).
    """
    return _PARSED(value)


def _parse_uri(value: str | bytes) -> URI:
    if len(value) > MAX_URI:
        raise URIError(f"URI longer than {MAX_URI} bytes")
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, colon, rest = text.partition(":")
    if not colon or not scheme:
        raise URIError("URI has no scheme")
    scheme = scheme.lower()
    if scheme in ("sip", "sips"):
        return _parse_sip(scheme, rest)
    if scheme == "tel":
        number, _, params = rest.partition(";")
        if not number or any(c.isspace() for c in number):
            raise URIError("bad tel number")
        return TelURI(number, parse_params(params))
    if not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise URIError("bad URI scheme")
    raise UnknownScheme(f"unsupported URI scheme {scheme!r}")


def _parse_sip(scheme: str, rest: str) -> SipURI:
    if not rest or _BAD_SIP_CHARS(rest):
        raise URIError("bad characters in SIP URI")
    user: str | None = None
    password: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, pw = userinfo.partition(":")
        if colon:
            if not _PASSWORD_CHARS.issuperset(pw):
                raise URIError("bad character in URI password")
            password = pw
        if not user or not _USER_CHARS.issuperset(user):
            raise URIError("bad user part in SIP URI")
    hostport, qmark, headers = rest.partition("?")
    hostport, semi, params = hostport.partition(";")
    host, port = _parse_host(hostport)
    return SipURI(
        scheme=scheme,
        host=host,
        user=user,
        password=password,
        port=port,
        params=parse_params(params) if semi else (),
        headers=headers if qmark else "",
    )


_PARSED: BoundedMemo[str | bytes, URI] = BoundedMemo(_parse_uri)
