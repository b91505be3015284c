"""Header names and the structured header values a registrar/proxy reads.

Values stay ``bytes`` in the message; these functions parse one value on demand.  Syntax errors
raise :class:`HeaderError` (a ``ValueError``), which the parser or handler turns into a 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from sipfarm.sip.memo import BoundedMemo
from sipfarm.sip.uri import MAX_PARAMS, URI, URIError, ipv6_reference, parse_uri

# RFC 3261 7.3.3 and registered extensions: compact form -> full name (lower case).
COMPACT: dict[str, str] = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
    "a": "accept-contact",
    "j": "reject-contact",
    "d": "request-disposition",
    "y": "identity",
    "n": "identity-info",
}

# How sipfarm writes the names of headers it adds.
DISPLAY: dict[str, bytes] = {
    "call-id": b"Call-ID",
    "cseq": b"CSeq",
    "www-authenticate": b"WWW-Authenticate",
    "mime-version": b"MIME-Version",
    "rack": b"RAck",
    "rseq": b"RSeq",
    "sip-etag": b"SIP-ETag",
    "sip-if-match": b"SIP-If-Match",
}

# Headers whose value is a comma-separated list that may be split across lines (RFC 3261 7.3.1).
LIST_HEADERS = frozenset(
    {
        "via",
        "route",
        "record-route",
        "contact",
        "path",
        "allow",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "content-encoding",
        "allow-events",
        "service-route",
    }
)

# --- What one value may cost -----------------------------------------------------------------
# A red team (2026-12-02) found values the parser reads linearly but slowly per byte: a Via of
# 28 KB of host and 28 KB of spaces (the Via regexes backtrack over both), a From of 14,000
# ";x=y" params, thousands of tiny via-parms on one line: 10-20x the CPU of a benign message
# of the same size (~0.1-0.4 ms for 56 KB).  Every structured value is therefore bounded by a
# length and a count of its separators (bytes.count: one C pass) before any regex or split;
# over a bound is HeaderError (URIError for URIs), answered 400 like any other syntax error.
# The bounds are far above what phones and proxies send: real header values are under 1 KB (a
# Digest Authorization 300-600 bytes, a WebRTC Contact ~250, a farm's Path/Record-Route entry
# with flow token and seal ~250, a Via ~150 with 1-3 spaces), route sets and Via stacks have a
# handful of entries (a 500-entry Route set is abuse, refused before), and
# tests/sip/test_limits.py keeps realistic long values accepted.
MAX_HEADER_VALUE: Final = 8192  # bytes of one header line's value (the parser refuses longer)
MAX_LIST_ELEMENTS: Final = 64  # comma-separated elements of one header name, all its lines
MAX_VIA_PARM: Final = 2048  # bytes of one via-parm
MAX_VIA_LWS: Final = 32  # spaces and tabs in one via-parm (RFC 4475 "wsinv" has 10)
MAX_NAME_ADDR_PARAMS: Final = 2 * MAX_PARAMS  # ';' in one name-addr: its URI's params and its own

# Headers some part of sipfarm parses (by name; compact forms resolve to these keys): the ones
# MAX_HEADER_VALUE bounds.  Others (Subject, Identity, X-...) are forwarded as bytes, never
# parsed, so they are bounded by the message size alone.
STRUCTURED: Final = LIST_HEADERS | frozenset(
    {
        "from",
        "to",
        "call-id",
        "cseq",
        "max-forwards",
        "content-length",
        "content-type",
        "expires",
        "min-expires",
        "session-expires",
        "authorization",
        "proxy-authorization",
        "www-authenticate",
        "proxy-authenticate",
        "event",
        "refer-to",
        "referred-by",
        "reply-to",
        "p-asserted-identity",
        "p-preferred-identity",
        "timestamp",
        "user-agent",
        "reason",
    }
)

_TOKEN_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
# a header parameter's unquoted value: a token, or a host (IPv6 reference, port)
_PARAM_VALUE_BYTES = _TOKEN_BYTES + b"[]:"


class HeaderError(ValueError):
    """A header value that does not follow its grammar."""


def display_name(key: str) -> bytes:
    """The spelling sipfarm uses when it writes header ``key`` (lower-case full name)."""
    name = DISPLAY.get(key)
    if name is None:
        name = "-".join(part.capitalize() for part in key.split("-")).encode("ascii")
        DISPLAY[key] = name
    return name


def is_token(value: bytes) -> bool:
    # every byte in the set: nothing is left once they are deleted (one C pass over the bytes,
    # where a set's issuperset looks each byte up as an int)
    return bool(value) and not value.translate(None, _TOKEN_BYTES)


# The bytes the list and parameter splitters act on, and the rest of a quoted string after its
# opening quote (RFC 3261 25.1: quoted-pair = "\\" any byte): in a long value each found by one
# regex scan in C, so a split costs a Python step per separator, never per byte (a long quoted
# display name or parameter value is skipped whole).  A value of up to _SHORT_VALUE bytes (every
# real one) is walked byte by byte instead: compiled, that loop costs a fraction of the regex
# calls (measured 2026-12-02: split_comma of a quoted name-addr 0.2 us against 2.1 us), and its
# cost is bounded by the length (~25 us interpreted at the bound).
_SHORT_VALUE: Final = 512
_COMMA_SPECIAL: Final = re.compile(rb'[",<>]')
_SEMI_SPECIAL: Final = re.compile(rb'[";]')
_QUOTED_REST: Final = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: no per-byte alternation
# '"', '<' and '>' in one list header value: a WebRTC Contact has 6 (<uri>, +sip.instance's
# quoted <urn>), so 8 per element of MAX_LIST_ELEMENTS is plenty.
_MAX_LIST_SPECIALS: Final = 8 * MAX_LIST_ELEMENTS


def _after_quoted(value: bytes, quote: int) -> int:
    """The index after the closing quote of the quoted string opening at ``quote``."""
    match = _QUOTED_REST.match(value, quote + 1)
    if match is None:
        raise HeaderError("unterminated quoted string")
    return match.end()


def _split_short(value: bytes, sep: int, angles: bool) -> list[bytes]:
    """The byte walk of the splitters, for a value of at most _SHORT_VALUE bytes: the pieces
    between ``sep`` bytes outside quoted strings (and, with ``angles``, outside <...>)."""
    out: list[bytes] = []
    start = 0
    in_quote = False
    in_angle = False
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if in_quote:
            if ch == 0x5C:  # backslash escapes the next byte (quoted-pair)
                i += 1
            elif ch == 0x22:
                in_quote = False
        elif ch == 0x22:
            in_quote = True
        elif angles and ch == 0x3C:
            in_angle = True
        elif angles and ch == 0x3E:
            in_angle = False
        elif ch == sep and not in_angle:
            out.append(value[start:i])
            start = i + 1
        i += 1
    if in_quote:
        raise HeaderError("unterminated quoted string")
    out.append(value[start:])
    return out


def split_comma(value: bytes) -> list[bytes]:
    """Split a header value on commas outside quoted strings and <...> (RFC 3261 7.3.1).

    HeaderError for more than :data:`MAX_LIST_ELEMENTS` commas (quoted or not: a bound)."""
    if value.count(b",") >= MAX_LIST_ELEMENTS:
        raise HeaderError(f"more than {MAX_LIST_ELEMENTS} list elements")
    if value.find(b'"') < 0 and value.find(b"<") < 0:
        return [part.strip() for part in value.split(b",") if part.strip()]
    if len(value) <= _SHORT_VALUE:
        return [stripped for part in _split_short(value, 0x2C, True) if (stripped := part.strip())]
    if value.count(b'"') + value.count(b"<") + value.count(b">") > _MAX_LIST_SPECIALS:
        raise HeaderError("too many quotes and angle brackets in list")
    out: list[bytes] = []
    start = 0
    in_angle = False
    i = 0
    while True:
        found = _COMMA_SPECIAL.search(value, i)
        if found is None:
            break
        i = found.start()
        ch = value[i]
        if ch == 0x22:
            i = _after_quoted(value, i)
            continue
        if ch == 0x3C:
            in_angle = True
        elif ch == 0x3E:
            in_angle = False
        elif not in_angle:  # a comma
            part = value[start:i].strip()
            if part:
                out.append(part)
            start = i + 1
        i += 1
    part = value[start:].strip()
    if part:
        out.append(part)
    return out


def first_element(value: bytes) -> tuple[bytes, bytes] | None:
    """(first element, what follows its comma) of a list header value, without splitting the
    rest: what a proxy reads of a Via or Route (RFC 3261 7.3.1).  The same first element as
    :func:`split_comma`, found with ``bytes.find``; commas inside ``<...>`` are skipped.  The
    rest is returned stripped, b"" when there is none.  None for what only ``split_comma``
    reads right: a quoted string anywhere (it may hide a comma, or be unterminated: the
    error is the full splitter's), or an empty first or second element (``", a"``, ``"a,,b"``).
    """
    if value.find(b'"') >= 0:
        return None
    start = 0
    while True:
        comma = value.find(b",", start)
        if comma < 0:
            first = value.strip()
            return (first, b"") if first else None
        # inside <...> when the last angle bracket before the comma opens one (as split_comma)
        if value.rfind(b"<", 0, comma) > value.rfind(b">", 0, comma):
            close = value.find(b">", comma)
            if close < 0:
                first = value.strip()
                return (first, b"") if first else None
            start = close
            continue
        first = value[:comma].strip()
        rest = value[comma + 1 :].strip()
        if not first or rest[:1] == b",":
            return None
        return first, rest


def split_semicolon(value: bytes) -> list[bytes]:
    """Split on ';' outside quoted strings."""
    if value.find(b'"') < 0:
        return value.split(b";")
    if len(value) <= _SHORT_VALUE:
        return _split_short(value, 0x3B, False)
    out: list[bytes] = []
    start = 0
    i = 0
    while True:
        found = _SEMI_SPECIAL.search(value, i)
        if found is None:
            break
        i = found.start()
        if value[i] == 0x22:
            i = _after_quoted(value, i)
            continue
        out.append(value[start:i])
        start = i + 1
        i += 1
    out.append(value[start:])
    return out


HeaderParams = tuple[tuple[str, str | None], ...]


def parse_header_params(text: bytes) -> HeaderParams:
    """``;name=value`` generic params (text after the first ';'); names lower-cased."""
    if text.count(b";") >= MAX_PARAMS:
        raise HeaderError(f"more than {MAX_PARAMS} header parameters")
    out: list[tuple[str, str | None]] = []
    for piece in split_semicolon(text):
        name, eq, value = piece.partition(b"=")
        name = name.strip()
        if not is_token(name):
            raise HeaderError(f"bad parameter name {name[:20]!r}")
        key = name.decode("ascii").lower()
        if eq:
            value = value.strip()
            if not value:
                raise HeaderError(f"empty value for parameter {key}")
            if value[0] == 0x22:
                if len(value) < 2 or value[-1] != 0x22:
                    raise HeaderError(f"unterminated quoted value for parameter {key}")
            elif value.translate(None, _PARAM_VALUE_BYTES):
                raise HeaderError(f"bad value for parameter {key}")
            out.append((key, value.decode("latin-1")))
        else:
            out.append((key, None))
    return tuple(out)


def get_param(params: HeaderParams, name: str) -> str | None:
    for key, value in params:
        if key == name:
            return "" if value is None else value
    return None


def unquote_string(value: str) -> str:
    """Strip the quotes of a quoted-string and resolve quoted-pairs."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        if "\\" not in inner:
            return inner
        out = []
        i = 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner):
                i += 1
            out.append(inner[i])
            i += 1
        return "".join(out)
    return value


