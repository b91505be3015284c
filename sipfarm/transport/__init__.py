"""SIP transports: thin asyncio layers (UDP, TCP, TLS) around the sans-IO core.

:class:`TransportManager` owns listeners and connections and hands every parsed message to one
synchronous callback; see ``manager.py`` for the theory of operation.
"""

from sipfarm.sip.address import Address
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.loop import install_uvloop
from sipfarm.transport.manager import MessageCallback, TransportManager
from sipfarm.transport.stats import TransportStats

__all__ = [
    "Address",
    "MessageCallback",
    "TransportConfig",
    "TransportManager",
    "TransportStats",
    "install_uvloop",
]
