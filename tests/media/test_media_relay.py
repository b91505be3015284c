"""The relay's forwarding engine (media/relay.py, media/ports.py).

Most tests drive the sans-IO core with an injected clock and in-memory senders; the last ones
put real UDP "phones" on 127.0.0.2/.3 and forward through a RelayServer on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest
from fixtures.relay import free_port_range
from hypothesis import given, settings
from hypothesis import strategies as st

from media.farm import FarmAddresses, PortRange
from media.ports import PortAllocator, PortsExhausted, RelayError
from media.relay import (
    MAX_ANSWER_LEGS,
    MediaEndpoint,
    MediaPorts,
    RelayEngine,
    RelayPort,
    RelayServer,
    SessionLimitReached,
    TooManyAnswers,
    UnknownCall,
    UnknownTag,
    policy_predicate,
)
from sipfarm.cluster.membership import Member, Role
from sipfarm.transport.destinations import DestinationPolicy

A_SDP = ("203.0.113.10", 4000)
B_SDP = ("203.0.113.20", 5000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any, /) -> None:
        self.sent.append((data, addr))


class Relay:
    """An engine with its ports' senders replaced by recorders, addressed by port number."""

    def __init__(self, ports: PortAllocator | None = None, **kwargs: Any) -> None:
        self.clock = Clock()
        policy = DestinationPolicy(deny=["10.0.0.0/8", "127.0.0.0/8"])  # 203.0.113.0/24 is fine
        kwargs.setdefault("sdp_allowed", policy_predicate(policy))
        self.engine = RelayEngine(ports or PortAllocator(20000, 20099), clock=self.clock, **kwargs)
        self.ports: dict[int, RelayPort] = {}
        self.senders: dict[int, Recorder] = {}

    def sync(self) -> None:
        for port in self.engine.take_opened():
            self.ports[port.port] = port
            port.sender = self.senders[port.port] = Recorder()
        for port in self.engine.take_closed():
            del self.ports[port.port]

    def call(
        self, b_sdp: tuple[str, int] = B_SDP, b_source: str | None = None, **a: Any
    ) -> tuple[MediaPorts, MediaPorts]:
        """offer from A, answer from B (``b_source``: B's SIP source, ng received-from):
        (A's relay ports, B's relay ports)."""
        b_ports = self.engine.offer("c1", "ta", [MediaEndpoint(*A_SDP, **a)])
        a_ports = self.engine.answer("c1", "ta", "tb", [MediaEndpoint(*b_sdp, source=b_source)])
        self.sync()
        return a_ports[0], b_ports[0]

    def send(self, port: int, data: bytes, source: tuple[str, int]) -> None:
        self.ports[port].receive(data, source)

    def sent(self, port: int) -> list[tuple[bytes, Any]]:
        out = self.senders[port].sent[:]
        self.senders[port].sent.clear()
        return out


def rtp(seq: int, ts: int | None = None, ssrc: int = 0xA, payload: bytes = b"\x00" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160 if ts is None else ts) & 0xFFFFFFFF, ssrc) + payload


def rtcp_rr(ssrc: int = 0xA) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc) + b"\x00" * 4


# -- ports ---------------------------------------------------------------------------------


def test_allocator_pairs_singles_and_merging() -> None:
    alloc = PortAllocator(20001, 20008, shuffled=False)  # odd start: pairs 20002, 20004, 20006
    assert alloc.free_ports == 6
    assert alloc.allocate_pair() == 20002
    single = alloc.allocate_single()  # splits 20004: 20005 waits as a single
    assert single == 20004
    assert alloc.allocate_single() == 20005
    assert alloc.free_pairs == 1
    alloc.free_single(20004)
    alloc.free_single(20005)  # partners merge back into a pair
    assert alloc.free_pairs == 2
    alloc.allocate_pair()
    alloc.allocate_pair()
    with pytest.raises(PortsExhausted, match=r"^Ran out of ports$"):
        alloc.allocate_pair()
    with pytest.raises(ValueError, match="bad port range"):
        PortAllocator(20000, 20000)


def test_ports_are_handed_out_in_a_random_order() -> None:
    """The next call's ports cannot be guessed from the last one's: two relays with the same
    range give different sequences (probability of a match 1 in 50!), every even port once."""
    orders = [[alloc.allocate_pair() for _ in range(50)] for alloc in (PortAllocator(30000, 30099) for _ in range(2))]
    assert orders[0] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(30000, 30099, 2))


