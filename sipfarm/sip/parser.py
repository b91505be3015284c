"""Parse SIP messages from bytes (RFC 3261 7, 18.3, 25).

``parse_message`` frames one message (a datagram, or one message the stream framer cut out),
splits the start line and header lines, and checks what every element needs before it can even
answer: the start line, the mandatory headers, CSeq, Content-Length.  It does not parse header
values it does not need; ``validate_request`` goes further (Request-URI, From, To, Via, Contact)
for elements that act on those.

Every defect raises a :class:`~sipfarm.sip.errors.SipError`: a 400 whose reason names it, 413,
416, 505, or "drop" (status 0) when nothing can be answered (a broken response, garbage).
"""

from __future__ import annotations

import re
from typing import ClassVar, Final

from sipfarm.sip.errors import (
    BadExtension,
    BadMessage,
    MessageDropped,
    MessageTooLarge,
    SipError,
    UnsupportedURIScheme,
    ValueTooLong,
    VersionNotSupported,
)
from sipfarm.sip.headers import (
    COMPACT,
    MAX_HEADER_VALUE,
    MAX_LIST_ELEMENTS,
    STRUCTURED,
    HeaderError,
    check_name_addr,
    check_via,
    is_token,
    parse_cseq,
    parse_uint,
)
from sipfarm.sip.memo import MAX_CACHED_KEY
from sipfarm.sip.message import Header, SipMessage
from sipfarm.sip.uri import MAX_URI, SipURI, URIError, parse_uri

try:  # built by scripts/build-compiled.sh only: the interpreted build does it all in Python
    from sipfarm.sip._fastparse import request_check as _request_check
    from sipfarm.sip._fastparse import split_headers as _split_headers

    HAVE_FASTPARSE = True
except ImportError:  # pragma: no cover - which branch runs depends on the build
    HAVE_FASTPARSE = False

MAX_MESSAGE_SIZE = 65535
MAX_HEADERS = 256
# No value of a header sipfarm parses (headers.STRUCTURED, compact or not, each line of a
# repeated one) may be longer than MAX_HEADER_VALUE, nor the Request-URI than MAX_URI (see
# sipfarm/sip/headers.py): a message shorter than both cannot hold one, so the common case
# pays one comparison.
_BOUNDED_BELOW: Final = min(MAX_HEADER_VALUE, MAX_URI)
# What StreamFramer.next_event returns for a CRLFCRLF keep-alive (compare with ``is``).
PING: Final = b"\r\n\r\n"

_FOLD_RE = re.compile(rb"\r?\n[ \t]+")
_SCHEMES_OK = (b"sip:", b"sips:", b"tel:")
_MANDATORY = ("via", "from", "to", "call-id", "cseq")
# Headers that may appear once only (RFC 3261 20); differing repeats are rejected.
_SINGLE = frozenset(("call-id", "from", "to", "cseq", "content-length", "max-forwards"))
# Headers whose first value the parser checks.
_WATCHED = _SINGLE | {"via", "expires"}
_SCHEME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.")

# raw header name -> lower-case full name; bounded so hostile names cannot grow it forever.
# The C common case (_fastparse.split_headers) takes only messages whose names are all in it,
# so the names phones and proxies send are put in first, in the spellings they use (RFC 3261's
# capitalisation, lower and upper case, compact forms): a sender of thousands of made-up names
# can fill the _KEY_CACHE_MAX other slots, never push the everyday names onto the slow path.
_KNOWN_NAMES: Final = (
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Allow-Events",
    "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact", "Content-Disposition",
    "Content-Encoding", "Content-Language", "Content-Length", "Content-Type", "CSeq", "Date", "Error-Info",
    "Event", "Expires", "Flow-Timer", "From", "History-Info", "Identity", "In-Reply-To", "Max-Forwards",
    "Min-Expires", "Min-SE", "MIME-Version", "Organization", "P-Access-Network-Info", "P-Asserted-Identity",
    "P-Preferred-Identity", "Path", "Priority", "Privacy", "Proxy-Authenticate", "Proxy-Authorization",
    "Proxy-Require", "RAck", "Reason", "Record-Route", "Refer-Sub", "Refer-To", "Referred-By", "Reject-Contact",
    "Replaces", "Reply-To", "Request-Disposition", "Require", "Retry-After", "Route", "RSeq", "Server",
    "Service-Route", "Session-Expires", "Session-ID", "SIP-ETag", "SIP-If-Match", "Subject",
    "Subscription-State", "Supported", "Target-Dialog", "Timestamp", "To", "Unsupported", "User-Agent", "Via",
    "Warning", "WWW-Authenticate",
)  # fmt: skip
_KEY_CACHE: dict[bytes, str] = {}
_KEY_CACHE_MAX = 512  # names beyond the known ones


