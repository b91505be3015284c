"""RFC 4475 torture tests: every vector parses, or fails with the SipError the RFC calls for.

Two sources:

* ``tests/sip/vectors/rfc4475/manifest.json`` with its ``*.sip`` files, written by the vector
  set's owner.  Each entry has ``name``, ``valid`` and ``expect`` (``expected`` is accepted too):
  ``"parse"``, ``"drop"`` or a status code, the outcome of the whole receive path.  Skipped
  while the directory does not exist.
* A built-in set below, transcribed from the RFC text (section numbers cited), so the most
  important cases run even without the vector files.

Only the parser's share of the receive path is checked here, :func:`parse_message` plus
:func:`validate_request` for a request:

* ``expect == "parse"``: both succeed;
* a valid message with an expected status (416 for an unknown scheme, 420, 483, ... decided
  further up): both succeed, or the parser already answers with that very status;
* an invalid message: a :class:`SipError` with the expected status (0 for "drop").

``ALTERNATIVES`` lists the other outcomes the RFC text allows for a vector.  Nothing but a
SipError may escape.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import StreamFramer, parse_message, validate_request
from sipfarm.sip.uri import SipURI, parse_uri
from sipfarm.sip.via import via_target

VECTOR_DIR = Path(__file__).resolve().parent / "vectors" / "rfc4475"
MANIFEST = VECTOR_DIR / "manifest.json"

PARSE = None  # "the parser accepts it" in a set of allowed outcomes

# Outcomes besides the manifest's "expect" that the RFC text allows.
ALTERNATIVES: dict[str, set[int | None]] = {
    "mismatch02": {400},  # 3.1.2.18: "501 ... (400 is also acceptable)"
    "baddate": {PARSE},  # 3.1.2.12: reject only "if Date matters"; the parser never reads Date
    "sdp01": {400},  # 3.3.15: 406, "400 also acceptable"
    "novelsc": {404},  # 3.3.3: 404 when the element accepts some soap.beep URIs
}


def run_vector(data: bytes) -> SipMessage:
    """parse_message + validate_request (for requests): the checks an element applies."""
    msg = parse_message(data)
    if msg.is_request:
        validate_request(msg)
    return msg


def expected_status(expected: object) -> int | None:
    """Manifest outcome -> SipError.status: "drop" is 0, "parse" None, "400" / 505 codes."""
    if expected in (None, "parse"):
        return PARSE
    if expected == "drop":
        return 0
    return int(str(expected))


def check_vector(
    name: str, data: bytes, valid: bool, expected: object, alternatives: tuple[object, ...] = ()
) -> SipMessage | None:
    wanted = expected_status(expected)
    allowed = {wanted} | ALTERNATIVES.get(name, set()) | {expected_status(a) for a in alternatives}
    try:
        msg = run_vector(data)
    except SipError as exc:
        if exc.status not in allowed or (valid and wanted is PARSE):
            pytest.fail(f"{name}: rejected with {exc.status} ({exc}); allowed: {allowed}")
        return None
    if not valid and PARSE not in allowed:
        pytest.fail(f"{name}: invalid vector accepted; expected {expected}")
    return msg


# -- vectors from the manifest (owned by the vector set's author) -------------------------------


def _manifest_entries() -> list[dict[str, object]]:
    if not MANIFEST.is_file():
        return []
    loaded = json.loads(MANIFEST.read_text(encoding="utf-8"))
    if isinstance(loaded, dict):
        loaded = loaded.get("messages", loaded.get("vectors", []))
    return [e for e in loaded if isinstance(e, dict) and "name" in e]


_ENTRIES = _manifest_entries()


@pytest.mark.skipif(not VECTOR_DIR.is_dir(), reason="tests/sip/vectors/rfc4475 not written yet")
@pytest.mark.parametrize(
    "entry", _ENTRIES or [None], ids=[str(e["name"]) for e in _ENTRIES] or ["no-manifest"]
)
def test_manifest_vector(entry: dict[str, object] | None) -> None:
    if entry is None:
        pytest.skip("manifest.json missing or empty")
    name = str(entry["name"])
    path = VECTOR_DIR / str(entry.get("file") or f"{name}.sip")
    if not path.is_file():
        pytest.skip(f"{path.name} not written yet")
    expected = entry.get("expect", entry.get("expected"))
    alternatives = tuple(entry.get("alternatives", ()))  # type: ignore[call-overload]
    check_vector(name, path.read_bytes(), bool(entry.get("valid")), expected, alternatives)


# -- RFC 5118 (IPv6) vectors, same manifest format ------------------------------------------------

RFC5118_DIR = VECTOR_DIR.parent / "rfc5118"
_RFC5118 = json.loads((RFC5118_DIR / "manifest.json").read_text(encoding="utf-8"))["messages"]


@pytest.mark.parametrize("entry", _RFC5118, ids=[str(e["name"]) for e in _RFC5118])
def test_rfc5118_vector(entry: dict[str, object]) -> None:
    data = (RFC5118_DIR / str(entry["file"])).read_bytes()
    alternatives = tuple(entry.get("alternatives", ()))  # type: ignore[call-overload]
    check_vector(str(entry["name"]), data, bool(entry["valid"]), entry["expect"], alternatives)


def _rfc5118_request(name: str) -> tuple[SipMessage, SipURI]:
    msg = run_vector((RFC5118_DIR / f"{name}.sip").read_bytes())
    uri = parse_uri(msg.uri)
    assert isinstance(uri, SipURI)
    return msg, uri


def test_rfc5118_hosts_read_as_the_rfc_means() -> None:
    """Beyond "it parses": the address and port each RFC 5118 message names."""
    _, ambiguous = _rfc5118_request("port-ambiguous")  # 4.3: 5070 is the address's last group
    assert (ambiguous.host, ambiguous.port) == ("[2001:db8::10:5070]", None)
    _, unambiguous = _rfc5118_request("port-unambiguous")  # 4.4
    assert (unambiguous.host, unambiguous.port) == ("[2001:db8::10]", 5070)
    for name in ("via-received-param-with-delim", "via-received-param-no-delim"):  # 4.5
        msg, _ = _rfc5118_request(name)
        target = via_target(msg.vias[0])
        assert ipaddress.ip_address(target.host) == ipaddress.ip_address("2001:db8::9:255"), name
    msg, _ = _rfc5118_request("mult-ip-in-header")  # 4.7
    assert [(v.transport, v.host, v.port, v.received) for v in msg.vias] == [
        ("UDP", "[2001:db8::9:1]", 6050, None),
        ("UDP", "192.0.2.1", None, None),
        ("TCP", "[2001:db8::9:255]", None, "192.0.2.200"),
    ]
    msg, _ = _rfc5118_request("ipv4-mapped-ipv6")  # 4.9
    assert [v.sent_by for v in msg.vias] == [("[::ffff:192.0.2.10]", 19823), ("[::ffff:192.0.2.2]", None)]
    # 4.10: the extra colon RFC 3261's ABNF allows is ignored; both name one address
    _, three = _rfc5118_request("ipv6-bug-abnf-3-colons")
    _, two = _rfc5118_request("ipv6-correct-abnf-2-colons")
    assert three.host == two.host == "[2001:db8::192.0.2.1]"


# -- built-in vectors (RFC 4475 section 3) --------------------------------------------------------


def sdp(ip: str, *, t: str = "0 0", origin: str | None = None, video: str = "m=video") -> bytes:
    """The SDP body most RFC 4475 messages carry (CRLF line ends, as on the wire)."""
    return (
        f"v=0\r\no=mhandley 29739 7272939 IN IP4 {origin or ip}\r\ns=-\r\nc=IN IP4 {ip}\r\n"
        f"t={t}\r\nm=audio 49217 RTP/AVP 0 12\r\n{video} 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n"
    ).encode()


def msg(*lines: str | bytes, body: bytes = b"") -> bytes:
    """Join header lines with CRLF, add the blank line and the body."""
    raw = [line.encode("utf-8") if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(raw) + b"\r\n\r\n" + body


@dataclass(frozen=True)
class Vector:
    name: str
    section: str
    data: bytes
    valid: bool
    expected: str = "parse"  # or "drop", or the status code to answer


CYRILLIC = "работающий"  # RFC 4475 3.1.1.2 puts UTF-8 in a quoted parameter

VECTORS = [
    # 3.1.1.1 A Short Tortuous INVITE: folding, LWS everywhere, compact forms, odd case.
    Vector(
        "wsinv",
        "3.1.1.1",
        msg(
            "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0",
            "TO :",
            " sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
            'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>',
            "  ;",
            "  tag = 98asjd8",
            "MaX-fOrWaRdS: 0068",
            "Call-ID: wsinv.ndaksdj@192.0.2.1",
            "Content-Length   : 150",
            "cseq: 0009",
            "  INVITE",
            "Via  : SIP  /   2.0",
            " /UDP",
            "    192.0.2.2;branch=390skdjuw",
            "s :",
            "NewFangledHeader:   newfangled value",
            " continued newfangled value",
            "UnknownHeaderWithUnusualValue: ;;,,;;,;",
            "Content-Type: application/sdp",
            "Route:",
            " <sip:services.example.com;lr;unknownwith=value;unknown-no-value>",
            "v:  SIP  / 2.0  / TCP     spindle.example.com   ;",
            "  branch  =   z9hG4bK9ikj8  ,",
            " SIP  /    2.0   / UDP  192.168.255.111   ; branch=",
            " z9hG4bK30239",
            'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =',
            "      newvalue ;",
            "  secondparam ; q = 0.33",
            body=sdp("192.0.2.4", origin="192.0.2.3"),
        ),
        valid=True,
    ),
    # 3.1.1.2 Wide Range of Valid Characters.
    Vector(
        "intmeth",
        "3.1.1.2",
        msg(
            "!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$"
            "/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0",
            "Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~",
            b'To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" '
            b"<sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>",
            "From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com> "
            f";fromParam''~+*_!.-%=\"{CYRILLIC}\";tag=_token~1'+`*%!-.",
            "Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{",
            "CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~",
            "Max-Forwards: 255",
            "extensionHeader-!.%*+_`'~:\ufeff\u5927\u505c\u96fb",
            "Content-Length: 0",
        ),
        valid=True,
    ),
    # 3.1.1.3 Valid Use of the % Escaping Mechanism.
    Vector(
        "esc01",
        "3.1.1.3",
        msg(
            "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0",
            "To: sip:%75se%72@example.com",
            "From: <sip:I%20have%20spaces@example.net>;tag=938",
            "Max-Forwards: 87",
            "i: esc01.239409asdfakjkn23onasd0-3234",
            "CSeq: 234234 INVITE",
            "Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw",
            "C: application/sdp",
            "Contact:",
            "  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>",
            "Content-Length: 150",
            body=sdp("192.0.2.1"),
        ),
        valid=True,
    ),
    # 3.1.1.4 Escaped Nulls in URIs.
    Vector(
        "escnull",
        "3.1.1.4",
        msg(
            "REGISTER sip:example.com SIP/2.0",
            "To: sip:null-%00-null@example.com",
            "From: sip:null-%00-null@example.com;tag=839923423",
            "Max-Forwards: 70",
            "Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd",
            "CSeq: 14398234 REGISTER",
            "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw",
            "Contact: <sip:%00@host5.example.com>",
            "Contact: <sip:%00%00@host5.example.com>",
            "L:0",
        ),
        valid=True,
    ),
    # 3.1.1.5 Use of % When It Is Not an Escape.
    Vector(
        "esc02",
        "3.1.1.5",
        msg(
            "RE%47IST%45R sip:registrar.example.com SIP/2.0",
            'To: "%Z%45" <sip:resource@example.com>',
            'From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23',
            "Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf",
            "Via: SIP/2.0/TCP host.example.com;branch=z9hG4bK209%fzsnel234",
            "CSeq: 29344 RE%47IST%45R",
            "Max-Forwards: 70",
            "Contact: <sip:alias1@host1.example.com>",
            "C%6Fntact: <sip:alias2@host2.example.com>",
            "Contact: <sip:alias3@host3.example.com>",
            "l: 0",
        ),
        valid=True,
    ),
    # 3.1.1.6 Message with No LWS between Display Name and <.
    Vector(
        "lwsdisp",
        "3.1.1.6",
        msg(
            "OPTIONS sip:user@example.com SIP/2.0",
            "To: sip:user@example.com",
            "From: caller<sip:caller@example.com>;tag=323",
            "Max-Forwards: 70",
            "Call-ID: lwsdisp.1234abcd@funky.example.com",
            "CSeq: 60 OPTIONS",
            "Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw",
            "l: 0",
        ),
        valid=True,
    ),
    # 3.1.1.7 Long Values in Header Fields.
    Vector(
        "longreq",
        "3.1.1.7",
        msg(
            "INVITE sip:user@example.com SIP/2.0",
            'To: "I have a user name of ' + "extreme " * 10 + 'proportion" '
            "<sip:user@example.com:6000;unknownparam1=very" + "long" * 20 + "value;longparam"
            + "name" * 25 + "=shortvalue;very" + "long" * 25 + "ParameterNameWithNoValue>",
            "F: sip:" + "amazinglylongcallername" * 5 + "@example.net;tag=12"
            + "982" * 50 + "424;unknownheaderparam" + "name" * 20 + "=unknowheaderparam"
            + "value" * 15 + ";unknownValuelessparam" + "nameparam" * 10 + "name",
            "Call-ID: longreq.one" + "really" * 20 + "longcallid",
            "CSeq: 3882340 INVITE",
            "Unknown-" + "Long" * 20 + "-Name:unknown-" + "long" * 20 + "-value;unknown-"
            + "long" * 20 + "-parameter-name =unknown-" + "long" * 20 + "-parameter-value",
            "Via: SIP/2.0/TCP sip33.example.com",
            "v: SIP/2.0/TCP sip32.example.com",
            "V: SIP/2.0/TCP sip31.example.com",
            "Via: SIP/2.0/TCP sip30.example.com",
            "ViA: SIP/2.0/TCP sip29.example.com",
            "VIa: SIP/2.0/TCP sip28.example.com",
            "VIA: SIP/2.0/TCP sip27.example.com",
            "via: SIP/2.0/TCP sip26.example.com",
            "viA: SIP/2.0/TCP sip25.example.com",
            "vIa: SIP/2.0/TCP sip24.example.com",
            "vIA: SIP/2.0/TCP sip23.example.com",
            "V :  SIP/2.0/TCP sip22.example.com",
            "v :  SIP/2.0/TCP sip21.example.com",
            "V  : SIP/2.0/TCP sip20.example.com",
            "v  : SIP/2.0/TCP sip19.example.com",
            "Via : SIP/2.0/TCP sip18.example.com",
            "Via  : SIP/2.0/TCP sip17.example.com",
            *[f"Via: SIP/2.0/TCP sip{n}.example.com" for n in range(16, 0, -1)],
            "Via: SIP/2.0/TCP host.example.com;received=192.0.2.5;branch=very"
            + "long" * 50 + "branchvalue",
            "Max-Forwards: 70",
            "Contact: <sip:" + "amazinglylongcallername" * 5 + "@host5.example.net>",
            "Content-Type: application/sdp",
            "l: 150",
            body=sdp("192.0.2.1"),
        ),
        valid=True,
    ),
    # 3.1.1.8 Extra Trailing Octets in a UDP Datagram: the INVITE after the body is noise.
    Vector(
        "dblreq",
        "3.1.1.8",
        msg(
            "REGISTER sip:example.com SIP/2.0",
            "To: sip:j.user@example.com",
            "From: sip:j.user@example.com;tag=43251j3j324",
            "Max-Forwards: 8",
            "I: dblreq.0ha0isndaksdj99sdfafnl3lk233412",
            "Contact: sip:j.user@host.example.com",
            "CSeq: 8 REGISTER",
            "Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492",
            "Content-Length: 0",
        )
        + msg(
            "INVITE sip:joe@example.com SIP/2.0",
            "t: sip:joe@example.com",
            "From: sip:caller@example.net;tag=141334",
            "Max-Forwards: 8",
            "Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234",
            "Content-Type: application/sdp",
            "Content-Length: 150",
            body=sdp("192.0.2.15", video="m =video"),
        ),
        valid=True,
    ),
    # 3.1.1.9 Semicolon-Separated Parameters in URI User Part.
    Vector(
        "semiuri",
        "3.1.1.9",
        msg(
            "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0",
            "To: sip:j_user@example.com",
            "From: sip:caller@example.org;tag=33242",
            "Max-Forwards: 3",
            "Call-ID: semiuri.0ha0isndaksdj",
            "CSeq: 8 OPTIONS",
            "Accept: application/sdp, application/pkcs7-mime,",
            "  multipart/mixed, multipart/signed,",
            "  message/sip, message/sipfrag",
            "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw",
            "l: 0",
        ),
        valid=True,
    ),
    # 3.1.1.10 Varied and Unknown Transport Types.
    Vector(
        "transports",
        "3.1.1.10",
        msg(
            "OPTIONS sip:user@example.com SIP/2.0",
            "To: sip:user@example.com",
            "From: <sip:caller@example.com>;tag=323",
            "Max-Forwards: 70",
            "Call-ID:  transports.kijh4akdnaqjkwendsasfdj",
            "Accept: application/sdp",
            "CSeq: 60 OPTIONS",
            "Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw",
            "Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf",
            "Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj",
            "Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en",
            "Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee",
            "l: 0",
        ),
        valid=True,
    ),
    # 3.1.1.12 Unusual Reason Phrase (UTF-8).
    Vector(
        "unreason",
        "3.1.1.12",
        msg(
            "SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять - простое",
            "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923",
            "Call-ID: unreason.1234ksdfak3j2erwedfsASdf",
            "CSeq: 35 INVITE",
            "From: sip:user@example.com;tag=11141343",
            "To: sip:user@example.edu;tag=2229",
            "Content-Length: 154",
            "Content-Type: application/sdp",
            "Contact: <sip:user@host198.example.com>",
            body=sdp("192.0.2.198"),
        ),
        valid=True,
    ),
    # 3.1.1.13 Empty Reason Phrase.
    Vector(
        "noreason",
        "3.1.1.13",
        msg(
            "SIP/2.0 100 ",
            "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe",
            "Call-ID: noreason.asndj203insdf99223ndf",
            "CSeq: 35 INVITE",
            "From: <sip:user@example.com>;tag=39ansfi3",
            "To: <sip:user@example.edu>;tag=902jndnke3",
            "Content-Length: 0",
            "Contact: <sip:user@host105.example.com>",
        ),
        valid=True,
    ),
    # 3.1.2.1 Extraneous Header Field Separators (empty Via params and elements).
    Vector(
        "badinv01",
        "3.1.2.1",
        msg(
            "INVITE sip:user@example.com SIP/2.0",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=134161461246",
            "Max-Forwards: 7",
            "Call-ID: badinv01.0ha0isndaksdjasdf3234nas",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.15;;,;,,",
            'Contact: "Joe" <sip:joe@example.org>;;;;',
            "Content-Length: 152",
            "Content-Type: application/sdp",
            body=sdp("192.0.2.15"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.2 Content Length Larger Than Message.
    Vector(
        "clerr",
        "3.1.2.2",
        msg(
            "INVITE sip:user@example.com SIP/2.0",
            "Max-Forwards: 80",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=93942939o2",
            "Contact: <sip:caller@hungry.example.net>",
            "Call-ID: clerr.0ha0isndaksdjweiafasdk3",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK-39234-23523",
            "Content-Type: application/sdp",
            "Content-Length: 9999",
            body=sdp("192.0.2.155"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.3 Negative Content-Length.
    Vector(
        "ncl",
        "3.1.2.3",
        msg(
            "INVITE sip:user@example.com SIP/2.0",
            "Max-Forwards: 254",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=32394234",
            "Call-ID: ncl.0ha0isndaksdj2193423r542w35",
            "CSeq: 0 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.53;branch=z9hG4bKkdjuw",
            "Contact: <sip:caller@example53.example.net>",
            "Content-Type: application/sdp",
            "Content-Length: -999",
            body=sdp("192.0.2.53"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.4 Request Scalar Fields with Overlarge Values.
    Vector(
        "scalar02",
        "3.1.2.4",
        msg(
            "REGISTER sip:example.com SIP/2.0",
            "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3",
            "To: <sip:user@example.com>",
            "From: <sip:user@example.com>;tag=239232jh3",
            "CSeq: 36893488147419103232 REGISTER",
            "Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32",
            "Max-Forwards: 300",
            "Expires: 1" + "0" * 100,
            "Contact: <sip:user@host129.example.com>",
            "  ;expires=280297596632815",
            "Content-Length: 0",
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.5 Response Scalar Fields with Overlarge Values: a response cannot be answered.
    Vector(
        "scalarlg",
        "3.1.2.5",
        msg(
            "SIP/2.0 503 Service Unavailable",
            "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129",
            "To: <sip:user@example.com>",
            "From: <sip:other@example.net>;tag=2easdjfejw",
            "CSeq: 9292394834772304023312 OPTIONS",
            "Call-ID: scalarlg.noase0of0234hn2qofoaf0232aewf2394r",
            "Retry-After: 949302838503028349304023988",
            'Warning: 1812 overture "In Progress"',
            "Content-Length: 0",
        ),
        valid=False,
        expected="drop",
    ),
    # 3.1.2.6 Unterminated Quoted String in Display Name.
    Vector(
        "quotbal",
        "3.1.2.6",
        msg(
            "INVITE sip:user@example.com SIP/2.0",
            'To: "Mr. J. User <sip:j.user@example.com>',
            "From: sip:caller@example.net;tag=93334",
            "Max-Forwards: 10",
            "Call-ID: quotbal.aksdj",
            "Contact: <sip:caller@host59.example.net>",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234",
            "Content-Type: application/sdp",
            "Content-Length: 152",
            body=sdp("192.0.2.15"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.7 <> Enclosing Request-URI.
    Vector(
        "ltgtruri",
        "3.1.2.7",
        msg(
            "INVITE <sip:user@example.com> SIP/2.0",
            "To: sip:user@example.com",
            "From: sip:caller@example.net;tag=39291",
            "Max-Forwards: 23",
            "Call-ID: ltgtruri.1@192.0.2.5",
            "CSeq: 1 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.5",
            "Contact: <sip:caller@host5.example.net>",
            "Content-Type: application/sdp",
            "Content-Length: 159",
            body=sdp("192.0.2.5", t="3149328700 0"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.8 Malformed SIP Request-URI (embedded LWS).
    Vector(
        "lwsruri",
        "3.1.2.8",
        msg(
            "INVITE sip:user@example.com; lr SIP/2.0",
            "To: sip:user@example.com;tag=3xfe-9921883-z9f",
            "From: sip:caller@example.net;tag=231413434",
            "Max-Forwards: 5",
            "Call-ID: lwsruri.asdfasdoeoi2323-asdfwrn23-asd834rk423",
            "CSeq: 2130706432 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKkdjuw2395",
            "Contact: <sip:caller@host1.example.net>",
            "Content-Type: application/sdp",
            "Content-Length: 159",
            body=sdp("192.0.2.1", t="3149328700 0"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.9 Multiple SP Separating Request-Line Elements.
    Vector(
        "lwsstart",
        "3.1.2.9",
        msg(
            "INVITE  sip:user@example.com  SIP/2.0",
            "Max-Forwards: 8",
            "To: sip:user@example.com",
            "From: sip:caller@example.net;tag=8814",
            "Call-ID: lwsstart.dfknq234oi243099adsdfnawe3@example.com",
            "CSeq: 1893884 INVITE",
            "Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bKkdjuw3923",
            "Contact: <sip:caller@host1.example.net>",
            "Content-Type: application/sdp",
            "Content-Length: 150",
            body=sdp("192.0.2.1"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.10 SP Characters at End of Request-Line.
    Vector(
        "trws",
        "3.1.2.10",
        msg(
            "OPTIONS sip:remote-target@example.com SIP/2.0  ",
            "Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK299342093",
            "To: <sip:remote-target@example.com>",
            "From: <sip:local-resource@example.com>;tag=329429089",
            "Call-ID: trws.oicu34958239neffasdhr2345r",
            "Accept: application/sdp",
            "CSeq: 238923 OPTIONS",
            "Max-Forwards: 70",
            "Content-Length: 0",
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.11 Escaped Headers in SIP Request-URI.
    Vector(
        "escruri",
        "3.1.2.11",
        msg(
            "INVITE sip:user@example.com?Route=%3Csip:example.com%3E SIP/2.0",
            "To: sip:user@example.com",
            "From: sip:caller@example.net;tag=341518",
            "Max-Forwards: 7",
            "Contact: <sip:caller@host39923.example.net>",
            "Call-ID: escruri.23940-asdfhj-aje3br-234q098w-fawerh2q-h4n5",
            "CSeq: 149209342 INVITE",
            "Via: SIP/2.0/UDP host-of-the-hour.example.com;branch=z9hG4bKkdjuw",
            "Content-Type: application/sdp",
            "Content-Length: 150",
            body=sdp("192.0.2.1"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.13 Failure to Enclose name-addr URI in <>.
    Vector(
        "regbadct",
        "3.1.2.13",
        msg(
            "REGISTER sip:example.com SIP/2.0",
            "To: sip:user@example.com",
            "From: sip:user@example.com;tag=998332",
            "Max-Forwards: 70",
            "Call-ID: regbadct.k345asrl3fdbv@10.0.0.1",
            "CSeq: 1 REGISTER",
            "Via: SIP/2.0/UDP 135.180.130.133:5060;branch=z9hG4bKkdjuw",
            "Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            "l: 0",
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.14 Spaces within addr-spec.
    Vector(
        "badaspec",
        "3.1.2.14",
        msg(
            "OPTIONS sip:user@example.org SIP/2.0",
            "Via: SIP/2.0/UDP host4.example.com:5060;branch=z9hG4bKkdju43234",
            "Max-Forwards: 70",
            'From: "Bell, Alexander" <sip:a.g.bell@example.com>;tag=433423',
            'To: "Watson, Thomas" < sip:t.watson@example.org >',
            "Call-ID: badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3",
            "Accept: application/sdp",
            "CSeq: 3923239 OPTIONS",
            "l: 0",
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.15 Non-token Characters in Display Name.
    Vector(
        "baddn",
        "3.1.2.15",
        msg(
            "OPTIONS sip:t.watson@example.org SIP/2.0",
            "Via:     SIP/2.0/UDP c.example.com:5060;branch=z9hG4bKkdjuw",
            "Max-Forwards:      70",
            "From:    Bell, Alexander <sip:a.g.bell@example.com>;tag=43",
            "To:      Watson, Thomas <sip:t.watson@example.org>",
            "Call-ID: baddn.31415@c.example.com",
            "Accept: application/sdp",
            "CSeq:    3923239 OPTIONS",
            "l: 0",
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.16 Unknown Protocol Version: 505.
    Vector(
        "badvers",
        "3.1.2.16",
        msg(
            "OPTIONS sip:t.watson@example.org SIP/7.0",
            "Via:     SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw",
            "Max-Forwards:     70",
            "From:    A. Bell <sip:a.g.bell@example.com>;tag=qweoiqpe",
            "To:      T. Watson <sip:t.watson@example.org>",
            "Call-ID: badvers.31417@c.example.com",
            "CSeq:    1 OPTIONS",
            "l: 0",
        ),
        valid=False,
        expected="505",
    ),
    # 3.1.2.17 Start Line and CSeq Method Mismatch.
    Vector(
        "mismatch01",
        "3.1.2.17",
        msg(
            "OPTIONS sip:user@example.com SIP/2.0",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=34525",
            "Max-Forwards: 6",
            "Call-ID: mismatch01.dj0234sxdfl3",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw",
            "l: 0",
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.18 Unknown Method with CSeq Method Mismatch.
    Vector(
        "mismatch02",
        "3.1.2.18",
        msg(
            "NEWMETHOD sip:user@example.com SIP/2.0",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=34525",
            "Max-Forwards: 6",
            "Call-ID: mismatch02.dj0234sxdfl3",
            "CSeq: 8 INVITE",
            "Contact: <sip:caller@host.example.net>",
            "Via: SIP/2.0/UDP host.example.net;branch=z9hG4bKkdjuw",
            "Content-Type: application/sdp",
            "l: 138",
            body=b"v=0\r\no=mhandley 29739 7272939 IN IP4 192.0.2.1\r\nc=IN IP4 192.0.2.1\r\n"
            b"m=audio 49217 RTP/AVP 0 12\r\nm=video 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n",
        ),
        valid=False,
        expected="400",
    ),
    # 3.1.2.19 Overlarge Response Code.
    Vector(
        "bigcode",
        "3.1.2.19",
        msg(
            "SIP/2.0 4294967301 better not break the receiver",
            "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe",
            "Call-ID: bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i",
            "CSeq: 353494 INVITE",
            "From: <sip:user@example.com>;tag=39ansfi3",
            "To: <sip:user@example.edu>;tag=902jndnke3",
            "Content-Length: 0",
            "Contact: <sip:user@host105.example.com>",
        ),
        valid=False,
        expected="drop",
    ),
    # 3.3.1 Missing Required Header Fields (no Call-ID, From, To).
    Vector(
        "insuf",
        "3.3.1",
        msg(
            "INVITE sip:user@example.com SIP/2.0",
            "CSeq: 193942 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf",
            "Content-Type: application/sdp",
            "l: 152",
            body=sdp("192.0.2.95"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.3.2 Request-URI with Unknown Scheme: 416.
    Vector(
        "unkscm",
        "3.3.2",
        msg(
            "OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0",
            "To: sip:user@example.com",
            "From: sip:caller@example.net;tag=384",
            "Max-Forwards: 3",
            "Call-ID: unkscm.nasdfasser0q239nwsdfasdkl34",
            "CSeq: 3923423 OPTIONS",
            "Via: SIP/2.0/TCP host9.example.com;branch=z9hG4bKkdjuw39234",
            "Content-Length: 0",
        ),
        valid=True,
        expected="416",
    ),
    # 3.3.4 Unknown URI scheme with '.' in it (RFC 3986 scheme grammar): still 416.
    Vector(
        "novelsc",
        "3.3.4",
        msg(
            "OPTIONS soap.beep://192.0.2.103:3002 SIP/2.0",
            "To: sip:user@example.com",
            "From: sip:caller@example.net;tag=384",
            "Max-Forwards: 3",
            "Call-ID: novelsc.asdfasser0q239nwsdfasdkl34",
            "CSeq: 3923423 OPTIONS",
            "Via: SIP/2.0/TCP host9.example.com;branch=z9hG4bKkdjuw39234",
            "Content-Length: 0",
        ),
        valid=True,
        expected="416",
    ),
    # 3.3.8 Multiple Values in Single Value Required Fields.
    Vector(
        "multi01",
        "3.3.8",
        msg(
            "INVITE sip:user@company.com SIP/2.0",
            "Contact: <sip:caller@host25.example.net>",
            "Via: SIP/2.0/UDP 192.0.2.25;branch=z9hG4bKkdjuw",
            "Max-Forwards: 70",
            "CSeq: 5 INVITE",
            "Call-ID: multi01.98asdh@192.0.2.1",
            "CSeq: 59 INVITE",
            "Call-ID: multi01.98asdh@192.0.2.2",
            "From: sip:caller@example.com;tag=3413415",
            "To: sip:user@example.com",
            "To: sip:other@example.net",
            "From: sip:caller@example.net;tag=2923420123",
            "Content-Type: application/sdp",
            "l: 152",
            "Contact: <sip:caller@host36.example.net>",
            "Max-Forwards: 5",
            body=sdp("192.0.2.25"),
        ),
        valid=False,
        expected="400",
    ),
    # 3.3.9 Multiple Content-Length Values: the framing is ambiguous, reject.
    Vector(
        "mcl01",
        "3.3.9",
        msg(
            "OPTIONS sip:user@example.com SIP/2.0",
            "Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bK293423",
            "To: <sip:user@example.com>",
            "From: <sip:other@example.net>;tag=3923942",
            "Call-ID: mcl01.fhn2323orihawfdoa3o4r52o3irsdf",
            "CSeq: 15932 OPTIONS",
            "Content-Length: 13",
            "Max-Forwards: 60",
            "Content-Length: 5",
            "Content-Type: text/plain",
            body=b"There's no way to know how many octets are supposed to be here.",
        ),
        valid=False,
        expected="400",
    ),
]


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_builtin_vector(vector: Vector) -> None:
    check_vector(vector.name, vector.data, vector.valid, vector.expected)


_BODYLESS = [v for v in VECTORS if v.data.endswith(b"\r\n\r\n") and v.name != "dblreq"]


@pytest.mark.parametrize("vector", _BODYLESS, ids=[v.name for v in _BODYLESS])
def test_builtin_vector_with_bare_lf(vector: Vector) -> None:
    """The same outcome when a sender ends lines with LF only (tolerated, RFC 3261 7.5)."""
    check_vector(vector.name, vector.data.replace(b"\r\n", b"\n"), vector.valid, vector.expected)


def test_wsinv_values() -> None:
    """3.1.1.1: the parsed values behind the whitespace."""
    m = run_vector(VECTORS[0].data)
    assert m.cseq == (9, b"INVITE")
    assert [v.host for v in m.vias] == ["192.0.2.2", "spindle.example.com", "192.168.255.111"]
    assert [v.branch for v in m.vias] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    assert m.vias[1].transport == "TCP"
    assert m.to.tag == "1918181833n"
    assert m.from_.tag == "98asjd8"
    assert m.from_.display == 'J Rosenberg \\"'
    assert m.get("max-forwards") == b"0068"
    assert m.get("subject") == b""
    contact = m.name_addrs("contact")[0]
    assert contact.display == 'Quoted string ""'
    assert contact.param("newparam") == "newvalue"
    assert contact.param("q") == "0.33"
    assert contact.param("secondparam") == ""
    assert len(m.body) == 150


def test_intmeth_values() -> None:
    m = run_vector(VECTORS[1].data)
    assert m.method == b"!interesting-Method0123456789_*+`.%indeed'~"
    uri = m.request_uri
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"  # type: ignore[union-attr]
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"  # type: ignore[union-attr]
    assert m.to.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.from_.tag == "_token~1'+`*%!-."
    assert m.top_via.branch == "z9hG4bK-.!%66*_+`'~"


def test_esc_values() -> None:
    esc01 = run_vector(VECTORS[2].data)
    assert esc01.request_uri.user_unescaped == "sips:user@example.com"  # type: ignore[union-attr]
    assert esc01.to.uri.aor == "user@example.com"
    esc02 = run_vector(VECTORS[4].data)
    # "C%6Fntact" is an unknown header, not a Contact
    assert len(esc02.values("contact")) == 2
    assert esc02.get("c%6fntact") == b"<sip:alias2@host2.example.com>"


def test_semiuri_user_part() -> None:
    m = run_vector(VECTORS[8].data)
    assert m.request_uri.user == "user;par=u%40example.net"  # type: ignore[union-attr]
    assert m.request_uri.host == "example.com"  # type: ignore[union-attr]
    assert len(m.values("accept")) == 6


def test_dblreq_ignores_trailing_octets() -> None:
    m = run_vector(VECTORS[7].data)
    assert m.method == b"REGISTER"
    assert m.body == b""
    assert b"INVITE" not in m.to_bytes()


def test_transports_and_reasons() -> None:
    by_name = {v.name: v for v in VECTORS}
    m = run_vector(by_name["transports"].data)
    assert [v.transport for v in m.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    unreason = run_vector(by_name["unreason"].data)
    assert unreason.status == 200
    assert unreason.reason.decode("utf-8").startswith("= 2**3 * 5**2 но")
    noreason = run_vector(by_name["noreason"].data)
    assert noreason.status == 100
    assert noreason.reason == b""


def _framer_run(chunks: list[bytes]) -> tuple[list[bytes], int | None]:
    framer = StreamFramer()
    events: list[bytes] = []
    try:
        for chunk in chunks:
            framer.receive_data(chunk)
            while (event := framer.next_event()) is not None:
                events.append(event)
    except SipError as exc:
        return events, exc.status
    return events, None


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_builtin_vector_over_a_stream(vector: Vector) -> None:
    """On TCP the framer cuts the same messages (or fails the same way) however bytes arrive."""
    whole = _framer_run([vector.data])
    assert whole == _framer_run([vector.data[i : i + 1] for i in range(len(vector.data))])
    for event in whole[0]:
        try:
            parse_message(event)
        except SipError:
            pass
