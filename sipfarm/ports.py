"""Free loopback ports for the processes sipfarm starts itself (Redis for ``sipfarm up``, the
benchmark's and the tests' servers).

Asking the kernel for port 0 gives a port from its ephemeral range, the same range it hands out
for every outgoing connection's local port: between the check and the server's own bind, a Redis
client connecting somewhere may take it. Ports are picked at random below that range instead,
where only other explicit choices (this function's) can land, and checked free for the wanted
protocols.

Nothing is bound between two calls, so two calls in a row could hand out the same port (a
balancer given one port for UDP/TCP and "another" for WebSocket failed to bind the second): a
port handed out recently by this process is not handed out again.
"""

from __future__ import annotations

import random
import socket
from collections import deque
from pathlib import Path

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_RECENT_MAX = 4096
_recent: deque[int] = deque(maxlen=_RECENT_MAX)
_recent_set: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def is_free(host: str, port: int, *, udp: bool = True, tcp: bool = True) -> bool:
    """True when ``port`` can be bound on ``host`` now, for each protocol asked."""
    kinds = ([socket.SOCK_DGRAM] if udp else []) + ([socket.SOCK_STREAM] if tcp else [])
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                # as the listener will (asyncio's create_server does): a port whose last
                # connections linger in TIME-WAIT is free for it (a restarted `sipfarm up`
                # refused its own ports for a minute)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1", *, udp: bool = True, tcp: bool = True) -> int:
    """A port free on ``host`` (UDP and/or TCP), below the kernel's ephemeral range."""
    top = _ephemeral_start()
    bottom = max(1024, top - 12_000)
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(bottom, top)
        if port not in _recent_set and is_free(host, port, udp=udp, tcp=tcp):
            _remember(port)
            return port
    raise RuntimeError(f"no free port on {host} in {bottom}-{top - 1}")


def _remember(port: int) -> None:
    if len(_recent) == _RECENT_MAX:
        _recent_set.discard(_recent[0])
    _recent.append(port)
    _recent_set.add(port)
