"""A bounded memo for pure parsers of immutable values (URIs, name-addrs, stored bindings).

SIP traffic repeats the same values (Request-URIs, Route and Contact values, a callee's
bindings), so parsing each distinct text once pays. The memo is bounded twice: in entries
(when full it is cleared, so hostile input that never repeats costs one dict insert per
value) and in the size of each key it remembers (``MAX_MEMO_KEY``): a key comes off the wire,
where a value may be as long as a message (64 KB), so a count bound alone would let distinct
long values hold ``limit`` x 64 KB (256 MB at 4,096 entries). A longer key is parsed every
time and not remembered: correctness never depends on the memo.
Only results are kept: a parser that raises is simply called again next time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# The longest key (characters of a str, bytes of a bytes, summed over a tuple of them) that a
# cache fed from the wire remembers. Real URIs, name-addrs, Call-IDs and branches are well
# under 256; a longer value still works, it just costs a recompute. Every cache keyed (or
# valued) by bytes off the wire uses this bound, so its worst case is entries x this, not
# entries x the message size.
MAX_CACHED_KEY: Final = 512


# keys bounded_key hashes, per process: an outsider cannot aim two values at one entry
_KEY_HASH_SECRET: Final = os.urandom(32)


def bounded_key(key: bytes) -> bytes:
    """``key`` itself when at most ``MAX_CACHED_KEY`` bytes, else 17 bytes standing for it: a
    NUL and a keyed BLAKE2b-128 of it.  For tables that behaviour depends on (a pinned INVITE,
    an admitted Call-ID), where not remembering a long key would change what happens: the same
    long value always maps to the same entry, of bounded size, and distinct ones (barring a
    2**-128 chance) to distinct entries."""
    if len(key) <= MAX_CACHED_KEY:
        return key
    return b"\0" + hashlib.blake2b(key, key=_KEY_HASH_SECRET, digest_size=16).digest()


def key_size(key: object) -> int:
    """The size ``MAX_CACHED_KEY`` bounds: len of a str or bytes, summed over a tuple."""
    if isinstance(key, (str, bytes)):
        return len(key)
    if isinstance(key, tuple):
        return sum(key_size(part) for part in key)
    return 0


class BoundedMemo(Generic[K, V]):
    __slots__ = ("_data", "_limit", "_make", "max_key", "skipped")

    def __init__(self, make: Callable[[K], V], limit: int = 4096, max_key: int = MAX_CACHED_KEY) -> None:
        self._make = make
        self._limit = limit
        self._data: dict[K, V] = {}
        self.max_key = max_key
        self.skipped = 0  # results not remembered because their key was longer than max_key

    def __call__(self, key: K) -> V:
        hit = self._data.get(key)
        if hit is not None:
            return hit
        value = self._make(key)
        self._remember(key, value)
        return value

    def seed(self, key: K, value: V) -> None:
        """Record ``value`` as what the parser makes of ``key`` (the caller just encoded it from
        that value), so its first read costs a look-up, not a parse."""
        self._remember(key, value)

    def _remember(self, key: K, value: V) -> None:
        if key_size(key) > self.max_key:
            self.skipped += 1
            return
        if len(self._data) >= self._limit:
            self._data.clear()
        self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)

    def key_bytes(self) -> int:
        """The summed size of the remembered keys (what tests bound)."""
        return sum(key_size(key) for key in self._data)
