"""The asyncio glue of a node: feeds the sans-IO :class:`~sipfarm.node.core.NodeCore` and drains
its output after every input (a message, a timer, a batch of Redis answers, a resolution).

One ``call_at`` timer per worker, re-armed from :meth:`NodeCore.next_deadline` after each
drain (an early timer firing for nothing is cheaper than cancelling it on every message).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sipfarm.node.core import NodeCore
from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage

log = logging.getLogger("sipfarm.node")

SendFn = Callable[..., bool]  # TransportManager.send(data, dest, *, connect=...)


class NodeGlue:
    def __init__(self, core: NodeCore, send: SendFn, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.send = send
        self.loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
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
        send = self.send
        via_socket = self.request_socket
        for data, dest in self.core.datagrams_to_send():
            if data[:8] == b"SIP/2.0 ":
                # a response goes back over the flow its request came on, never over a new
                # connection (RFC 3261 18.2.2; a forged Via must not make us dial anything)
                sent = send(data, dest, connect=False)
            elif via_socket is not None and dest.transport == "udp":
                sent = send(data, dest, local=via_socket)
            else:
                sent = send(data, dest)
            if not sent:
                log.debug("event=send_failed dest=%s", dest)
        deadline = self.core.next_deadline()
        if deadline is None:
            return
        if self._timer_at is not None and self._timer_at <= deadline:
            return  # armed early enough: when it fires, the next drain re-arms for what is left
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.core.handle_timer(self.loop.time())
        finally:
            self.drain()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
