"""SIP Digest authentication: header parsing, stateless nonces, verification, client side.

Theory of operation
-------------------
This module never sees a SIP message.  The caller hands it header *values* (bytes), the request
method, the stored HA1 values of one account and the current time, and gets typed results back:

* :func:`parse_challenge` / :func:`parse_credentials` turn a ``WWW-Authenticate`` /
  ``Proxy-Authenticate`` or ``Authorization`` / ``Proxy-Authorization`` value into a frozen
  :class:`Challenge` / :class:`Credentials`.  Malformed input raises :class:`AuthHeaderError`
  (a ``ValueError``) whose message names the defect; its ``status`` is 400.  A well-formed value
  with another scheme than ``Digest`` raises the subclass :class:`UnsupportedSchemeError`, so a
  registrar can answer it with a fresh 401 challenge instead of a 400 (RFC 4475 3.3.7).
* :class:`NonceFactory` issues and checks *stateless* nonces: a nonce carries its issue time, a
  random salt and a truncated HMAC-SHA256 over both and the realm.  Every node holding the same
  secret validates any other node's nonces, with no shared state.  An authentic but expired nonce
  is ``STALE`` (the re-challenge then carries ``stale=true``, RFC 7616 3.3); anything else that
  does not verify is ``INVALID``.
* :func:`verify` checks a :class:`Credentials` against the account's HA1 values.  An unknown
  account (``None``) is computed against a fixed dummy HA1, so it takes the same path, the same
  time and yields the same result and reason as a wrong password.
* :func:`build_challenges` and :func:`build_credentials` produce header values; the latter is the
  client side, used by tests and health probes.

Accounts store HA1 = H(username ":" realm ":" password) per *base* algorithm (``"MD5"``,
``"SHA-256"``), never passwords; the ``-sess`` variants derive their session HA1 from it
(RFC 7616 3.4.2).  Only ``qop=auth`` is supported: ``auth-int`` is never offered and a response
using it fails.  RFC 2069 responses (no qop) are accepted only when the caller allows them.

Replay protection within a nonce's lifetime (tracking ``nc`` per nonce) needs shared state and is
left to the caller: :class:`AuthResult` exposes the parsed ``nc``.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from sipfarm.sip.ids import random_bytes
from sipfarm.sip.uri import SipURI, URIError, parse_uri

try:  # built by scripts/build-compiled.sh only: the interpreted build parses in Python
    from sipfarm.sip._fastparse import digest_params as _digest_params

    HAVE_FAST_DIGEST = True
except ImportError:  # pragma: no cover - which branch runs depends on the build
    HAVE_FAST_DIGEST = False

__all__ = [
    "ALGORITHMS",
    "AuthHeaderError",
    "AuthOutcome",
    "AuthResult",
    "Challenge",
    "Credentials",
    "NonceFactory",
    "NonceStatus",
    "UnsupportedSchemeError",
    "build_challenges",
    "build_credentials",
    "challenge_templates",
    "digest_response",
    "ha1",
    "parse_challenge",
    "parse_credentials",
    "verify",
]


class AuthHeaderError(ValueError):
    """A malformed authentication header value; the message names the defect."""

    status: ClassVar[int] = 400


class UnsupportedSchemeError(AuthHeaderError):
    """A syntactically plausible value whose scheme is not ``Digest`` (answer with a challenge)."""

    status: ClassVar[int] = 401


# ---------------------------------------------------------------------------------------------
# Algorithms (RFC 7616 3.2, RFC 8760 2.2).  Names are matched case-insensitively and returned in
# the canonical spelling below.

_HASHES: Final[dict[str, Callable[[bytes], str]]] = {
    "MD5": lambda data: hashlib.md5(data, usedforsecurity=False).hexdigest(),
    "SHA-256": lambda data: hashlib.sha256(data).hexdigest(),
}
ALGORITHMS: Final[tuple[str, ...]] = ("SHA-256", "SHA-256-sess", "MD5", "MD5-sess")
_CANONICAL: Final[dict[str, str]] = {name.lower(): name for name in ALGORITHMS}
_HEX_LENGTH: Final[dict[str, int]] = {"MD5": 32, "SHA-256": 64}


def _canonical_algorithm(algorithm: str) -> str | None:
    return _CANONICAL.get(algorithm.lower())


def _base(algorithm: str) -> str:
    return algorithm.removesuffix("-sess")


def _h(algorithm: str, text: str) -> str:
    return _HASHES[_base(algorithm)](text.encode("utf-8"))


def ha1(algorithm: str, user: str, realm: str, password: str) -> str:
    """Hex HA1 = H(user ":" realm ":" password) (RFC 7616 3.4.2), the value accounts store.

    A ``-sess`` algorithm name gives the same value as its base algorithm: the session key is
    derived from it per nonce/cnonce by :func:`digest_response`.
    """
    canonical = _canonical_algorithm(algorithm)
    if canonical is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return _h(canonical, f"{user}:{realm}:{password}")


def digest_response(
    algorithm: str,
    ha1_hex: str,
    nonce: str,
    method: str,
    uri: str,
    *,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
) -> str:
    """The hex ``response`` value (RFC 7616 3.4.1, RFC 2617 3.2.2.1, RFC 2069 when ``qop`` is None).

    ``ha1_hex`` is the stored (non-session) HA1; for ``-sess`` algorithms the session HA1
    H(HA1 ":" nonce ":" cnonce) is derived here.  Only ``qop`` ``"auth"`` or ``None`` is valid.
    """
    canonical = _canonical_algorithm(algorithm)
    if canonical is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    key = ha1_hex.lower()
    if canonical.endswith("-sess"):
        if cnonce is None:
            raise ValueError("-sess algorithms need a cnonce")
        key = _h(canonical, f"{key}:{nonce}:{cnonce}")
    ha2 = _h(canonical, f"{method}:{uri}")
    if qop is None:
        return _h(canonical, f"{key}:{nonce}:{ha2}")
    if qop != "auth":
        raise ValueError(f"unsupported qop {qop!r}")
    if nc is None or cnonce is None:
        raise ValueError("qop=auth needs nc and cnonce")
    return _h(canonical, f"{key}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


# ---------------------------------------------------------------------------------------------
# Grammar (RFC 3261 25.1, RFC 7616 3.3-3.4):
#
#   challenge    =  "Digest" LWS digest-cln *(COMMA digest-cln)
#   credentials  =  "Digest" LWS digest-response
#   auth-param   =  auth-param-name EQUAL ( token / quoted-string )
#   token        =  1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" )
#   quoted-string =  SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
#   qdtext       =  LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
#   quoted-pair  =  "\" (%x00-09 / %x0B-0C / %x0E-7F)
#   LWS          =  [*WSP CRLF] 1*WSP
#
# Empty list elements (",,") are skipped, as RFC 7230 7 allows for #rule lists.

_TOKEN_CHARS: Final[frozenset[str]] = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
)
_WSP: Final[str] = " \t"


class _Scanner:
    """A cursor over one decoded header value; every method raises AuthHeaderError on a defect."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_lws(self) -> bool:
        """Skip SP/HTAB and folded line breaks (CRLF followed by WSP); True if anything skipped."""
        start = self.pos
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in _WSP:
                self.pos += 1
            elif text.startswith("\r\n", self.pos) and text[self.pos + 2 : self.pos + 3] in (" ", "\t"):
                self.pos += 3
            elif char in "\r\n":
                raise AuthHeaderError(f"line break not followed by whitespace at offset {self.pos}")
            else:
                break
        return self.pos > start

    def token(self, what: str) -> str:
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] in _TOKEN_CHARS:
            self.pos += 1
        if self.pos == start:
            found = repr(self.peek()) if not self.at_end() else "end of value"
            raise AuthHeaderError(f"expected {what} at offset {start}, found {found}")
        return text[start : self.pos]

    def quoted_string(self) -> str:
        text = self.text
        start = self.pos
        self.pos += 1  # opening DQUOTE, checked by the caller
        out: list[str] = []
        while True:
            if self.pos >= len(text):
                raise AuthHeaderError(f"unterminated quoted-string starting at offset {start}")
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\":
                if self.pos + 1 >= len(text):
                    raise AuthHeaderError(f"backslash at end of quoted-string starting at offset {start}")
                escaped = text[self.pos + 1]
                if escaped in "\r\n" or ord(escaped) > 0x7F:
                    raise AuthHeaderError(f"invalid quoted-pair at offset {self.pos}")
                out.append(escaped)
                self.pos += 2
            elif char in "\r\n":
                self.skip_lws()  # a fold (CRLF WSP) reads as one SP; a bare break raises
                out.append(" ")
            elif char == "\t" or (char >= " " and char != "\x7f"):
                out.append(char)
                self.pos += 1
            else:
                raise AuthHeaderError(f"control character {char!r} in quoted-string at offset {self.pos}")


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthHeaderError(f"header value is not UTF-8 (byte offset {exc.start})") from None


