"""Where a SIP message came from or goes to, as the transaction layer and transports see it."""

from __future__ import annotations

from typing import NamedTuple


class Address(NamedTuple):
    """A transport endpoint: ``transport`` is lower case (udp, tcp, tls, ws, wss).

    For connection-oriented transports the (transport, host, port) of the remote end names the
    connection the transport layer holds, so a response goes back over the flow its request used.
    """

    transport: str
    host: str
    port: int

    def __str__(self) -> str:
        host = self.host if ":" not in self.host or self.host.startswith("[") else f"[{self.host}]"
        return f"{self.transport}:{host}:{self.port}"

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"

    @classmethod
    def parse(cls, text: str) -> Address:
        """``udp:127.0.0.1:5060`` (also ``tcp:[::1]:5060``)."""
        transport, _, rest = text.partition(":")
        host, _, port = rest.rpartition(":")
        if not transport or not host or not port.isdigit():
            raise ValueError(f"bad address {text!r}: expected TRANSPORT:HOST:PORT")
        return cls(transport.lower(), host.strip("[]"), int(port))
