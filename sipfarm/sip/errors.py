"""One exception family for SIP failures, each carrying the status to answer.

Every component raises these; exactly one place (:func:`sipfarm.sip.message.error_response`)
turns them into a SIP response.  A :class:`SipError` whose ``status`` is 0 means "drop": no answer
is possible (a malformed response, or a request so broken that Via/Call-ID/CSeq cannot be read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from sipfarm.sip.message import SipMessage

# RFC 3261 21 (and extensions) reason phrases.
REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    429: "Too Many Requests",
    430: "Flow Failed",
    439: "First Hop Lacks Outbound Support",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    493: "Undecipherable",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


def reason_phrase(status: int) -> str:
    """The RFC reason phrase for ``status`` (a class-generic one for unknown codes)."""
    phrase = REASONS.get(status)
    if phrase is not None:
        return phrase
    return REASONS.get(status // 100 * 100, "Unknown")


class SipError(Exception):
    """A SIP-level failure: answer ``status`` (with ``reason``) or, when status is 0, drop.

    ``detail`` names the defect for logs and for the reason phrase of 400 answers (RFC 3261 21.4.1
    allows a more specific phrase), ``partial`` is the message as far as it could be parsed, used to
    build the answer.  ``headers`` are extra header (name, value) pairs for the answer, e.g.
    Retry-After with 503 or Min-Expires with 423.
    """

    status: ClassVar[int] = 500
    counter: ClassVar[str] = "error"

    def __init__(
        self,
        detail: str = "",
        *,
        partial: SipMessage | None = None,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        super().__init__(detail or self.default_reason())
        self.detail = detail
        self.partial = partial
        self.headers = headers

    @classmethod
    def default_reason(cls) -> str:
        return reason_phrase(cls.status) if cls.status else "dropped"

    @property
    def reason(self) -> str:
        """The reason phrase to answer with."""
        return self.default_reason()

    @property
    def drop(self) -> bool:
        return self.status == 0


class MessageDropped(SipError):
    """Input that cannot be answered: silently discarded (and counted)."""

    status = 0
    counter = "dropped"


class BadMessage(SipError):
    """400: malformed request; the reason phrase names the defect."""

    status = 400
    counter = "bad_message"

    @property
    def reason(self) -> str:
        # RFC 3261 21.4.1: "The reason phrase SHOULD identify the syntax problem in more detail".
        if not self.detail:
            return "Bad Request"
        clean = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in self.detail)
        return f"Bad Request ({clean[:80]})"


class ValueTooLong(BadMessage):
    """400: a header value or the Request-URI over the parser's bounds (a message within the
    size limit whose one value would cost a parser many times a benign message's CPU: see
    sipfarm/sip/headers.py MAX_HEADER_VALUE); counted apart from other syntax errors."""

    counter = "value_too_long"


class MessageTooLarge(SipError):
    """413: the message (or its body) exceeds the configured maximum."""

    status = 413
    counter = "too_large"


class UnsupportedURIScheme(SipError):
    status = 416
    counter = "bad_scheme"


class BadExtension(SipError):
    status = 420
    counter = "bad_extension"


class VersionNotSupported(SipError):
    status = 505
    counter = "bad_version"


class ResponseTooLarge(SipError):
    """513: a response would not fit the transport (RFC 3261 21.5.14)."""

    status = 513
    counter = "too_large"


class TooLargeToForward(SipError):
    """513: a request that would no longer fit a UDP datagram once our headers are added
    (RFC 3261 21.5.14; 18.1.1 would switch to TCP, which a stateless hop cannot)."""

    status = 513
    counter = "too_large_to_forward"


class Forbidden(SipError):
    status = 403
    counter = "forbidden"


class TooManyCalls(Forbidden):
    """403: the caller's account has as many calls in progress on this node as it may
    (``max_pending_invites``), or they hold its share of the node's transaction memory
    (``max_pending_invite_bytes``; sipfarm.proxy.pending)."""

    counter = "too_many_calls"

    @property
    def reason(self) -> str:
        return "Too Many Calls"


class NotFound(SipError):
    status = 404
    counter = "not_found"


class TemporarilyUnavailable(SipError):
    status = 480
    counter = "unavailable"


class CallDoesNotExist(SipError):
    status = 481
    counter = "no_transaction"


class NotAcceptableHere(SipError):
    """RFC 3261 21.4.26: the session description cannot be used here (the media relay could
    not read it, RFC 8866): the same offer would fail again, so no Retry-After."""

    status = 488
    counter = "sdp_not_acceptable"


class LoopDetected(SipError):
    status = 482
    counter = "loop"


class TooManyHops(SipError):
    status = 483
    counter = "too_many_hops"


class IntervalTooBrief(SipError):
    status = 423
    counter = "interval_too_brief"


class ServerInternalError(SipError):
    status = 500
    counter = "internal"


class BadGateway(SipError):
    """502: the next hop cannot be reached or resolved."""

    status = 502
    counter = "bad_gateway"


class ServiceUnavailable(SipError):
    """503, normally with Retry-After (Redis down, overload, no node alive)."""

    status = 503
    counter = "unavailable"

    def __init__(
        self,
        detail: str = "",
        *,
        retry_after: int | None = 5,
        partial: SipMessage | None = None,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        extra = headers
        if retry_after is not None:
            extra = (*headers, ("retry-after", str(retry_after).encode()))
        super().__init__(detail, partial=partial, headers=extra)


class NotImplementedMethod(SipError):
    status = 501
    counter = "not_implemented"
