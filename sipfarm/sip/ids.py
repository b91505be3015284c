"""Fast random identifiers for branches, tags and Call-IDs.

``secrets.token_hex`` asks the kernel for every identifier (a syscall per message on the hot
path). Branches and tags need uniqueness, not secrecy (RFC 3261 8.1.1.7, 19.3): a Mersenne
Twister seeded from the OS, re-seeded in each forked child so workers never share a stream,
gives 64 random bits in well under a microsecond. Nonces and other secrets keep using
``secrets``.
"""

from __future__ import annotations

import os
import random
from typing import Final

_RNG: Final = random.Random(os.urandom(32))


def _reseed() -> None:
    _RNG.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)


def random_hex(nbytes: int = 8) -> bytes:
    """``2 * nbytes`` lowercase hex digits as ASCII bytes."""
    return b"%0*x" % (2 * nbytes, _RNG.getrandbits(8 * nbytes))


def random_bytes(nbytes: int) -> bytes:
    """``nbytes`` random bytes (unique, not secret: salts, not keys)."""
    # what Random.randbytes does, without its interpreted frame
    return _RNG.getrandbits(8 * nbytes).to_bytes(nbytes, "little")