def test_offer_and_answer_allocate_even_pairs_and_mux_singles() -> None:
    relay = Relay()
    free = relay.engine.ports.free_ports
    a_ports, b_ports = relay.call()
    assert a_ports.rtp % 2 == 0 and a_ports.rtcp == a_ports.rtp + 1
    assert b_ports.rtp % 2 == 0 and b_ports.rtcp == b_ports.rtp + 1
    assert relay.engine.ports.free_ports == free - 4
    # an offerer with a=rtcp-mux gets one port; the answerer side still gets a pair
    ports = relay.engine.offer("c2", "x", [MediaEndpoint(*A_SDP, rtcp_mux=True)])
    mux = relay.engine.answer("c2", "x", "y", [MediaEndpoint(*B_SDP)])
    assert mux[0].rtcp_mux and not ports[0].rtcp_mux
    assert relay.engine.ports.free_ports == free - 4 - 3
    assert sorted(relay.engine.list_calls()) == ["c1", "c2"]


def test_exhaustion_is_typed_and_leaves_nothing_allocated() -> None:
    relay = Relay(PortAllocator(20000, 20005))  # three pairs
    relay.call()
    with pytest.raises(PortsExhausted) as info:
        relay.engine.offer("c2", "x", [MediaEndpoint(*A_SDP)])  # needs two pairs, one is left
    assert isinstance(info.value, RelayError) and info.value.reason == "Ran out of ports"
    assert relay.engine.ports.free_pairs == 1
    assert relay.engine.list_calls() == ["c1"]
    relay.engine.take_opened()
    relay.engine.take_closed()


def test_session_limit() -> None:
    relay = Relay(max_sessions=1)
    relay.call()
    with pytest.raises(SessionLimitReached):
        relay.engine.offer("c2", "x", [MediaEndpoint(*A_SDP)])
    relay.engine.offer("c1", "ta", [MediaEndpoint(*A_SDP)])  # the existing call may re-offer


def test_delete_returns_every_port_and_closes_sockets() -> None:
    relay = Relay()
    free = relay.engine.ports.free_ports
    a, b = relay.call()
    relay.send(a.rtp, rtp(1), A_SDP)
    stats = relay.engine.delete("c1")
    assert stats.monologues[0].media[0].rtp.packets == 1
    assert relay.engine.ports.free_ports == free
    assert sorted(p.port for p in relay.engine.take_closed()) == sorted([a.rtp, a.rtcp, b.rtp, b.rtcp])
    with pytest.raises(UnknownCall):
        relay.engine.query("c1")
    with pytest.raises(UnknownCall):
        relay.engine.delete("c1")


def test_unknown_tags_are_errors() -> None:
    relay = Relay()
    relay.call()
    with pytest.raises(UnknownTag):
        relay.engine.answer("c1", "nobody", "tb", [MediaEndpoint(*B_SDP)])
    with pytest.raises(UnknownTag):
        relay.engine.delete("c1", from_tag="nobody")


# -- forwarding and latching ---------------------------------------------------------------


def test_forwarding_both_ways_is_symmetric() -> None:
    relay = Relay()
    a, b = relay.call()
    relay.send(a.rtp, rtp(1), A_SDP)
    # A's packet leaves from B's port (so B sees the relay as the source) to B's SDP address
    assert relay.sent(b.rtp) == [(rtp(1), B_SDP)]
    relay.send(b.rtp, rtp(7, ssrc=0xB), B_SDP)
    assert relay.sent(a.rtp) == [(rtp(7, ssrc=0xB), A_SDP)]
    relay.send(a.rtcp, rtcp_rr(), (A_SDP[0], A_SDP[1] + 1))
    assert relay.sent(b.rtcp) == [(rtcp_rr(), (B_SDP[0], B_SDP[1] + 1))]
    stats = relay.engine.query("c1")
    a_rtp = stats.monologues[0].media[0].rtp
    assert (a_rtp.packets, a_rtp.bytes, a_rtp.source, a_rtp.last_seen) == (1, 172, A_SDP, 1000.0)
    assert stats.monologues[1].tag == "tb"


def test_sdp_address_refused_by_policy_waits_for_latching_nat() -> None:
    relay = Relay()
    nat = ("198.51.100.7", 40000)
    # B's private address: never a destination; its SIP came from its NAT's address
    a, b = relay.call(b_sdp=("10.1.2.3", 5000), b_source=nat[0])
    relay.send(a.rtp, rtp(1), A_SDP)
    relay.send(a.rtp, rtp(2), A_SDP)
    assert relay.sent(b.rtp) == []
    assert relay.engine.query("c1").monologues[0].media[0].rtp.drops_no_destination == 2
    relay.send(b.rtp, rtp(1, ssrc=0xB), nat)  # B's first packet latches its real address
    relay.send(a.rtp, rtp(3), A_SDP)
    assert relay.sent(b.rtp) == [(rtp(3), nat)]
    assert relay.engine.query("c1").monologues[1].media[0].rtp.source == nat