def _seed_key_cache() -> None:
    spellings = [*_KNOWN_NAMES, *COMPACT]
    for name in spellings:
        for raw in {name, name.lower(), name.upper(), "-".join(w.capitalize() for w in name.split("-"))}:
            key = name.lower()
            _KEY_CACHE[raw.encode("ascii")] = COMPACT.get(key, key)


_seed_key_cache()
_KEY_CACHE_LIMIT: Final = len(_KEY_CACHE) + _KEY_CACHE_MAX


def header_key(raw_name: bytes) -> str:
    """Lower-case full header name for ``raw_name`` (compact forms resolved, RFC 3261 7.3.3)."""
    key = _KEY_CACHE.get(raw_name)
    if key is not None:
        return key
    if not is_token(raw_name):
        raise BadMessage(f"bad header name {raw_name[:30]!r}")
    key = raw_name.decode("ascii").lower()
    key = COMPACT.get(key, key)
    if len(_KEY_CACHE) < _KEY_CACHE_LIMIT and len(raw_name) <= MAX_CACHED_KEY:  # 512 x 512 bytes at most
        _KEY_CACHE[raw_name] = key
    return key


def parse_message(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SipMessage:
    """Parse one whole SIP message. Raises SipError (status 0 = drop)."""
    # RFC 3261 7.5: CRLFs before the start line are ignored.
    if data[:1] in (b"\r", b"\n"):
        data = data.lstrip(b"\r\n")
    if not data:
        raise MessageDropped("empty message")
    if HAVE_FASTPARSE:
        # The common case in C (sipfarm/sip/_fastparse.c): CRLF line ends, no folding, known
        # names, no repeated single header.  None: anything else, which the Python code below
        # (the reference) parses or rejects with its own error.
        split = _split_headers(data, _KEY_CACHE, _WATCHED, _SINGLE, MAX_HEADERS)
        if split is not None:
            start = split[4]
            if start is None:
                try:
                    msg = _parse_start_line(split[0])
                except SipError as exc:
                    _answerable(exc, split[1])
                    raise
            else:  # the start line's common form, read by the C as _parse_start_line would
                msg = SipMessage(method=start[0], uri=start[1], status=start[2], reason=start[3])
            msg.headers = split[1]
            return _finish(msg, data, split[3], split[2], max_size)
    return _parse(data, max_size)


def parse_message_reference(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SipMessage:
    """``parse_message`` in Python alone: what the C common case must match (the tests compare
    them; the interpreted build has nothing else)."""
    if data[:1] in (b"\r", b"\n"):
        data = data.lstrip(b"\r\n")
    if not data:
        raise MessageDropped("empty message")
    return _parse(data, max_size)


def _parse(data: bytes, max_size: int) -> SipMessage:
    """The Python parse of ``data`` (not empty, no leading CRLF)."""
    head_end = data.find(b"\r\n\r\n")
    sep = b"\r\n"
    # the first blank line ends the header section, as StreamFramer cuts a stream: a bare-LF
    # sender's (tolerated), or "\r\n\n" (a CRLF line end, then a bare LF blank line: the framer
    # cut such a message and this parser dropped it unanswered, red team 2026-12-03)
    lf_end = data.find(b"\n\n", 0, head_end + 1 if head_end >= 0 else len(data))
    if lf_end >= 0:
        body_start = lf_end + 2
        head_end = lf_end - 1 if lf_end > 0 and data[lf_end - 1] == 0x0D else lf_end
        if data.find(b"\r\n", 0, head_end) < 0:
            sep = b"\n"  # bare-LF sender
    elif head_end >= 0:
        body_start = head_end + 4
    elif data.endswith(b"\r\n"):
        head_end, body_start = len(data) - 2, len(data)  # no blank line, no body
    else:
        raise MessageDropped("no end of headers")
    head = data[:head_end]
    lines = head.split(sep)  # the start line, then the header lines (split once, here)
    if sep == b"\r\n":
        crlf = len(lines) - 1
        if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
            # Mixed line ends: treat every LF as a line end so no header value keeps a bare LF
            # that a peer downstream would read as a line break.
            head = head.replace(b"\r\n", b"\n")
            sep = b"\n"
            lines = head.split(sep)
    try:
        msg = _parse_start_line(lines[0])
    except SipError as exc:
        if exc.partial is not None:
            try:
                _answerable(exc, _parse_headers(lines, sep, exc.partial)[0])
            except SipError:
                pass  # the headers are broken too: what _parse_headers kept, if anything
        raise
    if sep == b"\n" and head.find(b"\r") >= 0:
        # RFC 3261 7: CR only as part of CRLF (a bare CR is a line break to some parsers)
        if msg.is_response:
            raise MessageDropped("bare CR in header section")
        msg.headers = _answer_headers(lines[1:])  # those without a CR: the answer must not carry it
        raise BadMessage("bare CR in header section", partial=msg)
    if _CONTROL(head, len(lines[0])) is not None:
        _refuse_controls(msg, lines)
    headers, first_values = _parse_headers(lines, sep, msg)
    msg.headers = headers
    return _finish(msg, data, body_start, first_values, max_size)


# RFC 3261 25.1: a header value holds no control character but HTAB (TEXT-UTF8, qdtext and ctext
# exclude them), except escaped in a quoted-pair, in a quoted string or a comment: RFC 4475
# 3.1.1.11 ("intmeth") is valid with "BEL:\<BEL> NUL:\<NUL> DEL:\<DEL>" in a display name.
# Forwarded raw, a NUL truncates the value for a C peer and an ESC drives the terminal of
# whoever reads the log.  sipfarm/sip/_fastparse.c declines every line holding one (this code
# judges it).
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]").search


def _refuse_controls(msg: SipMessage, lines: list[bytes]) -> None:
    """MessageDropped (a response) or BadMessage (a request, answered without the lines that
    hold one) for a control character outside a quoted-pair in a header line; nothing when
    every one is escaped."""
    quote = False  # inside a quoted string
    depth = 0  # comment nesting
    bad = False
    for line in lines[1:]:
        if not line or (line[0] != 0x20 and line[0] != 0x09):
            quote, depth = False, 0  # a new header line (not a continuation)
        i, n = 0, len(line)
        while i < n:
            c = line[i]
            if c == 0x5C and (quote or depth):  # backslash: a quoted-pair, any character but CR/LF
                i += 2
                continue
            if c == 0x22 and not depth:
                quote = not quote
            elif c == 0x28 and not quote:
                depth += 1
            elif c == 0x29 and depth:
                depth -= 1
            elif (c < 0x20 and c != 0x09) or c == 0x7F:
                bad = True
                break
            i += 1
        if bad:
            break
    if not bad:
        return
    if msg.is_response:
        raise MessageDropped("control character in header section")
    msg.headers = _answer_headers([line for line in lines[1:] if _CONTROL(line) is None])
    raise BadMessage("control character in header value", partial=msg)


def _finish(msg: SipMessage, data: bytes, body_start: int, first_values: dict[str, bytes], max_size: int) -> SipMessage:
    """Size, body and mandatory headers, once the start line and headers are parsed."""
    if len(data) > max_size:
        raise MessageTooLarge(f"message of {len(data)} bytes", partial=msg if msg.is_request else None)
    if len(data) > _BOUNDED_BELOW:
        _check_bounds(msg)
    body = data[body_start:]
    clen = _content_length(msg, first_values.get("content-length"))
    if clen is not None:
        if clen > len(body):
            # RFC 3261 18.3: a datagram that ends before its body does is an error
            if msg.is_response:
                raise MessageDropped("truncated body in response")
            raise BadMessage("Content-Length larger than body", partial=msg)
        body = body[:clen]
    msg.body = body
    msg.size = len(data)
    _check_mandatory(msg, first_values)
    return msg


def _check_bounds(msg: SipMessage) -> None:
    """ValueTooLong (a drop for a response) for a value over the bounds: before any header
    parser, on the C and the Python path alike."""
    what = ""
    if len(msg.uri) > MAX_URI:
        what = f"Request-URI longer than {MAX_URI} bytes"
    else:
        for key, _, value in msg.headers:
            if len(value) > MAX_HEADER_VALUE and key in STRUCTURED:
                what = f"{key} value longer than {MAX_HEADER_VALUE} bytes"
                break
    if what:
        if msg.is_response:
            raise MessageDropped(what)
        raise ValueTooLong(what, partial=msg)


#: what a Reason-Phrase may not hold: the control characters but HTAB (RFC 3261 25.1)
_REASON_CONTROLS: Final = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"


def _parse_start_line(line: bytes) -> SipMessage:
    if line[:4] == b"SIP/" or line[:4].upper() == b"SIP/":
        # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        version, _, rest = line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version.upper() != b"SIP/2.0":
            raise MessageDropped("response with unsupported SIP version")
        if len(code) != 3 or not code.isdigit() or not (100 <= int(code) <= 699):
            raise MessageDropped("bad status code")
        if reason and len(reason.translate(None, _REASON_CONTROLS)) != len(reason):
            # RFC 3261 25.1: Reason-Phrase = *(reserved / unreserved / escaped / UTF8-NONASCII /
            # UTF8-CONT / SP / HTAB): a NUL or an escape sequence would go on to the caller and
            # into every log that prints it (sipfarm/sip/_fastparse.c declines the same)
            raise MessageDropped("control character in Reason-Phrase")
        return SipMessage(status=int(code), reason=reason)
    parts = line.split(b" ")
    if len(parts) != 3:
        raise MessageDropped("malformed request line") if len(parts) < 2 else _bad_request_line(parts)
    method, uri, version = parts
    if not is_token(method):
        raise MessageDropped("bad method token")
    msg = SipMessage(method=method, uri=uri)
    if version.upper() != b"SIP/2.0":
        if version[:4].upper() == b"SIP/":
            raise VersionNotSupported(f"version {version[:16]!r}", partial=msg)
        raise BadMessage("bad SIP version", partial=msg)
    if not uri:
        raise BadMessage("empty Request-URI", partial=msg)
    return msg


def _answerable(exc: SipError, headers: list[Header]) -> None:
    """Give the request an error in its start line left half-read its headers, so that the 400
    or 505 can be sent: the answer needs Via, From, To, Call-ID and CSeq (RFC 3261 8.2.2, 8.2.6;
    RFC 4475 3.1.2.8-10 and 3.1.2.16 want those answers, not silence)."""
    if exc.partial is not None and exc.partial.is_request and not exc.partial.headers:
        exc.partial.headers = headers


# Vias copied into the answer to a request refused before its header lines were read one by one
# (_answer_headers): as many as a request may carry (MAX_LIST_ELEMENTS, the bound
# validate_request puts on every list); the rest are not echoed (RFC 3261 8.2.6.2 copies them
# all, but such a request's sender gets an answer of bounded size, routable back at least to the
# hop that sent it).
_ANSWER_VIAS = MAX_LIST_ELEMENTS


def _answer_headers(lines: list[bytes]) -> list[Header]:
    """What the 400 to a request refused before its header lines were read one by one (too many
    of them, a continuation line first, a bare CR) needs of it: its Via lines (the first
    ``_ANSWER_VIAS``), and its first From, To, Call-ID and CSeq (RFC 3261 8.2.6.2).  Read
    without raising: a line the parser would reject is skipped, not answered for."""
    kept: list[Header] = []
    seen: set[str] = set()
    vias = 0
    for line in lines:
        colon = line.find(b":")
        if colon <= 0:
            continue
        name = line[:colon].rstrip(b" \t")
        key = _KEY_CACHE.get(name)
        if key is None:
            if not is_token(name) or len(name) > 16:
                continue
            key = name.decode("ascii").lower()
            key = COMPACT.get(key, key)
        if key == "via":
            if vias >= _ANSWER_VIAS:
                continue
            vias += 1
        elif key in _MANDATORY and key not in seen:
            seen.add(key)
        else:
            continue
        value = line[colon + 1 :].strip(b" \t")
        if len(value) > MAX_HEADER_VALUE or value.find(b"\r") >= 0:
            continue  # not echoed: overlong, or a bare CR a reader of the answer would break on
        kept.append((key, name, value))
    return kept


def _bad_request_line(parts: list[bytes]) -> SipError:
    # Whitespace inside the Request-URI (RFC 4475 3.1.2.6 "lwsruri", 3.1.2.7 "lwsstart").
    msg = SipMessage(method=parts[0], uri=b" ".join(parts[1:-1])) if is_token(parts[0]) else None
    if msg is None:
        return MessageDropped("malformed request line")
    return BadMessage("whitespace in Request-URI", partial=msg)


def _parse_headers(head_lines: list[bytes], sep: bytes, msg: SipMessage) -> tuple[list[Header], dict[str, bytes]]:
    """The header list, and the first value of each header ``_check_mandatory`` reads
    (``head_lines``: the header section split on ``sep``, the start line first)."""
    lines = head_lines[1:]
    if not lines or (len(lines) == 1 and not lines[0]):
        return [], {}
    # RFC 3261 7.3.1: a line starting with whitespace continues the previous one.
    for line in lines:
        if line and (line[0] == 0x20 or line[0] == 0x09):
            if lines[0][:1] in (b" ", b"\t"):
                if msg.is_request:
                    msg.headers = _answer_headers(lines)
                raise BadMessage("header section starts with a continuation line", partial=msg)
            lines = _FOLD_RE.sub(b" ", sep.join(lines)).split(sep)
            break
    if len(lines) > MAX_HEADERS:
        if msg.is_response:
            raise MessageDropped("too many header lines")
        msg.headers = _answer_headers(lines)
        raise BadMessage("too many header lines", partial=msg)
    headers: list[Header] = []
    append = headers.append
    cache = _KEY_CACHE
    watched = _WATCHED
    first: dict[str, bytes] = {}
    broken = False
    bad_name = ""  # the first header name that is no token
    repeated = ""  # a single-value header seen twice with different values
    for line in lines:
        colon = line.find(b":")
        if colon < 0:
            # read on: the headers after the broken line (a stray line break inside a value,
            # say) give the 400 its Via, From, To, Call-ID and CSeq (RFC 3261 8.2.2)
            broken = True
            continue
        name = line[:colon]
        key = cache.get(name)
        if key is None:
            name = name.rstrip(b" \t")  # HCOLON = *( SP / HTAB ) ":" SWS
            try:
                key = header_key(name)
            except BadMessage as exc:
                # read on, as for a broken line: the 400 needs the headers after it
                bad_name = bad_name or str(exc)
                continue
        # the value without the whitespace around it: one slice for the usual "name: value"
        # line, strip() (a C scan, not a Python step per byte) for a run of it (red team
        # 2026-12-02: 8 KB of trailing spaces a line cost a Python loop 8,000 steps)
        start = colon + 1
        end = len(line)
        if start < end and line[start] == 0x20:
            start += 1
        if start < end and (
            line[start] == 0x20 or line[start] == 0x09 or line[end - 1] == 0x20 or line[end - 1] == 0x09
        ):
            value = line[start:end].strip(b" \t")
        else:
            value = line[start:end]
        append((key, name, value))
        if key in watched:
            seen = first.get(key)
            if seen is None:
                first[key] = value
            elif seen != value and key in _SINGLE and not repeated:
                # RFC 3261 7.3.1 (RFC 4475 3.3.8 "multi01", 3.3.9 "mcl01"): only list headers
                # may repeat; two Content-Lengths make the framing ambiguous. Read on: the
                # headers after it give the 400 its From, To... (as for a broken line below)
                repeated = key
    if repeated:
        msg.headers = headers
        if msg.is_response:
            raise MessageDropped(f"more than one {repeated} header")
        raise BadMessage(f"more than one {repeated} header", partial=msg)
    if bad_name:
        msg.headers = headers
        raise BadMessage(bad_name, partial=msg)
    if broken:
        msg.headers = headers
        raise BadMessage("header line without colon", partial=msg)
    return headers, first


def _content_length(msg: SipMessage, value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_uint(value, "Content-Length", 2**31)
    except HeaderError as exc:
        if msg.is_response:
            raise MessageDropped(str(exc)) from None
        raise BadMessage(str(exc), partial=msg) from None


def _check_mandatory(msg: SipMessage, first: dict[str, bytes]) -> None:
    """RFC 3261 8.1.1: To, From, CSeq, Call-ID, Via (Max-Forwards is added by proxies if absent)."""
    for key in _MANDATORY:
        if key not in first:
            if msg.is_response:
                raise MessageDropped(f"response without {key}")
            raise BadMessage(f"missing {key} header", partial=msg)
    try:
        msg.cseq = parse_cseq(first["cseq"])
    except HeaderError as exc:
        if msg.is_response:
            raise MessageDropped(str(exc)) from None
        raise BadMessage(str(exc), partial=msg) from None
    if msg.is_request:
        if msg.cseq[1] != msg.method:
            # RFC 3261 8.1.1.5 (RFC 4475 3.1.2.17 "mismatch01")
            raise BadMessage("CSeq method does not match request method", partial=msg)
        call_id = first["call-id"]
        if not call_id or call_id.find(b" ") >= 0 or call_id.find(b"\t") >= 0:
            raise BadMessage("malformed Call-ID", partial=msg)
        for key in ("max-forwards", "expires"):
            value = first.get(key)
            if value is not None:
                try:
                    parse_uint(value, key, 2**32 - 1)
                except HeaderError as exc:
                    raise BadMessage(str(exc), partial=msg) from None
        uri = msg.uri
        if uri[:5].lower() not in _SCHEMES_OK and uri[:4].lower() not in _SCHEMES_OK:
            # RFC 3986 3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
            scheme, colon, _ = uri.partition(b":")
            if not colon or not scheme[:1].isalpha() or not _SCHEME_CHARS.issuperset(scheme):
                raise BadMessage("bad Request-URI", partial=msg)
            raise UnsupportedURIScheme("unsupported Request-URI scheme", partial=msg)


_NOT_IN_WORD: Final = re.compile(rb"[\x00-\x20\x7f]")


def validate_request(msg: SipMessage) -> None:
    """Deeper checks for elements acting on a request: Request-URI, From, To, Via, Contact.

    Raises BadMessage / UnsupportedURIScheme; the parsed values are cached or cheap to redo.
    The common case of everything after the Request-URI is read in C when built
    (``_fastparse.request_check``: the headers' shapes, then each name-addr's URI judged by the
    memoised parse_uri, as check_name_addr does); anything else, and every error, is the
    Python checks' (:func:`validate_request_general`).
    """
    uri = msg.request_uri
    if isinstance(uri, SipURI) and uri.headers:
        # RFC 3261 19.1.1 table: headers are not allowed in a Request-URI (RFC 4475 3.1.2.11)
        raise BadMessage("headers in Request-URI", partial=msg)
    if HAVE_FASTPARSE:
        uris = _request_check(msg.headers, msg.call_id)
        if uris is not None:
            try:
                for raw in uris:
                    parse_uri(raw)
            except URIError:
                pass  # validate_request_general names it
            else:
                return
    validate_request_general(msg)


def validate_request_general(msg: SipMessage) -> None:
    """validate_request after the Request-URI, in Python: the reference the C stands in for."""
    if _NOT_IN_WORD.search(msg.call_id) is not None:
        # RFC 3261 25.1: Call-ID = word ["@" word], no space or control character (a NUL or an
        # escape sequence would reach the logs and every element the request crosses)
        raise BadMessage("Call-ID: space or control character", partial=msg)
    for key in ("from", "to"):
        name_addr = msg.get(key)
        if name_addr is None:
            raise BadMessage(f"missing {key} header", partial=msg)
        _check_name_addr(msg, key, name_addr)
    vias = msg.values("via")
    if not vias:
        raise BadMessage("empty Via header", partial=msg)
    for via in vias:
        try:
            check_via(via)  # msg.vias's verdict, without building every Via
        except HeaderError as exc:
            raise BadMessage(f"Via: {exc}", partial=msg) from None
    contacts = msg.values("contact")
    if contacts != [b"*"]:
        for contact in contacts:
            _check_name_addr(msg, "contact", contact)
    max_forwards = msg.get("max-forwards")
    if max_forwards is not None:
        try:
            parse_uint(max_forwards, "Max-Forwards", 255)
        except HeaderError as exc:
            raise BadMessage(str(exc), partial=msg) from None


#: the option-tags (RFC 3261 19.2) a node understands in Require and Proxy-Require
UNDERSTOOD_OPTIONS: Final = frozenset((b"path", b"outbound", b"gruu", b"100rel", b"timer", b"replaces"))


def require_understood(msg: SipMessage, header: str) -> None:
    """BadExtension (420, with ``Unsupported`` naming them) for the option-tags of ``header``
    (``require`` or ``proxy-require``) that a node does not understand (RFC 3261 8.2.2.3, 16.3
    step 4); the check is case-insensitive (option-tags are tokens)."""
    unknown: list[bytes] = []
    for value in msg.values(header):
        for part in value.split(b","):
            tag = part.strip()
            if tag and tag.lower() not in UNDERSTOOD_OPTIONS and tag not in unknown:
                unknown.append(tag)
    if unknown:
        raise BadExtension(
            f"{header}: {b', '.join(unknown[:8]).decode('latin-1')}",
            partial=msg,
            headers=(("unsupported", b", ".join(unknown[:8])),),
        )


def _check_name_addr(msg: SipMessage, key: str, value: bytes) -> None:
    """``msg.name_addr(key)``'s verdict on ``value``, without building it (check_name_addr)."""
    try:
        check_name_addr(value)
    except HeaderError as exc:
        raise BadMessage(f"{key}: {exc}", partial=msg) from None


def max_forwards(msg: SipMessage) -> int:
    """Max-Forwards of a parsed request (70 when absent, RFC 3261 8.1.1.6)."""
    value = msg.get("max-forwards")
    return 70 if value is None else int(value)


def _framing_partial(head: bytes) -> SipMessage | None:
    """A stream message's header section that could not be framed, parsed as far as it goes
    without its Content-Length lines (the framing's defect): what a 400 or 413 needs (Via, From,
    To, Call-ID, CSeq), or None. Once per connection: the flow is closed after the answer."""
    lines = [
        line.removesuffix(b"\r")
        for line in head.split(b"\n")
        if line.partition(b":")[0].rstrip(b" \t").lower() not in (b"content-length", b"l")
    ]
    try:
        return parse_message(b"\r\n".join(lines) + b"\r\n\r\n")
    except SipError as exc:
        return exc.partial


class StreamFramer:
    """Cuts SIP messages out of a byte stream (TCP, TLS) by Content-Length (RFC 3261 18.3).

    Sans-IO: ``receive_data`` buffers, ``next_event`` returns a whole message's bytes, ``PING``
    for a CRLFCRLF keep-alive (RFC 5626 3.5.1; answer with CRLF), or None when more data is needed.
    Scanning is O(bytes received): the header-end search resumes where it stopped.  A message over
    ``max_size`` or without Content-Length raises SipError (its ``partial``: the header section
    as far as it parses, for the answer); the transport then answers it if it can and closes
    the flow.
    """

    # An alias of the module's PING: a ClassVar, so that a mypyc-compiled build keeps it a class
    # attribute (a plain assignment there becomes a per-instance attribute).
    PING: ClassVar[bytes] = PING

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._scan = 0  # where to resume the search for the end of headers
        self._need = -1  # total length of the message being waited for, once known

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """Whether part of a message is buffered, not only the start of a keep-alive (a lone
        CR, CRLF or CRLFCR).  Meaningful after ``next_event`` returned None."""
        buf = self._buf
        if self._need >= 0:
            return True
        return len(buf) > 0 and not (len(buf) < 4 and buf == b"\r\n\r"[: len(buf)])

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_event(self) -> bytes | None:
        buf = self._buf
        if self._need < 0:
            # between messages: keep-alives and stray CRLFs
            while buf[:2] == b"\r\n":
                if buf[:4] == b"\r\n\r\n":
                    del buf[:4]
                    self._scan = 0
                    return PING
                if len(buf) < 4 and buf == b"\r\n\r"[: len(buf)]:
                    return None  # could still become a ping
                del buf[:2]
            start = max(0, self._scan - 3)
            end = buf.find(b"\r\n\r\n", start)
            # a sender ending its lines with bare LF (RFC 3261 7.5 asks receivers to accept it,
            # as the datagram parser does): its header section ends at the first blank line
            bare = buf.find(b"\n\n", start, end + 1 if end >= 0 else len(buf))
            separator = 4
            if bare >= 0 and (end < 0 or bare < end):
                end, separator = bare, 2
            if end < 0:
                if len(buf) > self.max_size:
                    raise MessageTooLarge("header section larger than the maximum message size")
                self._scan = len(buf)
                return None
            if end + separator > self.max_size:
                # the same answer however the bytes were chunked (see the check above)
                raise MessageTooLarge("header section larger than the maximum message size")
            head = bytes(buf[:end])
            try:
                self._need = end + separator + self._stream_content_length(head)
                if self._need > self.max_size:
                    raise MessageTooLarge(f"message of {self._need} bytes")
            except SipError as exc:
                exc.partial = _framing_partial(head)  # what the answer before closing needs
                raise
        if len(buf) < self._need:
            return None
        message = bytes(buf[: self._need])
        del buf[: self._need]
        self._need = -1
        self._scan = 0
        return message

    @staticmethod
    def _stream_content_length(head: bytes) -> int:
        """The Content-Length of a stream message's header section; ``BadMessage`` when it is
        missing, malformed or given twice with different values."""
        found: bytes | None = None
        for line in head.split(b"\n")[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            name = name.rstrip(b" \t").lower()
            if name in (b"content-length", b"l"):
                value = value.strip()
                if not value.isdigit() or len(value) > 10:
                    raise BadMessage("bad Content-Length")
                if found is not None and found != value:
                    # RFC 4475 3.3.9 "mcl01": the framing is ambiguous; close the flow
                    raise BadMessage("more than one Content-Length")
                found = value
        if found is None:
            # RFC 3261 18.3: Content-Length MUST be used with stream transports
            raise BadMessage("Content-Length required on stream transports")
        return int(found)
