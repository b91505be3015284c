"""The edge's and the balancer's caches keyed (or valued) by bytes off the wire are bounded in
memory, not only in entries: an attacker sending distinct long values (up to a message's
64 KB) gets them answered right, and not remembered (see ``MAX_CACHED_KEY``)."""

from __future__ import annotations

import secrets

from test_balancer_keepalive import CONTACT
from test_balancer_keepalive import ok as keepalive_ok
from test_balancer_keepalive import register as keepalive_register
from test_balancer_unit import CLIENT, NODES, SECRET, Harness, members, request

from sipfarm.balancer.core import _bare, _bare_cached
from sipfarm.balancer.frontdoor import FrontDoor, FrontDoorPolicy
from sipfarm.balancer.keepalive import RegisteredFlows
from sipfarm.balancer.overload import AdmissionControl
from sipfarm.edge import FlowTokens, HopBranches, OwnRoutes, _is_ip_literal, is_ip_literal
from sipfarm.sip.address import Address
from sipfarm.sip.memo import MAX_CACHED_KEY
from sipfarm.sip.parser import parse_message
from sipfarm.transport.destinations import DestinationPolicy

LONG = 1536  # over memo.MAX_CACHED_KEY (512), under the parser's bounds (headers.MAX_VIA_PARM 2 KB)
HOP = Address("udp", "203.0.113.7", 40000)


def _ours(host: str, port: int) -> bool:
    return host == "10.0.0.1" and port == 5060


def test_own_routes_padded_by_the_sender_are_answered_not_remembered():
    tokens = FlowTokens(SECRET)
    routes = OwnRoutes(_ours, tokens)
    token = tokens.encode(CLIENT, "10.0.0.1", 5060)
    for i in range(300):
        pad = f";x{i}=" + "a" * LONG
        extra = f"Route: <sip:{token}@10.0.0.1:5060;lr{pad}>\r\n"
        msg = parse_message(request("BYE", "sip:bob@192.168.1.5:5062", extra=extra, to="<sip:b@x>;tag=t"))
        assert routes.pop(msg)[:2] == (CLIENT, None)
    assert len(routes) == 0
    extra = f"Route: <sip:{token}@10.0.0.1:5060;lr>\r\n"
    msg = parse_message(request("BYE", "sip:bob@192.168.1.5:5062", extra=extra, to="<sip:b@x>;tag=t"))
    assert routes.pop(msg)[:2] == (CLIENT, None)
    assert len(routes) == 1  # a real one still is


def test_hop_branches_do_not_keep_long_transaction_keys():
    hops = HopBranches(SECRET)
    made = []
    for i in range(300):
        key = b"z9hG4bK%d" % i + b"b" * LONG
        branch = hops.encode(HOP, key)
        made.append((branch, key))
    assert len(hops._verified) + len(hops._verified_old) == 0
    for branch, key in made[:20]:
        assert hops.decode(branch, key) == HOP  # verified by its MAC, every time
        assert hops.decode(branch, key + b"x") is None
    assert len(hops._verified) + len(hops._verified_old) == 0
    short = b"z9hG4bK" + secrets.token_hex(8).encode()
    assert hops.decode(hops.encode(HOP, short), short) == HOP
    assert len(hops._verified) == 1


def test_flow_tokens_seal_and_decode_caches_keep_no_long_keys():
    tokens = FlowTokens(SECRET)
    for i in range(300):
        host = f"h{i}." + "a" * LONG
        assert tokens.seal(host, 5060) == tokens.seal(host, 5060)
    assert all(len(host) <= MAX_CACHED_KEY for host, _ in tokens._seals)
    token = tokens.encode(CLIENT, "10.0.0.1", 5060)
    padded = " ".join(token[i : i + 2] for i in range(0, len(token), 2)) + " " * LONG
    assert tokens.decode(padded, "10.0.0.1", 5060) == CLIENT
    assert all(len(text) <= MAX_CACHED_KEY for text, _, _ in tokens._decoded)


def test_ip_literal_check_of_long_hosts_is_right_and_not_remembered():
    before = _is_ip_literal.cache_info().currsize
    for i in range(300):
        assert not is_ip_literal(f"h{i}." + "a" * LONG)
    assert _is_ip_literal.cache_info().currsize == before
    assert is_ip_literal("[2001:db8::1]") and is_ip_literal("192.0.2.1")