# --- Via (RFC 3261 20.42, 18.2.1; RFC 3581) --------------------------------------------------

# sent-protocol may contain LWS around the slashes (RFC 4475 3.1.1.1 "wsinv").
_VIA_RE = re.compile(
    rb"\s*SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9.!%*_+`'~-]+)\s+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)"
    rb"(?:\s*:\s*([0-9]{1,5}))?\s*(?:;(.*))?\Z",
    re.DOTALL | re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Via:
    transport: str  # upper case: UDP, TCP, TLS, WS, WSS, SCTP
    host: str
    port: int | None
    params: HeaderParams

    @property
    def branch(self) -> str | None:
        return get_param(self.params, "branch")

    @property
    def received(self) -> str | None:
        return get_param(self.params, "received")

    @property
    def rport(self) -> str | None:
        """'' when the rport flag is present without a value (RFC 3581), None when absent."""
        return get_param(self.params, "rport")

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self.host, self.port

    def response_address(self, default_port: int = 5060) -> tuple[str, int]:
        """Where responses go (RFC 3261 18.2.2 with RFC 3581 rport)."""
        host = self.received or self.host
        rport = self.rport
        if rport:
            return host, int(rport)
        return host, self.port or default_port

    def to_bytes(self) -> bytes:
        out = f"SIP/2.0/{self.transport} {self.host}"
        if self.port is not None:
            out += f":{self.port}"
        for key, value in self.params:
            out += f";{key}" if value is None else f";{key}={value}"
        return out.encode("latin-1")


def check_via_bounds(value: bytes) -> None:
    """HeaderError for a via-parm over the bounds (:data:`MAX_VIA_PARM`, :data:`MAX_VIA_LWS`,
    :data:`~sipfarm.sip.uri.MAX_PARAMS`): checked before either Via regex runs."""
    if len(value) > MAX_VIA_PARM:
        raise HeaderError(f"via-parm longer than {MAX_VIA_PARM} bytes")
    if value.count(b" ") + value.count(b"\t") > MAX_VIA_LWS:
        raise HeaderError("too much whitespace in via-parm")
    if value.count(b";") >= MAX_PARAMS:
        raise HeaderError(f"more than {MAX_PARAMS} Via parameters")


def parse_via(value: bytes) -> Via:
    """One via-parm (a single element of a possibly comma-separated Via header)."""
    check_via_bounds(value)
    match = _VIA_RE.match(value)
    if match is None:
        raise HeaderError("malformed Via")
    transport, host, port, params = match.groups()
    port_num = int(port) if port else None
    if port_num is not None and port_num > 65535:
        raise HeaderError("Via port out of range")
    parsed = parse_header_params(params) if params else ()
    rport = get_param(parsed, "rport")
    if rport and (not rport.isdigit() or len(rport) > 5 or int(rport) > 65535):
        raise HeaderError("Via rport is not a port number")  # RFC 3581 4: rport = port
    host_text = host.decode("ascii").lower()
    if host_text[0] == "[":
        try:
            host_text = ipv6_reference(host_text)  # an IPv6 address inside (RFC 5118 4.10's colon aside)
        except URIError:
            raise HeaderError("Via sent-by: bad IPv6 reference") from None
    return Via(
        transport=transport.decode("ascii").upper(),
        host=host_text,
        port=port_num,
        params=parsed,
    )


# The common via-parm, in one strict shape (no LWS, no quotes, a short transport name, a host
# name or IPv4 sent-by: an IPv6 reference is parse_via's to check): every value it matches is
# one parse_via accepts as well when the ports check out (see check_via).
_VIA_COMMON_RE = re.compile(
    rb"SIP/2\.0/[A-Za-z]{2,4} [A-Za-z0-9.-]+(?::([0-9]{1,5}))?"
    rb"(?:;[A-Za-z0-9.!%*_+`'~-]+(?:=[A-Za-z0-9.!%*_+`'~\[\]:-]+)?)*\Z"
)


def check_via(value: bytes) -> None:
    """HeaderError where :func:`parse_via` raises it, without building the Via: one match for
    the common shape (a validating proxy checks every Via of every request), parse_via for
    anything else."""
    check_via_bounds(value)
    match = _VIA_COMMON_RE.match(value)
    if match is not None:
        port = match.group(1)
        if port is None or int(port) <= 65535:
            # the first rport value, when there is one, is a port number (parse_via's check)
            at = value.lower().find(b";rport=")
            if at < 0:
                return
            end = value.find(b";", at + 7)
            rport = value[at + 7 :] if end < 0 else value[at + 7 : end]
            if rport.isdigit() and len(rport) <= 5 and int(rport) <= 65535:
                return
    parse_via(value)


def via_branch(value: bytes) -> bytes | None:
    """Fast path: the branch parameter of a single via-parm, without building a Via."""
    idx = value.find(b";branch=")
    if idx < 0:
        lower = value.lower()
        idx = lower.find(b";branch=")
        if idx < 0:
            idx = lower.find(b"branch")
            if idx < 0:
                return None
            # tolerate LWS around ';' and '=' (rare): fall back to the full parser
            branch = parse_via(value).branch
            return branch.encode("latin-1") if branch is not None else None
    start = idx + 8
    end = start
    n = len(value)
    # an int against a tuple display (mypyc: integer comparisons), not ``value[end] in b"..."``:
    # the branch is read for nearly every message a proxy handles, and a containment test in
    # bytes per character costs a generic call
    while end < n:
        if value[end] in (0x3B, 0x20, 0x2C, 0x09, 0x0D, 0x0A):  # ; SP , HT CR LF
            break
        end += 1
    return value[start:end]


# --- name-addr / addr-spec (From, To, Contact, Route, Record-Route, Path) ---------------------


@dataclass(frozen=True, slots=True)
class NameAddr:
    uri: URI
    display: str | None = None  # unquoted display name
    params: HeaderParams = ()
    raw_uri: bytes = b""  # the URI text as written

    @property
    def tag(self) -> str | None:
        return get_param(self.params, "tag")

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    def to_bytes(self) -> bytes:
        out = b""
        if self.display is not None:
            escaped = self.display.replace("\\", "\\\\").replace('"', '\\"')
            out = b'"' + escaped.encode("utf-8") + b'" '
        out += b"<" + (self.raw_uri or self.uri.to_bytes()) + b">"
        for key, value in self.params:
            out += f";{key}".encode() if value is None else f";{key}={value}".encode("latin-1")
        return out


def _find_unquoted_lt(value: bytes) -> int:
    """The index of the first '<' outside quoted strings, -1 when there is none."""
    i = 0
    while True:
        lt = value.find(b"<", i)
        quote = value.find(b'"', i)
        if quote < 0 or 0 <= lt < quote:
            return lt
        found = _QUOTED_REST.match(value, quote + 1)
        if found is None:
            return -1  # unterminated: no '<' outside quotes
        i = found.end()


def parse_name_addr(value: bytes) -> NameAddr:
    """From/To/Contact/Route element: ``"Name" <uri>;params`` or ``uri;params`` (RFC 3261 20.10).

    Memoised by value like :func:`~sipfarm.sip.uri.parse_uri` (results are immutable; Route
    and Contact values recur in every dialog through the same hops)."""
    check_name_addr_bounds(value)
    return _NAME_ADDRS(value)


def check_name_addr_bounds(value: bytes) -> None:
    """HeaderError for a name-addr over the bounds (:data:`MAX_HEADER_VALUE` bytes,
    :data:`MAX_NAME_ADDR_PARAMS` semicolons): checked before any regex, scan or memo."""
    if len(value) > MAX_HEADER_VALUE:
        raise HeaderError(f"name-addr longer than {MAX_HEADER_VALUE} bytes")
    if value.count(b";") >= MAX_NAME_ADDR_PARAMS:
        raise HeaderError(f"more than {MAX_NAME_ADDR_PARAMS} parameters in name-addr")


# The common name-addr, in one strict shape: an optional display name (tokens, or a quoted string
# without escapes), "<" a URI without LWS or quotes ">", then token parameters.  Its URI is
# parse_uri's to judge (memoised: a phone's From and To URIs recur in every call, their tags
# do not); anything else goes to parse_name_addr (see check_name_addr).
_NAME_ADDR_COMMON_RE = re.compile(
    rb'(?:"[^"\\<>\x00-\x1f\x7f]*" ?|(?:[A-Za-z0-9.!%*_+`\'~-]+ )*)<([^<>"\x00-\x20\x7f]+)>'
    rb"(?:;[A-Za-z0-9.!%*_+`'~-]+(?:=[A-Za-z0-9.!%*_+`'~\[\]:-]+)?)*\Z"
)


def check_name_addr(value: bytes) -> None:
    """HeaderError where :func:`parse_name_addr` raises it, without building (nor memoising) the
    name-addr: a validating proxy checks From and To of every request, and their tags make
    each value new."""
    check_name_addr_bounds(value)
    match = _NAME_ADDR_COMMON_RE.match(value)
    if match is None:
        parse_name_addr(value)
        return
    try:
        parse_uri(match.group(1))
    except URIError as exc:
        raise HeaderError(f"bad URI: {exc}") from None


def name_addr_uri(value: bytes) -> URI:
    """``parse_name_addr(value).uri`` without building the name-addr: the common shape's URI
    through the memoised parse_uri (a From's tag makes every value new, its URI recurs), the
    same HeaderError as parse_name_addr otherwise (check_name_addr's reading)."""
    check_name_addr_bounds(value)
    match = _NAME_ADDR_COMMON_RE.match(value)
    if match is None:
        return parse_name_addr(value).uri
    try:
        return parse_uri(match.group(1))
    except URIError as exc:
        raise HeaderError(f"bad URI: {exc}") from None


def _parse_name_addr(value: bytes) -> NameAddr:
    value = value.strip()
    lt = _find_unquoted_lt(value) if (value.find(b"<") >= 0) else -1
    display: str | None = None
    if lt >= 0:
        gt = value.find(b">", lt)
        if gt < 0:
            raise HeaderError("missing '>' in name-addr")
        disp = value[:lt].strip()
        if disp:
            if disp[0] == 0x22:
                if len(disp) < 2 or disp[-1] != 0x22:
                    raise HeaderError("bad quoted display name")
                display = unquote_string(disp.decode("utf-8", "replace"))
            else:
                # display-name as *(token LWS): tokens only
                for word in disp.split():
                    if not is_token(word):
                        raise HeaderError("bad display name (quote it)")
                display = disp.decode("utf-8", "replace")
        raw_uri = value[lt + 1 : gt]
        if raw_uri[:1] in (b" ", b"\t") or raw_uri[-1:] in (b" ", b"\t"):
            # RFC 3261 25.1: no LWS inside "<" addr-spec ">" (RFC 4475 3.1.2.14 "badaspec")
            raise HeaderError("whitespace inside <...>")
        rest = value[gt + 1 :].strip()
        if rest and rest[0] != 0x3B:
            raise HeaderError("junk after '>' in name-addr")
        params = rest[1:] if rest else b""
    else:
        if value[:1] == b'"':
            raise HeaderError("display name without <uri>")
        # addr-spec: the URI cannot contain ';' params, they belong to the header (RFC 3261 20.10)
        raw_uri, _, params = value.partition(b";")
        raw_uri = raw_uri.strip()
        if any(c in raw_uri for c in b" \t,?"):
            raise HeaderError("addr-spec with reserved characters must use <uri>")
    try:
        uri = parse_uri(raw_uri)
    except URIError as exc:
        raise HeaderError(f"bad URI: {exc}") from None
    return NameAddr(
        uri=uri,
        display=display,
        params=parse_header_params(params) if params else (),
        raw_uri=raw_uri,
    )


def tag_of(value: bytes) -> bytes | None:
    """Fast path: the tag parameter of a From/To value (after the URI)."""
    gt = value.rfind(b">")
    params = value[gt + 1 :] if gt >= 0 else value
    if not params:
        return None  # "<...>" and nothing after: an initial request's To (what follows finds no tag)
    idx = params.find(b";tag=")
    if idx < 0:
        idx = params.lower().find(b"tag")
        if idx < 0:
            return None
        tag = parse_name_addr(value).tag
        return tag.encode("latin-1") if tag else None
    start = idx + 5
    end = start
    n = len(params)
    while end < n:  # see via_branch
        if params[end] in (0x3B, 0x20, 0x09):  # ; SP HT
            break
        end += 1
    return params[start:end] or None


# --- CSeq, Max-Forwards, Content-Length, Expires ----------------------------------------------

# RFC 3261 20.16: "a single decimal sequence number" that 8.1.1.5 asks to be "expressible as a
# 32-bit unsigned integer"; its "less than 2**31" is for the first request a UAC sends, and a
# dialog's later requests go past it (a BYE at 2**31 refused left a call that began at
# 2**31 - 1 up, red team 2026-12-03)
_MAX_CSEQ = 2**32


def parse_cseq(value: bytes) -> tuple[int, bytes]:
    parts = value.split()
    if len(parts) != 2:
        raise HeaderError("malformed CSeq")
    number, method = parts
    # leading zeros are digits of the same number ("00000000001" is 1); bounded all the same
    if not number.isdigit() or len(number) > 20 or len(number.lstrip(b"0")) > 10:
        raise HeaderError("CSeq number is not a 32-bit integer")
    seq = int(number)
    if seq >= _MAX_CSEQ:
        raise HeaderError("CSeq number too large")
    if not is_token(method):
        raise HeaderError("bad CSeq method")
    return seq, method


def parse_uint(value: bytes, name: str, maximum: int) -> int:
    value = value.strip()
    if not value.isdigit() or len(value) > 10:
        raise HeaderError(f"{name} is not a number")
    number = int(value)
    if number > maximum:
        raise HeaderError(f"{name} too large")
    return number


_NAME_ADDRS: BoundedMemo[bytes, NameAddr] = BoundedMemo(_parse_name_addr)
