"""The C packer of Redis commands (sipfarm/store/_resppack.c) against hiredis.pack_command.

``RedisPipe`` packs every command with ``resp.pack_command``: the C ``pack`` for the common case
(a tuple of exact str, bytes, int and float), hiredis for anything else.  The bytes must be
hiredis's for every input the C takes, and the C must answer None (hiredis then packs or
raises as before) for every input it does not.  The common case must really be the C's (a C
that always said None would pass the rest).

The extension exists only in the compiled build (scripts/test-compiled.sh); the interpreted
stage skips this file (its path is hiredis's, tested everywhere else).
"""

from __future__ import annotations

import math
from typing import Any

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipfarm.store import resp

resppack = pytest.importorskip("sipfarm.store._resppack")

ARG = st.one_of(
    st.text(),
    st.binary(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
)

REGISTER = (
    "EVALSHA", "0123456789abcdef0123456789abcdef01234567", 4, "loc:{ab}:sip:alice@example.com", "idx:1",
    "ban:192.0.2.1", "nonce:abcdef", "sip:alice@example.com", "1764606000.123456", "call-1@192.0.2.1", 5, 10,
    "0", 1, "sip:alice@192.0.2.1:5060", "1764609600.123456", '{"contact":"sip:alice@192.0.2.1:5060"}', 30000,
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(ARG, max_size=40).map(tuple))
def test_the_bytes_are_hiredis(args: Any) -> None:
    packed = resppack.pack(args)
    assert packed is not None
    assert packed == hiredis.pack_command(args)
    assert resp.pack_command(args) == packed


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("PING",),
        REGISTER,
        ("SET", "é€😀", b"\x00\r\n", -0.0, math.pi, 1e300, 5e-324, 10**100, -(10**30)),
        tuple(range(200)),  # more arguments than the C keeps on its stack
        ("x" * 100_000, b"y" * 70_000),
    ],
)
def test_common_commands(args: Any) -> None:
    assert resppack.pack(args) == hiredis.pack_command(args)


@pytest.mark.parametrize(
    "args",
    [
        ("SET", None),
        ("SET", True),  # bool is an int subclass: hiredis refuses it
        ("SET", bytearray(b"x")),
        ("SET", memoryview(b"xy")),
        ("SET", "\udc80"),  # does not encode to UTF-8
    ],
)
def test_anything_else_is_not_mine(args: Any) -> None:
    assert resppack.pack(args) is None
    # and resp.pack_command does what hiredis does with it: the same bytes or the same error
    try:
        expected: object = hiredis.pack_command(args)
    except Exception as exc:  # whichever hiredis raises
        with pytest.raises(type(exc)):
            resp.pack_command(args)
    else:
        assert resp.pack_command(args) == expected


def test_not_a_tuple_is_not_mine() -> None:
    not_a_tuple: Any = ["SET", "k"]
    assert resppack.pack(not_a_tuple) is None