def test_a_source_the_policy_refuses_is_never_latched_onto_even_when_its_sdp_vouched_for_it() -> None:
    """A caller's SDP names a refused address (a service on 10.0.0.0/8, the SDP vouching for its
    IP); one packet spoofed from there must not latch the port, or the relay would stream the
    other party's media (or the caller's chosen payloads) at it (red team, 2026-12-03)."""
    relay = Relay()
    victim = ("10.9.9.9", 6379)
    a, b = relay.call(b_sdp=victim, b_source="198.51.100.7")  # B's SDP names the victim
    relay.send(b.rtp, rtp(1, ssrc=0xB), victim)  # the spoofed packet: dropped, counted, not latched
    relay.send(a.rtp, rtp(1), A_SDP)
    assert relay.sent(b.rtp) == []
    b_rtp = relay.engine.query("c1").monologues[1].media[0].rtp
    assert (b_rtp.source, b_rtp.drops_unexpected_source) == (None, 1)
    nat = ("198.51.100.7", 40000)
    relay.send(b.rtp, rtp(2, ssrc=0xB), nat)  # B's real address (its SIP's) latches
    relay.send(a.rtp, rtp(2), A_SDP)
    assert relay.sent(b.rtp) == [(rtp(2), nat)]


def test_an_sdp_inside_another_relays_range_waits_for_latching() -> None:
    """Two relays whose calls' SDPs name each other's ports would bounce one packet for ever:
    a port anywhere in another relay's range (its membership record) is never sent to."""
    farm = FarmAddresses([PortRange("203.0.113.1", 20000, 20099)])  # this relay's own
    farm.update([Member("relay2", Role.RELAY, ("udp:203.0.113.2:30000",), port_max=30999)])
    policy = DestinationPolicy(deny=["10.0.0.0/8", "127.0.0.0/8"])
    relay = Relay(sdp_allowed=policy_predicate(policy, farm.farm_address))
    a, b = relay.call(b_sdp=("203.0.113.2", 30500))  # B's SDP names relay 2's port of some call
    relay.send(a.rtp, rtp(1), A_SDP)
    assert relay.sent(b.rtp) == []
    assert relay.engine.query("c1").monologues[0].media[0].rtp.drops_no_destination == 1
    relay.engine.delete("c1")
    relay.sync()
    a, b = relay.call(b_sdp=("203.0.113.2", 31000))  # just past its range: a phone's like any other
    relay.send(a.rtp, rtp(2), A_SDP)
    assert relay.sent(b.rtp) == [(rtp(2), ("203.0.113.2", 31000))]


def test_after_latching_other_sources_are_dropped_and_counted() -> None:
    relay = Relay()
    a, b = relay.call()
    relay.send(a.rtp, rtp(1), A_SDP)
    relay.sent(b.rtp)
    intruder = ("198.51.100.66", 1234)
    for seq in range(10):
        relay.send(a.rtp, rtp(seq, ssrc=0xBAD), intruder)  # another SSRC, A not silent
    assert relay.sent(b.rtp) == []
    a_rtp = relay.engine.query("c1").monologues[0].media[0].rtp
    assert (a_rtp.drops_unexpected_source, a_rtp.packets, a_rtp.source) == (10, 1, A_SDP)
    relay.send(b.rtp, rtp(1, ssrc=0xB), B_SDP)
    assert relay.sent(a.rtp) == [(rtp(1, ssrc=0xB), A_SDP)]  # B's packets still go to A, not the intruder


def test_relatch_on_same_ssrc_continuing_sequence() -> None:
    relay = Relay()
    a, b = relay.call()
    for seq in range(1, 11):
        relay.send(a.rtp, rtp(seq), A_SDP)
    relay.sent(b.rtp)
    moved = ("203.0.113.10", 4444)  # A's NAT binding changed mid-stream: same SSRC, next seqs
    for seq in range(11, 15):
        relay.send(a.rtp, rtp(seq), moved)
    assert relay.sent(b.rtp) == []  # four packets: not proven yet
    relay.send(a.rtp, rtp(15), moved)
    assert relay.sent(b.rtp) == [(rtp(15), B_SDP)]
    relay.send(b.rtp, rtp(1, ssrc=0xB), B_SDP)
    assert relay.sent(a.rtp) == [(rtp(1, ssrc=0xB), moved)]  # and A now receives at its new address
    a_rtp = relay.engine.query("c1").monologues[0].media[0].rtp
    assert (a_rtp.relatches, a_rtp.drops_unexpected_source, a_rtp.lost) == (1, 4, 4)


