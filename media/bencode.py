"""Bencoding (BEP 3), the value format of rtpengine's ng control protocol.

Four kinds of value, written as:

- integer: ``i<decimal>e`` -- no leading zeros, no ``-0`` ("i-0e is invalid.  All encodings with a
  leading zero, such as i03e, are invalid, other than i0e, which of course corresponds to 0");
- byte string: ``<length>:<bytes>``, the length in decimal (no leading zeros either);
- list: ``l<values>e``;
- dictionary: ``d<key><value>...e``, keys byte strings ("Keys must be strings and appear in sorted
  order (sorted as raw strings, not alphanumerics)").

:func:`encode` writes dictionaries with sorted keys.  :func:`decode` is strict about everything
but key order: Kamailio's rtpengine module (and rtpengine itself) writes ng dictionaries in
insertion order (``d7:command5:offer7:call-id...``), so unsorted keys are accepted; a repeated key
is not.  Input is bounded (:data:`MAX_SIZE` bytes, :data:`MAX_DEPTH` nested containers,
:data:`MAX_INT_DIGITS` digits) and read in time linear in its size; trailing bytes after the
value are rejected.  Every defect raises :class:`BencodeError` naming it and its offset; nothing
else escapes :func:`decode`.

Decoded strings are ``bytes`` and dictionaries ``dict[bytes, Value]``.  :func:`encode` also takes
``str`` (written as UTF-8) for convenience, for values and keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "MAX_SIZE", "BencodeError", "Value", "decode", "encode"]

MAX_SIZE = 64 * 1024  # an ng message is an SDP (bounded to 64 KiB by media.sdp) plus a few keys
MAX_DEPTH = 32  # ng messages nest three levels; the bound keeps recursion far from Python's limit
MAX_INT_DIGITS = 64  # ints in ng are counters and ports; int() of a huge string is quadratic

Value = Union[int, bytes, list["Value"], dict[bytes, "Value"]]  # noqa: UP007 (a runtime alias)
Encodable = Union[  # noqa: UP007 (a runtime alias)
    int, bytes, str, Sequence["Encodable"], Mapping[str, "Encodable"], Mapping[bytes, "Encodable"]
]

_DIGITS = frozenset(b"0123456789")


class BencodeError(ValueError):
    """Input that is not exactly one valid bencoded value; the message names the defect."""


def encode(value: Encodable) -> bytes:
    """Bencode ``value``; raises :class:`BencodeError` for a type bencoding has no form for."""
    out: list[bytes] = []
    _encode(value, out, 0)
    return b"".join(out)


def _encode(value: Encodable, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BencodeError(f"value nests deeper than {MAX_DEPTH}")
    if isinstance(value, bool):  # a bool is an int to Python, but surely a mistake here
        raise BencodeError("cannot bencode a bool")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out.append(b"%d:" % len(data))
        out.append(data)
    elif isinstance(value, str):
        _encode(value.encode("utf-8"), out, depth)
    elif isinstance(value, Mapping):
        items: dict[bytes, Encodable] = {}
        for key, item in value.items():
            raw = key.encode("utf-8") if isinstance(key, str) else key
            if not isinstance(raw, bytes):
                raise BencodeError(f"dictionary key {key!r} is not a string")
            if raw in items:
                raise BencodeError(f"dictionary key {raw!r} given twice")
            items[raw] = item
        out.append(b"d")
        for raw in sorted(items):  # BEP 3: sorted as raw strings
            out.append(b"%d:" % len(raw))
            out.append(raw)
            _encode(items[raw], out, depth + 1)
        out.append(b"e")
    elif isinstance(value, list | tuple):
        out.append(b"l")
        for item in value:
            _encode(item, out, depth + 1)
        out.append(b"e")
    else:
        raise BencodeError(f"cannot bencode a {type(value).__name__}")


def decode(data: bytes, *, max_size: int = MAX_SIZE, max_depth: int = MAX_DEPTH) -> Value:
    """The one value ``data`` encodes; raises :class:`BencodeError`."""
    if len(data) > max_size:
        raise BencodeError(f"input is {len(data)} bytes, more than {max_size}")
    if not data:
        raise BencodeError("input is empty")
    value, end = _Decoder(bytes(data), max_depth).value_at(0, 0)
    if end != len(data):
        raise BencodeError(f"trailing data at offset {end}")
    return value


class _Decoder:
    __slots__ = ("data", "max_depth")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.max_depth = max_depth

    def value_at(self, pos: int, depth: int) -> tuple[Value, int]:
        data = self.data
        if pos >= len(data):
            raise BencodeError(f"truncated: a value expected at offset {pos}")
        lead = data[pos]
        if lead == 0x69:  # i
            return self.integer_at(pos)
        if lead in _DIGITS:
            return self.string_at(pos)
        if lead in (0x6C, 0x64):  # l, d
            if depth >= self.max_depth:
                raise BencodeError(f"containers nest deeper than {self.max_depth} at offset {pos}")
            return self.list_at(pos, depth) if lead == 0x6C else self.dict_at(pos, depth)
        raise BencodeError(f"unexpected byte {bytes([lead])!r} at offset {pos}")

    def integer_at(self, pos: int) -> tuple[int, int]:
        data = self.data
        end = data.find(b"e", pos + 1, pos + 3 + MAX_INT_DIGITS)
        if end < 0:
            if len(data) - pos - 1 <= MAX_INT_DIGITS + 1:
                raise BencodeError(f"truncated integer at offset {pos}")
            raise BencodeError(f"integer at offset {pos} has more than {MAX_INT_DIGITS} digits")
        text = data[pos + 1 : end]
        digits = text[1:] if text[:1] == b"-" else text
        if not digits or not all(c in _DIGITS for c in digits):
            raise BencodeError(f"integer at offset {pos} is not a decimal number: {text[:20]!r}")
        if len(digits) > MAX_INT_DIGITS:
            raise BencodeError(f"integer at offset {pos} has more than {MAX_INT_DIGITS} digits")
        if digits[0] == 0x30 and (len(digits) > 1 or text[:1] == b"-"):  # i03e, i-0e
            raise BencodeError(f"integer at offset {pos} has a leading zero or is negative zero")
        return int(text), end + 1

    def string_at(self, pos: int) -> tuple[bytes, int]:
        data = self.data
        colon = data.find(b":", pos, pos + 12)  # a length fits in 10 digits (MAX_SIZE is smaller)
        if colon < 0:
            raise BencodeError(f"string length at offset {pos} has no colon (or too many digits)")
        text = data[pos:colon]
        if not all(c in _DIGITS for c in text):
            raise BencodeError(f"string length at offset {pos} is not a decimal number: {text!r}")
        if len(text) > 1 and text[0] == 0x30:
            raise BencodeError(f"string length at offset {pos} has a leading zero")
        length = int(text)
        start = colon + 1
        if start + length > len(data):
            raise BencodeError(f"truncated: string at offset {pos} is {length} bytes, {len(data) - start} left")
        return data[start : start + length], start + length

    def list_at(self, pos: int, depth: int) -> tuple[list[Value], int]:
        data = self.data
        items: list[Value] = []
        pos += 1
        while True:
            if pos >= len(data):
                raise BencodeError("truncated: list not closed")
            if data[pos] == 0x65:  # e
                return items, pos + 1
            item, pos = self.value_at(pos, depth + 1)
            items.append(item)

    def dict_at(self, pos: int, depth: int) -> tuple[dict[bytes, Value], int]:
        data = self.data
        items: dict[bytes, Value] = {}
        pos += 1
        while True:
            if pos >= len(data):
                raise BencodeError("truncated: dictionary not closed")
            if data[pos] == 0x65:  # e
                return items, pos + 1
            if data[pos] not in _DIGITS:
                raise BencodeError(f"dictionary key at offset {pos} is not a string")
            key_at = pos
            key, pos = self.string_at(pos)
            if key in items:
                raise BencodeError(f"dictionary key {key[:40]!r} repeated at offset {key_at}")
            if pos >= len(data):
                raise BencodeError(f"truncated: dictionary key {key[:40]!r} has no value")
            items[key], pos = self.value_at(pos, depth + 1)
