"""Sans-IO tests of registered flows (RFC 5626): the keepalive table with an injected clock,
and :class:`BalancerCore` learning from REGISTER 2xx (holds, OPTIONS keepalives) and
answering 430 at once for a client connection that is gone.

The balancer is 10.0.0.1:5060 (udp, tcp); one node at 10.0.1.1:5060; phones behind NAT.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import pytest

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.keepalive import (
    HOLD_MARGIN,
    KEEPALIVE_PREFIX,
    FlowGone,
    Probe,
    RegisteredFlows,
    registration,
)
from sipfarm.balancer.nodes import NodeSet
from sipfarm.cluster.membership import Member, Role
from sipfarm.config import BalancerConfig, ConfigError, load
from sipfarm.edge import FlowTokens
from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import parse_message
from sipfarm.sip.via import stamp_received

SECRET = b"unit-test-flow-secret-0123456789"
LB_UDP = Address("udp", "10.0.0.1", 5060)
LB_TCP = Address("tcp", "10.0.0.1", 5060)
NODE = Address("udp", "10.0.1.1", 5060)
PHONE = Address("udp", "203.0.113.7", 40000)
OTHER_PHONE = Address("udp", "203.0.113.8", 40000)
TCP_PHONE = Address("tcp", "203.0.113.9", 51000)
CONTACT = "sip:alice@192.168.1.5:5062"


def register(
    *, call_id: str, contact: str = CONTACT, via: str = "SIP/2.0/UDP 192.168.1.5:5062;rport", expires: int = 600
) -> bytes:
    return (
        f"REGISTER sip:farm.test SIP/2.0\r\nVia: {via};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:alice@farm.test>;tag=r1\r\nTo: <sip:alice@farm.test>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 2 REGISTER\r\nContact: <{contact}>\r\nExpires: {expires}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def ok(request: SipMessage, contacts: str) -> bytes:
    """The node's 200 OK: every binding of the AOR (RFC 3261 10.3 step 8)."""
    vias = "".join(f"Via: {v.decode()}\r\n" for v in request.values("via"))
    return (
        f"SIP/2.0 200 OK\r\n{vias}From: <sip:alice@farm.test>;tag=r1\r\nTo: <sip:alice@farm.test>;tag=n1\r\n"
        f"Call-ID: {request.call_id.decode()}\r\nCSeq: 2 REGISTER\r\n{contacts}Content-Length: 0\r\n\r\n"
    ).encode()


@dataclass
class Harness:
    flows: RegisteredFlows = field(default_factory=lambda: RegisteredFlows(interval=30, failures=2))
    sent: list[tuple[SipMessage, Address]] = field(default_factory=list)
    dialled: list[Address] = field(default_factory=list)  # sent with ``send`` (may connect)
    open_flows: set[Address] = field(default_factory=lambda: {PHONE, OTHER_PHONE, TCP_PHONE, NODE})
    holds: list[tuple[Address, float]] = field(default_factory=list)
    now: float = 1000.0

    def __post_init__(self) -> None:
        nodes = NodeSet()
        nodes.update_members([Member("node1", Role.NODE, (str(NODE),))])
        self.tokens = FlowTokens(SECRET)
        self.core = BalancerCore(
            nodes, self.tokens, public={"udp": LB_UDP, "tcp": LB_TCP}, internal=LB_UDP,
            send=self._send, send_response=self._send_response, hop_secret=SECRET,
            registrations=self.flows, hold=self._hold, hold_max=7200,
        )  # fmt: skip
        self.core._clock = lambda: self.now

    def _send(self, data: bytes, dest: Address, local: Address | None = None) -> bool:
        self.dialled.append(dest)
        self.sent.append((parse_message(data), dest))
        return True

    def _send_response(self, data: bytes, dest: Address) -> bool:
        if dest not in self.open_flows:
            return False  # the flow is gone: never re-dialled
        self.sent.append((parse_message(data), dest))
        return True

    def _hold(self, flow: Address, seconds: float) -> bool:
        self.holds.append((flow, seconds))
        return True

    def feed(self, data: bytes, source: Address, local: Address = LB_UDP) -> list[tuple[SipMessage, Address]]:
        msg = parse_message(data)
        if msg.is_request:
            stamp_received(msg, source)
        before = len(self.sent)
        self.core.on_message(msg, source, local)
        return self.sent[before:]

    def registered(self, source: Address, contacts: str, **kwargs: object) -> SipMessage:
        """A REGISTER from ``source`` through the node, answered 200 with ``contacts``."""
        local = LB_TCP if source.transport == "tcp" else LB_UDP
        [(to_node, node)] = self.feed(register(**kwargs), source, local)  # type: ignore[arg-type]
        [(answer, dest)] = self.feed(ok(to_node, contacts), node)
        assert dest == source and answer.status == 200
        return to_node


# -- the 200 OK read -----------------------------------------------------------------------------


