"""The bans this process knows of: a bounded LRU of source (its subject) -> end of trust, no I/O.

A node drops requests from a source it knows is banned before it parses much or asks Redis, so
a banned flood costs a dict lookup per datagram. The cache only ever holds what Redis said
(learnt from the guard's answers) and is lossy by design: when full, the least recently used
entry goes, and that source is simply asked about again.
"""

from __future__ import annotations

from collections import OrderedDict

from sipfarm.transport.subject import source_subject


class LocalBans:
    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._entries: OrderedDict[str, float] = OrderedDict()  # source -> trusted until (clock)

    def __len__(self) -> int:
        return len(self._entries)

    def banned(self, source: str, now: float) -> bool:
        source = source_subject(source)  # what was banned: an IPv6 source's /64
        until = self._entries.get(source)
        if until is None:
            return False
        if until <= now:
            del self._entries[source]
            return False
        self._entries.move_to_end(source)
        return True

    def learn(self, source: str, until: float) -> None:
        source = source_subject(source)
        self._entries[source] = until
        self._entries.move_to_end(source)
        if len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def forget(self, source: str) -> None:
        self._entries.pop(source_subject(source), None)