def test_relatch_refused_on_broken_continuity_then_allowed_after_silence() -> None:
    relay = Relay()
    a, _ = relay.call()
    relay.send(a.rtp, rtp(100), A_SDP)
    other = ("203.0.113.10", 9)  # A's IP, another port (its NAT binding changed)
    for seq in (101, 102, 103, 104, 9000, 9001):  # same SSRC, but the run breaks at 9000
        relay.send(a.rtp, rtp(seq), other)
    assert relay.engine.query("c1").monologues[0].media[0].rtp.source == A_SDP
    relay.clock.now += 2.0  # A silent for relatch_silence: a new SSRC may take over
    for seq in range(5):
        relay.send(a.rtp, rtp(seq, ssrc=0xC), other)
    a_rtp = relay.engine.query("c1").monologues[0].media[0].rtp
    assert (a_rtp.source, a_rtp.relatches) == (other, 1)


def test_malformed_and_wrong_kind_packets_are_dropped_and_counted() -> None:
    relay = Relay()
    a, b = relay.call()
    relay.send(a.rtp, b"\x40" + rtp(1)[1:], A_SDP)  # version 1
    relay.send(a.rtp, b"\x80\x00\x00", A_SDP)  # short
    relay.send(a.rtp, rtcp_rr(), A_SDP)  # RTCP on a non-mux RTP port
    relay.send(a.rtcp, rtp(1), A_SDP)  # RTP on the RTCP port
    assert relay.sent(b.rtp) == [] and relay.sent(b.rtcp) == []
    media = relay.engine.query("c1").monologues[0].media[0]
    assert media.rtp.drops_malformed == 3
    assert media.rtcp is not None and media.rtcp.drops_malformed == 1
    assert media.rtp.source is None  # nothing malformed latches


def test_rtcp_mux_side_demuxes_to_a_non_mux_peer() -> None:
    relay = Relay()
    a, b = relay.call(rtcp_mux=True)
    assert a.rtcp_mux
    relay.send(a.rtp, rtcp_rr(), A_SDP)
    relay.send(a.rtp, rtp(1), A_SDP)
    assert relay.sent(b.rtcp) == [(rtcp_rr(), (B_SDP[0], B_SDP[1] + 1))]
    assert relay.sent(b.rtp) == [(rtp(1), B_SDP)]
    relay.send(b.rtcp, rtcp_rr(0xB), (B_SDP[0], B_SDP[1] + 1))
    assert relay.sent(a.rtp) == [(rtcp_rr(0xB), A_SDP)]  # RTCP to a mux party: its one port


def test_loss_and_jitter_of_a_relayed_stream() -> None:
    relay = Relay()
    a, _ = relay.call()
    t0 = relay.clock.now
    for i in range(201):
        if i in (50, 51, 52):
            continue
        relay.clock.now = t0 + i * 0.020 + (0.005 if i % 2 else 0.0)
        relay.send(a.rtp, rtp(65500 + i), A_SDP)  # wraps through 65535
    a_rtp = relay.engine.query("c1").monologues[0].media[0].rtp
    assert (a_rtp.expected, a_rtp.received, a_rtp.lost, a_rtp.packets) == (201, 198, 3, 198)
    assert a_rtp.extended_max_seq == 65536 + (65500 + 200 - 65536)
    assert a_rtp.jitter_ms == pytest.approx(5.0, abs=0.3)


def test_clock_rate_from_the_codec() -> None:
    relay = Relay()
    relay.engine.offer("c1", "ta", [MediaEndpoint(*A_SDP, clock_rate=48000)])
    relay.engine.answer("c1", "ta", "tb", [MediaEndpoint(*B_SDP)])
    relay.sync()
    port = relay.engine.query("c1").monologues[0].media[0].ports.rtp
    for i in range(100):
        relay.clock.now = 1000.0 + i * 0.020 + (0.002 if i % 2 else 0.0)
        relay.send(port, rtp(i, ts=i * 960), A_SDP)
    assert relay.engine.query("c1").monologues[0].media[0].rtp.jitter_ms == pytest.approx(2.0, abs=0.1)


