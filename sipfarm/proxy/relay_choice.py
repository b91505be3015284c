"""Which media relay a new call goes to: the node's table of relays, sans-IO.

Two sources fill the table:

* a static list of ng addresses (``[node] relays = ["IP:PORT", ...]``: rtpengine, or relays
  outside the membership).  No load figures: a call starts on the relay a CRC-32 of its
  Call-ID picks, the same on every node and worker, and tries the others in list order;
* the cluster membership (``relays = ["cluster"]``, what ``sipfarm up`` configures): the live
  ``sipfarm relay`` processes with their heartbeat figures (active sessions, free media
  ports).  A new call goes to the least loaded; between two heartbeats the node adds the calls
  it has itself sent to each relay since, so a burst of calls spreads instead of piling onto
  the relay that looked idlest a second ago.  Draining relays and relays with no free port pair
  take no new call.

Either way a relay that did not answer (timeout) or refused is *suspect* for ``suspect_for``
seconds: tried last by new calls, so once one call has paid the ng timeout the next calls go
straight to a healthy relay (Kamailio's rtpengine module marks a dead rtpengine disabled the
same way, ``rtpengine_disable_tout``).  The membership drops a dead relay after its heartbeat
TTL; the suspect mark covers the seconds in between.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["MIN_FREE_PORTS", "SUSPECT_SECONDS", "RelayLoad", "RelayTable", "relay_index"]

RelayAddress = tuple[str, int]

SUSPECT_SECONDS = 5.0
#: a call needs a port pair per side (RTP and RTCP): fewer free ports than this is a full relay
MIN_FREE_PORTS = 4


def relay_index(call_id: bytes, count: int) -> int:
    """The relay a call starts on among ``count`` with no load figures: the same on every node
    and process (Python's own ``hash`` is salted per process, CRC-32 is not)."""
    return zlib.crc32(call_id) % count


@dataclass(frozen=True, slots=True)
class RelayLoad:
    """A relay as its last heartbeat described it."""

    address: RelayAddress
    sessions: float = 0.0
    free_ports: int | None = None


@dataclass(slots=True)
class _Entry:
    load: RelayLoad
    assigned: int = 0  # new calls this node sent it since its last heartbeat figures
    suspect_until: float = 0.0


class RelayTable:
    """The relays a node may use and how loaded each is (see the module docstring)."""

    def __init__(self, static: Sequence[RelayAddress] = (), *, suspect_for: float = SUSPECT_SECONDS) -> None:
        self.by_load = not static
        self.suspect_for = suspect_for
        self._entries: dict[RelayAddress, _Entry] = {a: _Entry(RelayLoad(a)) for a in static}
        self._order: list[RelayAddress] = list(static)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, address: object) -> bool:
        return address in self._entries

    @property
    def addresses(self) -> list[RelayAddress]:
        return list(self._order)

    def update(self, relays: Iterable[RelayLoad]) -> None:
        """The live relays of the membership (replacing the table; a relay gone from it is gone
        from the table). Suspect marks survive; the node's own counts restart from the new
        figures."""
        old = self._entries
        entries: dict[RelayAddress, _Entry] = {}
        for load in relays:
            previous = old.get(load.address)
            entries[load.address] = _Entry(load, 0, previous.suspect_until if previous else 0.0)
        self._entries = entries
        self._order = sorted(entries)

    def choose(self, call_id: bytes, now: float) -> list[RelayAddress]:
        """The relays to try for a new call, best first: healthy ones (by load, or from the
        Call-ID's hash for a static list), then suspect or full ones as a last resort."""
        order = self._order
        count = len(order)
        if not count:
            return []
        first = relay_index(call_id, count)
        entries = self._entries

        def rank(position: int) -> tuple[int, float, int]:
            entry = entries[order[position]]
            rotated = (position - first) % count
            unusable = entry.suspect_until > now or (
                entry.load.free_ports is not None and entry.load.free_ports < MIN_FREE_PORTS
            )
            load = entry.load.sessions + entry.assigned if self.by_load else 0.0
            return (1 if unusable else 0, load, rotated)

        return [order[p] for p in sorted(range(count), key=rank)]

    def assigned(self, address: RelayAddress) -> None:
        """A new call went to ``address``: it counts towards its load until the next figures."""
        entry = self._entries.get(address)
        if entry is not None:
            entry.assigned += 1
            entry.suspect_until = 0.0

    def failed(self, address: RelayAddress, now: float) -> None:
        """``address`` did not answer, or refused: tried last for ``suspect_for`` seconds."""
        entry = self._entries.get(address)
        if entry is not None:
            entry.suspect_until = now + self.suspect_for

    def suspect(self, address: RelayAddress, now: float) -> bool:
        entry = self._entries.get(address)
        return entry is not None and entry.suspect_until > now
