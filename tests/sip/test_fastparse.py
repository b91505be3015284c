"""The C common case of the parser and serialiser (sipfarm/sip/_fastparse.c) against the Python
code it stands in for.

``parse_message`` hands a message to ``split_headers`` first and falls back to the Python parse
(``parse_message_reference`` is that parse alone) when the C answers None; ``to_bytes`` does the
same with ``join``.  For valid messages (the typical and RFC 4475 vectors, generated ones) and
for mutations of them (folding, bare CR/LF, LF-only, repeated single headers, unknown and
compact names, empty values, whitespace around the colon, NUL and high bytes, more than
MAX_HEADERS lines, no blank line, truncation): the same message (start line, headers with raw
names, body, CSeq) or the same exception (class, text, status, partial message) either way, and
the same bytes out.  ``digest_params`` (an Authorization / WWW-Authenticate value) against
``auth._parse_fast`` the same way; ``request_check`` (validate_request's common case) against
the Python checks on generated header values and mutated messages.  The common case must
really be the C's (a C that always said None would pass the rest).

The extension exists only in the compiled build (scripts/test-compiled.sh); the interpreted
stage skips this file (its path is the Python one, tested everywhere else).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_properties import sip_messages

from sipfarm.sip import auth, parser, via
from sipfarm.sip.address import Address
from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import MAX_HEADERS, parse_message, parse_message_reference

fastparse = pytest.importorskip("sipfarm.sip._fastparse")

SCALE = float(os.environ.get("SIPFARM_PROPERTY_SCALE", "1"))
PROPERTY = settings(
    max_examples=int(400 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VECTORS = Path(__file__).resolve().parent / "vectors"
TYPICAL = sorted((VECTORS / "typical").glob("*.sip"))
_FOLD = re.compile(rb"\r\n[ \t]+")
COMMON = [p.read_bytes() for p in TYPICAL]
CORPUS = COMMON + [p.read_bytes() for p in sorted((VECTORS / "rfc4475").glob("*.sip"))]


def split(data: bytes) -> object:
    return fastparse.split_headers(data, parser._KEY_CACHE, parser._WATCHED, parser._SINGLE, MAX_HEADERS)


def summary(msg: SipMessage | None) -> tuple[object, ...] | None:
    if msg is None:
        return None
    return (msg.method, msg.uri, msg.status, msg.reason, list(msg.headers), msg.body, msg.cseq)


def outcome(parse: object, data: bytes) -> tuple[object, ...]:
    try:
        msg = parse(data)  # type: ignore[operator]
    except SipError as exc:
        return ("error", type(exc), str(exc), exc.status, summary(exc.partial))
    return ("parsed", summary(msg), msg.to_bytes())


def check_same(data: bytes) -> None:
    """The C-assisted parse and the Python one agree, the first time a name is seen (the C
    declines, Python parses and caches the name) and the next (the C's turn)."""
    first = outcome(parse_message, data)
    reference = outcome(parse_message_reference, data)
    again = outcome(parse_message, data)
    assert first == reference
    assert again == reference
    if reference[0] == "parsed":
        msg = parse_message(data)
        assert msg.to_bytes() == msg.to_bytes_reference()


# -- the common case is the C's -------------------------------------------------------------------


@pytest.mark.parametrize("path", TYPICAL, ids=[p.stem for p in TYPICAL])
def test_typical_messages_take_the_c_path(path: Path) -> None:
    data = path.read_bytes()
    parse_message_reference(data)  # the names are cached
    got = split(data)
    assert got is not None
    start_line, headers, first, body_start, start = got  # type: ignore[misc]
    msg = parse_message_reference(data)
    assert start_line == data[: data.find(b"\r\n")]
    assert start == (msg.method, msg.uri, msg.status, msg.reason)
    assert headers == msg.headers
    assert [type(item) for item in headers] == [tuple] * len(headers)
    # str and bytes only, untracked at birth: a message kept 32 s by its transaction does not
    # put its header tuples in front of the cyclic GC
    assert not any(gc.is_tracked(item) for item in headers)
    assert first == {key: value for key, _, value in reversed(msg.headers) if key in parser._WATCHED}
    assert data[body_start:].startswith(msg.body)
    assert fastparse.join(msg.start_line(), msg.headers, msg.body) == msg.to_bytes_reference()


@settings(max_examples=int(100 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sip_messages())
def test_generated_unfolded_messages_take_the_c_path(gen: object) -> None:
    data: bytes = gen.data  # type: ignore[attr-defined]
    parse_message_reference(data)
    head = data[: data.find(b"\r\n\r\n")]
    if b"\r\n " in head or b"\r\n\t" in head or head.count(b"\n") != head.count(b"\r"):
        return  # folded, or a value with a CR/LF the generator let through
    names = [line.partition(b":")[0].rstrip(b" \t") for line in head.split(b"\r\n")[1:]]
    if not all(name in parser._KEY_CACHE for name in names):
        # thousands of examples (SIPFARM_PROPERTY_SCALE) fill the cache's slots for names
        # beyond the known ones: a made-up name past them goes the Python way, by design
        event("a name the full cache did not take")
        return
    assert split(data) is not None
    check_same(data)


def test_a_flood_of_made_up_names_leaves_the_known_ones_on_the_c_path() -> None:
    """Thousands of distinct header names (a scanner, or an attacker after a restart) fill the
    cache's slots for unknown names; the names phones send, in every usual spelling, stay
    cached, so their messages keep the C path."""
    for i in range(parser._KEY_CACHE_MAX + 200):
        parse_message(
            b"OPTIONS sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n"
            b"From: <sip:b@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: c\r\n"
            b"CSeq: 1 OPTIONS\r\nX-Flood-%d: v\r\nContent-Length: 0\r\n\r\n" % i
        )
    assert len(parser._KEY_CACHE) == parser._KEY_CACHE_LIMIT
    for data in COMMON:
        assert split(data) is not None
    shouting = (
        b"REGISTER sip:example.com SIP/2.0\r\nVIA: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n"
        b"FROM: <sip:b@example.com>;tag=1\r\nTO: <sip:b@example.com>\r\nCALL-ID: c\r\nCSEQ: 1 REGISTER\r\n"
        b"CONTACT: <sip:b@192.0.2.1>\r\nUSER-AGENT: x\r\nContent-Length: 0\r\n\r\n"
    )
    compact = (
        b"INVITE sip:a@example.com SIP/2.0\r\nv: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n"
        b"f: <sip:b@example.com>;tag=1\r\nt: <sip:a@example.com>\r\ni: c\r\nCSeq: 1 INVITE\r\n"
        b"m: <sip:b@192.0.2.1>\r\nk: path\r\nc: application/sdp\r\nl: 0\r\n\r\n"
    )
    for data in (shouting, compact):
        assert split(data) is not None
        check_same(data)


def test_the_c_declines_what_is_not_the_common_case() -> None:
    base = (VECTORS / "typical" / "invite_sdp.sip").read_bytes()
    parse_message_reference(base)
    assert split(base) is not None
    head, _, body = base.partition(b"\r\n\r\n")
    declined = [
        base.replace(b"\r\n", b"\n"),  # LF only
        head.replace(b"\r\nTo:", b"\r\n To:") + b"\r\n\r\n" + body,  # folding
        head.replace(b"\r\nTo:", b"\rTo:") + b"\r\n\r\n" + body,  # bare CR
        head.replace(b"\r\nTo:", b"\nTo:") + b"\r\n\r\n" + body,  # bare LF
        head + b"\r\nCall-ID: another\r\n\r\n" + body,  # a second, different Call-ID
        head + b"\r\nX-Never-Seen-Before-Zq: 1\r\n\r\n" + body,  # a name not cached yet
        head + b"\r\nno colon here\r\n\r\n" + body,
        head + b"\r\n" + b"Contact: <sip:a@b>\r\n" * MAX_HEADERS + b"\r\n" + body,  # too many
        head + b"\r\n",  # no blank line
        b"\r\n" + base,  # leading CRLF: parse_message strips it before asking
    ]
    for data in declined:
        assert split(data) is None, data[:60]
        check_same(data)
    # MAX_HEADERS lines are the C's, one more is not
    lines = head.count(b"\r\n")  # header lines (the start line has none before it)
    exact = head + b"\r\n" + b"Contact: <sip:a@b>\r\n" * (MAX_HEADERS - lines) + b"\r\n" + body
    assert split(exact) is not None
    over = head + b"\r\n" + b"Contact: <sip:a@b>\r\n" * (MAX_HEADERS - lines + 1) + b"\r\n" + body
    assert split(over) is None
    check_same(over)
    # a repeat with the same value, or of a list header, is the common case
    assert split(head + b"\r\nCall-ID: " + parse_message(base).call_id + b"\r\n\r\n" + body) is not None
    assert split(head + b"\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\n\r\n" + body) is not None


def test_join_declines_what_a_message_does_not_hold() -> None:
    msg = parse_message((VECTORS / "typical" / "invite_sdp.sip").read_bytes())
    start = msg.start_line()
    assert fastparse.join(start, msg.headers, msg.body) == msg.to_bytes_reference()
    for headers in (
        [*msg.headers, ("x-a", b"X-A", bytearray(b"1"))],
        [*msg.headers, ["x-a", b"X-A", b"1"]],
        [*msg.headers, ("x-a", b"X-A")],
        tuple(msg.headers),
    ):
        assert fastparse.join(start, headers, msg.body) is None
    assert fastparse.join(start, msg.headers, bytearray(msg.body)) is None
    assert fastparse.join(bytearray(start), msg.headers, msg.body) is None
    assert fastparse.join(start, [], b"") == start + b"\r\n\r\n"


# -- arbitrary messages: the same answer either way ----------------------------------------------

_SINGLE_NAMES = [b"Call-ID", b"i", b"CSeq", b"From", b"f", b"To", b"t", b"Content-Length", b"l", b"Max-Forwards"]
_OTHER_NAMES = [b"Via", b"v", b"Contact", b"m", b"Subject", b"s", b"Expires", b"Route", b"Supported", b"k"]


@st.composite
def unknown_names(draw: st.DrawFn) -> bytes:
    # a few dozen distinct names: they get cached (the cache is bounded; not filled by this)
    return b"X-Odd-" + str(draw(st.integers(0, 40))).encode()


@st.composite
def header_lines(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(_SINGLE_NAMES + _OTHER_NAMES) | unknown_names())
    if draw(st.booleans()):
        name = name.upper() if draw(st.booleans()) else name.lower()
    before = draw(st.sampled_from([b"", b"", b" ", b"\t", b" \t "]))
    after = draw(st.sampled_from([b" ", b"", b"  ", b"\t", b" \t"]))
    value = draw(
        st.sampled_from([b"", b"1", b"0", b"5 INVITE", b"abc@h", b"<sip:a@b>;tag=1", b"SIP/2.0/UDP h;branch=z9hG4bK1"])
        | st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    )
    trail = draw(st.sampled_from([b"", b"", b" ", b"\t"]))
    return name + before + b":" + after + value + trail


_START_LINES = [
    b"SIP/2.0 200 OK", b"SIP/2.0 200", b"SIP/2.0 200 ", b"SIP/2.0 100 Trying", b"SIP/2.0 699 x y",
    b"SIP/2.0 700 X", b"SIP/2.0 099 X", b"SIP/2.0 99 X", b"SIP/2.0 2000 OK", b"SIP/2.0  200 OK",
    b"sip/2.0 200 OK", b"SIP/2.1 200 OK", b"SIP/2.0 2x0 OK", b"SIP/2.0 200\tOK", b"SIP/2.0 200 \xff\x00",
    b"INVITE sip:a@b SIP/2.0", b"INVITE  sip:a@b SIP/2.0", b"INVITE sip:a b SIP/2.0", b"INVITE sip:a sip/2.0",
    b"INVITE sip:a SIP/2.0 ", b"INV@TE sip:a SIP/2.0", b"SIP/x sip:a SIP/2.0", b"sIp/ sip:a SIP/2.0",
    b"INVITE sip:a SIP/3.0", b"INVITE sip:a", b"X", b"INVITE \xffsip:a SIP/2.0", b"INVITE sip:a SIP/2.00",
    b"INVITE  SIP/2.0", b"INVITE sip:a SIP/2.1", b"INVITE sip:a SIP/2.0x", b"INVITE sip:a SIP/2.",
    b"REGISTER sip:a SIP/2.0", b"ACK tel:+1 SIP/2.0", b"INVITE sip:a\tb SIP/2.0", b" INVITE sip:a SIP/2.0",
]  # fmt: skip


@st.composite
def start_lines(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.sampled_from(_START_LINES))
    first = draw(st.sampled_from([b"SIP/2.0", b"INVITE", b"BYE", b"X-y.z", b"SIP/"]) | st.binary(max_size=8))
    second = draw(st.sampled_from([b"200", b"sip:a@b", b"180", b""]) | st.binary(max_size=6))
    third = draw(st.sampled_from([b"SIP/2.0", b"OK", b"", b"Ringing now"]) | st.binary(max_size=6))
    line = b" ".join([first, second, third])
    return line.replace(b"\r", b"").replace(b"\n", b"")


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    source = draw(st.integers(0, 2))
    if source == 0:
        data = draw(st.sampled_from(COMMON))  # typical traffic: the C's common case
    elif source == 1:
        data = draw(st.sampled_from(CORPUS))  # with RFC 4475's torture messages
    else:
        data = draw(sip_messages()).data  # type: ignore[attr-defined]
        if draw(st.integers(0, 3)):
            data = _FOLD.sub(b" ", data)  # mostly unfolded: the C's
    for _ in range(draw(st.integers(0, 3))):
        op = draw(
            st.sampled_from(
                [
                    "fold", "bare_cr", "bare_lf", "cr_other", "lf_only", "dup_line", "add_line",
                    "many_lines", "exact_lines", "line_ws", "no_blank", "truncate", "byte", "insert",
                    "leading_crlf", "tail", "start_line",
                ]
            )
        )  # fmt: skip
        head_end = data.find(b"\r\n\r\n")
        head_end = len(data) if head_end < 0 else head_end
        crlfs = [i for i in range(head_end - 1) if data[i : i + 2] == b"\r\n"]
        if op == "fold" and crlfs:
            i = draw(st.sampled_from(crlfs)) + 2
            data = data[:i] + draw(st.sampled_from([b" ", b"\t", b"  "])) + data[i:]
        elif op in ("bare_cr", "bare_lf") and head_end:
            i = draw(st.integers(0, head_end))
            data = data[:i] + (b"\r" if op == "bare_cr" else b"\n") + data[i:]
        elif op == "cr_other" and crlfs:
            # a line "ended" by CR and another byte: one line to Python (bare CR)
            i = draw(st.sampled_from(crlfs))
            data = data[:i] + b"\r" + bytes([draw(st.sampled_from([0x20, 0x58, 0x00, 0x0D]))]) + data[i + 2 :]
        elif op == "line_ws" and crlfs:
            # SP/HTAB at the end of a line, or around its colon
            i = draw(st.sampled_from(crlfs))
            if draw(st.booleans()):
                colon = data.rfind(b":", 0, i)
                i = colon + draw(st.integers(0, 1)) if colon > data.rfind(b"\r\n", 0, i) else i
            data = data[:i] + draw(st.sampled_from([b" ", b"\t", b" \t ", b"  "])) + data[i:]
        elif op == "exact_lines" and crlfs:
            # exactly MAX_HEADERS header lines, or one more
            lines = data[:head_end].count(b"\r\n")
            n = MAX_HEADERS - lines + draw(st.integers(-1, 1))
            i = draw(st.sampled_from(crlfs)) + 2
            data = data[:i] + b"Subject: x\r\n" * max(n, 0) + data[i:]
        elif op == "start_line":
            end = data.find(b"\r\n")
            data = draw(start_lines()) + (data[end:] if end >= 0 else b"\r\n")
        elif op == "lf_only":
            data = data[:head_end].replace(b"\r\n", b"\n") + data[head_end:].replace(b"\r\n", b"\n", 1)
        elif op == "dup_line" and crlfs:
            i = draw(st.sampled_from(crlfs)) + 2
            j = data.find(b"\r\n", i)
            line = data[i:j] if j >= 0 else data[i:]
            if draw(st.booleans()):
                line += draw(st.sampled_from([b"x", b"", b" ", b"0"]))
            data = data[:i] + line + b"\r\n" + data[i:]
        elif op == "add_line" and crlfs:
            i = draw(st.sampled_from(crlfs)) + 2
            data = data[:i] + draw(header_lines()) + b"\r\n" + data[i:]
        elif op == "many_lines" and crlfs:
            i = draw(st.sampled_from(crlfs)) + 2
            n = draw(st.sampled_from([MAX_HEADERS - 20, MAX_HEADERS - 12, MAX_HEADERS, MAX_HEADERS + 1, 300]))
            data = data[:i] + b"Subject: x\r\n" * n + data[i:]
        elif op == "no_blank":
            data = data[:head_end] + b"\r\n" + data[head_end + 4 :]
        elif op == "truncate" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif op == "byte" and data:
            i = draw(st.integers(0, len(data) - 1))
            byte = draw(st.sampled_from([0, 0x80, 0xFF, 0x20, 0x09, 0x3A, 0x0D, 0x0A]))
            data = data[:i] + bytes([byte]) + data[i + 1 :]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data = (
                data[:i] + draw(st.sampled_from([b"\x00", b"\xff", b":", b" ", b"\t", b"\r\n", b"\r\n\r\n"])) + data[i:]
            )
        elif op == "leading_crlf":
            data = draw(st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"])) + data
        elif op == "tail":
            data += draw(st.binary(max_size=20))
    return data


@PROPERTY
@given(mutated_messages())
def test_c_assisted_parse_is_the_python_parse(data: bytes) -> None:
    check_same(data)


@PROPERTY
@given(st.sampled_from(CORPUS), st.data())
def test_join_is_the_python_join_after_edits(data: bytes, draw: st.DataObject) -> None:
    try:
        msg = parse_message(data)
    except SipError:
        return
    values = st.binary(max_size=30)
    for _ in range(draw.draw(st.integers(0, 4))):
        op = draw.draw(st.sampled_from(["prepend", "set", "append", "remove", "body", "pop"]))
        key = draw.draw(st.sampled_from(["via", "record-route", "max-forwards", "x-added", "route", "contact"]))
        if op == "prepend":
            msg.prepend(key, draw.draw(values))
        elif op == "set":
            msg.set(key, draw.draw(values))
        elif op == "append":
            msg.append(key, draw.draw(values))
        elif op == "remove":
            msg.remove(key)
        elif op == "body":
            msg.set_body(draw.draw(values), draw.draw(st.none() | st.just(b"application/sdp")))
        else:
            msg.headers = msg.headers[1:]
    assert msg.to_bytes() == msg.to_bytes_reference()
    response = SipMessage(status=draw.draw(st.integers(100, 699)), reason=draw.draw(values), headers=msg.headers)
    assert response.to_bytes() == response.to_bytes_reference()


@pytest.mark.parametrize("line", _START_LINES)
def test_start_line_read_by_the_c_is_the_python_reading(line: bytes) -> None:
    data = line + b"\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n"
    with contextlib.suppress(SipError):
        parse_message_reference(data)  # Via is cached
    got = split(data)
    assert got is not None
    start = got[4]  # type: ignore[index]
    try:
        msg = parser._parse_start_line(line)
    except SipError:
        assert start is None
        return
    assert start in (None, (msg.method, msg.uri, msg.status, msg.reason))
    if line in (b"SIP/2.0 200 OK", b"SIP/2.0 200", b"SIP/2.0 200 ", b"INVITE sip:a@b SIP/2.0", b"ACK tel:+1 SIP/2.0"):
        assert start == (msg.method, msg.uri, msg.status, msg.reason)


# --- Digest credentials and challenges: digest_params against auth._parse_fast -------------------

_DIGEST_COMMON = [
    b'Digest username="alice",realm="bench.test",nonce="AAAAaGVsbG8td29ybGQ",uri="sip:bench.test",'
    b'response="6629fae49393a05397450978507c4ef1",algorithm=MD5,cnonce="0a4f113b",qop=auth,nc=00000001',
    b'digest username = "bob" , realm="r", nonce="n", uri="sip:x", response="", opaque=""',
    b'DIGEST realm="bench.test", nonce="abc", algorithm=SHA-256, qop="auth", stale=true',
    b'Digest\tusername="a"',
    b'Digest username="a", username="b"',
    b'Digest username="a", USERNAME="b"',
    b'Digest username="a",,realm="r"',
    b'Digest username="a", realm="r",',
    b'Digest username="a\\"b"',
    b'Digest username="caf\xc3\xa9", realm="r"',
    b'Digest username="caf\xe9"',
    b'Digest  username="a"',
    b"Basic dXNlcjpwYXNz",
    b"Digest username=a b",
    b'Digest username="a" realm="r"',
    b"Digest a=b",
    b"Digest x=~|^`#$%&'*+-.!",
    b'Digest x="\x7f"',
    b'Digest x="\t"',
    b"Digest x=\x00",
    b"Digest ",
    b"Digest",
    b"Digestx a=b",
    b'Digest x="unterminated',
    b"Digest x=" + b"y" * 300 + b", " + b"n" * 200 + b"=1",
]
_DIGEST_PIECES = [
    b"Digest ",
    b"digest ",
    b"username",
    b"realm",
    b"nonce",
    b"qop",
    b"=",
    b'"',
    b"\\",
    b",",
    b" ",
    b"\t",
    b"\r\n ",
    b"auth",
    b"MD5",
    b"00000001",
    b"\xc3\xa9",
    b"\xff",
    b"\x00",
    b"\x7f",
    b";",
    b":",
    b"@",
    b"(",
    b"a",
]


def _python_digest(value: bytes) -> object:
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None  # not the C's: the Python path decodes (and names a bad UTF-8 byte)
    return auth._parse_fast(text)


@pytest.mark.parametrize("value", _DIGEST_COMMON)
def test_digest_params_read_by_the_c_are_the_python_reading(value: bytes) -> None:
    assert fastparse.digest_params(value) == _python_digest(value)


def test_digest_params_common_case_is_the_cs() -> None:
    assert fastparse.digest_params(_DIGEST_COMMON[0]) is not None
    assert fastparse.digest_params(_DIGEST_COMMON[1]) is not None


@PROPERTY
@given(
    st.one_of(
        st.lists(st.sampled_from(_DIGEST_PIECES), max_size=24).map(b"".join),
        st.tuples(st.sampled_from(_DIGEST_COMMON), st.integers(0, 400), st.binary(max_size=3)).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
        ),
        st.tuples(st.sampled_from(_DIGEST_COMMON), st.integers(0, 400)).map(lambda t: t[0][: t[1]] + t[0][t[1] + 1 :]),
    )
)
def test_digest_params_are_the_python_ones(value: bytes) -> None:
    assert fastparse.digest_params(value) == _python_digest(value)


# -- stamp_via: via._stamp_fast in C ----------------------------------------------------------

_VIA_PIECES = st.sampled_from(
    [
        b"branch=z9hG4bK1",
        b"rport",
        b"RPORT",
        b" rport ",
        b"rport=5",
        b"received=10.0.0.9",
        b"received=127.0.0.2",
        b"Received= 127.0.0.2 ",
        b"received",
        b"ttl=1",
        b"maddr=x",
        b"",
        b" ",
        b"\x0brport",
        b"rport\x0b",
        b'x="q"',
        b"received=127.0.0.2;rport",
        b"=",
        b"rport=",
        b"re ceived=1",
    ]
)
_SENT_BY = st.sampled_from(
    [
        b"127.0.0.2:5062",
        b"127.0.0.2",
        b"HOST.example.com:5060",
        b"host.example.com",
        b" 127.0.0.2:5062 ",
        b"127.0.0.2:",
        b"127.0.0.2:123456",
        b"127.0.0.2:5x",
        b"[::1]:5060",
        b"a b:5060",
        b"a\tb",
        b"",
        b" ",
        b"127.0.0.2:5062:1",
        b"\x0b127.0.0.2",
        b"127.0.0.3:1",
    ]
)


@PROPERTY
@given(
    protocol=st.sampled_from(
        [b"SIP/2.0/UDP", b"SIP/2.0/TCP", b"SIP/2.0/WSS", b"SIP/2.0/", b"sip/2.0/UDP", b"SIP/2.0/UDP "]
    ),
    sent_by=_SENT_BY,
    pieces=st.lists(_VIA_PIECES, max_size=6),
    semicolon=st.booleans(),
    host=st.sampled_from(["127.0.0.2", "127.0.0.3", "host.example.com", "::1"]),
    port=st.integers(0, 65535),
    noise=st.binary(max_size=4),
)
def test_stamp_via_matches_stamp_fast(
    protocol: bytes, sent_by: bytes, pieces: list[bytes], semicolon: bool, host: str, port: int, noise: bytes
) -> None:
    raw = protocol + b" " + sent_by + ((b";" + b";".join(pieces)) if pieces or semicolon else b"") + noise
    expected = via._stamp_fast(raw, Address("udp", host, port))
    got = fastparse.stamp_via(raw, host.encode("ascii"), port)
    assert got == (False if expected is via._SLOW else expected), raw


def test_stamp_via_common_shapes_are_the_cs() -> None:
    assert fastparse.stamp_via(b"SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK1;rport", b"127.0.0.2", 5062) == (
        b"SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK1;rport=5062;received=127.0.0.2"
    )
    assert fastparse.stamp_via(b"SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK1", b"127.0.0.2", 5062) is None
    assert fastparse.stamp_via(b"SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK1", b"127.0.0.2", 5062) == (
        b"SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK1;received=127.0.0.2"
    )
    assert fastparse.stamp_via(b"SIP/2.0/UDP [::1]:5062;branch=z9hG4bK1", b"::1", 5062) is False
    # the host compared without case; an empty parameter list is no parameter
    assert fastparse.stamp_via(b"SIP/2.0/UDP HOST.Example.com:5062;branch=z9hG4bK1", b"host.example.com", 1) is None
    assert (
        fastparse.stamp_via(b"SIP/2.0/UDP 10.0.0.1:5062;", b"127.0.0.2", 1)
        == b"SIP/2.0/UDP 10.0.0.1:5062;received=127.0.0.2"
    )
    assert (
        fastparse.stamp_via(b"SIP/2.0/UDP 10.0.0.1:5062", b"127.0.0.2", 1)
        == b"SIP/2.0/UDP 10.0.0.1:5062;received=127.0.0.2"
    )


# -- request_check: validate_request's common case ----------------------------------------------

# (register_pjsip_auth is not: its Contact has a quoted +sip.instance, the Python checks' to read)
_FAST_REQUESTS = ["ack", "bye", "cancel", "invite_sdp", "options_probe"]


def check_outcome(check: object, msg: SipMessage) -> tuple[object, ...]:
    try:
        check(msg)  # type: ignore[operator]
    except SipError as exc:
        return ("error", type(exc), str(exc), exc.status)
    return ("valid",)


def validate_general(msg: SipMessage) -> None:
    """validate_request as the interpreted build runs it (the Python checks only)."""
    saved = parser.HAVE_FASTPARSE
    parser.HAVE_FASTPARSE = False
    try:
        parser.validate_request(msg)
    finally:
        parser.HAVE_FASTPARSE = saved


def request_check(msg: SipMessage) -> tuple[bytes, ...] | None:
    return fastparse.request_check(msg.headers, msg.call_id)


@pytest.mark.parametrize("name", _FAST_REQUESTS)
def test_typical_requests_are_validated_by_the_c(name: str) -> None:
    msg = parse_message((VECTORS / "typical" / f"{name}.sip").read_bytes())
    validate_general(msg)
    uris = request_check(msg)
    assert uris is not None
    assert uris[:2] == (msg.name_addr("from").raw_uri, msg.name_addr("to").raw_uri)
    assert list(uris[2:]) == [na.raw_uri for na in msg.name_addrs("contact")]


def test_a_sipp_invite_and_register_are_validated_by_the_c() -> None:
    for data in (_SIPP_INVITE, _SIPP_REGISTER):
        msg = parse_message(data)
        assert request_check(msg) is not None


_SIPP_INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1-1-0;rport=5070;received=127.0.0.1,"
    b" SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-ab-1-0;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "alice" <sip:alice@example.com>;tag=1234SIPpTag001\r\n'
    b"To: bob <sip:bob@example.com>\r\n"
    b"Call-ID: 1-1234@127.0.0.1\r\n"
    b"CSeq: 2 INVITE\r\n"
    b"Contact: <sip:alice@127.0.0.1:5060;transport=udp>\r\n"
    b"Content-Length: 0\r\n\r\n"
)
_SIPP_REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-2-2\r\n"
    b"From: <sip:u1@example.com>;tag=2\r\n"
    b"To: <sip:u1@example.com>\r\n"
    b"Call-ID: 2-5@127.0.0.1\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Contact: <sip:u1@127.0.0.1:5061>;expires=3600\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def _with(data: bytes, name: bytes, value: bytes) -> bytes:
    """data with header `name`'s first line's value replaced (or the line added)."""
    lines = data.split(b"\r\n")
    for i, line in enumerate(lines[1:], 1):
        if line.partition(b":")[0].lower() == name.lower():
            lines[i] = name + b": " + value
            return b"\r\n".join(lines)
    return b"\r\n".join([lines[0], name + b": " + value, *lines[1:]])


_DECLINED = [
    (b"Via", b"SIP/2.0/UDP h:65536;branch=z9hG4bK1"),  # port out of range: the reference's
    (b"Via", b"SIP/2.0/UDP h;rport=65536;branch=z9hG4bK1"),
    (b"Via", b"SIP/2.0/UDP h;rport=x;branch=z9hG4bK1"),
    (b"Via", b"SIP/2.0/UDP h;branch=z9hG4bK1;rport=123456"),
    (b"Via", b"SIP/2.0/UDP [::1]:5060;branch=z9hG4bK1"),  # IPv6: parse_via's
    (b"Via", b"SIP / 2.0 / UDP h;branch=z9hG4bK1"),
    (b"Via", b'SIP/2.0/UDP h;branch="q"'),
    (b"Via", b"SIP/2.0/UDP h;branch=z9hG4bK1" + b"," * 40),  # split_comma's comma bound
    (b"Via", b", ".join([b"SIP/2.0/UDP h;branch=z9hG4bK%d" % i for i in range(33)])),
    (b"Via", b"SIP/2.0/UDP h;branch=z9hG4bK1" + b";x" * 40),
    (b"Via", b"SIP/2.0/UDPXY h;branch=z9hG4bK1"),
    (b"Via", b"SIP/2.0/U h;branch=z9hG4bK1"),
    (b"Via", b""),
    (b"From", b"<sip:a@b> ;tag=1"),
    (b"From", b'"a\\"b" <sip:a@b>;tag=1'),
    (b"From", b"a  b <sip:a@b>;tag=1"),
    (b"From", b"sip:a@b;tag=1"),  # an addr-spec: parse_name_addr's
    (b"From", b'<sip:a@b>;tag="1"'),
    (b"From", b"<sip:a@b>;tag="),
    (b"From", b"<sip:a b@b>;tag=1"),
    (b"From", b"<>;tag=1"),
    (b"From", b"<sip:a@b;tag=1"),
    (b"From", b"<sip:a@b>" + b";x" * 40),
    (b"From", b"<sip:a@b>;tag=" + b"1" * 1100),
    (b"To", b""),
    (b"To", b'"\x01" <sip:b@b>'),
    (b"Contact", b"*"),
    (b"Contact", b'<sip:a@b>;+sip.instance="<urn:uuid:1>"'),
    (b"Contact", b"<sip:a@b>, <sip:c@d>"),
    (b"Max-Forwards", b"256"),
    (b"Max-Forwards", b"x"),
    (b"Max-Forwards", b"12345678901"),
    (b"Max-Forwards", b""),
    (b"Call-ID", b"a b"),
    (b"Call-ID", b"a\x7f"),
]


@pytest.mark.parametrize(("name", "value"), _DECLINED)
def test_request_check_declines_what_is_not_the_common_case(name: bytes, value: bytes) -> None:
    try:
        msg = parse_message(_with(_SIPP_INVITE, name, value))
    except SipError:
        return  # refused by the parser already
    assert request_check(msg) is None
    assert check_outcome(parser.validate_request, msg) == check_outcome(validate_general, msg)


_VIA_PARTS = [
    b"SIP/2.0/UDP", b"SIP/2.0/TCP", b"SIP/2.0/WSS", b"SIP/2.0/tls", b"SIP/2.0/", b"sip/2.0/UDP", b" ", b"\t",
    b"127.0.0.1", b"host.example-1.com", b"[::1]", b":5060", b":65535", b":65536", b":0", b":123456",
    b";branch=z9hG4bK-1", b";rport", b";rport=", b";rport=5060", b";RPORT=99999", b";received=1.2.3.4",
    b";x=[a]:b", b";", b"=", b",", b", ", b'"', b"<", b"\x00", b"\xff", b"a", b"1",
]  # fmt: skip
_NAME_ADDR_PARTS = [
    b'"alice"', b'"a b"', b'""', b'"', b"alice", b"a b", b" ", b"<", b">", b"<sip:a@b>", b"<sips:a@b:5061>",
    b"<tel:+1234>", b"<sip:a@b;transport=tcp>", b"<sip:a@b?x=y>", b"<http://x>", b"<sip:a@[::1]>", b"sip:a@b",
    b";tag=1", b";tag=", b";expires=60", b";x=[1]:2", b";", b"=", b",", b"\\", b"\x00", b"\x7f", b"\xc3\xa9", b"\t",
]  # fmt: skip


_VIAS = [
    b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-1;rport=5060;received=127.0.0.1",
    b"SIP/2.0/TCP host.example.com;branch=z9hG4bK-2;rport", b"SIP/2.0/WSS a1b2.invalid;branch=z9hG4bK3",
    b"SIP/2.0/UDP 10.0.0.1:65535;branch=z9hG4bK-4, SIP/2.0/UDP 10.0.0.2;rport=1;branch=z9hG4bK5",
]  # fmt: skip
_NAME_ADDRS = [
    b'"alice" <sip:alice@example.com>;tag=1234SIPpTag001', b"<sip:u1@example.com>;tag=2", b"bob <sip:bob@b:5061>",
    b'"A b" <sips:a@b;transport=tcp>;tag=x;x=[1]:2', b"<tel:+1234>", b"<sip:a@127.0.0.1:5060>;expires=60",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, values: list[bytes], parts: list[bytes]) -> bytes:
    """A common value, mostly kept, with a few parts inserted, replaced or cut."""
    value = draw(st.sampled_from(values))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(value)))
        j = min(len(value), i + draw(st.sampled_from([0, 0, 1, 2, 5])))
        value = value[:i] + draw(st.sampled_from([b"", *parts])) + value[j:]
    return value