# -- timeout, forks, re-INVITE -------------------------------------------------------------


def test_media_timeout_frees_a_silent_call_only() -> None:
    relay = Relay(media_timeout=60.0)
    free = relay.engine.ports.free_ports
    a, _ = relay.call()
    relay.engine.offer("c2", "x", [MediaEndpoint(*A_SDP)])
    relay.sync()
    assert relay.engine.next_timer() == 1060.0
    relay.clock.now = 1030.0
    relay.send(a.rtp, rtp(1), A_SDP)  # c1 has media, c2 none
    relay.clock.now = 1060.0
    expired = relay.engine.handle_timer(relay.clock.now)
    assert [s.call_id for s in expired] == ["c2"]
    assert relay.engine.list_calls() == ["c1"]
    assert relay.engine.next_timer() == 1090.0
    assert relay.engine.handle_timer(1089.9) == []
    assert [s.call_id for s in relay.engine.handle_timer(1090.0)] == ["c1"]
    assert relay.engine.ports.free_ports == free
    assert relay.engine.next_timer() is None


def test_forked_answers_each_to_tag_is_a_leg() -> None:
    relay = Relay()
    b_ports = relay.engine.offer("c1", "ta", [MediaEndpoint(*A_SDP)])
    relay.engine.answer("c1", "ta", "t1", [MediaEndpoint("203.0.113.31", 6000)])
    a_ports = relay.engine.answer("c1", "ta", "t2", [MediaEndpoint("203.0.113.32", 6000)])
    relay.sync()
    relay.send(a_ports[0].rtp, rtp(1), A_SDP)
    assert relay.sent(b_ports[0].rtp) == [(rtp(1), ("203.0.113.32", 6000))]  # the newest answer
    callee = relay.engine.query("c1").monologues[1]
    assert (callee.tag, callee.legs) == ("t2", ("t1", "t2"))
    relay.engine.delete("c1", "ta", "t2")  # the newest leg goes: t1 directs the media again
    relay.send(a_ports[0].rtp, rtp(2), A_SDP)
    assert relay.sent(b_ports[0].rtp) == [(rtp(2), ("203.0.113.31", 6000))]
    assert relay.engine.list_calls() == ["c1"]
    relay.engine.delete("c1", "ta", "t1")
    assert relay.engine.list_calls() == []


def test_a_call_holds_at_most_max_answer_legs_to_tags() -> None:
    """A callee's 183s under ever new To tags (red team, 2026-12-03: 12,000 of them grew the
    relay by 30 MB) are refused past MAX_ANSWER_LEGS; the legs kept still answer and direct."""
    relay = Relay()
    relay.engine.offer("c1", "ta", [MediaEndpoint(*A_SDP)])
    for n in range(MAX_ANSWER_LEGS):
        relay.engine.answer("c1", "ta", f"t{n}", [MediaEndpoint("203.0.113.31", 6000 + 2 * n)])
    with pytest.raises(TooManyAnswers):
        relay.engine.answer("c1", "ta", "one-more", [MediaEndpoint("203.0.113.31", 7000)])
    assert len(relay.engine.query("c1").monologues[1].legs) == MAX_ANSWER_LEGS
    relay.engine.answer("c1", "ta", "t0", [MediaEndpoint("203.0.113.31", 7002)])  # a kept leg's new answer
    assert relay.engine.query("c1").monologues[1].tag == "t0"
    relay.engine.delete("c1", "ta", "t5")
    relay.engine.answer("c1", "ta", "one-more", [MediaEndpoint("203.0.113.31", 7000)])  # room again


def test_reinvite_from_the_callee_swaps_tags_and_keeps_ports() -> None:
    relay = Relay()
    a, b = relay.call()
    ports = relay.engine.offer("c1", "tb", [MediaEndpoint("203.0.113.21", 5002)], to_tag="ta")
    assert ports == [a]
    back = relay.engine.answer("c1", "tb", "ta", [MediaEndpoint(*A_SDP)])
    assert back == [b]
    relay.send(a.rtp, rtp(1), A_SDP)
    assert relay.sent(b.rtp) == [(rtp(1), ("203.0.113.21", 5002))]  # B moved its media
    assert relay.engine.take_opened() == []  # no new port


# -- real sockets on loopback --------------------------------------------------------------


class Phone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((data, addr))


async def phone(host: str) -> tuple[asyncio.DatagramTransport, Phone]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(Phone, local_addr=(host, 0))


