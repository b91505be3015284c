"""SIP requests and responses as an ordered list of headers over ``bytes``.

Theory of operation
-------------------
A proxy forwards most headers untouched, so a message keeps each header as
``(key, raw_name, value)``: ``key`` is the lower-case full name (compact forms resolved) used for
look-ups, ``raw_name`` is the name as received (written back as is), ``value`` the raw bytes after
the colon.  Nothing is parsed beyond that until asked; the few structured values the hot path
needs (top Via branch, tags, CSeq) have fast accessors.  Editing (prepend a Via, pop a Route,
decrement Max-Forwards, set a body) changes the list; :meth:`SipMessage.to_bytes` joins it again.
Content-Length always matches the body: :meth:`set_body` keeps it so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

from sipfarm.sip.errors import REASONS, BadMessage, SipError, UnsupportedURIScheme, reason_phrase
from sipfarm.sip.headers import (
    LIST_HEADERS,
    MAX_HEADER_VALUE,
    MAX_LIST_ELEMENTS,
    HeaderError,
    NameAddr,
    Via,
    display_name,
    first_element,
    name_addr_uri,
    parse_name_addr,
    parse_via,
    split_comma,
    tag_of,
)
from sipfarm.sip.uri import URI, UnknownScheme, URIError, parse_uri

try:  # built by scripts/build-compiled.sh only: the interpreted build joins in Python
    from sipfarm.sip._fastparse import join as _join

    HAVE_FASTJOIN = True
except ImportError:  # pragma: no cover - which branch runs depends on the build
    HAVE_FASTJOIN = False

Header = tuple[str, bytes, bytes]  # (key, raw name, value)

SIP_VERSION = b"SIP/2.0"


class SipMessage:
    """A request (``method`` set) or a response (``status`` set)."""

    __slots__ = (
        "_uri",
        "body",
        "cseq",
        "headers",
        "method",
        "reason",
        "size",
        "status",
        "uri",
    )

    def __init__(
        self,
        *,
        method: bytes = b"",
        uri: bytes = b"",
        status: int = 0,
        reason: bytes = b"",
        headers: list[Header] | None = None,
        body: bytes = b"",
        cseq: tuple[int, bytes] | None = None,
    ) -> None:
        self.method = method
        self.uri = uri  # Request-URI as bytes (requests only)
        self.status = status
        self.reason = reason
        self.headers: list[Header] = headers if headers is not None else []
        self.body = body
        # (number, method); validated by the parser, filled lazily for built messages
        self.cseq: tuple[int, bytes] = cseq if cseq is not None else (0, b"")
        self._uri: URI | None = None
        # bytes on the wire when parsed (0 for a built message): what holding it costs, for
        # the transaction layer's memory budget
        self.size = 0

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def request(
        cls,
        method: bytes | str,
        uri: bytes | str,
        headers: Iterable[tuple[str, bytes | str]] = (),
        body: bytes = b"",
    ) -> SipMessage:
        m = method.encode() if isinstance(method, str) else method
        u = uri.encode() if isinstance(uri, str) else uri
        msg = cls(method=m, uri=u)
        for key, value in headers:
            msg.append(key, value)
        msg.set_body(body, None)
        return msg

    def copy(self) -> SipMessage:
        """A shallow copy whose header list can be edited independently."""
        dup = SipMessage(
            method=self.method,
            uri=self.uri,
            status=self.status,
            reason=self.reason,
            headers=list(self.headers),
            body=self.body,
            cseq=self.cseq,
        )
        dup._uri = self._uri
        return dup

    # -- kind ----------------------------------------------------------------------------------

    @property
    def is_request(self) -> bool:
        return self.status == 0

    @property
    def is_response(self) -> bool:
        return self.status != 0

    @property
    def request_uri(self) -> URI:
        """The parsed Request-URI (cached). Raises BadMessage / UnsupportedURIScheme (416)."""
        if self._uri is None:
            try:
                self._uri = parse_uri(self.uri)
            except URIError as exc:
                # One handler, not `except UnknownScheme` then `except URIError`: mypyc would give
                # `exc` the first clause's type and reject a plain URIError in the second.
                if isinstance(exc, UnknownScheme):
                    raise UnsupportedURIScheme(str(exc), partial=self) from None
                raise BadMessage(f"bad Request-URI: {exc}", partial=self) from None
        return self._uri

    def set_uri(self, uri: bytes | URI) -> None:
        if isinstance(uri, bytes):
            self.uri = uri
            self._uri = None
        else:
            self.uri = uri.to_bytes()
            self._uri = uri

    # -- header access -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """First value of header ``key`` (lower-case full name), or None."""
        for k, _, v in self.headers:
            if k == key:
                return v
        return None

    def get_all(self, key: str) -> list[bytes]:
        """Every line's value of header ``key``, in order."""
        return [v for k, _, v in self.headers if k == key]

    def values(self, key: str) -> list[bytes]:
        """Elements of a list header (Via, Route, Contact...) across all its lines."""
        out: list[bytes] = []
        try:
            for k, _, v in self.headers:
                if k == key:
                    out.extend(split_comma(v))
                    if len(out) > MAX_LIST_ELEMENTS:  # repeated lines add up (see headers.py)
                        raise HeaderError(f"more than {MAX_LIST_ELEMENTS} list elements")
        except HeaderError as exc:
            raise BadMessage(f"{key}: {exc}", partial=self) from None
        return out

    def first_value(self, key: str) -> bytes | None:
        """The first element of list header ``key`` (``values(key)[0]``, None when there is
        none), without splitting the rest: the top Route or Via, on every forwarded message.
        The same checks as ``values``: a value with a quoted string goes through it whole."""
        first: bytes | None = None
        for k, _, v in self.headers:
            if k == key:
                if v.find(b'"') >= 0:
                    break  # values() reads (and judges) every line of this header
                if first is None:
                    found = first_element(v)
                    if found is None:
                        break
                    first = found[0]
        else:
            return first
        values = self.values(key)
        return values[0] if values else None

    def has(self, key: str) -> bool:
        for k, _, _ in self.headers:  # noqa: SIM110 - compiled, any() over a generator costs more
            if k == key:
                return True
        return False

    def __contains__(self, key: str) -> bool:
        return self.has(key)

    def __iter__(self) -> Iterator[Header]:
        return iter(self.headers)

    # -- header editing ------------------------------------------------------------------------

    def append(self, key: str, value: bytes | str) -> None:
        val = value.encode("utf-8") if isinstance(value, str) else value
        self.headers.append((key, display_name(key), val))

    def prepend(self, key: str, value: bytes | str) -> None:
        """Insert before the first header named ``key`` (or at the top when there is none)."""
        val = value.encode("utf-8") if isinstance(value, str) else value
        for i, (k, _, _) in enumerate(self.headers):
            if k == key:
                self.headers.insert(i, (key, display_name(key), val))
                return
        self.headers.insert(0, (key, display_name(key), val))

    def prepend_values(self, key: str, values: tuple[bytes, ...]) -> None:
        """Insert the ``values`` lines, in order, before the first header named ``key`` (or at
        the top when there is none): ``prepend`` of each, the last first, in one scan."""
        headers = self.headers
        at = 0
        for i, (k, _, _) in enumerate(headers):
            if k == key:
                at = i
                break
        name = display_name(key)
        for value in reversed(values):  # list.insert: cheaper than a slice assignment here
            headers.insert(at, (key, name, value))

    def set(self, key: str, value: bytes | str) -> None:
        """Replace every ``key`` header with one, kept where the first one stood."""
        val = value.encode("utf-8") if isinstance(value, str) else value
        headers = self.headers
        for i, (k, raw, _) in enumerate(headers):
            if k == key:
                headers[i] = (key, raw, val)
                for j in range(i + 1, len(headers)):
                    if headers[j][0] == key:  # repeats (rare): the list rebuilt without them
                        headers[i + 1 :] = [h for h in headers[i + 1 :] if h[0] != key]
                        break
                return
        headers.append((key, display_name(key), val))

    def remove(self, key: str) -> int:
        before = len(self.headers)
        self.headers = [h for h in self.headers if h[0] != key]
        return before - len(self.headers)

    def pop_first_value(self, key: str) -> bytes | None:
        """Remove and return the first element of list header ``key`` (e.g. the top Route)."""
        for i, (k, raw, v) in enumerate(self.headers):
            if k == key:
                if key in LIST_HEADERS and (v.find(b",") >= 0):
                    found = first_element(v)
                    if found is not None:
                        if found[1]:
                            self.headers[i] = (k, raw, found[1])
                        else:
                            del self.headers[i]
                        return found[0]
                    parts = split_comma(v)
                    if len(parts) > 1:
                        self.headers[i] = (k, raw, b", ".join(parts[1:]))
                        return parts[0]
                del self.headers[i]
                return v
        return None

    def replace_first_value(self, key: str, value: bytes) -> None:
        """Replace the first element of list header ``key`` (e.g. the top Via)."""
        for i, (k, raw, v) in enumerate(self.headers):
            if k == key:
                if key in LIST_HEADERS and (v.find(b",") >= 0):
                    parts = split_comma(v)
                    if len(parts) > 1:
                        self.headers[i] = (k, raw, b", ".join([value, *parts[1:]]))
                        return
                self.headers[i] = (k, raw, value)
                return
        raise KeyError(key)

    def set_body(self, body: bytes, content_type: bytes | str | None) -> None:
        self.body = body
        self.set("content-length", str(len(body)).encode())
        if content_type is not None:
            if body:
                self.set("content-type", content_type)
            else:
                self.remove("content-type")

    # -- fast accessors for the hot path -------------------------------------------------------

    @property
    def call_id(self) -> bytes:
        return self.get("call-id") or b""

    @property
    def top_via_value(self) -> bytes:
        v = self.get("via")
        if v is None:
            return b""
        if v.find(b",") >= 0:
            found = first_element(v)
            if found is not None:
                return found[0]
            try:
                elements = split_comma(v)
            except HeaderError as exc:
                raise BadMessage(f"Via: {exc}", partial=self) from None
            if not elements:  # nothing but commas
                raise BadMessage("empty Via header", partial=self)
            return elements[0]
        return v

    @property
    def top_via(self) -> Via:
        try:
            return parse_via(self.top_via_value)
        except HeaderError as exc:
            raise BadMessage(f"Via: {exc}", partial=self) from None

    @property
    def vias(self) -> list[Via]:
        try:
            return [parse_via(v) for v in self.values("via")]
        except HeaderError as exc:
            raise BadMessage(f"Via: {exc}", partial=self) from None

    @property
    def from_tag(self) -> bytes | None:
        return self._tag("from")

    @property
    def to_tag(self) -> bytes | None:
        return self._tag("to")

    def _tag(self, key: str) -> bytes | None:
        v = self.get(key)
        if v is None:
            return None
        try:
            return tag_of(v)
        except HeaderError as exc:  # tag_of falls back to the full parser on odd spellings
            raise BadMessage(f"{key}: {exc}", partial=self) from None

    @property
    def from_(self) -> NameAddr:
        return self.name_addr("from")

    @property
    def to(self) -> NameAddr:
        return self.name_addr("to")

    def required(self, key: str) -> bytes:
        """The first ``key`` header's value; BadMessage when there is none."""
        value = self.get(key)
        if value is None:
            raise BadMessage(f"missing {key} header", partial=self)
        return value

    def name_addr(self, key: str) -> NameAddr:
        """The first ``key`` header parsed as a name-addr; BadMessage when absent or malformed."""
        try:
            return parse_name_addr(self.required(key))
        except HeaderError as exc:
            raise BadMessage(f"{key}: {exc}", partial=self) from None

    def name_addr_uri(self, key: str) -> URI:
        """``name_addr(key).uri``, without building the name-addr (headers.name_addr_uri)."""
        try:
            return name_addr_uri(self.required(key))
        except HeaderError as exc:
            raise BadMessage(f"{key}: {exc}", partial=self) from None

    def name_addrs(self, key: str) -> list[NameAddr]:
        try:
            return [parse_name_addr(v) for v in self.values(key)]
        except HeaderError as exc:
            raise BadMessage(f"{key}: {exc}", partial=self) from None

    # -- serialisation -------------------------------------------------------------------------

    def start_line(self) -> bytes:
        if self.status:
            return b"SIP/2.0 %d %s" % (self.status, self.reason)
        return self.method + b" " + self.uri + b" SIP/2.0"

    def to_bytes(self) -> bytes:
        if HAVE_FASTJOIN:
            # sipfarm/sip/_fastparse.c: the same bytes in one allocation (None: headers that are
            # not all (str, bytes, bytes), which the Python join below handles or rejects)
            out = _join(self.start_line(), self.headers, self.body)
            if out is not None:
                return out
        return self.to_bytes_reference()

    def to_bytes_reference(self) -> bytes:
        """``to_bytes`` in Python alone (what the C join must match; the interpreted build's)."""
        parts = [self.start_line()]
        parts.extend([raw + b": " + v for _, raw, v in self.headers])
        parts.append(b"")
        parts.append(self.body)
        return b"\r\n".join(parts)

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __repr__(self) -> str:
        if self.status:
            return f"<SipMessage {self.status} {self.cseq[1].decode('latin-1')} {self.call_id!r}>"
        return f"<SipMessage {self.method.decode('latin-1')} {self.uri!r} {self.call_id!r}>"


