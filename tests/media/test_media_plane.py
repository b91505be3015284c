"""The relay's media plane on real loopback sockets: links (a socket connected to each latched
party), bursts of one hot stream, and that the rules of latching hold through both sockets."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import struct
from typing import Any

import pytest

from media.ports import PortAllocator, PortsExhausted
from media.relay import MediaEndpoint, RelayEngine, RelayServer, policy_predicate
from sipfarm.transport.destinations import DestinationPolicy

_HEADER = struct.Struct("!BBHII")


def rtp(seq: int, ssrc: int = 0xA, size: int = 160) -> bytes:
    return _HEADER.pack(0x80, 0, seq & 0xFFFF, seq * 160 & 0xFFFFFFFF, ssrc) + b"\xff" * size


class Phone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((data, addr))


async def phone(host: str) -> tuple[asyncio.DatagramTransport, Phone]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Phone, local_addr=(host, 0))
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return transport, protocol


async def receive(p: Phone, count: int) -> list[tuple[bytes, Any]]:
    return [await asyncio.wait_for(p.received.get(), 5.0) for _ in range(count)]


async def until(predicate: Any) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 2 s")


def relay(low: int) -> RelayServer:
    engine = RelayEngine(
        PortAllocator(low, low + 19), sdp_allowed=policy_predicate(DestinationPolicy(allow=["127.0.0.0/8"]))
    )
    return RelayServer(engine, "127.0.0.1", receive_buffer=1 << 20)


async def test_latched_ports_get_links_and_strangers_are_still_dropped() -> None:
    server = relay(41300)
    ta, pa = await phone("127.0.0.2")
    tb, pb = await phone("127.0.0.3")
    try:
        a_addr, b_addr = ta.get_extra_info("sockname"), tb.get_extra_info("sockname")
        [b_ports] = await server.offer("call", "ta", [MediaEndpoint(*a_addr)])
        [a_ports] = await server.answer("call", "ta", "tb", [MediaEndpoint(*b_addr)])
        ta.sendto(rtp(0), ("127.0.0.1", a_ports.rtp))
        tb.sendto(rtp(0, ssrc=0xB), ("127.0.0.1", b_ports.rtp))
        await receive(pa, 1)
        await receive(pb, 1)
        await until(lambda: server.linked_ports == 2)  # the two RTP ports, once each party sent
        for seq in range(1, 101):
            ta.sendto(rtp(seq), ("127.0.0.1", a_ports.rtp))
            tb.sendto(rtp(seq, ssrc=0xB), ("127.0.0.1", b_ports.rtp))
        to_b, to_a = await receive(pb, 100), await receive(pa, 100)
        assert [d for d, _ in to_b] == [rtp(seq) for seq in range(1, 101)]
        assert [d for d, _ in to_a] == [rtp(seq, ssrc=0xB) for seq in range(1, 101)]
        # symmetric: each party hears the relay port it sends to
        assert {addr for _, addr in to_b} == {("127.0.0.1", b_ports.rtp)}
        assert {addr for _, addr in to_a} == {("127.0.0.1", a_ports.rtp)}
        # another process cannot bind a linked port, even asking for SO_REUSEADDR
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError):
                squatter.bind(("127.0.0.1", a_ports.rtp))
        # a stranger's packets reach the port's own socket: dropped and counted as before
        ti, _ = await phone("127.0.0.5")
        ti.sendto(rtp(500), ("127.0.0.1", a_ports.rtp))
        await until(lambda: server.query("call").monologues[0].media[0].rtp.drops_unexpected_source == 1)
        ti.close()
        stats = server.query("call").monologues[0].media[0].rtp
        assert (stats.packets, stats.source, stats.lost, stats.drops_send_failed) == (101, a_addr, 0, 0)
        server.delete("call")
        assert server.open_ports == 0 and server.linked_ports == 0 and server.links_failed == 0
        for port in (a_ports.rtp, a_ports.rtcp, b_ports.rtp, b_ports.rtcp):  # both sockets closed
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port))
    finally:
        server.close()
        ta.close()
        tb.close()


async def test_handover_moves_the_link_and_new_sdp_relatches_through_the_old_one() -> None:
    server = relay(41320)
    ta, _ = await phone("127.0.0.2")
    tb, pb = await phone("127.0.0.3")
    tn, pn = await phone("127.0.0.6")  # phone A after its network changed: same SSRC, new address
    try:
        a_addr, b_addr = ta.get_extra_info("sockname"), tb.get_extra_info("sockname")
        [b_ports] = await server.offer("call", "ta", [MediaEndpoint(*a_addr)])
        [a_ports] = await server.answer("call", "ta", "tb", [MediaEndpoint(*b_addr)])
        for seq in range(10):
            ta.sendto(rtp(seq), ("127.0.0.1", a_ports.rtp))
        await until(lambda: server.linked_ports == 1)
        for seq in range(10, 15):  # RFC-style proof: 5 packets continuing A's SSRC and sequence
            tn.sendto(rtp(seq), ("127.0.0.1", a_ports.rtp))
        await until(lambda: server.query("call").monologues[0].media[0].rtp.relatches == 1)
        assert [d for d, _ in await receive(pb, 10)] == [rtp(seq) for seq in range(10)]
        assert [d for d, _ in await receive(pb, 1)] == [rtp(14)]  # the 5th proves it: forwarded
        await until(lambda: server.linked_ports == 1)  # linked again, to the new address
        dropped = server.query("call").monologues[0].media[0].rtp.drops_unexpected_source  # the 4 before
        assert server.query("call").monologues[0].media[0].rtp.source == tn.get_extra_info("sockname")
        tb.sendto(rtp(0, ssrc=0xB), ("127.0.0.1", b_ports.rtp))
        assert (await receive(pn, 1))[0][0] == rtp(0, ssrc=0xB)  # B is heard at A's new address
        ta.sendto(rtp(15), ("127.0.0.1", a_ports.rtp))  # the old address is a stranger now
        await until(lambda: server.query("call").monologues[0].media[0].rtp.drops_unexpected_source == dropped + 1)
        # a re-INVITE with new SDP (its SIP now from A's new network) unlatches; the phone
        # sending on relatches (through its link)
        await server.offer("call", "ta", [MediaEndpoint("127.0.0.7", 9, source="127.0.0.6")])
        assert server.linked_ports == 1  # B's port only
        for seq in range(16, 26):
            tn.sendto(rtp(seq), ("127.0.0.1", a_ports.rtp))
        assert [d for d, _ in await receive(pb, 10)] == [rtp(seq) for seq in range(16, 26)]
        await until(lambda: server.linked_ports == 2)
        tb.sendto(rtp(1, ssrc=0xB), ("127.0.0.1", b_ports.rtp))
        assert (await receive(pn, 1))[0][0] == rtp(1, ssrc=0xB)
    finally:
        server.close()
        for t in (ta, tb, tn):
            t.close()


async def test_one_hot_stream_is_read_in_bursts_without_loss() -> None:
    server = relay(41340)
    ta, _ = await phone("127.0.0.2")
    tb, pb = await phone("127.0.0.3")
    try:
        a_addr, b_addr = ta.get_extra_info("sockname"), tb.get_extra_info("sockname")
        [_] = await server.offer("call", "ta", [MediaEndpoint(*a_addr)])
        [a_ports] = await server.answer("call", "ta", "tb", [MediaEndpoint(*b_addr)])
        n = 5000
        for seq in range(n):  # in chunks: the relay reads between them (one event loop)
            ta.sendto(rtp(seq), ("127.0.0.1", a_ports.rtp))
            if seq % 50 == 49:  # ~50,000 packets/s at most: the relay reads a batch a millisecond
                await asyncio.sleep(0.001)
        got = await receive(pb, n)
        assert [d for d, _ in got] == [rtp(seq) for seq in range(n)]
        stats = server.query("call").monologues[0].media[0].rtp
        assert (stats.packets, stats.lost, stats.received) == (n, 0, n)
    finally:
        server.close()
        ta.close()
        tb.close()


async def test_a_closed_relay_ignores_a_drain_already_due() -> None:
    server = relay(41360)
    await server.offer("call", "ta", [MediaEndpoint("127.0.0.2", 9)])
    plane = server._plane
    server.close()
    plane.drain()  # the loop may still run a readiness reported before the close
    assert server.open_ports == 0


async def test_out_of_descriptors_fails_the_offer_but_retires_no_port() -> None:
    server = relay(41380)
    total = server.engine.ports.free_ports
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = {int(fd) for fd in os.listdir("/proc/self/fd")}
    limit = 0
    while sum(1 for fd in range(limit) if fd not in in_use) < 2:  # room for 2 of the 4 sockets
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with pytest.raises(PortsExhausted):
            await server.offer("call", "ta", [MediaEndpoint("127.0.0.2", 9)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert server.engine.list_calls() == [] and server.open_ports == 0
        assert server.engine.ports.free_ports == total  # nothing retired: the ports were fine
        await server.offer("call", "ta", [MediaEndpoint("127.0.0.2", 9)])
        assert server.open_ports == 4
    finally:
        server.close()
