"""Bencoding (media/bencode.py): BEP 3 vectors, strictness, round trip and fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.bencode import MAX_DEPTH, MAX_SIZE, BencodeError, Value, decode, encode

# BEP 3's own examples, and the shape of an ng message as Kamailio's rtpengine module writes it
VECTORS: list[tuple[bytes, Value]] = [
    (b"4:spam", b"spam"),
    (b"0:", b""),
    (b"i3e", 3),
    (b"i-3e", -3),
    (b"i0e", 0),
    (b"l4:spam4:eggse", [b"spam", b"eggs"]),
    (b"le", []),
    (b"d3:cow3:moo4:spam4:eggse", {b"cow": b"moo", b"spam": b"eggs"}),
    (b"d4:spaml1:a1:bee", {b"spam": [b"a", b"b"]}),
    (b"de", {}),
    (b"i9223372036854775808e", 2**63),
]


@pytest.mark.parametrize(("data", "value"), VECTORS)
def test_bep3_vectors(data: bytes, value: Value) -> None:
    assert decode(data) == value
    assert encode(value) == data


def test_encode_sorts_keys_and_takes_str() -> None:
    assert encode({"spam": "eggs", "cow": 1, b"a": ["x", b"y"]}) == b"d1:al1:x1:ye3:cowi1e4:spam4:eggse"
    assert encode("é") == b"2:\xc3\xa9"


def test_decode_accepts_keys_in_insertion_order_as_ng_clients_send_them() -> None:
    ng = b"d7:command4:ping7:call-id3:abce"
    assert decode(ng) == {b"command": b"ping", b"call-id": b"abc"}


@pytest.mark.parametrize(
    ("data", "defect"),
    [
        (b"", "empty"),
        (b"i03e", "leading zero"),
        (b"i-0e", "negative zero"),
        (b"ie", "not a decimal"),
        (b"i-e", "not a decimal"),
        (b"i1.5e", "not a decimal"),
        (b"i12", "truncated"),
        (b"i" + b"1" * 100 + b"e", "more than 64 digits"),
        (b"03:abc", "leading zero"),
        (b"5:abc", "truncated"),
        (b"3abc", "no colon"),
        (b"l4:spam", "list not closed"),
        (b"d3:cow", "no value"),
        (b"d3:cow3:moo", "dictionary not closed"),
        (b"di1e3:mooe", "key at offset 1 is not a string"),
        (b"d1:ai1e1:ai2ee", "repeated"),
        (b"i1ei2e", "trailing data at offset 3"),
        (b"4:spamx", "trailing data"),
        (b"x", "unexpected byte"),
        (b"l" * (MAX_DEPTH + 1) + b"e" * (MAX_DEPTH + 1), "nest deeper"),
        (b"%d:" % MAX_SIZE + b"x" * MAX_SIZE, "more than 65536"),
    ],
)
def test_strict_decoding_names_the_defect(data: bytes, defect: str) -> None:
    with pytest.raises(BencodeError, match=defect):
        decode(data)


def test_nesting_up_to_the_bound_is_fine() -> None:
    deep = b"l" * MAX_DEPTH + b"e" * MAX_DEPTH
    value = decode(deep)
    assert encode(value) == deep


@pytest.mark.parametrize("value", [True, 1.5, None, {1: b"x"}, {"a": 1, b"a": 2}])
def test_encode_refuses_what_bencoding_cannot_say(value: object) -> None:
    with pytest.raises(BencodeError):
        encode(value)  # type: ignore[arg-type]


values: st.SearchStrategy[Value] = st.recursive(
    st.integers(min_value=-(10**60), max_value=10**60) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.binary(max_size=10), children, max_size=5),
    max_leaves=30,
)


@given(values)
def test_round_trip(value: Value) -> None:
    data = encode(value)
    assert decode(data) == value
    assert encode(decode(data)) == data


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_decode_or_raise_the_typed_error(data: bytes) -> None:
    try:
        value = decode(data)
    except BencodeError:
        return
    # anything accepted re-encodes to the same value (bytes may differ only in key order)
    assert decode(encode(value)) == value


@settings(max_examples=300)
@given(values, st.data())
def test_fuzz_mutated_and_truncated_encodings(value: Value, data: st.DataObject) -> None:
    raw = bytearray(encode(value))
    cut = data.draw(st.integers(0, len(raw)))
    if raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            decode(candidate)
        except BencodeError:
            pass
