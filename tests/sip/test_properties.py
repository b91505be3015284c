"""Hypothesis properties of the parser: round trips, and nothing but SipError on bad input.

* generated messages (random methods/status codes, URIs, compact and folded headers, bodies)
  parse to what was generated, and ``parse(serialize(parse(x)))`` equals ``parse(x)``;
* ``parse_message`` on arbitrary bytes, and on valid messages truncated, with bytes flipped or
  with CR/LF/NUL/colons inserted, raises nothing but ``SipError`` -- and whatever it accepts
  serializes to bytes that parse back to the same message (what a proxy forwards is what it read);
* ``StreamFramer`` fed whole, byte by byte or in random chunks gives the same messages, or the
  same typed error;
* the accessors a handler calls on a parsed message raise nothing but ``SipError``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sip_support import exercise

from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import StreamFramer, parse_message, validate_request

# Moderate counts keep `pytest tests/sip` fast; SIPFARM_PROPERTY_SCALE=20 for a deep run.
SCALE = float(os.environ.get("SIPFARM_PROPERTY_SCALE", "1"))
FAST = settings(max_examples=int(100 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
STREAM = settings(max_examples=int(40 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"

tokens = st.text(TOKEN_CHARS, min_size=1, max_size=10)
methods = st.sampled_from(
    ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "SUBSCRIBE", "NOTIFY", "MESSAGE", "PRACK"]
) | tokens
hosts = st.sampled_from(["example.com", "192.0.2.1", "[2001:db8::1]", "a-b.example.org", "h"])
users = st.text(ALNUM + "-_.!~*'()&=+$,", min_size=1, max_size=10)
uri_params = st.lists(
    st.tuples(st.text(ALNUM, min_size=1, max_size=6), st.none() | st.text(ALNUM, min_size=1, max_size=6)),
    max_size=3,
)


@st.composite
def sip_uris(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return "tel:+" + draw(st.text("0123456789", min_size=1, max_size=12))
    out = draw(st.sampled_from(["sip:", "sips:"]))
    user = draw(st.none() | users)
    if user is not None:
        out += user + "@"
    out += draw(hosts)
    port = draw(st.none() | st.integers(0, 65535))
    if port is not None:
        out += f":{port}"
    for name, value in draw(uri_params):
        out += f";{name}" if value is None else f";{name}={value}"
    return out


# printable header text, no CR/LF; may carry UTF-8 and odd punctuation
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from(list("\té€ж")),
    max_size=40,
).map(lambda s: s.strip(" \t"))


def cased(draw: st.DrawFn, name: str) -> str:
    """Random upper/lower case for a header name (names are case-insensitive)."""
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True))


def fold(draw: st.DrawFn, value: str) -> str:
    """Maybe replace one space of ``value`` with a line fold (RFC 3261 7.3.1). Only a space with
    no whitespace beside it: the parser rightly turns a fold and the whitespace around it into
    one SP, so folding "0 \t0" would not read back as itself."""
    blank = (" ", "\t")
    spaces = [
        i for i, c in enumerate(value)
        if c == " " and value[i - 1 : i] not in blank and value[i + 1 : i + 2] not in blank
    ]  # fmt: skip
    if not spaces or not draw(st.booleans()):
        return value
    i = draw(st.sampled_from(spaces))
    return value[:i] + draw(st.sampled_from(["\r\n ", "\r\n\t", "\r\n   "])) + value[i + 1 :]


@dataclass(frozen=True)
class Generated:
    data: bytes
    start: tuple[bytes, bytes, int, bytes]  # method, uri, status, reason
    headers: list[tuple[str, bytes]]  # (key, unfolded value) as the parser should see them
    body: bytes


@st.composite
def sip_messages(draw: st.DrawFn) -> Generated:
    is_request = draw(st.booleans())
    method = draw(methods)
    if is_request:
        uri = draw(sip_uris())
        start_line = f"{method} {uri} SIP/2.0"
        start = (method.encode(), uri.encode(), 0, b"")
    else:
        status = draw(st.integers(100, 699))
        reason = draw(header_text).replace("\t", " ")
        start_line = f"SIP/2.0 {status} {reason}"
        start = (b"", b"", status, reason.encode())
    branch = "z9hG4bK" + draw(st.text(ALNUM, min_size=1, max_size=8))
    to_tag = draw(st.none() | st.text(ALNUM, min_size=1, max_size=8))
    via_host = draw(hosts)
    fields: list[tuple[str, str, str]] = [  # (key, possible names, value)
        ("via", "Via|v", f"SIP/2.0/{draw(st.sampled_from(['UDP', 'TCP', 'TLS']))} {via_host};branch={branch}"),
        ("from", "From|f", f'"{draw(users)}" <{draw(sip_uris())}>;tag={draw(st.text(ALNUM, min_size=1))}'),
        ("to", "To|t", f"<{draw(sip_uris())}>" + (f";tag={to_tag}" if to_tag else "")),
        ("call-id", "Call-ID|i", draw(st.text(ALNUM + "-.@", min_size=1, max_size=20))),
        ("cseq", "CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"),
    ]
    if draw(st.booleans()):
        fields.append(("max-forwards", "Max-Forwards", str(draw(st.integers(0, 255)))))
    fields += [
        ("contact", "Contact|m", f"<{draw(sip_uris())}>;expires={draw(st.integers(0, 9999))}")
        for _ in range(draw(st.integers(0, 2)))
    ]
    for _ in range(draw(st.integers(0, 2))):
        vias = ", ".join(f"SIP/2.0/UDP {draw(hosts)};branch=z9hG4bK{i}" for i in range(draw(st.integers(1, 3))))
        fields.append(("via", "Via|v", vias))
    for _ in range(draw(st.integers(0, 4))):
        name = "X-" + draw(tokens)
        fields.append((name.lower(), name, draw(header_text)))
    if draw(st.booleans()):
        fields.append(("subject", "Subject|s", draw(header_text)))
    order = draw(st.permutations(range(len(fields))))
    body = draw(st.binary(max_size=200)) if draw(st.booleans()) else b""
    lines = [start_line]
    headers: list[tuple[str, bytes]] = []
    for i in order:
        key, names, value = fields[i]
        name = cased(draw, draw(st.sampled_from(names.split("|"))))
        colon = draw(st.sampled_from([": ", ":", " : ", ":\t"]))
        lines.append(name + colon + fold(draw, value))
        headers.append((key, value.encode()))
    if body or draw(st.booleans()):
        name = draw(st.sampled_from(["Content-Length", "l", "content-length"]))
        lines.append(f"{name}: {len(body)}")
        headers.append(("content-length", str(len(body)).encode()))
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return Generated(data, start, headers, body)


def semantic(msg: SipMessage) -> tuple[object, ...]:
    """What must survive a parse/serialize round trip."""
    return (
        msg.method,
        msg.uri,
        msg.status,
        msg.reason,
        [(key, value) for key, _, value in msg.headers],
        msg.body,
        msg.cseq,
    )


def parse_or_error(data: bytes) -> SipMessage | SipError:
    try:
        return parse_message(data)
    except SipError as exc:
        return exc


def check_any_input(data: bytes) -> None:
    """Only SipError; and what parses re-serializes to the same message."""
    result = parse_or_error(data)
    if isinstance(result, SipError):
        assert isinstance(result.status, int)
        return
    again = parse_message(result.to_bytes())
    assert semantic(again) == semantic(result)
    exercise(result)


# -- generated messages -------------------------------------------------------------------------


@FAST
@given(sip_messages())
def test_generated_message_parses_to_what_was_generated(gen: Generated) -> None:
    msg = parse_message(gen.data)
    assert (msg.method, msg.uri, msg.status, msg.reason) == gen.start
    assert [(key, value) for key, _, value in msg.headers] == gen.headers
    assert msg.body == gen.body
    if msg.is_request:
        validate_request(msg)
    exercise(msg)


@FAST
@given(sip_messages())
def test_parse_serialize_parse_is_stable(gen: Generated) -> None:
    first = parse_message(gen.data)
    second = parse_message(first.to_bytes())
    assert semantic(second) == semantic(first)
    assert second.to_bytes() == first.to_bytes()


@FAST
@given(sip_messages())
def test_bare_lf_version_parses_the_same(gen: Generated) -> None:
    head, _, body = gen.data.partition(b"\r\n\r\n")
    lf = head.replace(b"\r\n", b"\n") + b"\n\n" + body
    if b"\n\n" in head.replace(b"\r\n", b"\n"):
        return
    expected = parse_message(gen.data)
    if b"\r" in body or b"\n\n" in body:
        return  # where the LF-only head ends is only defined when the body cannot confuse it
    assert semantic(parse_message(lf)) == semantic(expected)


# -- bad input: only SipError ----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=1500))
def test_arbitrary_bytes(data: bytes) -> None:
    check_any_input(data)


@FUZZ
@given(st.lists(st.sampled_from([
    b"INVITE sip:a@b SIP/2.0", b"SIP/2.0 200 OK", b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b",",
    b";", b"<", b">", b'"', b"\\", b"\x00", b"Via", b"v", b"Content-Length", b"l", b"0", b"5",
    b"CSeq", b"1 INVITE", b"Call-ID", b"i", b"From", b"To", b"tag=", b"sip:", b"@", b"[::1]",
    b"SIP/2.0/UDP h;branch=z9hG4bK1", b"\r\n\r\n", b"Contact", b"*", b"rport=", b"\xff",
]), max_size=60).map(b"".join))
def test_sip_shaped_noise(data: bytes) -> None:
    check_any_input(data)


INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b":", b" ", b"\t", b",", b";", b"<", b">", b'"', b"\\", b"\r\n "]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(sip_messages()).data)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "dup"]))
        if op == "truncate":
            del data[i:]
        elif op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from(INSERTS))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            j = draw(st.integers(i, min(len(data), i + 40)))
            data[j:j] = data[i:j]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_messages(data: bytes) -> None:
    check_any_input(data)


# -- StreamFramer: chunking does not matter -----------------------------------------------------------


def run_framer(chunks: list[bytes], max_size: int) -> tuple[list[bytes], tuple[type, int] | None]:
    framer = StreamFramer(max_size=max_size)
    events: list[bytes] = []
    try:
        for chunk in chunks:
            framer.receive_data(chunk)
            while (event := framer.next_event()) is not None:
                events.append(event)
    except SipError as exc:
        return events, (type(exc), exc.status)
    return events, None


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            parts.append(b"\r\n\r\n")
        elif kind == 1:
            parts.append(draw(st.sampled_from([b"\r\n", b"\r", b"\n"])))
        elif kind == 2:
            parts.append(draw(mutated()))
        else:
            parts.append(draw(sip_messages()).data)
    return b"".join(parts)


@STREAM
@given(streams(), st.data())
def test_framer_chunking_is_irrelevant(stream: bytes, data: st.DataObject) -> None:
    max_size = data.draw(st.sampled_from([65535, 400, 200]))
    whole = run_framer([stream], max_size)
    bytewise = run_framer([stream[i : i + 1] for i in range(len(stream))], max_size)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    bounds = [0, *cuts, len(stream)]
    chunked = run_framer([stream[a:b] for a, b in itertools.pairwise(bounds)], max_size)
    assert whole == bytewise == chunked
    for event in whole[0]:
        if event != StreamFramer.PING:
            check_any_input(event)


@STREAM
@given(st.lists(sip_messages(), min_size=1, max_size=3))
def test_framer_returns_each_message(messages: list[Generated]) -> None:
    stream = b"".join(m.data for m in messages)
    events, error = run_framer([stream[i : i + 7] for i in range(0, len(stream), 7)], 65535)
    with_length = [m.data for m in messages]
    if all(any(k == "content-length" for k, _ in m.headers) for m in messages):
        assert error is None
        assert events == with_length
    else:
        # RFC 3261 18.3: a message without Content-Length on a stream is an error
        assert error is not None and error[1] == 400


# -- the fuzz target itself ---------------------------------------------------------------------------


def test_fuzz_parser_runs(tmp_path: Path) -> None:
    """tests/sip/fuzz_parser.py runs for ~3 s (atheris if installed) without a crash."""
    script = Path(__file__).resolve().parent / "fuzz_parser.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--seconds", "3", "--seed", "1", "--artifacts", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0, f"{crashes}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert not crashes