def test_registration_reads_the_clients_own_contacts_from_the_200() -> None:
    msg = parse_message(ok(parse_message(register(call_id="c")), (
        f"Contact: <sip:alice@10.9.9.9:5060>;expires=3000\r\nContact: <{CONTACT}>;expires=598\r\n"
    )))  # fmt: skip
    reg = registration(msg, "alice@farm.test", (CONTACT,))
    assert (reg.aor, reg.contacts, reg.expires) == ("alice@farm.test", (CONTACT,), 598)
    gone = parse_message(ok(parse_message(register(call_id="c")), "Contact: <sip:alice@10.9.9.9>;expires=3000\r\n"))
    assert registration(gone, "alice@farm.test", (CONTACT,)).expires == 0  # de-registered
    bare = parse_message(ok(parse_message(register(call_id="c")), "Expires: 300\r\n"))
    assert registration(bare, "alice@farm.test", (CONTACT,)).expires == 300


# -- the keepalive table, injected clock ---------------------------------------------------------


def _table(interval: float = 30, failures: int = 2) -> RegisteredFlows:
    table = RegisteredFlows(interval=interval, failures=failures)
    req = parse_message(register(call_id="k"))
    table.on_register(PHONE, req)
    assert table.on_register_ok(PHONE, parse_message(ok(req, f"Contact: <{CONTACT}>;expires=600\r\n")), 0.0)
    return table


def test_a_silent_flow_gets_options_then_is_gone_after_its_budget() -> None:
    table = _table()
    assert table.next_deadline() == 30.0
    assert table.handle_timer(29.9) == []
    first = table.handle_timer(30.0)
    assert [type(a) for a in first] == [Probe]
    probe = first[0]
    assert isinstance(probe, Probe)
    assert probe.flow == PHONE and probe.contact == CONTACT and probe.branch.startswith(KEEPALIVE_PREFIX)
    assert [type(a) for a in table.handle_timer(60.0)] == [Probe]
    [gone] = table.handle_timer(90.0)
    assert gone == FlowGone(PHONE, "alice@farm.test", (CONTACT,))
    assert not table.flows and table.next_deadline() is None
    assert (table.stats.sent, table.stats.flows_expired) == (2, 1)


def test_anything_heard_or_an_answer_keeps_the_flow() -> None:
    table = _table()
    for t in range(1, 10):
        table.heard(PHONE)  # SIP, STUN or CRLF from the phone between the looks
        assert table.handle_timer(30.0 * t) == []
    [probe] = table.handle_timer(300.0)
    assert isinstance(probe, Probe)
    table.on_probe_response(probe.branch)  # a 4xx would do as well
    assert table.handle_timer(330.0) == []
    for t in range(12, 20):
        table.heard(PHONE)
        assert table.handle_timer(30.0 * t) == []
    assert table.handle_timer(600.0) == []  # expired registration: simply gone, no OPTIONS
    assert not table.flows
    assert (table.stats.answered, table.stats.registrations_ended, table.stats.flows_expired) == (1, 1, 0)


def test_de_register_forgets_the_flow_and_the_table_is_bounded() -> None:
    table = _table()
    req = parse_message(register(call_id="k", expires=0))
    table.on_register(PHONE, req)
    table.on_register_ok(PHONE, parse_message(ok(req, "")), 1.0)
    assert not table.flows
    small = RegisteredFlows(interval=30, limit=10)
    for port in range(1, 50):
        flow = Address("udp", "203.0.113.7", port)
        req = parse_message(register(call_id=f"c{port}"))
        small.on_register(flow, req)
        small.on_register_ok(flow, parse_message(ok(req, f"Contact: <{CONTACT}>;expires=600\r\n")), float(port))
    assert len(small.flows) == 10 and small.stats.dropped_full == 39
    assert Address("udp", "203.0.113.7", 49) in small.flows  # the newest stay


def test_no_table_when_disabled_and_never_for_stream_flows() -> None:
    for interval, flow in ((0, PHONE), (30, TCP_PHONE)):
        table = RegisteredFlows(interval=interval)
        req = parse_message(register(call_id="k"))
        table.on_register(flow, req)
        reg = table.on_register_ok(flow, parse_message(ok(req, f"Contact: <{CONTACT}>;expires=600\r\n")), 0.0)
        assert reg is not None and reg.expires == 600
        assert not table.flows


# -- through the balancer core -------------------------------------------------------------------


