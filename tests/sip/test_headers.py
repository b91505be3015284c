"""Header-level grammar: compact forms, comma lists, name-addr, Via, tags, CSeq, numbers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipfarm.sip.headers import (
    COMPACT,
    HeaderError,
    check_name_addr,
    check_via,
    display_name,
    first_element,
    is_token,
    name_addr_uri,
    parse_cseq,
    parse_header_params,
    parse_name_addr,
    parse_uint,
    parse_via,
    split_comma,
    split_semicolon,
    tag_of,
    unquote_string,
    via_branch,
)
from sipfarm.sip.parser import header_key
from sipfarm.sip.uri import SipURI, TelURI


@pytest.mark.parametrize(
    ("compact", "full"),
    [
        ("i", "call-id"),
        ("m", "contact"),
        ("f", "from"),
        ("t", "to"),
        ("v", "via"),
        ("l", "content-length"),
        ("c", "content-type"),
        ("k", "supported"),
        ("s", "subject"),
        ("e", "content-encoding"),
        ("o", "event"),
        ("u", "allow-events"),
    ],
)
def test_compact_forms(compact: str, full: str) -> None:
    assert COMPACT[compact] == full
    assert header_key(compact.encode()) == full
    assert header_key(compact.upper().encode()) == full


def test_header_key_is_case_insensitive() -> None:
    assert header_key(b"CALL-ID") == header_key(b"call-id") == header_key(b"Call-Id") == "call-id"
    assert header_key(b"X-Custom-Thing") == "x-custom-thing"


def test_display_names() -> None:
    assert display_name("call-id") == b"Call-ID"
    assert display_name("cseq") == b"CSeq"
    assert display_name("www-authenticate") == b"WWW-Authenticate"
    assert display_name("record-route") == b"Record-Route"
    assert display_name("max-forwards") == b"Max-Forwards"


def test_is_token() -> None:
    assert is_token(b"INVITE")
    assert is_token(b"!interesting-Method0123456789_*+`.%indeed'~")
    assert not is_token(b"")
    assert not is_token(b"IN VITE")
    assert not is_token(b"a:b")
    assert not is_token(b"\xff")


# -- comma lists -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        (b"a, b,c", [b"a", b"b", b"c"]),
        (b"", []),
        (b" , ,, ", []),
        (b'"Doe, John" <sip:j@h>, <sip:k@h>', [b'"Doe, John" <sip:j@h>', b"<sip:k@h>"]),
        (b"<sip:h;x=a,b>, <sip:k>", [b"<sip:h;x=a,b>", b"<sip:k>"]),
        (b'"a \\", b" <sip:x>, c', [b'"a \\", b" <sip:x>', b"c"]),
        (b'"a\\\\", b', [b'"a\\\\"', b"b"]),
        (
            b"SIP/2.0/UDP a;branch=1 , SIP/2.0/TCP b;branch=2",
            [b"SIP/2.0/UDP a;branch=1", b"SIP/2.0/TCP b;branch=2"],
        ),
    ],
)
def test_split_comma(value: bytes, parts: list[bytes]) -> None:
    assert split_comma(value) == parts


def test_split_comma_unterminated_quote() -> None:
    with pytest.raises(HeaderError):
        split_comma(b'"unterminated, x')


# first_element: what split_comma gives first, and the rest it would go on to split, whenever
# it answers at all (None hands the value to split_comma)
_LIST_PIECES = st.lists(st.sampled_from([b"a", b"<", b">", b",", b" ", b'"', b"sip:x;lr", b"\\"]), max_size=12)


@given(_LIST_PIECES)
def test_first_element_agrees_with_split_comma(pieces: list[bytes]) -> None:
    value = b"".join(pieces)
    found = first_element(value)
    if found is None:
        return
    first, rest = found
    parts = split_comma(value)
    assert parts[0] == first
    assert split_comma(rest) == parts[1:]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"<sip:a;lr>, <sip:b;lr>", (b"<sip:a;lr>", b"<sip:b;lr>")),
        (b"<sip:h;x=a,b>, <sip:k>", (b"<sip:h;x=a,b>", b"<sip:k>")),
        (b"SIP/2.0/UDP a;branch=1 , SIP/2.0/TCP b", (b"SIP/2.0/UDP a;branch=1", b"SIP/2.0/TCP b")),
        (b"<sip:a>", (b"<sip:a>", b"")),
        (b'"Doe, John" <sip:j@h>, <sip:k@h>', None),  # quoted: split_comma's
        (b", <sip:a>", None),
        (b"<sip:a>,, <sip:b>", None),
    ],
)
def test_first_element(value: bytes, expected: tuple[bytes, bytes] | None) -> None:
    assert first_element(value) == expected


# -- name-addr / addr-spec -----------------------------------------------------------------------


def test_name_addr_quoted_display_with_escapes() -> None:
    na = parse_name_addr(b'"J Rosenberg \\\\\\"" <sip:jdrosen@example.com>;tag=98asjd8')
    assert na.display == 'J Rosenberg \\"'
    assert na.tag == "98asjd8"
    assert isinstance(na.uri, SipURI) and na.uri.user == "jdrosen"
    assert na.raw_uri == b"sip:jdrosen@example.com"


def test_name_addr_token_display_and_no_lws() -> None:
    assert parse_name_addr(b"Bob Smith <sip:bob@h>").display == "Bob Smith"
    assert parse_name_addr(b"caller<sip:caller@example.com>;tag=323").display == "caller"


def test_addr_spec_params_belong_to_header() -> None:
    na = parse_name_addr(b"sip:bob@example.com;tag=abc;expires=60")
    assert na.display is None
    assert na.params == (("tag", "abc"), ("expires", "60"))
    assert isinstance(na.uri, SipURI) and na.uri.params == ()


def test_name_addr_params_inside_angles_belong_to_uri() -> None:
    na = parse_name_addr(b"<sip:bob@example.com;transport=tcp>;expires=60;q=0.7")
    assert isinstance(na.uri, SipURI)
    assert na.uri.param("transport") == "tcp"
    assert na.param("expires") == "60"
    assert na.param("q") == "0.7"
    assert na.param("transport") is None


def test_name_addr_lws_around_params() -> None:
    na = parse_name_addr(
        b'"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam = newvalue ; secondparam ; q = 0.33'
    )
    assert na.display == 'Quoted string ""'
    assert na.params == (("newparam", "newvalue"), ("secondparam", None), ("q", "0.33"))


def test_name_addr_tel_and_quoted_param() -> None:
    na = parse_name_addr(b'<tel:+15551234>;+sip.instance="<urn:uuid:1>"')
    assert isinstance(na.uri, TelURI)
    assert na.param("+sip.instance") == '"<urn:uuid:1>"'


def test_name_addr_to_bytes_round_trip() -> None:
    na = parse_name_addr(b'"A \\"B\\"" <sip:a@h;lr>;tag=1')
    again = parse_name_addr(na.to_bytes())
    assert again == na


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"<>",
        b"<sip:x@y",
        b'"Mr. J. User <sip:j.user@example.com>',  # RFC 4475 quotbal
        b"Bell, Alexander <sip:a.g.bell@example.com>;tag=43",  # baddn
        b'"Watson, Thomas" < sip:t.watson@example.org >',  # badaspec
        b"sip:user@example.com?Route=%3Csip:sip.example.com%3E",  # regbadct
        b"<sip:a@b> junk",
        b"<sip:a@b>;tag=",
        b"<sip:a@b>;=x",
        b"<sip:a@b>;a b=c",
        b'<sip:a@b>;x="unterminated',
        b"<mailto:a@b>",
        b"sip:a b@c",
    ],
)
def test_bad_name_addr(value: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_name_addr(value)


def test_unquote_string() -> None:
    assert unquote_string('"a\\"b"') == 'a"b'
    assert unquote_string('"plain"') == "plain"
    assert unquote_string("token") == "token"


def test_header_params() -> None:
    assert parse_header_params(b"a=1;B=2;flag") == (("a", "1"), ("b", "2"), ("flag", None))
    assert parse_header_params(b'x="a;b"') == (("x", '"a;b"'),)
    with pytest.raises(HeaderError):
        parse_header_params(b"a=1;;b")


# -- Via ----------------------------------------------------------------------------------------


def test_via_full() -> None:
    via = parse_via(b"SIP/2.0/UDP 192.0.2.1:5060;received=198.51.100.7;rport=40000;branch=z9hG4bKx")
    assert via.transport == "UDP"
    assert via.sent_by == ("192.0.2.1", 5060)
    assert via.branch == "z9hG4bKx"
    assert via.received == "198.51.100.7"
    assert via.rport == "40000"
    assert via.response_address() == ("198.51.100.7", 40000)


def test_via_rport_flag_and_defaults() -> None:
    via = parse_via(b"SIP/2.0/tcp Host.Example.com;rport;branch=z9hG4bKy")
    assert via.transport == "TCP"
    assert via.host == "host.example.com"
    assert via.rport == ""
    assert via.response_address() == ("host.example.com", 5060)


def test_via_lws_in_sent_protocol_and_ipv6() -> None:
    via = parse_via(b"SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw".replace(b"\r\n", b""))
    assert via.transport == "UDP" and via.host == "192.0.2.2" and via.branch == "390skdjuw"
    v6 = parse_via(b"SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKz")
    assert v6.sent_by == ("[2001:db8::9]", 5061)


@pytest.mark.parametrize(
    "value",
    [
        b"SIP/2.0/UDP [192.0.2.1];branch=z9hG4bKa",
        b"SIP/2.0/UDP [::::]:5060;branch=z9hG4bKa",
        b"SIP/2.0/UDP [1:2];branch=z9hG4bKa",
        b"SIP/2.0/UDP [2001:db8:::10];branch=z9hG4bKa",
    ],
)
def test_via_ipv6_sent_by_must_be_an_address(value: bytes) -> None:
    """check_via's one-match shape took any hex and colons in brackets; parse_via decides now."""
    with pytest.raises(HeaderError):
        parse_via(value)
    with pytest.raises(HeaderError):
        check_via(value)


