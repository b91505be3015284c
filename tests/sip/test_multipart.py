"""sipfarm.sip.multipart: the SDP part of a multipart body (RFC 5621, RFC 2046 5.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipfarm.sip.multipart import boundary_of, sdp_part

SDP = b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def body(*parts: bytes, boundary: bytes = b"b1", preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += b"--" + boundary + b"\r\n" + part + b"\r\n"
    return out + b"--" + boundary + b"--\r\n" + epilogue


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        (b"multipart/mixed;boundary=b1", b"b1"),
        (b'Multipart/Mixed; Boundary="a b:c"', b"a b:c"),
        (b"multipart/alternative ; charset=x ; boundary=zz", b"zz"),
        (b"application/sdp;boundary=b1", None),
        (b"multipart/mixed", None),
        (b'multipart/mixed;boundary=""', None),
        (b"multipart/mixed;boundary=" + b"x" * 71, None),
    ],
)
def test_boundary_of(content_type: bytes, boundary: bytes | None) -> None:
    assert boundary_of(content_type) == boundary


def test_the_sdp_part_is_found_among_others_and_replaced_in_place() -> None:
    data = body(
        b"Content-Type: application/ISUP;version=itu-t92+\r\n\r\n\x01\x02\r\n\x03",
        b"content-type: Application/SDP\r\nContent-Disposition: session\r\n\r\n" + SDP,
        preamble=b"preamble\r\n",
        epilogue=b"epilogue",
    )
    part = sdp_part(b"multipart/mixed;boundary=b1", data)
    assert part is not None and part.sdp == SDP
    assert part.before + part.sdp + part.after == data
    replaced = part.with_sdp(b"v=0\r\n")
    assert replaced == data.replace(SDP, b"v=0\r\n")


@pytest.mark.parametrize(
    "data",
    [
        body(b"Content-Type: text/plain\r\n\r\nhello"),  # no SDP part
        body(b"\r\n" + SDP),  # a part without headers is text/plain (RFC 2046 5.1)
        body(b"Content-Type: application/sdp\r\nContent-Length: 12\r\n\r\n" + SDP),  # its own length
        body(b"Content-Type: application/sdp\r\n\r\n" + SDP, boundary=b"other"),  # another boundary
        b"--b1\r\nContent-Type: application/sdp\r\n\r\n" + SDP,  # no delimiter after it
        b"",
    ],
)
def test_no_sdp_part(data: bytes) -> None:
    assert sdp_part(b"multipart/mixed;boundary=b1", data) is None


def test_only_the_first_sixteen_parts_are_looked_at() -> None:
    filler = [b"Content-Type: text/plain\r\n\r\nx"] * 16
    sdp = b"Content-Type: application/sdp\r\n\r\n" + SDP
    assert sdp_part(b"multipart/mixed;boundary=b1", body(*filler, sdp)) is None
    assert sdp_part(b"multipart/mixed;boundary=b1", body(*filler[:15], sdp)) is not None


@given(st.binary(max_size=300), st.binary(max_size=80))
def test_any_body_splits_back_into_itself_or_has_no_part(data: bytes, sdp: bytes) -> None:
    for candidate in (data, body(b"Content-Type: application/sdp\r\n\r\n" + data)):
        part = sdp_part(b"multipart/mixed;boundary=b1", candidate)
        if part is not None:
            assert part.before + part.sdp + part.after == candidate
            assert part.with_sdp(sdp).startswith(part.before) and part.with_sdp(sdp).endswith(part.after)