_TOKEN_RE = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # noqa: S105 - a regex, not a secret
# The common, well-formed shape of a value (no escapes, no LWS folding): the whole value is
# checked by one match, then its params are read by one findall (a C loop each, not a Python
# loop over Match objects).
_FAST_PARAM = rf'[ \t]*({_TOKEN_RE})[ \t]*=[ \t]*(?:"([^"\\\x00-\x1f\x7f]*)"|({_TOKEN_RE}))[ \t]*'
_FAST_SHAPE = re.compile(rf"(?i:digest) (?:{_FAST_PARAM},)*{_FAST_PARAM}", re.ASCII).fullmatch
_FAST_PARAMS = re.compile(rf"{_FAST_PARAM},?", re.ASCII).findall


def _parse_fast(text: str) -> tuple[str, dict[str, str], frozenset[str]] | None:
    """The hot-path parse of a typical Authorization value; None hands over to the scanner."""
    if _FAST_SHAPE(text) is None:
        return None
    # each param's extent is fixed by its characters (a token holds no '=', '"', ',' or
    # whitespace; a quoted-string here holds no '"'), so findall from the first one reads
    # exactly the params the shape matched
    found: list[tuple[str, str, str]] = _FAST_PARAMS(text, 7)
    params: dict[str, str] = {}
    quoted: list[str] = []
    for raw_name, quoted_value, token_value in found:
        name = raw_name.lower()
        if token_value:
            params[name] = token_value
        else:  # a token is never empty: this one was a quoted-string
            params[name] = quoted_value
            quoted.append(name)
    if len(params) != len(found):
        return None  # a duplicate parameter: the scanner names the defect
    return text[:6], params, frozenset(quoted)


