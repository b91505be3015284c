"""Sans-IO tests of the balancer's front door (:mod:`sipfarm.balancer.frontdoor`): rate limits,
scanners, unserved domains and the local copy of the farm's bans, on a fake clock."""

from __future__ import annotations

import math

import pytest

from sipfarm.balancer.frontdoor import FrontDoor, FrontDoorPolicy
from sipfarm.balancer.main import exempt_networks
from sipfarm.protect.pike import RateBudgets
from sipfarm.routing.table import RoutingError
from sipfarm.sip.address import Address
from sipfarm.sip.parser import parse_message
from sipfarm.sip.uri import SipURI

POLICY = FrontDoorPolicy(
    budgets=RateBudgets(register=3, invite=2, other=5, suspect=2, window=1.0),
    ban_time=60.0,
    exempt=("10.9.0.0/16",),
    domains=("farm.test",),
    ban_after=0.0,  # banned at the first excess (the default's grace: its own test below)
)
FLOODER = "198.51.100.2"
PHONE = "198.51.100.3"


def request(method: str = "REGISTER", uri: str = "sip:farm.test", agent: str | None = None, to_tag: str = "") -> bytes:
    lines = [
        f"{method} {uri} SIP/2.0",
        "Via: SIP/2.0/UDP 198.51.100.2:5060;branch=z9hG4bK1",
        "From: <sip:alice@farm.test>;tag=1",
        f"To: <sip:alice@farm.test>{';tag=' + to_tag if to_tag else ''}",
        "Call-ID: c1",
        f"CSeq: 1 {method}",
        "Max-Forwards: 70",
    ]
    if agent is not None:
        lines.append(f"User-Agent: {agent}")
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


def names_us(uri: SipURI) -> bool:
    return uri.host == "192.0.2.10"


def admitted(front: FrontDoor, data: bytes, source: str, now: float) -> bool:
    return front.screen(data, source, now) and front.inspect(parse_message(data), source, names_us, now)


def test_flooder_banned_phone_untouched():
    front = FrontDoor(POLICY)
    assert [front.screen(request(), FLOODER, 0.0) for _ in range(4)] == [True] * 3 + [False]
    assert front.stats == {"rate_register": 1, "ban_started": 1}
    ban = front.take_new_bans()
    assert [(b.source, b.seconds, b.reason) for b in ban] == [(FLOODER, 60.0, "rate_register")]
    assert front.take_new_bans() == []
    # banned: anything from it is dropped unparsed (even a response, even garbage), counted
    assert not front.screen(b"SIP/2.0 200 OK\r\n", FLOODER, 1.0)
    assert not front.screen(b"\x00garbage", FLOODER, 59.0)
    assert front.stats["banned"] == 2
    assert front.screen(request(), PHONE, 1.0)
    # the ban ends after ban_time; the source starts from a fresh budget
    assert front.screen(request(), FLOODER, 60.5)


def test_classes_have_their_own_budgets_and_responses_are_not_counted():
    front = FrontDoor(POLICY)
    for _ in range(50):
        assert front.screen(b"SIP/2.0 200 OK\r\nCSeq: 1 INVITE\r\n", PHONE, 0.0)
    assert [front.screen(request("INVITE"), PHONE, 0.0) for _ in range(3)] == [True, True, False]
    assert front.stats["rate_invite"] == 1


def test_exempt_networks_never_limited_nor_dropped():
    front = FrontDoor(POLICY)
    assert all(admitted(front, request(agent="friendly-scanner"), "10.9.1.1", 0.0) for _ in range(100))
    assert front.stats == {}


def test_scanner_agent_banned_at_once():
    front = FrontDoor(POLICY)
    data = request("OPTIONS", "sip:100@farm.test", agent="SIPVicious/0.3.8 Friendly-Scanner")
    assert not admitted(front, data, FLOODER, 0.0)
    assert front.stats == {"scanner": 1, "ban_started": 1}
    assert [b.reason for b in front.take_new_bans()] == ["scanner"]
    assert not front.screen(request(), FLOODER, 0.1)
    assert admitted(front, request(agent="Linphone/5.1"), PHONE, 0.1)


def test_unserved_domain_dropped_then_banned():
    front = FrontDoor(POLICY)
    assert admitted(front, request("INVITE", "sip:bob@FARM.test"), PHONE, 0.0)
    assert admitted(front, request("OPTIONS", "sip:192.0.2.10:5060"), PHONE, 0.0)  # the balancer itself
    # in a dialog (To tag): not checked, the dialog's own business
    assert admitted(front, request("BYE", "sip:bob@203.0.113.9", to_tag="x"), PHONE, 0.0)
    outcomes = [admitted(front, request("OPTIONS", "sip:100@evil.test"), FLOODER, 0.0) for _ in range(3)]
    assert outcomes == [False, False, False]
    assert front.stats["unknown_domain"] == 3
    assert front.stats["rate_suspect"] == 1
    assert front.banned(FLOODER, 0.1)


