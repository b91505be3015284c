"""SIP, SIPS and TEL URIs (RFC 3261 19.1, 25.1; RFC 3966)."""

from __future__ import annotations

import ipaddress

import pytest

from sipfarm.sip.memo import BoundedMemo
from sipfarm.sip.uri import SipURI, TelURI, UnknownScheme, URIError, parse_uri


def sip(text: str) -> SipURI:
    uri = parse_uri(text)
    assert isinstance(uri, SipURI)
    return uri


def test_full_sip_uri() -> None:
    uri = sip("sip:alice:secret@example.com:5060;transport=TCP;lr?subject=hi&priority=urgent")
    assert uri.scheme == "sip"
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "example.com"
    assert uri.port == 5060
    assert uri.params == (("transport", "TCP"), ("lr", None))
    assert uri.param("lr") == ""
    assert uri.param("maddr") is None
    assert uri.has_param("transport")
    assert uri.transport == "tcp"
    assert uri.headers == "subject=hi&priority=urgent"
    assert uri.hostport == "example.com:5060"
    assert str(uri) == "sip:alice:secret@example.com:5060;transport=TCP;lr?subject=hi&priority=urgent"


def test_bytes_input_and_round_trip() -> None:
    text = b"sip:bob@192.0.2.4:5070;ob"
    uri = parse_uri(text)
    assert uri.to_bytes() == text


def test_sips_defaults_to_tls_and_sip_to_udp() -> None:
    assert sip("sips:bob@example.com").transport == "tls"
    assert sip("sip:bob@example.com").transport == "udp"


def test_scheme_and_host_are_case_insensitive_user_is_not() -> None:
    uri = sip("SIP:Alice@EXAMPLE.COM")
    assert uri.scheme == "sip"
    assert uri.host == "example.com"
    assert uri.user == "Alice"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("sip:[2001:db8::1]", "[2001:db8::1]", None),
        ("sips:alice@[2001:DB8::1]:5061;transport=tls", "[2001:db8::1]", 5061),
        ("sip:[::ffff:192.0.2.1]:5060", "[::ffff:192.0.2.1]", 5060),
        ("sip:192.0.2.1:5060", "192.0.2.1", 5060),
    ],
)
def test_ip_hosts(text: str, host: str, port: int | None) -> None:
    uri = sip(text)
    assert (uri.host, uri.port) == (host, port)


@pytest.mark.parametrize(
    ("text", "host"),
    [
        # RFC 5118 4.10: RFC 3261's IPv6address ABNF (from RFC 2373) derives an extra colon
        # before an embedded IPv4 address; read as the address RFC 4291 writes with two
        ("sip:user@[2001:db8:::192.0.2.1]", "[2001:db8::192.0.2.1]"),
        ("sip:user@[2001:DB8:::192.0.2.1]:5070", "[2001:db8::192.0.2.1]"),
        ("sip:[:::192.0.2.1]", "[::192.0.2.1]"),
        ("sip:user@[2001:db8::192.0.2.1]", "[2001:db8::192.0.2.1]"),
    ],
)
def test_rfc3261_abnf_extra_colon_before_ipv4_is_read_as_two(text: str, host: str) -> None:
    uri = sip(text)
    assert uri.host == host
    ipaddress.IPv6Address(uri.host[1:-1])  # an address for whoever reads the host (edge, routing)


def test_port_inside_the_brackets_is_part_of_the_address() -> None:
    """RFC 5118 4.3: in ``[2001:db8::10:5070]`` 5070 is the last group, not a port."""
    ambiguous, unambiguous = sip("sip:[2001:db8::10:5070]"), sip("sip:[2001:db8::10]:5070")
    assert (ambiguous.host, ambiguous.port) == ("[2001:db8::10:5070]", None)
    assert (unambiguous.host, unambiguous.port) == ("[2001:db8::10]", 5070)


def test_escaped_user() -> None:
    uri = sip("sip:%61lice%20smith@example.com")
    assert uri.user == "%61lice%20smith"  # kept as written, for forwarding
    assert uri.user_unescaped == "alice smith"
    assert uri.aor == "alice smith@example.com"


