"""The balancer's transport: every received message is screened before it is parsed.

:class:`ScreenedTransports` is the :class:`~sipfarm.transport.manager.TransportManager` with one
check in front of ``deliver``: ``screen(data, source)`` (the front door's, see
:mod:`sipfarm.balancer.frontdoor`) returning False drops the message unparsed and unanswered,
so a banned or flooding source costs a dict look-up or two per datagram.
"""

from __future__ import annotations

from collections.abc import Callable

from sipfarm.sip.address import Address
from sipfarm.transport.manager import TransportManager

__all__ = ["ScreenedTransports"]


class ScreenedTransports(TransportManager):
    screen: Callable[[bytes, Address], bool] | None = None

    def deliver(self, data: bytes, source: Address, local: Address) -> None:
        screen = self.screen
        if screen is None or screen(data, source):
            super().deliver(data, source, local)