def test_no_domains_no_domain_check():
    front = FrontDoor(FrontDoorPolicy(domains=()))
    assert all(admitted(front, request("INVITE", "sip:100@evil.test"), PHONE, 0.0) for _ in range(10))


def test_bans_from_redis_replace_the_local_copy():
    front = FrontDoor(POLICY)
    front.replace_bans({PHONE: 30.0, "203.0.113.1": math.inf}, now=10.0, read_started=10.0)
    assert not front.screen(request(), PHONE, 11.0)
    assert not front.screen(request(), "203.0.113.1", 1e9)
    assert front.bans_known == 2
    # a ban started here after the read began survives the read (its write is not read back yet)
    for _ in range(4):
        front.screen(request(), FLOODER, 12.0)
    front.replace_bans({}, now=12.1, read_started=11.9)
    assert front.banned(FLOODER, 12.2)
    assert not front.banned(PHONE, 12.2)  # lifted in Redis: lifted here
    # once the next read began after it, Redis has the last word
    front.replace_bans({}, now=13.0, read_started=12.5)
    assert not front.banned(FLOODER, 13.0)


def test_core_drops_a_scanner_from_a_client_never_from_a_node():
    from test_balancer_unit import CLIENT, LB_TCP, NODES, Harness, members  # noqa: PLC0415 - the core's harness
    from test_balancer_unit import request as core_request  # noqa: PLC0415

    h = Harness()
    h.nodes.update_members(members())
    front = FrontDoor(POLICY)
    h.core.front = front
    scan = core_request("OPTIONS", "sip:100@farm.test", extra="User-Agent: friendly-scanner\r\n")
    assert h.feed(scan, CLIENT) == []  # dropped, nothing answered
    # over UDP the source address proves nothing: that message is dropped, nobody is banned
    assert front.stats == {"scanner": 1, "not_banned_udp": 1} and front.take_new_bans() == []
    assert not front.banned(CLIENT.host, 0.0)
    assert h.feed(scan, Address("tcp", CLIENT.host, 40001), LB_TCP) == []  # a connection did
    assert front.stats == {"scanner": 2, "not_banned_udp": 1, "ban_started": 1}
    assert [b.reason for b in front.take_new_bans()] == ["scanner"]
    phone = core_request("OPTIONS", "sip:bob@farm.test", extra="User-Agent: Linphone\r\n")
    assert len(h.feed(phone, Address("udp", "198.51.100.9", 5060))) == 1  # forwarded to a node
    # a node's request is the farm's own: never inspected
    from_node = core_request("OPTIONS", "sip:bob@evil.test", extra="User-Agent: sipvicious\r\n")
    h.feed(from_node, NODES["node1"])
    assert front.stats.get("scanner") == 2 and "unknown_domain" not in front.stats


def test_a_spoofed_udp_source_bans_nobody():
    """One UDP datagram claiming a victim's address (a scanner's User-Agent, or a burst over
    the REGISTER budget) banned that address farm-wide on every transport for ban_time (red
    team D, 2026-12-02).  Over UDP the evidence drops the messages only, while the source is
    over its budget; the victim's phone is let in again as soon as the forger stops."""
    front = FrontDoor(FrontDoorPolicy(budgets=RateBudgets(register=3, window=1.0), ban_after=0.0))
    victim = "198.51.100.50"
    for i in range(10):  # the forger, over budget
        assert front.screen(b"REGISTER sip:farm.test SIP/2.0\r\n", victim, 100.0, proven=False) is (i < 3)
    assert front.take_new_bans() == [] and not front.banned(victim, 100.0)
    assert front.stats == {"rate_register": 7, "not_banned_udp": 7}
    assert front.screen(b"REGISTER sip:farm.test SIP/2.0\r\n", victim, 102.5, proven=False)  # the forger stopped
    # over a stream the address is the peer's own: the same burst bans it
    for _ in range(4):
        front.screen(b"REGISTER sip:farm.test SIP/2.0\r\n", "198.51.100.51", 100.0, proven=True)
    assert [b.source for b in front.take_new_bans()] == ["198.51.100.51"]


