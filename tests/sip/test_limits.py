"""The bounds on what one header value or URI may cost (sipfarm/sip/headers.py, "What one value
may cost"): each crafted shape of the red team's (2026-12-02) is refused with a 400 naming the
bound, before any parser reads it whole; realistic long values still pass."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sipfarm.sip.errors import BadMessage, SipError
from sipfarm.sip.headers import MAX_LIST_ELEMENTS, MAX_VIA_LWS
from sipfarm.sip.message import error_response
from sipfarm.sip.parser import parse_message, validate_request
from sipfarm.sip.uri import MAX_PARAMS


def request(*, via: str = "SIP/2.0/UDP 192.0.2.5:5062;rport", from_: str = "<sip:alice@farm.test>;tag=a1",
            extra: str = "", uri: str = "sip:bob@farm.test", method: str = "INVITE") -> bytes:
    return (
        f"{method} {uri} SIP/2.0\r\nVia: {via};branch=z9hG4bK776\r\nMax-Forwards: 70\r\n"
        f"From: {from_}\r\nTo: <sip:bob@farm.test>\r\nCall-ID: c1@h\r\nCSeq: 1 {method}\r\n{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


CRAFTED = {
    "via_host_spaces_56k": (request(via="SIP/2.0/UDP " + "h" * 28000 + " " * 28000), "longer than"),
    "via_host_8k": (request(via="SIP/2.0/UDP " + "h" * 4000), "longer than"),
    "via_lws_run": (request(via="SIP/2.0/UDP h" + " " * (MAX_VIA_LWS + 1)), "whitespace"),
    "via_compact_lines": (request(extra="".join(f"v: SIP/2.0/UDP h{i}\r\n" for i in range(70))), "elements"),
    "via_elements_one_line": (request(via=", ".join(["SIP/2.0/UDP a"] * 100)), "elements"),
    "via_params": (request(via="SIP/2.0/UDP a" + ";p=q" * MAX_PARAMS), "parameters"),
    "from_uri_14000_params": (request(from_="<sip:a@farm.test" + ";x=y" * 14000 + ">;tag=1"), "longer than"),
    "from_uri_2000_params": (request(from_="<sip:a@farm.test" + ";x=y" * 2000 + ">;tag=1"), "parameters"),
    "from_compact_params": (request(from_="<sip:a@farm.test>;tag=1" + ";x=y" * 200).replace(b"From:", b"f:"),
                            "parameters"),
    "from_header_params": (request(from_="<sip:a@farm.test>;tag=1" + ";x=y" * 200), "parameters"),
    "uri_5k": (request(from_="<sip:" + "u" * 5000 + "@farm.test>;tag=1"), "URI longer"),
    "request_uri_5k": (request(uri="sip:" + "u" * 5000 + "@farm.test"), "Request-URI longer"),
    "request_uri_params": (request(uri="sip:bob@farm.test" + ";x" * 100), "URI parameters"),
    "contact_quoted_10k": (request(extra='Contact: "' + "q" * 10000 + '" <sip:a@b>\r\n'), "longer than"),
    "contact_many_quoted": (request(extra="Contact: " + '"a" ' * 700 + "<sip:a@b>\r\n"), "quotes"),
    "contacts_many": (request(extra="".join(f"Contact: <sip:p{i}.test>\r\n" for i in range(70))), "elements"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_crafted_value_is_refused_with_400_naming_the_bound(name: str) -> None:
    data, bound = CRAFTED[name]
    with pytest.raises(BadMessage) as caught:
        validate_request(parse_message(data))
    assert caught.value.status == 400 and bound in str(caught.value), str(caught.value)
    answer = error_response(caught.value.partial, caught.value, b"lbtag")  # the one mapping place
    assert answer is not None and answer.status == 400


WEBRTC_CONTACT = (
    "Contact: <sip:k3v9pd1q@df7jal23ls0d.invalid;transport=ws;ob>;+sip.ice;reg-id=1;"
    '+sip.instance="<urn:uuid:6f1a2b4c-8d3e-4f5a-9b6c-7d8e9f0a1b2c>";expires=600\r\n'
)
FLOW_PATH = "".join(
    f"Path: <sip:{'Zm' * 60}{i}@lb{i}.farm.test:5060;lr;ob;seal={'a1b2c3d4' * 8}>\r\n" for i in range(6)
)
DIGEST = (
    'Authorization: Digest username="alice", realm="farm.test", nonce="' + "n" * 96 + '", '
    'uri="sip:farm.test", response="' + "0" * 64 + '", algorithm=SHA-256, cnonce="' + "c" * 32 + '", '
    'opaque="' + "o" * 64 + '", qop=auth, nc=00000001\r\n'
)
LEGIT = {
    "webrtc_register": request(method="REGISTER", uri="sip:farm.test", extra=WEBRTC_CONTACT + DIGEST),
    "path_of_six_flow_tokens": request(method="REGISTER", uri="sip:farm.test", extra=FLOW_PATH),
    "record_route_on_one_line": request(extra="Record-Route: " + ", ".join(
        f"<sip:{'t' * 200}@p{i}.test;lr;ftag=abc>" for i in range(12)) + "\r\n"),
    "rfc4475_style_lws_via": request(via="SIP / 2.0 / UDP  192.0.2.5 : 5062 ;rport"),
    "many_vias": request(extra="".join(f"Via: SIP/2.0/UDP p{i}.test;branch=z9hG4bK{i}\r\n" for i in range(40))),
    "long_padding_header": request(extra="X-Pad: " + "p" * 50000 + "\r\n"),  # not parsed: not bounded
}


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_realistic_long_values_still_pass(name: str) -> None:
    validate_request(parse_message(LEGIT[name]))


def test_list_bound_counts_every_line_of_one_header() -> None:
    ok = request(extra="".join(f"Route: <sip:p{i}.test;lr>\r\n" for i in range(MAX_LIST_ELEMENTS - 1)))
    msg = parse_message(ok)
    assert len(msg.values("route")) == MAX_LIST_ELEMENTS - 1
    with pytest.raises(BadMessage):
        parse_message(ok.replace(b"Route:", b"Route: <sip:x.test;lr>, <sip:y.test;lr>,", 1)).values("route")


def _lines(name: str, count: int, value: str) -> str:
    return "".join(f"{name}: {value.format(i=i)}\r\n" for i in range(count))


# Requests the parser refuses before it has read their headers one by one (too many lines, a
# continuation line first) or for a value it will not copy: each still gets its 400, with the
# Via, From, To, Call-ID and CSeq a client needs to match it (RFC 3261 8.2.6.2), and the answer
# echoes no overlong value and at most MAX_LIST_ELEMENTS Vias.
UNREAD = {
    "routes_500_lines": request(extra=_lines("Route", 500, "<sip:10.0.{i}.1;lr>")),
    "vias_800_lines": request(extra=_lines("Via", 800, "SIP/2.0/UDP 10.0.0.{i};branch=z9hG4bK{i}")),
    "compact_vias_800_lines": request(extra=_lines("v", 800, "SIP/2.0/UDP 10.0.0.{i};branch=z9hG4bK{i}")),
    "unknown_headers_300": request(extra=_lines("X-N{i}", 300, "v")),
    "via_list_800_one_line": request(extra="Via: " + ",".join(
        f"SIP/2.0/UDP 10.0.0.{i};branch=z9hG4bK{i}" for i in range(800)) + "\r\n"),
    "route_list_one_line": request(extra="Route: " + ",".join(f"<sip:10.0.{i}.1;lr>" for i in range(800)) + "\r\n"),
    "continuation_first": request().replace(b"\r\nVia:", b"\r\n  folded\r\nVia:", 1),
    # found by mutating the lines of a request (a byte inserted, dropped or replaced): a name that
    # is no token, a bare CR, before the headers the answer needs
    "bad_header_name_first": request().replace(b"\r\nVia:", b"\r\nCon tact: <sip:a@b>\r\nVia:", 1),
    "bad_header_name": request(extra="Max<Forwards: 70\r\n"),
    "bare_cr_in_the_start_line": request().replace(b"farm.test SIP", b"farm.te\rst SIP", 1),
    "bare_cr_in_a_value_first": request().replace(b"\r\nVia:", b"\r\nX-A: a\rb\r\nVia:", 1),
    "bare_cr_in_the_from": request(from_="<sip:alice@farm.test>;tag=a1").replace(b"From:", b"X-Pad: \r\r\nFrom:"),
}


@pytest.mark.parametrize("name", sorted(UNREAD))
def test_a_request_refused_before_its_headers_are_read_is_still_answered(name: str) -> None:
    data = UNREAD[name]
    with pytest.raises(BadMessage) as caught:
        validate_request(parse_message(data))
    answer = error_response(caught.value.partial, caught.value, b"lbtag")
    assert answer is not None and answer.status == 400, caught.value
    wire = answer.to_bytes()
    assert answer.get("call-id") == b"c1@h" and answer.get("cseq") == b"1 INVITE"
    assert answer.values("via")[0] == b"SIP/2.0/UDP 192.0.2.5:5062;rport;branch=z9hG4bK776"
    assert b"tag=lbtag" in answer.get("to") and answer.get("from") == b"<sip:alice@farm.test>;tag=a1"
    assert len(answer.values("via")) <= MAX_LIST_ELEMENTS + 1
    assert len(wire) < 8192, len(wire)
    assert wire.replace(b"\r\n", b"").find(b"\r") < 0  # no bare CR echoed



_LINES = [
    b"INVITE sip:bob@farm.test SIP/2.0",
    b"Via: SIP/2.0/UDP 192.0.2.5:5062;rport;branch=z9hG4bK776",
    b"Max-Forwards: 70",
    b"From: <sip:alice@farm.test>;tag=a1",
    b"To: <sip:bob@farm.test>",
    b"Call-ID: c1@h",
    b"CSeq: 1 INVITE",
    b"Contact: <sip:alice@192.0.2.5:5062>",
    b"Content-Type: application/sdp",
    b"Route: <sip:farm.test;lr>",
    b"Supported: path",
]
_MUTABLE = [0, 2, 7, 8, 9, 10]  # every line but the Via, From, To, Call-ID and CSeq an answer copies
_JUNK = [b"\x00", b"\xff", b"<", b">", b'"', b";", b",", b"=", b" ", b"\t", b":", b"@", b"[", b"\\", b"\r", b"\n",
         b"a" * 300, b";x" * 80]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    line=st.sampled_from(_MUTABLE),
    edits=st.lists(
        st.tuples(st.integers(0, 80), st.sampled_from(["insert", "delete", "replace"]), st.sampled_from(_JUNK)),
        min_size=1,
        max_size=4,
    ),
)
def test_a_request_with_its_answer_headers_intact_is_parsed_or_answered(
    line: int, edits: list[tuple[int, str, bytes]]
) -> None:
    """Whatever is wrong with the other lines (a byte inserted, dropped or replaced), a request
    whose Via, From, To, Call-ID and CSeq are intact is accepted or gets its 4xx/5xx, with no
    bare CR in it; only a broken method (nothing to answer with: RFC 3261 8.2.6.2 copies the
    CSeq) may be dropped unanswered."""
    lines = list(_LINES)
    mutated = bytearray(lines[line])
    for pos, op, junk in edits:
        pos = min(pos, len(mutated))
        if op == "insert":
            mutated[pos:pos] = junk
        elif op == "delete":
            del mutated[pos : pos + 3]
        else:
            mutated[pos : pos + 1] = junk
    lines[line] = bytes(mutated)
    head = b"\r\n".join(lines)
    # an edit that makes a blank line (a CR and an LF side by side) ends the header section
    # there: the answer headers below it are then the body's, not intact headers
    assume(b"\n\n" not in head.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
    data = head + b"\r\nContent-Length: 0\r\n\r\n"
    try:
        validate_request(parse_message(data))
    except SipError as exc:
        answer = error_response(exc.partial, exc, b"lbtag")
        if answer is None:
            assert line == 0 and exc.status == 0, (exc, data)
            return
        assert 400 <= answer.status < 600
        assert answer.to_bytes().replace(b"\r\n", b"").find(b"\r") < 0