def test_user_with_semicolon_params_and_escaped_at() -> None:
    uri = sip("sip:user;par=u%40example.net@example.com")  # RFC 4475 3.1.1.9
    assert uri.user == "user;par=u%40example.net"
    assert uri.host == "example.com"
    assert uri.params == ()


def test_aor_without_user() -> None:
    assert sip("sip:example.com").aor == "example.com"


def test_tel_uri() -> None:
    uri = parse_uri("tel:+1-201-555-0123;phone-context=example.com;isub=1")
    assert isinstance(uri, TelURI)
    assert uri.number == "+1-201-555-0123"
    assert uri.param("phone-context") == "example.com"
    assert uri.aor == "+1-201-555-0123"
    assert str(uri) == "tel:+1-201-555-0123;phone-context=example.com;isub=1"


def test_uri_editing() -> None:
    uri = sip("sip:bob@example.com;transport=udp")
    assert str(uri.with_param("lr")) == "sip:bob@example.com;transport=udp;lr"
    assert str(uri.with_param("transport", "tcp")) == "sip:bob@example.com;transport=tcp"
    assert str(uri.without_param("transport")) == "sip:bob@example.com"
    assert str(uri.replace(port=5080)) == "sip:bob@example.com:5080;transport=udp"


@pytest.mark.parametrize("text", ["mailto:bob@example.com", "http://example.com/", "urn:uuid:1234", "soap.beep://h"])
def test_unknown_scheme(text: str) -> None:
    with pytest.raises(UnknownScheme):
        parse_uri(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sip",
        ":bob@example.com",
        "sip:",
        "sip:@example.com",
        "sip:bob@",
        "sip:bob@example.com:",
        "sip:bob@example.com:abc",
        "sip:bob@example.com:65536",
        "sip:bob@example.com:123456",
        "sip:bob@example.com:\u00b2",  # a digit to str.isdigit(), not to int() (latin-1 0xB2)
        "sip:bob smith@example.com",
        "sip:bob@exa mple.com",
        "sip:bob@<example.com>",
        'sip:"bob"@example.com',
        "sip:bob@[::1",
        "sip:bob@[]",
        "sip:bob@[::1]junk",
        "sip:bob@[zz::1]",
        # an IPv6 reference holds an IPv6 address (RFC 3261 25.1, RFC 4291), not any hex and colons
        "sip:bob@[192.0.2.1]",
        "sip:bob@[::::]",
        "sip:bob@[1:2]",
        "sip:bob@[2001:db8::1::2]",
        "sip:bob@[fe80::1%eth0]",
        "sip:bob@[2001:db8::1.2.3]",
        # RFC 3261's extra colon is tolerated before an embedded IPv4 address only (RFC 5118 4.10)
        "sip:bob@[2001:db8:::10]",
        "sip:bob@[:::1]",
        "sip:bob@[2001:db8::1:::192.0.2.1]",
        "sip:bob@[2001:db8:::192.0.2.1:5]",
        "sip:bob@example.com;=x",
        "sip:bob@example.com;a b=c",
        "sip:a@b@c",
        "sip:a:b:c@d",
        "sip:b\u00e9b@example.com",
        "sip:bob@ex\x00ample.com",
        "tel:",
        "tel:+1 555",
        "sip:bob@example.com\r\n",
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(URIError):
        parse_uri(text)


def test_unknown_scheme_is_a_uri_error() -> None:
    # callers that only care about "usable or not" can catch URIError alone
    assert issubclass(UnknownScheme, URIError)
    assert issubclass(URIError, ValueError)


def test_parse_memo_is_bounded_and_never_keeps_errors():
    calls: list[str] = []

    def parse(text: str) -> str:
        calls.append(text)
        if text == "bad":
            raise ValueError(text)
        return text.upper()

    memo: BoundedMemo[str, str] = BoundedMemo(parse, limit=2)
    assert memo("a") == "A" and memo("a") == "A"
    assert calls == ["a"]
    for _ in range(2):
        with pytest.raises(ValueError):
            memo("bad")
    assert calls == ["a", "bad", "bad"]
    memo("b")
    memo("c")  # full: cleared, then kept
    assert len(memo._data) <= 2