def test_forged_udp_neither_spends_a_sources_proven_budget_nor_gets_it_banned():
    """Forged REGISTERs from a victim's address kept the one budget full, so the victim's own
    TCP REGISTERs were the excess, and, proven, got it banned 3 s later (red team, 2026-12-03).
    A source's datagrams spend a budget of their own: its connections' requests still pass,
    and nothing bans it."""
    front = FrontDoor(FrontDoorPolicy(budgets=RateBudgets(register=3, window=1.0), ban_after=3.0))
    victim = "198.51.100.50"
    register = b"REGISTER sip:farm.test SIP/2.0\r\n"
    for second in range(10):
        now = 100.0 + second
        for _ in range(20):  # the forger, far over the budget every second
            front.screen(register, victim, now, proven=False)
        assert front.screen(register, victim, now + 0.5, proven=True), second  # the office's TCP phone
    assert front.take_new_bans() == [] and not front.banned(victim, 110.0)


def test_an_ipv6_source_is_budgeted_and_banned_as_its_64():
    """New addresses in one /64 (a host has them all) share one budget and one ban."""
    front = FrontDoor(POLICY)
    hops = [f"2001:db8:7:8::{n:x}" for n in range(1, 5)]
    assert [front.screen(request(), host, 0.0) for host in hops] == [True] * 3 + [False]
    assert [(b.source, b.reason) for b in front.take_new_bans()] == [("2001:db8:7:8::/64", "rate_register")]
    assert front.banned("2001:db8:7:8:dead:beef:0:1", 1.0)
    assert not front.screen(request(), "2001:db8:7:8:1::1", 1.0)
    assert front.screen(request(), "2001:db8:7:9::1", 1.0)  # the next /64 is someone else
    # a ban read from Redis for a /64 applies to each of its addresses
    front.replace_bans({"2001:db8:1:1::/64": 30.0}, now=2.0, read_started=2.0)
    assert not front.screen(request(), "2001:db8:1:1::abcd", 3.0)
    # a scanner's User-Agent over a proven transport bans its /64
    scanner = request("OPTIONS", agent="friendly-scanner")
    assert not admitted(front, scanner, "2001:db8:2:2::1", 4.0)
    assert front.banned("2001:db8:2:2::2", 4.0)


def test_ban_log_changes_update_the_local_copy():
    front = FrontDoor(POLICY)
    front.replace_bans({PHONE: 30.0}, now=10.0, read_started=10.0)
    front.update_bans({"203.0.113.5": math.inf, "203.0.113.6": 5.0}, now=11.0, read_started=11.0)
    assert front.banned("203.0.113.5", 1e9) and front.banned("203.0.113.6", 15.9)
    assert not front.banned("203.0.113.6", 16.1)  # its end as the log's read gave it
    assert front.banned(PHONE, 11.0)  # not in the changes: untouched
    front.update_bans({PHONE: None}, now=12.0, read_started=12.0)  # lifted
    assert not front.banned(PHONE, 12.0)
    # a ban started here after the read began is not lifted by it (its write is not read back)
    for _ in range(4):
        front.screen(request(), FLOODER, 13.0)
    front.update_bans({FLOODER: None}, now=13.1, read_started=12.9)
    assert front.banned(FLOODER, 13.2)
    # the next read that began after it has the last word
    front.update_bans({FLOODER: None}, now=14.0, read_started=13.5)
    assert not front.banned(FLOODER, 14.0)


def test_the_farms_gateways_and_trunks_are_exempt(tmp_path):
    """The config file's [routing] peers (trusted gateways and trunks, the IP literals it
    forwards to) join ``exempt``: a PSTN gateway carries many callers' calls from one address,
    and its calls past the INVITE budget over TCP banned it, every call through it cut off."""
    config = tmp_path / "farm.toml"
    config.write_text(
        '[routing]\ntrusted = ["192.0.2.10", "198.51.100.16/28"]\n'
        'rules = [{name = "pstn", user_prefix = "+1", action = "forward", uri = "sip:203.0.113.5:5060"}]\n'
    )
    exempt = exempt_networks(["127.0.0.0/8"], str(config))
    assert exempt == ["127.0.0.0/8", "192.0.2.10/32", "198.51.100.16/28", "203.0.113.5/32"]
    assert exempt_networks(["127.0.0.0/8"], None) == ["127.0.0.0/8"]
    policy = FrontDoorPolicy(budgets=POLICY.budgets, ban_time=60.0, exempt=tuple(exempt), ban_after=0.0)
    front = FrontDoor(policy)
    for gateway in ("192.0.2.10", "198.51.100.20", "203.0.113.5"):
        assert all(front.screen(request("INVITE"), gateway, 0.0, proven=True) for _ in range(500))
    assert [front.screen(request("INVITE"), PHONE, 0.0, proven=True) for _ in range(3)] == [True, True, False]
    assert [b.source for b in front.take_new_bans()] == [PHONE]
    config.write_text("[routing]\ntrusted = 7\n")
    with pytest.raises(RoutingError):  # the balancer refuses to start, as the node does
        exempt_networks([], str(config))