def test_balancer_pins_of_long_call_ids_are_bounded_and_cancel_still_follows():
    h = Harness()
    moved = 0
    for _ in range(60):
        call_id = secrets.token_hex(8) + "c" * LONG
        h.nodes.update_members(members(["node1"]))
        invite = request("INVITE", "sip:bob@farm.test", call_id=call_id)
        assert h.one(invite, CLIENT)[1] == NODES["node1"]
        h.nodes.update_members(members())  # node2 and node3 join while it rings
        moved += h.nodes.pick(call_id.encode()).id != "node1"  # type: ignore[union-attr]
        branch = parse_message(invite).top_via_value
        cancel = invite.replace(b"INVITE sip:", b"CANCEL sip:").replace(b"1 INVITE", b"1 CANCEL")
        cancel = cancel.replace(parse_message(cancel).top_via_value, branch)
        assert h.one(cancel, CLIENT)[1] == NODES["node1"]  # by its pin, as for a short Call-ID
    assert moved > 0  # hashing alone would have sent those CANCELs elsewhere
    assert len(h.core._invites) == 60
    assert sum(len(key) for key in h.core._invites) <= 60 * 17


def test_admission_holds_long_call_ids_as_bounded_keys():
    admission = AdmissionControl()
    for i in range(300):
        call_id = b"%d" % i + b"c" * LONG
        key = call_id + b" 1"
        admission.sent(key, "node1", 0.0)
        admission.admitted(call_id, "node1", 0.0)
        assert admission.is_pending(key) and admission.pending_node(key) == "node1"
        assert admission.follow_up(call_id, 1.0) == "node1"
    assert sum(len(k) for k in admission._pending) <= 300 * 17
    assert sum(len(k) for k in admission._admitted) <= 300 * 17
    admission.answered(b"0" + b"c" * LONG + b" 1", 0.1)
    assert not admission.is_pending(b"0" + b"c" * LONG + b" 1")
    assert admission.stats.answered == 1
    short = b"abc@host"
    admission.sent(short + b" 1", "node2", 0.0)
    assert short + b" 1" in admission._pending  # a real Call-ID is held as it is


def test_front_door_user_agent_verdicts_keep_no_long_values():
    door = FrontDoor(FrontDoorPolicy())
    for i in range(300):
        assert door._is_scanner(b"friendly-scanner %d " % i + b"u" * LONG)
        assert not door._is_scanner(b"Phone %d " % i + b"u" * LONG)
    assert len(door._agent_verdicts) == 0
    assert door._is_scanner(b"friendly-scanner") and len(door._agent_verdicts) == 1


def test_destination_verdicts_keep_no_long_hosts():
    policy = DestinationPolicy()
    for i in range(300):
        assert not policy.permits(Address("udp", f"h{i}." + "a" * LONG, 5060))
    assert len(policy._judged) == 0
    assert policy.permits(Address("udp", "192.0.2.1", 5060))
    assert len(policy._judged) == 1


def test_keepalive_table_keeps_no_long_registrations_and_hashes_long_call_ids():
    table = RegisteredFlows(interval=30, failures=2)
    for i in range(200):
        flow = Address("udp", "203.0.113.7", 40000 + i)
        long_contact = f"sip:alice@192.168.1.5:5062;x{i}=" + "a" * LONG
        req = parse_message(keepalive_register(call_id=f"c{i}", contact=long_contact))
        table.on_register(flow, req)
        assert (
            table.on_register_ok(flow, parse_message(keepalive_ok(req, f"Contact: <{long_contact}>\r\n")), 0.0) is None
        )
    assert len(table._pending) == 0 and len(table.flows) == 0
    assert table.stats.too_long == 200
    # a long Call-ID with a real Contact still works, held under a bounded key
    flow = Address("udp", "203.0.113.7", 50000)
    req = parse_message(keepalive_register(call_id="c" * LONG))
    table.on_register(flow, req)
    assert sum(len(call_id) for _, call_id in table._pending) <= 17
    reg = table.on_register_ok(flow, parse_message(keepalive_ok(req, f"Contact: <{CONTACT}>;expires=600\r\n")), 0.0)
    assert reg is not None and reg.contacts == (CONTACT,) and flow in table.flows


def test_our_host_check_of_long_hosts_is_right_and_not_remembered():
    before = _bare_cached.cache_info().currsize
    for i in range(300):
        assert _bare(f"[H{i}." + "a" * LONG + "]") == f"h{i}." + "a" * LONG
    assert _bare_cached.cache_info().currsize == before
    assert _bare("[2001:DB8:0::1]") == "2001:db8::1"
    h = Harness()
    h.nodes.update_members(members())
    # a request whose top Via names a long host: read (not ours), answered, nothing kept
    msg, _ = h.one(request("OPTIONS", "sip:bob@farm.test", via="SIP/2.0/UDP " + "v" * LONG + ".example"), CLIENT)
    assert msg.method == b"OPTIONS"
    assert _bare_cached.cache_info().currsize <= before + 4