# -- responses ---------------------------------------------------------------------------------

_COPIED_TO_RESPONSE = ("via", "record-route", "from", "to", "call-id", "cseq")


# errors.REASONS encoded, read from compiled code (errors.py is interpreted: reason_phrase is a frame)
_REASON_BYTES: Final[dict[int, bytes]] = {status: phrase.encode() for status, phrase in REASONS.items()}


def make_response(
    request: SipMessage,
    status: int,
    reason: str | bytes | None = None,
    *,
    to_tag: bytes | None = None,
    headers: Iterable[tuple[str, bytes | str]] = (),
    body: bytes = b"",
    content_type: bytes | None = None,
    record_route: bool = False,
) -> SipMessage:
    """A response to ``request`` per RFC 3261 8.2.6.2: Via, From, To, Call-ID, CSeq copied.

    A To tag is added to responses other than 100 when the request has none (8.2.6.2).
    Record-Route is copied only when asked (UAS dialog-creating 2xx/18x, 12.1.1).
    """
    if reason is None:
        known = _REASON_BYTES.get(status)
        reason_b = known if known is not None else reason_phrase(status).encode()
    elif isinstance(reason, str):
        reason_b = reason.encode("utf-8", "replace")
    else:
        reason_b = reason
    out: list[Header] = []
    for h in request.headers:
        key = h[0]
        if key in _COPIED_TO_RESPONSE:
            if key == "record-route" and not record_route:
                continue
            if key == "to" and to_tag is not None and status != 100 and _lacks_tag(h[2]):
                out.append((key, h[1], h[2] + b";tag=" + to_tag))
                continue
            out.append(h)
    if status == 100:
        ts = request.get("timestamp")  # RFC 3261 8.2.6.1
        if ts is not None:
            out.append(("timestamp", b"Timestamp", ts))
    response = SipMessage(status=status, reason=reason_b, headers=out, cseq=request.cseq)
    for key, value in headers:
        response.append(key, value)
    response.set_body(body, content_type)
    return response