def test_a_burst_is_dropped_a_flood_is_banned():
    """Phones behind one NAT address reconnecting at once (a balancer restarted) are over the
    REGISTER budget for a second or two: their excess is dropped, nobody is banned, and once
    the burst is over they register again. A source over budget for ``ban_after`` seconds with
    no quiet window between is a flood: banned, farm-wide."""
    policy = FrontDoorPolicy(budgets=POLICY.budgets, ban_time=60.0, ban_after=3.0)
    front = FrontDoor(policy)
    office, flooder = "198.51.100.50", "198.51.100.60"
    burst = [front.screen(request(), office, t / 100, proven=True) for t in range(150)]  # 1.5 s
    assert 0 < burst.count(True) < 10 and front.stats.get("ban_started") is None
    assert front.screen(request(), office, 3.0, proven=True)  # after a quiet second: served
    banned_at = None
    for t in range(400):  # a flood: 100 a second for 4 s
        front.screen(request(), flooder, t / 100, proven=True)
        if banned_at is None and front.banned(flooder, t / 100):
            banned_at = t / 100
    assert banned_at is not None and 3.0 <= banned_at < 3.1, banned_at
    assert [(b.source, b.reason) for b in front.take_new_bans()] == [(flooder, "rate_register")]
    assert not front.banned(office, 5.0)
    # a spoofable UDP source is never banned: its excess is dropped from the first, counted
    assert [front.screen(request(), "198.51.100.70", 0.0, proven=False) for _ in range(5)] == [True] * 3 + [False] * 2
    assert front.stats["not_banned_udp"] == 2 and front.take_new_bans() == []


def test_the_ban_table_is_bounded():
    """Each proven source over its budget or a scanner is a ban, here and in Redis: an IPv6
    attacker holds /64s by the thousand (20,863 bans, 11.5 MB: red team, 2026-12-03). Past
    max_sources no new ban starts (the excess is still dropped); read from Redis, the longest
    ones are kept."""
    policy = FrontDoorPolicy(budgets=RateBudgets(register=1, window=1.0), ban_after=0.0, max_sources=5)
    front = FrontDoor(policy)
    for n in range(8):
        front.screen(b"REGISTER sip:farm.test SIP/2.0\r\n", f"2001:db8:{n}::1", 100.0)
        assert not front.screen(b"REGISTER sip:farm.test SIP/2.0\r\n", f"2001:db8:{n}::1", 100.0)
    assert front.bans_known == 5 and len(front.take_new_bans()) == 5
    assert front.stats["ban_table_full"] == 3
    front.replace_bans({f"192.0.2.{n}": float(n + 1) for n in range(10)}, 200.0, 300.0)
    assert front.bans_known == 5 and front.banned("192.0.2.9", 200.0) and not front.banned("192.0.2.0", 200.0)


def test_a_source_whose_connections_keep_being_closed_for_abuse_is_banned():
    """Red team (2026-12-03): a connection closed for a flood of frames or pings, garbage framing
    or not reading cost its sender nothing: the next connection started the abuse over.  Over
    ``abuse_limit`` such closes within ``abuse_window`` the source is banned (the stream proved
    its address); closes spread out, exempt sources and other sources are not."""
    front = FrontDoor(POLICY)
    limit, window = POLICY.abuse_limit, POLICY.abuse_window
    for n in range(limit):
        front.abused(FLOODER, float(n))
    assert not front.banned(FLOODER, float(limit))  # at the limit: not yet
    front.abused(FLOODER, float(limit))
    assert front.banned(FLOODER, float(limit))
    assert [(b.source, b.reason) for b in front.take_new_bans()] == [(FLOODER, "stream_abuse")]
    assert not front.screen(request(), FLOODER, float(limit) + 1)
    # spread over more than the window: never over the limit
    for n in range(3 * limit):
        front.abused(PHONE, n * (window / limit + 1))
    assert not front.banned(PHONE, 3 * limit * window)
    for n in range(3 * limit):
        front.abused("10.9.1.1", float(n))  # exempt
    assert not front.banned("10.9.1.1", 100.0)
    # an IPv6 source's /64 is one subject
    for n in range(limit + 1):
        front.abused(f"2001:db8:5:5::{n + 1:x}", 200.0 + n)
    assert front.banned("2001:db8:5:5::99", 210.0)
    off = FrontDoor(FrontDoorPolicy(abuse_limit=0))
    for n in range(100):
        off.abused(FLOODER, float(n))
    assert not off.banned(FLOODER, 100.0)