async def receive(p: Phone, count: int) -> list[tuple[bytes, Any]]:
    return [await asyncio.wait_for(p.received.get(), 2.0) for _ in range(count)]


def bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_stranger_never_latches_while_the_call_rings_nor_after_silence() -> None:
    """RTP bleed (red team, 2026-12-02): a sender the signalling did not name sprays the
    relay's ports while the callee's phone rings (its ports know no address yet), and again
    after a party's 2 s of silence.  It latches nothing, hears nothing, injects nothing; the
    real phones still latch, from the IPs their SDP and SIP named, on any port."""
    relay = Relay()
    b_ports = relay.engine.offer("c1", "ta", [MediaEndpoint(*A_SDP)])[0]
    relay.sync()
    a_ports = relay.engine.query("c1").monologues[0].media[0].ports
    stranger = ("198.51.100.66", 7078)
    for port in (a_ports.rtp, a_ports.rtcp, b_ports.rtp, b_ports.rtcp):  # ringing: B sent no SDP yet
        for seq in range(10):
            relay.send(port, rtp(seq, ssrc=0xBAD) if port % 2 == 0 else rtcp_rr(0xBAD), stranger)
    relay.send(a_ports.rtp, rtp(1), A_SDP)  # A talks while B rings: nobody to hear it yet
    assert all(not relay.sent(p) for p in relay.ports)
    relay.engine.answer("c1", "ta", "tb", [MediaEndpoint("10.1.2.3", 5000, source="198.51.100.7")])
    b_nat = ("198.51.100.7", 41000)  # B's NAT, a port nobody named
    relay.send(b_ports.rtp, rtp(1, ssrc=0xB), b_nat)
    relay.send(a_ports.rtp, rtp(2), A_SDP)
    assert relay.sent(b_ports.rtp) == [(rtp(2), b_nat)]
    assert relay.sent(a_ports.rtp) == [(rtp(1, ssrc=0xB), A_SDP)]
    relay.clock.now += 5.0  # both silent (hold, silence suppression): still only they may move
    for port in (a_ports.rtp, b_ports.rtp):
        for seq in range(20):
            relay.send(port, rtp(seq, ssrc=0xBAD), stranger)
    stats = relay.engine.query("c1")
    a_rtp, b_rtp = (m.media[0].rtp for m in stats.monologues)
    assert (a_rtp.source, b_rtp.source, a_rtp.relatches, b_rtp.relatches) == (A_SDP, b_nat, 0, 0)
    assert a_rtp.drops_unexpected_source == 30 and b_rtp.drops_unexpected_source == 30
    relay.send(b_ports.rtp, rtp(2, ssrc=0xB), b_nat)
    assert relay.sent(a_ports.rtp) == [(rtp(2, ssrc=0xB), A_SDP)]  # no stranger's packet ever left


def test_latch_from_any_takes_the_first_sender_as_before() -> None:
    relay = Relay(latch_from="any")
    a, b = relay.call(b_sdp=("10.1.2.3", 5000))
    anywhere = ("198.51.100.9", 40000)
    relay.send(b.rtp, rtp(1, ssrc=0xB), anywhere)
    relay.send(a.rtp, rtp(1), A_SDP)
    assert relay.sent(b.rtp) == [(rtp(1), anywhere)]
    with pytest.raises(ValueError, match="latch_from"):
        RelayEngine(PortAllocator(20000, 20099), latch_from="first")


def test_a_dual_stack_socket_sees_ipv4_vouched_sources_in_their_mapped_form() -> None:
    relay = Relay()
    _, b = relay.call(b_source="198.51.100.7")
    relay.send(b.rtp, rtp(1, ssrc=0xB), ("::ffff:198.51.100.7", 40000, 0, 0))
    assert relay.engine.query("c1").monologues[1].media[0].rtp.source == ("::ffff:198.51.100.7", 40000, 0, 0)


