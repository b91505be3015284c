"""sipfarm.ports: free loopback ports for the processes sipfarm and its tests start."""

from __future__ import annotations

import socket

from sipfarm import ports


def test_ports_in_a_row_are_distinct_while_none_is_bound() -> None:
    # A balancer is given one port for UDP/TCP and another for WebSocket before it binds either:
    # the same port twice made it fail with "address already in use" (CI, once).
    picked = [ports.free_port() for _ in range(2000)]
    assert len(set(picked)) == len(picked)


def test_a_port_in_use_is_not_handed_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        taken = sock.getsockname()[1]
        assert not ports.is_free("127.0.0.1", taken, udp=True, tcp=False)
        assert all(ports.free_port(udp=True, tcp=False) != taken for _ in range(200))