# Bounds checked before any scan (see sipfarm/sip/headers.py, "What one value may cost"): real
# Digest values are 300-600 bytes with ~10 params (RFC 7616's examples, pjsua, Linphone,
# SIP.js); the scanner below reads one character at a time, so an unbounded value is costly.
MAX_DIGEST: Final = 4096  # bytes of one Authorization / WWW-Authenticate (and Proxy-) value
MAX_DIGEST_PARAMS: Final = 32  # commas in one value (quoted ones too: a bound)


def _parse(value: bytes) -> tuple[str, dict[str, str], frozenset[str]]:
    """Split ``scheme LWS param *(COMMA param)``; returns scheme, params (lower-cased names) and the
    names whose value was a quoted-string."""
    if len(value) > MAX_DIGEST:
        raise AuthHeaderError(f"authentication header longer than {MAX_DIGEST} bytes")
    if value.count(b",") >= MAX_DIGEST_PARAMS:
        raise AuthHeaderError(f"more than {MAX_DIGEST_PARAMS} authentication parameters")
    if HAVE_FAST_DIGEST:
        # _parse_fast's common case read straight from the bytes, in C (sipfarm/sip/_fastparse.c;
        # None: not the common case, or not ASCII)
        done = _digest_params(value)
        if done is not None:
            return done
    text = _decode(value)
    fast = _parse_fast(text)
    if fast is not None:
        return fast
    scanner = _Scanner(text)
    scanner.skip_lws()
    scheme = scanner.token("authentication scheme")
    if scheme.lower() != "digest":
        raise UnsupportedSchemeError(f"unsupported authentication scheme {scheme!r}")
    if not scanner.skip_lws():
        raise AuthHeaderError("expected whitespace after 'Digest'")
    params: dict[str, str] = {}
    quoted: set[str] = set()
    while True:
        scanner.skip_lws()
        if scanner.peek() == ",":  # empty list element
            scanner.pos += 1
            continue
        if scanner.at_end():
            break
        name = scanner.token("parameter name").lower()
        scanner.skip_lws()
        if scanner.peek() != "=":
            raise AuthHeaderError(f"expected '=' after parameter {name!r}")
        scanner.pos += 1
        scanner.skip_lws()
        if scanner.peek() == '"':
            param_value = scanner.quoted_string()
            quoted.add(name)
        else:
            param_value = scanner.token(f"value of parameter {name!r}")
        if name in params:
            raise AuthHeaderError(f"duplicate parameter {name!r}")
        params[name] = param_value
        scanner.skip_lws()
        if scanner.at_end():
            break
        if scanner.peek() != ",":
            raise AuthHeaderError(f"expected ',' after parameter {name!r} at offset {scanner.pos}")
        scanner.pos += 1
    if not params:
        raise AuthHeaderError("no Digest parameters")
    return scheme, params, frozenset(quoted)