@PROPERTY
@given(
    mutated(_VIAS, _VIA_PARTS),
    mutated(_NAME_ADDRS, _NAME_ADDR_PARTS),
    mutated(_NAME_ADDRS, _NAME_ADDR_PARTS),
    st.sampled_from([b"70", b" 70", b"070", b"255", b"256", b"", b"7a", None]),
    st.sampled_from([b"1@h", b"1@h", b"a b", b"\x00", b"", b"x\xff"]),
)
def test_request_check_agrees_with_the_python_checks(
    via_value: bytes, from_value: bytes, contact_value: bytes, max_forwards: bytes | None, call_id: bytes
) -> None:
    headers = [
        ("via", b"Via", via_value),
        ("from", b"From", from_value),
        ("to", b"To", b"<sip:bob@example.com>"),
        ("call-id", b"Call-ID", call_id),
        ("contact", b"Contact", contact_value),
    ]
    if max_forwards is not None:
        headers.append(("max-forwards", b"Max-Forwards", max_forwards))
    msg = SipMessage(method=b"INVITE", uri=b"sip:bob@example.com", headers=headers)
    assert check_outcome(parser.validate_request, msg) == check_outcome(validate_general, msg)
    event("the C's" if request_check(msg) is not None else "the Python checks'")


@PROPERTY
@given(mutated_messages())
def test_validate_request_is_the_python_one_on_mutated_messages(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipError:
        return
    if not msg.is_request:
        return
    assert check_outcome(parser.validate_request, msg) == check_outcome(validate_general, msg)