def test_udp_phone_is_kept_alive_with_options_whose_answer_is_consumed() -> None:
    h = Harness()
    h.registered(
        PHONE, f"Contact: <sip:alice@10.9.9.9>;expires=900\r\nContact: <{CONTACT}>;expires=600\r\n", call_id="r1"
    )
    h.registered(OTHER_PHONE, "Contact: <sip:bob@10.9.9.9>;expires=600\r\n", call_id="r2", contact="sip:bob@10.9.9.9")
    assert set(h.flows.flows) == {PHONE, OTHER_PHONE}
    h.now += 31
    # the other phone sent something meanwhile (any SIP: here an OPTIONS to the balancer)
    h.feed(
        b"OPTIONS sip:10.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKx;rport\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:bob@farm.test>;tag=1\r\nTo: <sip:10.0.0.1>\r\nCall-ID: o\r\n"
        b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        OTHER_PHONE,
    )
    before = len(h.sent)
    assert h.core.keepalive_tick(h.now) == []
    [(options, dest)] = h.sent[before:]
    assert dest == PHONE  # the NAT binding, not the private contact
    assert options.method == b"OPTIONS" and str(options.request_uri) == CONTACT
    assert options.top_via.branch.startswith(KEEPALIVE_PREFIX.decode())
    assert b"balancer" in (options.get("from") or b"") and (options.get("to") or b"") == b"<sip:alice@farm.test>"
    assert int(options.get("max-forwards") or 0) > 0
    # the phone answers (404 is as good as 200): consumed here, never forwarded to a node
    answer = (
        f"SIP/2.0 404 Not Here\r\nVia: {options.top_via_value.decode()}\r\nFrom: {options.get('from').decode()}\r\n"  # type: ignore[union-attr]
        f"To: <sip:alice@farm.test>;tag=p\r\nCall-ID: {options.call_id.decode()}\r\nCSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    assert h.feed(answer, PHONE) == []
    assert h.flows.stats.answered == 1
    h.now += 30
    before = len(h.sent)
    assert h.core.keepalive_tick(h.now) == []
    # the answering phone is left alone; the other one has been silent since: its turn
    assert [dest for _, dest in h.sent[before:]] == [OTHER_PHONE]


def test_silent_udp_phone_is_reported_gone() -> None:
    h = Harness()
    h.registered(PHONE, f"Contact: <{CONTACT}>;expires=600\r\n", call_id="r1")
    gone: list[FlowGone] = []
    for _ in range(3):
        h.now += 30
        gone += h.core.keepalive_tick(h.now)
    assert gone == [FlowGone(PHONE, "alice@farm.test", (CONTACT,))]
    assert h.flows.stats.sent == 2


def test_tcp_registration_holds_the_connection_for_its_lifetime_capped_and_released() -> None:
    h = Harness()
    via = "SIP/2.0/TCP 192.168.1.5:5062"
    h.registered(
        TCP_PHONE,
        f"Contact: <{CONTACT};transport=tcp>;expires=3600\r\n",
        call_id="t1",
        contact=f"{CONTACT};transport=tcp",
        via=via,
    )
    h.registered(
        TCP_PHONE,
        f"Contact: <{CONTACT};transport=tcp>;expires=86400\r\n",
        call_id="t1",
        contact=f"{CONTACT};transport=tcp",
        via=via,
    )
    h.registered(TCP_PHONE, "", call_id="t1", contact=f"{CONTACT};transport=tcp", via=via, expires=0)
    assert h.holds == [(TCP_PHONE, 3600 + HOLD_MARGIN), (TCP_PHONE, 7200 + HOLD_MARGIN), (TCP_PHONE, 0.0)]
    assert not h.flows.flows  # no OPTIONS keepalives for connections


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_request_for_a_gone_connection_gets_430_at_once_and_is_never_dialled(transport: str) -> None:
    h = Harness()
    phone = Address(transport, "203.0.113.9", 51000)
    h.open_flows.add(phone)
    via = f"SIP/2.0/{transport.upper()} 192.168.1.5:5062"
    [(to_node, node)] = h.feed(register(call_id="t", via=via), phone, LB_TCP)
    routes = "".join(f"Route: {p.decode()}\r\n" for p in to_node.values("path"))
    h.open_flows.discard(phone)  # the phone's connection died
    invite = (
        f"INVITE {CONTACT};transport={transport} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.1.1:5060;branch=z9hG4bKn1\r\n"
        f"{routes}Max-Forwards: 69\r\nFrom: <sip:bob@farm.test>;tag=b\r\nTo: <sip:alice@farm.test>\r\n"
        "Call-ID: i1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    h.dialled.clear()
    [(answer, dest)] = h.feed(invite, node)
    assert answer.status == 430 and dest == node  # RFC 5626 5.3, to the node at once
    assert phone not in h.dialled
    assert h.core.stats.flow_failed == 1


def test_nat_settings_are_validated_naming_the_key() -> None:
    cfg = load(BalancerConfig, flags={"keepalive_interval": "0", "stream_idle_timeout": "2"}, environ={})
    assert (cfg.keepalive_interval, cfg.keepalive_failures, cfg.stream_idle_timeout) == (0.0, 3, 2.0)
    for key, value in (("keepalive_interval", "-1"), ("keepalive_failures", "0"), ("stream_idle_timeout", "0")):
        with pytest.raises(ConfigError, match=key):
            load(BalancerConfig, flags={key: value}, environ={})