def test_via_ipv6_sent_by_with_rfc3261_extra_colon() -> None:
    """RFC 5118 4.10: ``:::`` before an embedded IPv4 address reads as ``::``."""
    via = parse_via(b"SIP/2.0/UDP [2001:db8:::192.0.2.1]:5070;branch=z9hG4bKa")
    assert via.sent_by == ("[2001:db8::192.0.2.1]", 5070)
    check_via(b"SIP/2.0/UDP [2001:db8:::192.0.2.1]:5070;branch=z9hG4bKa")
    check_via(b"SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255];branch=z9hG4bKa")


def test_via_to_bytes_round_trip() -> None:
    via = parse_via(b"SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx;rport")
    assert parse_via(via.to_bytes()) == via


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"SIP/2.0/UDP",
        b"SIP/2.0 192.0.2.1",
        b"SIP/3.0/UDP 192.0.2.1",
        b"SIP/2.0/UDP 192.0.2.1:99999",
        b"SIP/2.0/UDP 192.0.2.15;;,;,,",
        b"SIP/2.0/UDP host;branch=a;rport=x",
        b"SIP/2.0/UDP host;rport=70000",
        b"SIP/2.0/UDP ho st",
    ],
)
def test_bad_via(value: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_via(value)


def _verdict(check: Callable[[bytes], object], value: bytes) -> bool:
    try:
        check(value)
    except HeaderError:
        return False
    return True


# via-parms near the common shape: each piece from a small alphabet of right and wrong spellings
_VIA_PIECES = st.tuples(
    st.sampled_from([b"SIP/2.0/", b"sip/2.0/", b"SIP/2.0 /", b"SIP/3.0/", b"SIP/2.0"]),
    st.sampled_from([b"UDP", b"tcp", b"WSS", b"SCTPX", b"", b"U/P"]),
    st.sampled_from([b" ", b"  ", b"", b"\t"]),
    st.sampled_from([b"192.0.2.1", b"host.example.com", b"[2001:db8::1]", b"[::1", b"ho st", b"h_x", b""]),
    st.sampled_from([b"", b":5060", b":0", b":65535", b":65536", b":99999", b":123456", b": 5060", b":"]),
    st.lists(
        st.sampled_from(
            [
                b";branch=z9hG4bKx",
                b";rport",
                b";rport=5062",
                b";RPORT=1",
                b";rport=70000",
                b";rport=x",
                b";rport=",
                b";received=127.0.0.2",
                b";maddr=[::1]",
                b';x="q"',
                b';x="q',
                b";",
                b";=",
                b" ;a",
                b";a =b",
                b";b=c:d",
                b";\xc3\xa9",
                b";a=b@c",
                b",",
                b";rport=00001",
                b";rport=123456",
            ]
        ),
        max_size=5,
    ),
)


@settings(max_examples=1000)
@given(_VIA_PIECES)
def test_check_via_agrees_with_parse_via(pieces: tuple[bytes, bytes, bytes, bytes, bytes, list[bytes]]) -> None:
    proto, transport, space, host, port, params = pieces
    value = proto + transport + space + host + port + b"".join(params)
    assert _verdict(check_via, value) == _verdict(parse_via, value), value


# name-addrs near the common shape, from right and wrong spellings of each part
_NAME_ADDR_PIECES = st.tuples(
    st.sampled_from(
        [
            b"",
            b"sipp ",
            b'"Alice" ',
            b'"A <b>" ',
            b'"a\\"b" ',
            b'"\xc3\xa9" ',
            b"Bell, Alexander ",
            b'"x',
            b"a  b ",
            b" ",
            b'""',
            b"tok\x01 ",
        ]
    ),
    st.sampled_from([b"<", b"< ", b""]),
    st.sampled_from(
        [
            b"sip:alice@farm.test",
            b"sips:bob@127.0.0.1:5061",
            b"sip:[::1]:5060",
            b"sip:[127.0.0.1]",
            b"tel:+123",
            b"mailto:a@b",
            b"sip:a b@c",
            b"sip:user@host?Route=x",
            b"sip:%zz@h",
            b"sip:u@h:99999",
            b"sip:u@h;lr",
            b"sip:h;transport=tcp;maddr=[::1]",
            b"",
            b"sip:",
            b"sip:a@b>c",
            b'sip:"q"@h',
        ]
    ),
    st.sampled_from([b">", b" >", b""]),
    st.lists(
        st.sampled_from(
            [
                b";tag=1928301774",
                b";tag=",
                b";tag",
                b";=x",
                b";a b=c",
                b';x="q"',
                b";x=[::1]",
                b";",
                b" ;t=1",
                b" junk",
                b";t=a%b",
                b",",
                b";expires=3600;q=0.5",
            ]
        ),
        max_size=3,
    ),
)


@settings(max_examples=1000)
@given(_NAME_ADDR_PIECES)
def test_check_name_addr_agrees_with_parse_name_addr(pieces: tuple[bytes, bytes, bytes, bytes, list[bytes]]) -> None:
    display, lt, uri, gt, params = pieces
    value = display + lt + uri + gt + b"".join(params)
    assert _verdict(check_name_addr, value) == _verdict(parse_name_addr, value), value


@settings(max_examples=1000)
@given(_NAME_ADDR_PIECES)
def test_name_addr_uri_is_the_parsed_name_addrs_uri(pieces: tuple[bytes, bytes, bytes, bytes, list[bytes]]) -> None:
    display, lt, uri, gt, params = pieces
    value = display + lt + uri + gt + b"".join(params)
    try:
        expected: object = parse_name_addr(value).uri
    except HeaderError as exc:
        expected = ("error", str(exc))
    try:
        got: object = name_addr_uri(value)
    except HeaderError as exc:
        got = ("error", str(exc))
    assert got == expected, value


@pytest.mark.parametrize(
    "value",
    [
        b"SIP/2.0/UDP 127.0.0.2:5062;received=127.0.0.2;rport=5062;branch=z9hG4bK-1234-1-0",
        b"SIP/2.0/UDP 192.0.2.1:99999",
        b"SIP/2.0/UDP host;branch=a;rport=x",
        b"SIP/2.0/UDP host;rport;rport=x",
        b"SIP/2.0/UDP host;rport=70000",
        b"SIP/2.0/UDP host;Rport=1;rport=x",
    ],
)
def test_check_via_matches_parse_via_on_rport_and_ports(value: bytes) -> None:
    assert _verdict(check_via, value) == _verdict(parse_via, value)


@pytest.mark.parametrize(
    ("value", "branch"),
    [
        (b"SIP/2.0/UDP h;branch=z9hG4bKabc", b"z9hG4bKabc"),
        (b"SIP/2.0/UDP h;rport;branch=z9hG4bKabc;received=1.2.3.4", b"z9hG4bKabc"),
        (b"SIP/2.0/UDP h;BRANCH=z9hG4bKabc", b"z9hG4bKabc"),
        (b"SIP/2.0/UDP h ; branch = z9hG4bKsp", b"z9hG4bKsp"),
        (b"SIP/2.0/UDP h", None),
    ],
)
def test_via_branch_fast_path(value: bytes, branch: bytes | None) -> None:
    assert via_branch(value) == branch
    parsed = parse_via(value).branch
    assert (parsed.encode() if parsed is not None else None) == branch


# -- tags, CSeq, numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        (b"<sip:a@b>;tag=1928301774", b"1928301774"),
        (b'"A" <sip:a@b>;x=y;tag=abc;z', b"abc"),
        (b"sip:a@b;tag=1", b"1"),
        (b"<sip:a@b>;TAG=up", b"up"),
        (b"<sip:a@b> ; tag = sp", b"sp"),
        (b"<sip:a@b;tag=inside-uri>", None),
        (b"<sip:a@b>", None),
        (b"", None),
        (b"sip:tagger@b", None),
    ],
)
def test_tag_of(value: bytes, tag: bytes | None) -> None:
    assert tag_of(value) == tag


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (b"1 INVITE", (1, b"INVITE")),
        (b"0009  INVITE", (9, b"INVITE")),
        (b" 2147483647 BYE ", (2147483647, b"BYE")),
        # a dialog's later requests go past 2**31 (RFC 3261 8.1.1.5 bounds the first one)
        (b"2147483648 BYE", (2147483648, b"BYE")),
        (b"4294967295 BYE", (4294967295, b"BYE")),
        (b"00000000001 INVITE", (1, b"INVITE")),  # leading zeros: the same number
    ],
)
def test_cseq(value: bytes, parsed: tuple[int, bytes]) -> None:
    assert parse_cseq(value) == parsed


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"1",
        b"INVITE",
        b"-1 INVITE",
        b"4294967296 INVITE",
        b"36893488147419103232 REGISTER",
        b"000000000000000000001 INVITE",
        b"1 INV ITE",
        b"1 INV:ITE",
        b"\xd9\xa3 INVITE",
    ],
)
def test_bad_cseq(value: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_cseq(value)


def test_parse_uint() -> None:
    assert parse_uint(b" 0068 ", "Max-Forwards", 255) == 68
    for bad in (b"", b"-1", b"1.0", b"256", b"12345678901", b"\xd9\xa3"):
        with pytest.raises(HeaderError):
            parse_uint(bad, "Max-Forwards", 255)


def _outcome(split: Callable[[bytes], list[bytes]], value: bytes) -> list[bytes] | str:
    try:
        return split(value)
    except HeaderError as exc:
        return f"HeaderError: {exc}"


# values of the bytes the splitters act on, short enough for the byte walk; padded with 600
# spaces they take the regex path, which must split them alike
_SPLITTABLE = st.lists(st.sampled_from([b'"', b"\\", b"<", b">", b",", b";", b"a", b" ", b"=x"]), max_size=40).map(
    b"".join
)


@given(_SPLITTABLE)
def test_the_short_and_the_long_split_comma_agree(value: bytes) -> None:
    assert _outcome(split_comma, value) == _outcome(split_comma, value + b" " * 600)


@given(_SPLITTABLE)
def test_the_short_and_the_long_split_semicolon_agree(value: bytes) -> None:
    short, long = _outcome(split_semicolon, value), _outcome(split_semicolon, value + b" " * 600)
    if isinstance(long, list):
        long = [*long[:-1], long[-1][: len(long[-1]) - 600]]
    assert short == long