async def test_two_phones_through_the_relay_with_nat_latching() -> None:
    engine = RelayEngine(
        PortAllocator(*free_port_range(100)),
        sdp_allowed=policy_predicate(DestinationPolicy(allow=["127.0.0.0/8"])),
    )
    server = RelayServer(engine, "127.0.0.1")
    ta, pa = await phone("127.0.0.2")
    tb, pb = await phone("127.0.0.3")
    try:
        a_addr = ta.get_extra_info("sockname")
        b_addr = tb.get_extra_info("sockname")
        # B's SDP names 127.0.0.4:9 (its "private" address); its SIP came from 127.0.0.3, and
        # it sends from 127.0.0.3:Y
        [b_ports] = await server.offer("call", "ta", [MediaEndpoint(*a_addr)])
        [a_ports] = await server.answer("call", "ta", "tb", [MediaEndpoint("127.0.0.4", 9, source="127.0.0.3")])
        assert server.open_ports == 4
        n = 50
        for seq in range(n):
            tb.sendto(rtp(seq, ssrc=0xB), ("127.0.0.1", b_ports.rtp))
        got = await receive(pa, n)
        assert {addr for _, addr in got} == {("127.0.0.1", a_ports.rtp)}  # the relay's port: symmetric
        assert [d for d, _ in got] == [rtp(seq, ssrc=0xB) for seq in range(n)]
        for seq in range(n):
            ta.sendto(rtp(seq), ("127.0.0.1", a_ports.rtp))
        got = await receive(pb, n)  # to where B really sends from, not its SDP address
        assert {addr for _, addr in got} == {("127.0.0.1", b_ports.rtp)}
        stats = server.query("call")
        a_rtp, b_rtp = (m.media[0].rtp for m in stats.monologues)
        assert (a_rtp.packets, a_rtp.source, a_rtp.lost) == (n, a_addr, 0)
        assert (b_rtp.packets, b_rtp.source, b_rtp.lost) == (n, b_addr, 0)
        assert b_rtp.destination == b_addr
        # an intruder on another loopback address is dropped and counted
        ti, _ = await phone("127.0.0.5")
        ti.sendto(rtp(0, ssrc=0xBAD), ("127.0.0.1", a_ports.rtp))
        ti.sendto(rtp(n, ssrc=0xB), ("127.0.0.1", b_ports.rtp))
        for _ in range(100):
            if server.query("call").monologues[0].media[0].rtp.drops_unexpected_source:
                break
            await asyncio.sleep(0.01)
        ti.close()
        assert server.query("call").monologues[0].media[0].rtp.drops_unexpected_source == 1
        final = server.delete("call")
        assert final.monologues[0].media[0].rtp.packets == n
        assert server.open_ports == 0 and engine.ports.free_ports == 100
        await asyncio.sleep(0.05)  # transports close their sockets on the next loop iteration
        assert all(bindable(p) for p in (a_ports.rtp, a_ports.rtcp, b_ports.rtp, b_ports.rtcp))
    finally:
        server.close()
        ta.close()
        tb.close()


async def test_media_timeout_closes_sockets_on_a_real_loop() -> None:
    engine = RelayEngine(
        PortAllocator(*free_port_range(20)), media_timeout=0.2, sdp_allowed=lambda host, port: host.startswith("127.")
    )
    server = RelayServer(engine, "127.0.0.1")
    try:
        [ports] = await server.offer("call", "ta", [MediaEndpoint("127.0.0.2", 9, rtcp_mux=True)])
        assert server.open_ports == 3
        for _ in range(100):
            if not engine.list_calls():
                break
            await asyncio.sleep(0.02)
        assert engine.list_calls() == []
        assert server.open_ports == 0
        await asyncio.sleep(0.05)
        assert bindable(ports.rtp)
        # stopping the relay returns every port of the calls it still holds
        await server.offer("other", "ta", [MediaEndpoint("127.0.0.2", 9)])
        assert server.open_ports == 4
        server.close()
        assert engine.list_calls() == [] and server.open_ports == 0 and engine.ports.free_ports == 20
    finally:
        server.close()


