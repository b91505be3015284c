"""The UDP flows phones registered over straight to this node, without I/O.

A phone that registers with a node directly (an open node, no balancer in front: the REGISTER
carries no Path, so the node is the phone's edge proxy) keeps its NAT binding open with STUN
Binding requests on the same flow (RFC 5626 4.4.2, 8).  A STUN answer goes to the datagram's
source, which anyone can forge: a node answering every STUN request would reflect datagrams at
any address.  So a node answers only the flows that registered through it, until their
bindings expire, as the balancer answers only its registered flows.  Everything else is
dropped and counted (``stun_dropped{reason="stun_not_registered"}``).

At most ``size`` flows are kept, the oldest registration forgotten first: a forgotten phone's
keep-alive goes unanswered, so it registers again (RFC 5626 4.4.1), and is known again.
"""

from __future__ import annotations

from typing import Final

from sipfarm.sip.address import Address

__all__ = ["DirectFlows"]


class DirectFlows:
    """Registered UDP flows (source address -> when their longest binding expires, wall clock)."""

    __slots__ = ("_until", "size")

    def __init__(self, size: int = 65_536) -> None:
        self.size: Final = size
        self._until: dict[Address, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def registered(self, source: Address, until: float) -> None:
        """``source`` registered bindings lasting until ``until`` (0: it has none left)."""
        flows = self._until
        flows.pop(source, None)
        if until <= 0:
            return
        if len(flows) >= self.size:
            del flows[next(iter(flows))]
        flows[source] = until  # newest last: the first entry is the oldest registration

    def allows(self, source: Address, now: float) -> bool:
        """Whether ``source`` is a flow registered through this node and not expired at ``now``."""
        until = self._until.get(source)
        if until is None:
            return False
        if until <= now:
            del self._until[source]
            return False
        return True