def _require(params: Mapping[str, str], name: str) -> str:
    try:
        return params[name]
    except KeyError:
        raise AuthHeaderError(f"missing {name!r} parameter") from None


def _bool_param(params: Mapping[str, str], name: str) -> bool:
    raw = params.get(name)
    if raw is None:
        return False
    lowered = raw.lower()
    if lowered not in ("true", "false"):
        raise AuthHeaderError(f"parameter {name!r} must be true or false, not {raw!r}")
    return lowered == "true"


def _ext_value(raw: str) -> str:
    """Decode an RFC 8187 ext-value (``UTF-8''%c3%a9...``), used by ``username*`` (RFC 7616 3.4.4)."""
    charset, sep1, rest = raw.partition("'")
    _language, sep2, encoded = rest.partition("'")
    if not sep1 or not sep2 or charset.lower() != "utf-8":
        raise AuthHeaderError("username* is not a UTF-8 ext-value")
    out = bytearray()
    i = 0
    while i < len(encoded):
        char = encoded[i]
        if char == "%":
            pair = encoded[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
                raise AuthHeaderError("bad percent-escape in username*")
            out.append(int(pair, 16))
            i += 3
        else:
            out.extend(char.encode("utf-8"))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthHeaderError("username* does not decode as UTF-8") from None


@dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` / ``Proxy-Authenticate`` Digest challenge."""

    realm: str
    nonce: str
    algorithm: str = "MD5"  # as sent (default MD5, RFC 7616 3.3); see supported_algorithm
    qop: tuple[str, ...] = ()  # qop-options, lower-cased
    opaque: str | None = None
    stale: bool = False
    domain: str | None = None
    userhash: bool = False
    params: tuple[tuple[str, str], ...] = ()  # every parameter, names lower-cased, in order

    @property
    def supported_algorithm(self) -> str | None:
        """Canonical algorithm name if this module supports it, else None."""
        return _canonical_algorithm(self.algorithm)


_CREDENTIALS_FIELDS: Final = (
    "username",
    "realm",
    "nonce",
    "uri",
    "response",
    "algorithm",
    "qop",
    "nc",
    "cnonce",
    "opaque",
    "userhash",
    "params",
)


class Credentials:
    """A parsed ``Authorization`` / ``Proxy-Authorization`` Digest response.

    Immutable (Final attributes, which a compiled build enforces) with value equality: a plain
    class, not a frozen dataclass, whose generated __init__ costs ~15x a compiled one."""

    def __init__(
        self,
        username: str,
        realm: str,
        nonce: str,
        uri: str,
        response: str,
        algorithm: str = "MD5",
        qop: str | None = None,
        nc: str | None = None,
        cnonce: str | None = None,
        opaque: str | None = None,
        userhash: bool = False,
        params: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.username: Final = username
        self.realm: Final = realm
        self.nonce: Final = nonce
        self.uri: Final = uri  # digest-uri, to be compared with the Request-URI by the caller (RFC 3261 22.4)
        self.response: Final = response
        self.algorithm: Final = algorithm
        self.qop: Final = qop  # lower-cased message-qop
        self.nc: Final = nc  # 8 hex digits, as sent
        self.cnonce: Final = cnonce
        self.opaque: Final = opaque
        self.userhash: Final = userhash  # username is H(user ":" realm) (RFC 7616 3.4.4); lookup is the caller's
        self.params: Final = params

    def _fields(self) -> tuple[object, ...]:
        return (
            self.username,
            self.realm,
            self.nonce,
            self.uri,
            self.response,
            self.algorithm,
            self.qop,
            self.nc,
            self.cnonce,
            self.opaque,
            self.userhash,
            self.params,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credentials) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            "Credentials("
            + ", ".join(f"{n}={v!r}" for n, v in zip(_CREDENTIALS_FIELDS, self._fields(), strict=True))
            + ")"
        )

    def replace(self, **changes: object) -> Credentials:
        """A copy with ``changes`` (what ``dataclasses.replace`` did for the dataclass)."""
        values: dict[str, object] = dict(zip(_CREDENTIALS_FIELDS, self._fields(), strict=True))
        for name in changes:
            if name not in values:
                raise TypeError(f"Credentials has no field {name!r}")
        values.update(changes)
        return Credentials(**values)  # type: ignore[arg-type]


def parse_challenge(value: bytes) -> Challenge:
    """Parse a Digest challenge value; raise AuthHeaderError naming the defect."""
    _scheme, params, _quoted = _parse(value)
    qop_raw = params.get("qop")
    qop: tuple[str, ...] = ()
    if qop_raw is not None:
        qop = tuple(item.strip(_WSP).lower() for item in qop_raw.split(",") if item.strip(_WSP))
        if not qop:
            raise AuthHeaderError("empty 'qop' parameter")
    return Challenge(
        realm=_require(params, "realm"),
        nonce=_require(params, "nonce"),
        algorithm=params.get("algorithm", "MD5"),
        qop=qop,
        opaque=params.get("opaque"),
        stale=_bool_param(params, "stale"),
        domain=params.get("domain"),
        userhash=_bool_param(params, "userhash"),
        params=tuple(params.items()),
    )


def parse_credentials(value: bytes) -> Credentials:
    """Parse a Digest credentials value; raise AuthHeaderError naming the defect."""
    _scheme, params, _quoted = _parse(value)
    if "username" in params and "username*" in params:
        raise AuthHeaderError("both 'username' and 'username*' present")  # RFC 7616 3.4.4
    username = _ext_value(params["username*"]) if "username*" in params else _require(params, "username")
    qop = params.get("qop")
    nc = params.get("nc")
    cnonce = params.get("cnonce")
    if qop is not None:
        qop = qop.lower()
        if nc is None or cnonce is None:
            raise AuthHeaderError("'qop' present without 'nc' and 'cnonce'")  # RFC 7616 3.4
    if nc is not None and (len(nc) != 8 or any(c not in "0123456789abcdefABCDEF" for c in nc)):
        raise AuthHeaderError(f"'nc' must be 8 hex digits, not {nc!r}")
    return Credentials(
        username=username,
        realm=_require(params, "realm"),
        nonce=_require(params, "nonce"),
        uri=_require(params, "uri"),
        response=_require(params, "response"),
        algorithm=params.get("algorithm", "MD5"),
        qop=qop,
        nc=nc,
        cnonce=cnonce,
        opaque=params.get("opaque"),
        userhash=_bool_param(params, "userhash"),
        params=tuple(params.items()),
    )


# ---------------------------------------------------------------------------------------------
# Building header values.


_PLAIN_QDTEXT = re.compile(r'[^"\\\x00-\x1f\x7f]*\Z').match


def _quote(text: str) -> str:
    """Render ``text`` as a quoted-string, backslash-escaping what qdtext cannot carry."""
    if _PLAIN_QDTEXT(text):
        return '"' + text + '"'  # the common case: nothing to escape
    if "\r" in text or "\n" in text:
        raise ValueError("CR and LF cannot be carried in a quoted-string")
    out = ['"']
    for char in text:
        if char in '"\\' or char < " " or char == "\x7f":
            out.append("\\")
        out.append(char)
    out.append('"')
    return "".join(out)


def build_challenges(
    realm: str,
    nonce: str,
    algorithms: Iterable[str] = ("SHA-256", "MD5"),
    stale: bool = False,
    opaque: str | None = None,
) -> list[bytes]:
    """Challenge values in preference order, one per algorithm (RFC 8760 2.4: SHA-256 first).

    Each offers ``qop="auth"`` only.  The caller emits them as separate header fields.
    """
    values: list[bytes] = []
    for algorithm in algorithms:
        canonical = _canonical_algorithm(algorithm)
        if canonical is None:
            raise ValueError(f"unsupported digest algorithm {algorithm!r}")
        parts = [f"Digest realm={_quote(realm)}", f"nonce={_quote(nonce)}"]
        if opaque is not None:
            parts.append(f"opaque={_quote(opaque)}")
        parts.append(f"algorithm={canonical}")
        parts.append('qop="auth"')
        if stale:
            parts.append("stale=true")
        values.append(", ".join(parts).encode("utf-8"))
    return values


def challenge_templates(
    realm: str, algorithms: Iterable[str] = ("SHA-256", "MD5"), stale: bool = False
) -> list[tuple[bytes, bytes]]:
    """:func:`build_challenges`' values (no ``opaque``) cut around the nonce: each value is
    ``before + nonce + after`` for a nonce that is plain qdtext (a :class:`NonceFactory`
    nonce is: base64url).  Everything but the nonce is the same for every challenge of a realm:
    a node builds these once per realm, and per challenge joins three byte strings."""
    templates: list[tuple[bytes, bytes]] = []
    for algorithm in algorithms:
        canonical = _canonical_algorithm(algorithm)
        if canonical is None:
            raise ValueError(f"unsupported digest algorithm {algorithm!r}")
        before = f'Digest realm={_quote(realm)}, nonce="'
        after = f'", algorithm={canonical}, qop="auth"' + (", stale=true" if stale else "")
        templates.append((before.encode("utf-8"), after.encode("utf-8")))
    return templates


def build_credentials(
    challenge: Challenge,
    user: str,
    password: str,
    method: bytes | str,
    uri: str,
    cnonce: str,
    nc: int = 1,
) -> bytes:
    """An ``Authorization`` value answering ``challenge`` (client side, for tests and probes).

    Uses qop=auth when offered, RFC 2069 style when the challenge offers no qop; raises
    ValueError for an unsupported algorithm or a challenge offering only auth-int.
    """
    algorithm = challenge.supported_algorithm
    if algorithm is None:
        raise ValueError(f"unsupported digest algorithm {challenge.algorithm!r}")
    if not 0 < nc <= 0xFFFFFFFF:
        raise ValueError("nc must fit 8 hex digits and be positive")
    method_text = method.decode("ascii") if isinstance(method, bytes) else method
    secret = ha1(algorithm, user, challenge.realm, password)
    parts = [
        f"Digest username={_quote(user)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
    ]
    if challenge.qop:
        if "auth" not in challenge.qop:
            raise ValueError(f"challenge offers no supported qop: {challenge.qop!r}")
        nc_text = f"{nc:08x}"
        digest = digest_response(
            algorithm, secret, challenge.nonce, method_text, uri, qop="auth", nc=nc_text, cnonce=cnonce
        )
        parts.append(f"response={_quote(digest)}")
        parts.append(f"algorithm={algorithm}")
        parts.append(f"cnonce={_quote(cnonce)}")
        parts.append("qop=auth")
        parts.append(f"nc={nc_text}")
    else:
        sess_cnonce = cnonce if algorithm.endswith("-sess") else None
        digest = digest_response(algorithm, secret, challenge.nonce, method_text, uri, cnonce=sess_cnonce)
        parts.append(f"response={_quote(digest)}")
        parts.append(f"algorithm={algorithm}")
        if sess_cnonce is not None:
            parts.append(f"cnonce={_quote(sess_cnonce)}")
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    return ", ".join(parts).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Stateless nonces.


class NonceStatus(enum.Enum):
    VALID = "valid"
    STALE = "stale"  # authentic, but older than the lifetime: re-challenge with stale=true
    INVALID = "invalid"  # not issued with our secret for this realm, or garbled


_TIMESTAMP = struct.Struct(">Q")  # issue time, whole milliseconds since the epoch
_SALT_LEN: Final = 8
_MAC_LEN: Final = 16  # 128-bit keyed BLAKE2b: plenty for a forgery bound
_NONCE_LEN: Final = _TIMESTAMP.size + _SALT_LEN + _MAC_LEN
_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


def _b64url(raw: bytes) -> bytes:
    """base64.urlsafe_b64encode without its interpreted frames (one nonce per challenge)."""
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE)


class NonceFactory:
    """Issues and checks stateless nonces shared by every node holding ``secret``.

    nonce = base64url(timestamp | salt | BLAKE2b-128(key=secret, timestamp | salt | [0 | client | 0 |] realm)),
    unpadded (43 characters). Keyed BLAKE2b is a MAC by design (RFC 7693) and a third of the
    cost of HMAC-SHA256 here, which matters: every challenge and every authenticated request
    computes one. The salt needs uniqueness, not secrecy (the MAC covers it). ``old_secrets``
    are still accepted by :meth:`check`, for key rotation across a cluster. A nonce dated more
    than ``max_clock_skew`` seconds in the future is INVALID (an authentic one can only come
    from a node whose clock is off).
    """

    __slots__ = ("_keyed", "_keys", "_random", "lifetime", "max_clock_skew")

    def __init__(
        self,
        secret: bytes,
        lifetime: float,
        *,
        old_secrets: Iterable[bytes] = (),
        max_clock_skew: float = 30.0,
        random: Callable[[int], bytes] = random_bytes,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("nonce secret must be at least 16 bytes")
        if lifetime <= 0:
            raise ValueError("nonce lifetime must be positive")
        # BLAKE2b takes keys of up to 64 bytes: longer secrets are hashed down to that.
        self._keys: tuple[bytes, ...] = tuple(
            k if len(k) <= 64 else hashlib.blake2b(k).digest() for k in (secret, *old_secrets)
        )
        # each key's BLAKE2b state after the key block, copied per MAC (the same digest as
        # blake2b(data, key=key): one key-block compression and the setup less per nonce)
        self._keyed: tuple[hashlib.blake2b, ...] = tuple(
            hashlib.blake2b(key=k, digest_size=_MAC_LEN) for k in self._keys
        )
        self._random = random
        self.lifetime = lifetime
        self.max_clock_skew = max_clock_skew

    @staticmethod
    def _mac(keyed: hashlib.blake2b, head: bytes, realm: str, client: str) -> bytes:
        h = keyed.copy()
        # with a client: NUL, client, NUL, realm (a realm is a served domain: it never starts
        # with NUL, so no client-less input reads the same)
        client_part = b"\0" + client.encode("utf-8") + b"\0" if client else b""
        h.update(head + client_part + realm.encode("utf-8"))
        return h.digest()

    def issue(self, now: float, realm: str, client: str = "") -> str:
        """A nonce for ``realm``, valid only from ``client`` (an IP address, "" for anyone):
        a nonce obtained at one address does not authenticate, nor count failures, from another
        (a spoofed source cannot get its victim banned with it)."""
        head = _TIMESTAMP.pack(max(0, int(now * 1000))) + self._random(_SALT_LEN)[:_SALT_LEN]
        if len(head) != _TIMESTAMP.size + _SALT_LEN:
            raise ValueError("random source returned too few bytes")
        raw = head + self._mac(self._keyed[0], head, realm, client)
        return _b64url(raw).rstrip(b"=").decode("ascii")

    def check(self, nonce: str, now: float, realm: str, client: str = "") -> NonceStatus:
        if len(nonce) != 43 or not nonce.isascii():
            return NonceStatus.INVALID
        try:
            # base64.urlsafe_b64decode, without its interpreted frames (the text is ASCII)
            raw = binascii.a2b_base64((nonce + "=").encode("ascii").translate(_FROM_URLSAFE))
        except (binascii.Error, ValueError):
            return NonceStatus.INVALID
        # a2b_base64 drops stray characters and ignores the last character's spare bits: insist on
        # the canonical spelling so one nonce has exactly one textual form (callers key on it).
        if len(raw) != _NONCE_LEN or _b64url(raw)[:43].decode("ascii") != nonce:
            return NonceStatus.INVALID
        head, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        authentic = False
        for keyed in self._keyed:  # no early exit: same work whichever key matches
            authentic |= hmac.compare_digest(self._mac(keyed, head, realm, client), mac)
        if not authentic:
            return NonceStatus.INVALID
        (issued_ms,) = _TIMESTAMP.unpack(head[: _TIMESTAMP.size])
        age = now - issued_ms / 1000
        if age < -self.max_clock_skew:
            return NonceStatus.INVALID
        if age > self.lifetime:
            return NonceStatus.STALE
        return NonceStatus.VALID


# ---------------------------------------------------------------------------------------------
# Verification.


class AuthOutcome(enum.Enum):
    OK = "ok"
    STALE = "stale"  # right password, expired nonce: re-challenge with stale=true
    FAIL = "fail"  # answer 401/407 (or 403 after repeated failures): never say why to the client


class AuthResult:
    """The outcome of :func:`verify` (immutable: Final attributes; a plain class, not a frozen
    dataclass, whose generated __init__ costs ~15x a compiled one)."""

    def __init__(self, outcome: AuthOutcome, reason: str, nc: int | None = None) -> None:
        self.outcome: Final = outcome
        self.reason: Final = reason  # for logs and metrics only; identical for unknown user and wrong password
        self.nc: Final = nc  # parsed nonce-count, for callers tracking replays

    # value semantics, as the frozen dataclass had
    def __eq__(self, other: object) -> bool:
        return isinstance(other, AuthResult) and (self.outcome, self.reason, self.nc) == (
            other.outcome,
            other.reason,
            other.nc,
        )

    def __hash__(self) -> int:
        return hash((self.outcome, self.reason, self.nc))

    def __repr__(self) -> str:
        return f"AuthResult({self.outcome}, {self.reason!r}, nc={self.nc!r})"

    @property
    def ok(self) -> bool:
        return self.outcome is AuthOutcome.OK


# Used when the account is unknown, so the computation and its timing match a wrong password.
_DUMMY_HA1: Final[dict[str, str]] = {
    name: _HASHES[name](b"sipfarm:no-such-account:" + name.encode()) for name in _HASHES
}
_MISMATCH: Final = "digest mismatch"


def same_resource(digest_uri: str, request_uri: bytes) -> bool:
    """The digest ``uri`` does not name another resource than the Request-URI (RFC 2617
    3.2.2.5, RFC 3261 22.4): without this check, credentials captured from one request
    authorise another with the same nonce use sent first (an INVITE to a premium number instead
    of a colleague: the digest covers its ``uri``, not the Request-URI).  Byte-equal, or the
    same user (unescaped) where both name one.  Only the user is compared: phones differ in how
    they write the rest (SIPp puts ``sip:<server IP>:<port>`` for any Request-URI), a ``uri``
    with no user part names no other callee, and a Request-URI with none (a REGISTER's) routes
    to no user whatever the ``uri`` says."""
    if digest_uri.encode("latin-1", "replace") == request_uri:
        return True
    try:
        mine = parse_uri(digest_uri)
        theirs = parse_uri(request_uri)
    except URIError:
        return False
    if not (isinstance(mine, SipURI) and isinstance(theirs, SipURI)):
        return str(mine) == str(theirs)
    if mine.user is None or theirs.user is None:
        return True
    return mine.user_unescaped == theirs.user_unescaped


def verify(
    creds: Credentials,
    method: bytes | str,
    ha1_by_algorithm: Mapping[str, str] | None,
    nonces: NonceFactory,
    now: float,
    expected_realm: str,
    *,
    allow_rfc2069: bool = False,
    client: str = "",
    nonce_status: NonceStatus | None = None,
) -> AuthResult:
    """Check ``creds`` for a request with ``method`` against an account's stored HA1 values
    (``client``: the address the request came from, which its nonce must have been issued to;
    ``nonce_status``: the caller's ``nonces.check`` of it already, not computed again).

    ``ha1_by_algorithm`` maps base algorithm names (``"MD5"``, ``"SHA-256"``) to hex HA1, or is
    None for an unknown account; both that and a wrong password give FAIL with the same reason.
    The caller must still compare ``creds.uri`` with the Request-URI and ``creds.username`` with
    the account it looked up.
    """
    if creds.realm != expected_realm:
        return AuthResult(AuthOutcome.FAIL, "realm mismatch")
    algorithm = _canonical_algorithm(creds.algorithm)
    if algorithm is None:
        return AuthResult(AuthOutcome.FAIL, f"unsupported algorithm {creds.algorithm!r}")
    nc_value: int | None = None
    if creds.qop is None:
        if not allow_rfc2069:
            return AuthResult(AuthOutcome.FAIL, "qop missing (RFC 2069 response not allowed)")
        if algorithm.endswith("-sess") and creds.cnonce is None:
            return AuthResult(AuthOutcome.FAIL, "-sess algorithm without cnonce")
    elif creds.qop != "auth":
        return AuthResult(AuthOutcome.FAIL, f"unsupported qop {creds.qop!r}")  # auth-int not offered
    else:
        if creds.nc is None or creds.cnonce is None:  # parse_credentials enforces this already
            return AuthResult(AuthOutcome.FAIL, "qop without nc/cnonce")
        nc_value = int(creds.nc, 16)
        if nc_value == 0:
            return AuthResult(AuthOutcome.FAIL, "nc is zero")
    status = nonce_status if nonce_status is not None else nonces.check(creds.nonce, now, expected_realm, client)
    if status is NonceStatus.INVALID:
        return AuthResult(AuthOutcome.FAIL, "invalid nonce", nc_value)

    base = _base(algorithm)
    stored = ha1_by_algorithm.get(base) if ha1_by_algorithm is not None else None
    known = stored is not None and len(stored) == _HEX_LENGTH[base]
    key = stored if stored is not None and known else _DUMMY_HA1[base]
    method_text = method.decode("ascii", "replace") if isinstance(method, bytes) else method
    expected = digest_response(
        algorithm,
        key,
        creds.nonce,
        method_text,
        creds.uri,
        qop=creds.qop,
        nc=creds.nc,
        cnonce=creds.cnonce if (creds.qop is not None or algorithm.endswith("-sess")) else None,
    )
    given = creds.response.lower().encode("ascii", "replace")
    matches = hmac.compare_digest(expected.encode("ascii"), given) & known
    if not matches:
        return AuthResult(AuthOutcome.FAIL, _MISMATCH, nc_value)
    if status is NonceStatus.STALE:
        return AuthResult(AuthOutcome.STALE, "nonce expired", nc_value)
    return AuthResult(AuthOutcome.OK, "ok", nc_value)
