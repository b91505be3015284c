"""Caches fed from the wire are bounded in memory, not only in entries.

A value off the wire may be as long as a message (64 KB): a memo bounded to N entries only
would let distinct long values hold N x 64 KB. Each memo remembers keys up to a size
(``MAX_CACHED_KEY``); longer values still parse right, they are just not remembered.
"""

from __future__ import annotations

from sipfarm.sip import headers, parser, uri
from sipfarm.sip.headers import parse_name_addr
from sipfarm.sip.memo import MAX_CACHED_KEY, BoundedMemo, key_size
from sipfarm.sip.uri import SipURI, parse_uri
from sipfarm.store import location
from sipfarm.store.location import Binding

HOSTILE = 2_000  # distinct values, each of LONG bytes: 16 MB if remembered
LONG = 1536  # over memo.MAX_CACHED_KEY (512), under the parser's bounds (headers.MAX_VIA_PARM 2 KB)


def _long_param(i: int) -> str:
    return f"x{i}=" + "a" * LONG


def test_memo_does_not_remember_long_keys_but_answers_them() -> None:
    calls: list[str] = []

    def make(text: str) -> str:
        calls.append(text)
        return text.upper()

    memo: BoundedMemo[str, str] = BoundedMemo(make, limit=100, max_key=8)
    assert memo("short") == "SHORT" and memo("short") == "SHORT"
    assert calls == ["short"]
    long = "l" * 9
    assert memo(long) == long.upper() and memo(long) == long.upper()
    assert calls == ["short", long, long]  # recomputed: never remembered
    assert len(memo) == 1 and memo.skipped == 2
    memo.seed("s" * 9, "S")
    assert len(memo) == 1 and memo.skipped == 3


def test_key_size_sums_tuples() -> None:
    assert key_size(b"abc") == 3 and key_size("ab") == 2
    assert key_size((b"ab", ("cde", 7))) == 5


def test_uri_memo_keeps_no_hostile_long_uris() -> None:
    for i in range(HOSTILE):
        text = f"sip:alice@example.com;{_long_param(i)}"
        parsed = parse_uri(text if i % 2 else text.encode())
        assert isinstance(parsed, SipURI) and parsed.param(f"x{i}") == "a" * LONG
    memo = uri._PARSED
    assert len(memo) <= memo._limit
    assert all(key_size(key) <= MAX_CACHED_KEY for key in memo._data)  # none of them remembered
    # short ones still are
    assert parse_uri("sip:bob@example.com;cache=me") is parse_uri("sip:bob@example.com;cache=me")


def test_name_addr_memo_keeps_no_hostile_long_values() -> None:
    for i in range(HOSTILE):
        value = f'"Mallory" <sip:m@example.com>;{_long_param(i)}'.encode()
        parsed = parse_name_addr(value)
        assert parsed.params and str(parsed.uri) == "sip:m@example.com"
    memo = headers._NAME_ADDRS
    assert len(memo) <= memo._limit
    assert memo.key_bytes() <= len(memo) * MAX_CACHED_KEY
    short = b"<sip:bob@example.com>;tag=1"
    assert parse_name_addr(short) is parse_name_addr(short)


def test_binding_memo_keeps_no_hostile_long_bindings() -> None:
    memo = location._DECODED
    for i in range(200):
        binding = Binding(
            "sip:m@192.0.2.1", 1e9, 1.0, f"cid{i}", 1, None, None, (), "udp:192.0.2.1:5060",
            "UA/" + "u" * LONG, "node1", 1.0,
        )  # fmt: skip
        raw = binding.to_json().encode()
        assert Binding.from_json(raw) == binding
    assert memo.key_bytes() <= len(memo) * memo.max_key
    assert all(len(key) <= memo.max_key for key in memo._data)


def test_header_name_cache_keeps_no_long_names() -> None:
    for i in range(300):
        name = f"X-{i}-" + "n" * LONG
        data = (
            "OPTIONS sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n"
            "From: <sip:b@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: c\r\n"
            f"CSeq: 1 OPTIONS\r\n{name}: v\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        assert parser.parse_message(data).get(name.lower()) == b"v"
    assert all(len(raw) <= MAX_CACHED_KEY for raw in parser._KEY_CACHE)
