"""The SDP part of a ``multipart/*`` body (RFC 5621, RFC 2046 5.1), for the media relays.

SIP-T/SIP-I gateways (ISUP beside the SDP, RFC 3204) and some phones send an offer or answer as
one part of a multipart body. A relay reads and rewrites SDP only: :func:`sdp_part` finds the
part whose Content-Type is ``application/sdp`` and :meth:`SdpPart.with_sdp` puts a rewritten SDP
back in its place, every other byte of the body (the other parts, their headers, the preamble
and epilogue) as it was. Sans-IO, bytes in and out.

Only the top level is searched: a multipart inside a part (``multipart/alternative`` in
``multipart/mixed``) is not opened, and a body whose boundary is missing, whose delimiters are
not found, or which holds no SDP part has none (the caller then leaves the body alone, or
refuses it). The first SDP part is the one (RFC 5621 does not define two offers at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_PARTS: Final = 16  # parts looked at, at most (a body of many tiny parts costs no more)
_SDP_TYPE: Final = b"application/sdp"


@dataclass(frozen=True, slots=True)
class SdpPart:
    """A body split around its SDP part: ``before + sdp + after`` is the body."""

    before: bytes
    sdp: bytes
    after: bytes

    def with_sdp(self, sdp: bytes) -> bytes:
        """The body with ``sdp`` in place of the part's SDP, the part's headers unchanged (a
        part naming its own Content-Length is never taken: see :func:`sdp_part`)."""
        return self.before + sdp + self.after


def boundary_of(content_type: bytes) -> bytes | None:
    """The ``boundary`` parameter of a ``multipart/*`` Content-Type (quoted or not), or None."""
    kind, _, params = content_type.partition(b";")
    if not kind.strip().lower().startswith(b"multipart/"):
        return None
    for param in params.split(b";"):
        name, eq, value = param.partition(b"=")
        if eq and name.strip().lower() == b"boundary":
            value = value.strip()
            if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            # RFC 2046 5.1.1: 1 to 70 characters, none of them a line end
            if 0 < len(value) <= 70 and value.find(b"\r") < 0 and value.find(b"\n") < 0:
                return value
            return None
    return None


def sdp_part(content_type: bytes, body: bytes) -> SdpPart | None:
    """The first ``application/sdp`` part of ``body`` under ``content_type`` (None: not a
    multipart body, malformed, or no SDP part; a part that names its own Content-Length is
    not taken either, since a rewritten SDP would contradict it)."""
    boundary = boundary_of(content_type)
    if boundary is None:
        return None
    delimiter = b"--" + boundary
    # the first delimiter may open the body; every other one follows a line end (RFC 2046 5.1.1)
    at = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter)
    if at < 0:
        return None
    if at > 0:
        at += 2
    for _ in range(MAX_PARTS):
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            return None
        if body[at + len(delimiter) : at + len(delimiter) + 2] == b"--":
            return None  # the close delimiter: no SDP part
        start = line_end + 2  # the part: its headers, a blank line, its body
        end = body.find(b"\r\n" + delimiter, start - 2)
        if end < 0:
            return None  # no delimiter after it
        head_end = body.find(b"\r\n\r\n", start - 2, end)
        if head_end < 0:
            at = end + 2
            continue  # a part without a blank line: malformed, skipped
        headers = body[start:head_end] if head_end >= start else b""
        if _is_sdp(headers):
            return SdpPart(body[: head_end + 4], body[head_end + 4 : end], body[end:])
        at = end + 2
    return None


def _is_sdp(headers: bytes) -> bool:
    """Whether a part's header lines say ``Content-Type: application/sdp`` (and no
    Content-Length of its own)."""
    found = False
    for line in headers.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name in (b"content-type", b"c"):
            found = value.partition(b";")[0].strip().lower() == _SDP_TYPE
        elif name in (b"content-length", b"l"):
            return False
    return found


__all__ = ["MAX_PARTS", "SdpPart", "boundary_of", "sdp_part"]
