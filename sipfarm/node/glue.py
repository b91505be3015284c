"""The asyncio glue of a node: feeds the sans-IO :class:`~sipfarm.node.core.NodeCore` and drains
its output after every input (a message, a timer, a batch of Redis answers, a resolution).

One ``call_at`` timer per worker, re-armed from :meth:`NodeCore.next_deadline` after each
drain (an early timer firing for nothing is cheaper than cancelling it on every message), on a
coarse grid (:data:`TIMER_GRANULARITY`): at hundreds of calls a second a transaction timer is due
every fraction of a millisecond, and one wake-up now fires all that are due in a 10 ms slot.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import cast

from sipfarm.node.core import NodeCore
from sipfarm.proxy.ng_client import NgClient
from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage

log = logging.getLogger("sipfarm.node")

SendFn = Callable[..., bool]  # TransportManager.send(data, dest, *, connect=...)

# drains in a row while client flows fail: each failure ends branches, and the answers (or a
# next q-value group toward another flow) are sent in the next round; what is left after these
# waits for the next input or timer
_FLOW_FAILURE_ROUNDS = 8
# The node's timers fire up to this late (seconds): one wake-up of the loop for every timer due
# in a slot, instead of one for nearly every timer (~4 per call end 5 and 32 s after it, each
# a wake-up, its system call and a drain).  RFC 3261's timers are "at least" durations of 0.5 s
# (T1) and up; 10 ms late is well inside what the network adds (Kamailio's own timer ticks are
# coarser).
TIMER_GRANULARITY = 0.01


class LazyTimer:
    """One ``call_at`` timer kept no later than the earliest deadline asked for: an early fire
    for nothing is cheaper than cancelling and re-arming on every message (the handler re-arms
    for what is left)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[], None], granularity: float = 0.0) -> None:
        self.loop = loop
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None
        self.fired_at = 0.0  # the deadline the timer last fired for
        # > 0: deadlines are rounded up to a multiple of it, so the timers due in one slot
        # share one wake-up (see TIMER_GRANULARITY)
        self.granularity = granularity

    def arm(self, deadline: float | None) -> None:
        if deadline is None:
            return
        if self.granularity > 0.0:
            deadline = math.ceil(deadline / self.granularity) * self.granularity
        if self._at is not None and self._at <= deadline:
            return  # armed early enough: when it fires, the next drain re-arms
        if self._handle is not None:
            self._handle.cancel()
        self._at = deadline
        self._handle = self.loop.call_at(deadline, self._fired)

    def _fired(self) -> None:
        self._handle = None
        self.fired_at = self._at or 0.0
        self._at = None
        self._fire()

    def now(self) -> float:
        """The loop's time, in a handler: no earlier than the deadline it was armed for (the
        loop's millisecond timers may run one a fraction of a millisecond early, which would
        leave that slot's timers to one more wake-up)."""
        return max(self.loop.time(), self.fired_at)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._at = None


class NodeGlue:
    def __init__(self, core: NodeCore, send: SendFn, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.send = send
        self.loop = loop
        self._timer = LazyTimer(loop, self._on_timer, TIMER_GRANULARITY)
        # the UDP socket requests leave from: the one our Via names (a worker's private port),
        # since peers answer to the source port (RFC 3581)
        self.request_socket: Address | None = None

    def on_message(self, msg: SipMessage, source: Address, local: Address) -> None:
        """Transport callback (inline, no task). A SipError raised here before a transaction
        exists goes back to the transport, which answers it statelessly."""
        try:
            self.core.on_message(msg, source, local, self.loop.time())
        finally:
            self.drain()

    def on_send_failure(self, dest: Address) -> None:
        self.core.transport_failure(dest, self.loop.time())
        self.drain()

    def drain(self) -> None:
        """Send what the core queued, then re-arm the one timer."""
        core = self.core
        send = self.send
        via_socket = self.request_socket
        for _ in range(_FLOW_FAILURE_ROUNDS):
            out = core.datagrams_to_send()
            flows = core.flow_destinations
            failed: set[Address] | None = None
            for data, dest in out:
                if data[:8] == b"SIP/2.0 ":
                    # a response goes back over the flow its request came on, never over a new
                    # connection (RFC 3261 18.2.2; a forged Via must not make us dial anything)
                    sent = send(data, dest, connect=False)
                elif via_socket is not None and dest.transport == "udp":
                    sent = send(data, dest, local=via_socket)
                elif flows and dest in flows:
                    # a request to a client's connection: that one or none, a NATed phone
                    # cannot be dialled; its loss is answered 430 at once (RFC 5626 5.3)
                    sent = send(data, dest, connect=False)
                    if not sent:
                        if failed is None:
                            failed = set()
                        failed.add(dest)
                else:
                    sent = send(data, dest)
                if not sent:
                    log.debug("event=send_failed dest=%s", dest)
            if failed is None:
                break
            now = self.loop.time()
            for dest in failed:
                core.transport_failure(dest, now)
        self._timer.arm(core.next_deadline())

    def _on_timer(self) -> None:
        try:
            self.core.handle_timer(self._timer.now())
        finally:
            self.drain()

    def close(self) -> None:
        self._timer.cancel()


class NgEndpoint(asyncio.DatagramProtocol):
    """The UDP socket a node worker speaks ng on, to its media relays: the asyncio layer of a
    sans-IO :class:`~sipfarm.proxy.ng_client.NgClient`.  Requests leave as soon as the proxy
    queues them (the client's ``wake``); replies and the one ``call_at`` timer feed the client,
    whose callbacks continue the proxy, then ``after`` (the node's drain) sends what they
    queued.  Nothing here waits for a relay."""

    def __init__(self, client: NgClient, loop: asyncio.AbstractEventLoop, after: Callable[[], None]) -> None:
        self.client = client
        self.loop = loop
        self.after = after
        self.transport: asyncio.DatagramTransport | None = None
        self._timer = LazyTimer(loop, self._on_timer)
        client.wake = self.flush

    @classmethod
    async def open(
        cls, client: NgClient, loop: asyncio.AbstractEventLoop, after: Callable[[], None], host: str = "0.0.0.0"
    ) -> NgEndpoint:
        _, protocol = await loop.create_datagram_endpoint(lambda: cls(client, loop, after), local_addr=(host, 0))
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio.DatagramTransport: no isinstance
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.client.receive_datagram(data, (addr[0], addr[1]))
        finally:
            self.flush()
            self.after()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead relay: the request times out as if lost
        log.debug("event=ng_socket_error error=%s", exc)

    def flush(self) -> None:
        """Send what the client queued, then re-arm the one timer."""
        transport = self.transport
        for data, relay in self.client.datagrams_to_send():
            if transport is not None:
                transport.sendto(data, relay)
        self._timer.arm(self.client.next_deadline())

    def _on_timer(self) -> None:
        try:
            self.client.handle_timer(self.loop.time())
        finally:
            self.flush()
            self.after()

    def close(self) -> None:
        self._timer.cancel()
        if self.transport is not None:
            self.transport.close()