def _lacks_tag(to_value: bytes) -> bool:
    """True when a To value has no tag; a To too broken to read is left as it is."""
    try:
        return tag_of(to_value) is None
    except HeaderError:
        return False  # answering a malformed request (error_response) must not fail


def error_response(request: SipMessage | None, error: SipError, to_tag: bytes) -> SipMessage | None:
    """The one place a :class:`SipError` becomes a SIP response (None: drop, nothing to answer).

    ``request`` may be a partially parsed request (``error.partial``); an answer needs its Via,
    From, To, Call-ID and CSeq, otherwise the request is dropped.
    """
    req = request if request is not None else error.partial
    if error.drop or req is None or not req.is_request or req.method == b"ACK":
        return None  # RFC 3261 17.2.1: never answer an ACK
    for key in ("via", "from", "to", "call-id", "cseq"):
        if not req.has(key):
            return None
    kept: list[Header] = []
    copied: set[str] = set()
    for header in req.headers:
        if header[0] in _SINGLE_IN_RESPONSE:
            if header[0] in copied:
                continue  # a request rejected for repeating it (RFC 4475 3.3.8): one in the answer
            copied.add(header[0])
        elif header[0] == "via":
            if "via" in copied and len(header[2]) > MAX_HEADER_VALUE:
                continue  # an overlong Via below the top one is not echoed (the answer goes by the top)
            copied.add("via")
        kept.append(header)
    if len(kept) != len(req.headers):
        req = SipMessage(method=req.method, uri=req.uri, headers=kept, cseq=req.cseq)
    return make_response(req, error.status, error.reason, to_tag=to_tag, headers=error.headers)


_SINGLE_IN_RESPONSE = frozenset(("from", "to", "call-id", "cseq"))


__all__ = [
    "SIP_VERSION",
    "Header",
    "HeaderError",
    "SipMessage",
    "error_response",
    "make_response",
]