async def test_a_port_held_by_another_process_is_retired_and_the_offer_fails_cleanly() -> None:
    first, last = free_port_range(6)
    engine = RelayEngine(PortAllocator(first, last, shuffled=False), sdp_allowed=lambda host, port: True)
    server = RelayServer(engine, "127.0.0.1")
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", first))
    try:
        with pytest.raises(PortsExhausted, match=rf"^Failed to bind port {first}$"):
            await server.offer("c1", "ta", [MediaEndpoint("127.0.0.2", 9)])
        assert engine.list_calls() == [] and server.open_ports == 0
        [ports] = await server.offer("c2", "ta", [MediaEndpoint("127.0.0.2", 9)])
        assert ports.rtp != first and server.open_ports == 4
        server.delete("c2")
        assert engine.ports.free_ports == 5  # the squatted port is never handed out again
    finally:
        squatter.close()
        server.close()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["offer", "answer", "reoffer", "delete", "delete_leg", "timeout", "packet"]),
            st.integers(0, 2),  # which call
            st.integers(0, 2),  # which to-tag (forks)
            st.integers(1, 2),  # media streams
            st.booleans(),  # rtcp-mux
        ),
        max_size=40,
    )
)
def test_any_signalling_sequence_never_leaks_or_double_frees_ports(ops: list[tuple[str, int, int, int, bool]]) -> None:
    relay = Relay(PortAllocator(20000, 20023), max_sessions=2, media_timeout=10.0)
    total = relay.engine.ports.free_ports
    for op, c, t, n, mux in ops:
        call_id, to_tag = f"c{c}", f"t{t}"
        media = [MediaEndpoint(*A_SDP, rtcp_mux=mux)] * n
        try:
            if op == "offer":
                relay.engine.offer(call_id, "ta", media)
            elif op == "answer":
                relay.engine.answer(call_id, "ta", to_tag, [MediaEndpoint(*B_SDP, rtcp_mux=mux)] * n)
            elif op == "reoffer":
                relay.engine.offer(call_id, to_tag, media, to_tag="ta")
            elif op == "delete":
                relay.engine.delete(call_id)
            elif op == "delete_leg":
                relay.engine.delete(call_id, "ta", to_tag)
            elif op == "timeout":
                relay.clock.now += 6.0
                relay.engine.handle_timer(relay.clock.now)
            else:
                relay.sync()
                for port in list(relay.ports.values()):
                    port.receive(rtp(t), A_SDP)
        except RelayError:
            pass
        relay.sync()
        in_use = sum(len(relay.engine.query(cid).monologues) for cid in relay.engine.list_calls())
        assert in_use <= 2 * len(relay.engine.list_calls())
        assert relay.engine.ports.free_ports + len(relay.ports) == total
    for call_id in relay.engine.list_calls():
        relay.engine.delete(call_id)
    relay.sync()
    assert relay.engine.ports.free_ports == total
    assert relay.ports == {}


def test_a_port_never_latches_onto_an_address_of_the_farm() -> None:
    """A packet spoofed from another relay's media port (whose IP an SDP named) latches
    nothing: relay A sending there, with relay B set the same way, would feed each other for
    ever (red team C, 2026-12-02)."""
    other_relay = ("203.0.113.20", 31000)
    relay = Relay(farm_address=lambda host, port: host == other_relay[0] and 30000 <= port <= 39999)
    a, b = relay.call(b_sdp=other_relay)
    relay.send(b.rtp, rtp(1, ssrc=0xB), other_relay)
    relay.send(b.rtp, rtp(2, ssrc=0xB), ("203.0.113.20", 40000))  # that host, outside the farm's range
    b_rtp = relay.engine.query("c1").monologues[1].media[0].rtp
    assert (b_rtp.source, b_rtp.drops_unexpected_source) == (("203.0.113.20", 40000), 1)
    relay.send(a.rtp, rtp(1), A_SDP)
    assert relay.sent(b.rtp) == [(rtp(1), ("203.0.113.20", 40000))]


def test_one_owners_calls_hold_at_most_max_ports_per_owner() -> None:
    """One account's ringing calls took every port of the range and every other caller got
    503 (red teams C and D, 2026-12-02): an owner's calls hold at most max_ports_per_owner
    ports; an offer over it allocates nothing; ending a call gives its ports back."""
    relay = Relay(max_ports_per_owner=12)
    for n in range(3):  # a call of one stream: a pair for each party, 4 ports
        relay.engine.offer(f"c{n}", "ta", [MediaEndpoint(*A_SDP)], owner="alice@farm.test")
    free = relay.engine.ports.free_ports
    with pytest.raises(RelayError, match="Owner's port limit"):
        relay.engine.offer("c3", "ta", [MediaEndpoint(*A_SDP)], owner="alice@farm.test")
    assert relay.engine.ports.free_ports == free and "c3" not in relay.engine.list_calls()
    relay.engine.offer("b0", "tb", [MediaEndpoint(*B_SDP)], owner="bob@farm.test")  # others unaffected
    relay.engine.offer("x0", "tx", [MediaEndpoint(*B_SDP)])  # no owner said: no owner's bound
    relay.engine.answer("c0", "ta", "tz", [MediaEndpoint(*B_SDP)])  # an answer adds nothing
    relay.engine.delete("c0")
    relay.engine.offer("c3", "ta", [MediaEndpoint(*A_SDP)], owner="alice@farm.test")
    for n in (1, 2, 3):
        relay.engine.delete(f"c{n}")
    assert relay.engine._owned == {"bob@farm.test": 4}
