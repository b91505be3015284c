"""The relay's UDP ports: a configured range handed out as RTP/RTCP pairs or single ports.

RFC 3550 11: RTP takes an even port and RTCP the next odd one; with rtcp-mux (RFC 5761) one
port carries both.  The range is kept as two free lists so that both requests are O(1):

- ``pairs``: even ports whose odd partner is free too (a deque: freed pairs go to the back, so a
  port is reused as late as possible and stray packets of an old call rarely reach a new one).
  It starts in a random order: the next call's ports cannot be guessed from the last one's
  (an attacker spraying the ports after its own finds no call to hit; latching is strict
  besides, see media/port.py);
- ``singles``: ports whose partner is in use (an insertion-ordered dict used as a set, so that
  freeing a single can find and remove its partner in O(1) and merge the two back into a pair).

A single is taken from ``singles`` first and otherwise by splitting a pair.
"""

from __future__ import annotations

import random
from collections import deque

__all__ = ["PortAllocator", "PortsExhausted", "RelayError"]


class RelayError(Exception):
    """A request the relay cannot satisfy; ``reason`` is the text of the ng error reply."""

    reason = "Relay error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.reason)


class PortsExhausted(RelayError):
    """No free port (pair) left in the range: the proxy should try another relay."""

    reason = "Ran out of ports"


class PortAllocator:
    """Ports from ``[min_port, max_port]``; see the module docstring."""

    __slots__ = ("_pairs", "_retired", "_singles", "max_port", "min_port")

    def __init__(self, min_port: int, max_port: int, *, shuffled: bool = True) -> None:
        if not 1024 <= min_port <= max_port <= 65535:
            raise ValueError(f"bad port range {min_port}-{max_port}: expected 1024 <= min <= max <= 65535")
        first = min_port + (min_port & 1)  # RTP ports are even (RFC 3550 11)
        if first + 1 > max_port:
            raise ValueError(f"bad port range {min_port}-{max_port}: no even/odd pair in it")
        self.min_port = min_port
        self.max_port = max_port
        pairs = list(range(first, max_port, 2))
        if shuffled:  # ``shuffled=False``: in order, for tests that name the ports they get
            random.SystemRandom().shuffle(pairs)
        self._pairs: deque[int] = deque(pairs)
        self._singles: dict[int, None] = {}
        self._retired: set[int] = set()

    @property
    def free_ports(self) -> int:
        return 2 * len(self._pairs) + len(self._singles)

    @property
    def free_pairs(self) -> int:
        return len(self._pairs)

    def allocate_pair(self) -> int:
        """An even port ``p`` with ``p + 1`` also allocated; PortsExhausted if none."""
        try:
            return self._pairs.popleft()
        except IndexError:
            raise PortsExhausted from None

    def allocate_single(self) -> int:
        """One port (rtcp-mux); PortsExhausted if none."""
        if self._singles:
            port = next(iter(self._singles))
            del self._singles[port]
            return port
        base = self.allocate_pair()
        self._singles[base + 1] = None
        return base

    def free_pair(self, port: int) -> None:
        if port in self._retired or port + 1 in self._retired:
            self.free_single(port)
            self.free_single(port + 1)
            return
        self._pairs.append(port)

    def free_single(self, port: int) -> None:
        if port in self._retired:
            return
        partner = port ^ 1
        if partner in self._singles:
            del self._singles[partner]
            self._pairs.append(min(port, partner))
        else:
            self._singles[port] = None

    def retire(self, port: int) -> None:
        """Never hand ``port`` out again (another process holds it: bind failed). Call before
        freeing the allocation that holds it."""
        self._retired.add(port)
        self._singles.pop(port, None)
