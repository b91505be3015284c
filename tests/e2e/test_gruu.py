"""GRUU (RFC 5627) and Flow-Timer (RFC 5626 5.4) on a real farm: two node processes, a balancer,
the test's redis-server, phones as UDP sockets speaking hand-made SIP.

bob has two devices (desk and mobile, each with its own instance ID) registered at node 1 with
``Supported: gruu``.  A call to the GRUUs node 1 handed out, sent to node 2 (which never saw the
REGISTER) or through the balancer, reaches the desk and never the mobile; a forged temporary
GRUU gets the answer of a user that does not exist.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
from fixtures.farm import DOMAIN, BalancerProcess, NodeProcess, SipClient, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S

from sipfarm.sip import auth
from sipfarm.sip.headers import unquote_string
from sipfarm.sip.message import SipMessage, make_response

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)

DESK = "urn:uuid:5b0a4c6e-2f61-4d1b-8a53-0f1e2d3c4b5a"
MOBILE = "urn:uuid:9e8d7c6b-5a49-4382-b1a0-f9e8d7c6b5a4"
Dest = tuple[str, int]


def register(
    phone: SipClient, registrar: Dest, password: str, instance: str, *, reg_id: int | None = None
) -> SipMessage:
    contact = f'<sip:bob@{phone.host}:{phone.port}>;+sip.instance="<{instance}>"'
    if reg_id is not None:
        contact += f";reg-id={reg_id}"
    reply = phone.register(registrar, "bob", password, contact=contact, extra=(("supported", "gruu, outbound"),))
    assert reply is not None
    assert reply.status == 200, reply.to_bytes()[:300]
    return reply


def gruus(reply: SipMessage, instance: str) -> tuple[str, str]:
    for na in reply.name_addrs("contact"):
        if unquote_string(na.param("+sip.instance") or "") == f"<{instance}>":
            return unquote_string(na.param("pub-gruu") or ""), unquote_string(na.param("temp-gruu") or "")
    raise AssertionError(f"no Contact of {instance} in {reply.to_bytes()!r:.500}")


def invite(
    caller: SipClient, proxy: Dest, uri: str, password: str, call_id: str = ""
) -> tuple[SipMessage | None, SipMessage]:
    """An INVITE from alice to ``uri``, its 407 answered: (the final answer, the INVITE sent).
    The answer is None when none came within 3 s, or at once with ``call_id`` given (the caller
    reads the answer later)."""
    wait = not call_id
    call_id = call_id or secrets.token_hex(8)
    headers = (("contact", f"<sip:alice@{caller.host}:{caller.port}>"),)
    first = caller.request("INVITE", uri, to=f"<sip:bob@{DOMAIN}>", call_id=call_id, headers=headers)
    caller.send(first, proxy)
    challenge = final_of(caller, call_id)
    assert challenge is not None
    assert challenge.status == 407
    chal = auth.parse_challenge(challenge.get_all("proxy-authenticate")[0])
    creds = auth.build_credentials(chal, "alice", password, "INVITE", uri, secrets.token_hex(4))
    again = caller.request(
        "INVITE",
        uri,
        to=f"<sip:bob@{DOMAIN}>",
        call_id=call_id,
        cseq=2,
        headers=(*headers, ("proxy-authorization", creds.decode())),
    )
    caller.send(again, proxy)
    return (final_of(caller, call_id, again, proxy) if wait else None), again


def final_of(
    caller: SipClient, call_id: str, invite: SipMessage | None = None, proxy: Dest | None = None
) -> SipMessage | None:
    """The final response of ``call_id`` (to ``invite`` if given; others skipped: retransmissions
    of earlier calls); a non-2xx to ``invite`` is ACKed (RFC 3261 17.1.1.3), so it is not
    retransmitted."""
    msg = caller.recv_final(call_id=call_id, cseq=invite.cseq[0] if invite is not None else None)
    if msg is not None and invite is not None and proxy is not None and msg.status >= 300:
        ack = SipMessage.request(
            "ACK",
            invite.uri.decode(),
            [
                ("via", invite.top_via_value),
                ("max-forwards", "70"),
                ("from", invite.get("from") or b""),
                ("to", msg.get("to") or b""),
                ("call-id", invite.call_id),
                ("cseq", f"{invite.cseq[0]} ACK"),
            ],
        )
        caller.send(ack, proxy)
    return msg


def answer_busy(device: SipClient, call_id: str) -> SipMessage:
    """The INVITE of ``call_id`` the device receives (anything else skipped), answered 486."""
    while True:
        msg = device.recv(3.0)
        assert msg is not None, "the device got no INVITE"
        if msg.method == b"INVITE" and msg.call_id == call_id.encode():
            break
    # responses go back where the request came from (the node that forwarded it)
    via = msg.top_via_value.decode()
    sent_by = via.split()[1].split(";")[0]
    host, _, port = sent_by.rpartition(":")
    rport = next((p.split("=")[1] for p in via.split(";") if p.startswith("rport=")), port)
    device.send(make_response(msg, 486, to_tag=b"desk1"), (host, int(rport)))
    return msg


def test_a_gruu_learnt_from_node_1_is_routed_by_node_2_and_the_balancer_to_that_device_only(
    redis_url: str,
    accounts: dict[str, str],
    start_node: Callable[..., NodeProcess],
    start_balancer: Callable[..., BalancerProcess],
) -> None:
    node1 = start_node(redis_url, "node1")
    node2 = start_node(redis_url, "node2")
    lb = start_balancer(redis_url)
    wait_nodes_usable(lb, 2)
    desk, mobile, alice = SipClient(), SipClient(), SipClient()
    try:
        pub, temp = gruus(register(desk, node1.address, accounts["bob"], DESK), DESK)
        register(mobile, node1.address, accounts["bob"], MOBILE)
        assert pub == f"sip:bob@{DOMAIN};gr={DESK}"
        assert temp.startswith("sip:tgruu.")
        assert temp.endswith(";gr")

        for proxy, uri in ((node2.address, pub), (node2.address, temp), (lb.address, temp)):
            call_id = secrets.token_hex(8)
            _, sent = invite(alice, proxy, uri, accounts["alice"], call_id)
            got = answer_busy(desk, call_id)
            assert got.uri == f"sip:bob@{desk.host}:{desk.port}".encode()  # retargeted to the binding
            final = final_of(alice, call_id, sent, proxy)
            assert final is not None
            assert (final.status, final.call_id) == (486, call_id.encode()), (proxy, uri)
            assert mobile.recv(0.3) is None  # the other device of the account heard nothing

        unknown, _ = invite(alice, node2.address, f"sip:nobody@{DOMAIN}", accounts["alice"])
        forged, _ = invite(alice, node2.address, temp.replace("tgruu.", "tgruu.b", 1), accounts["alice"])
        assert unknown is not None
        assert forged is not None
        assert (forged.status, forged.reason) == (unknown.status, unknown.reason) == (480, b"Temporarily Unavailable")
    finally:
        for client in (desk, mobile, alice):
            client.close()


def test_an_outbound_registration_through_the_balancer_gets_flow_timer(
    redis_url: str,
    accounts: dict[str, str],
    start_node: Callable[..., NodeProcess],
    start_balancer: Callable[..., BalancerProcess],
) -> None:
    start_node(redis_url, "node1")
    lb = start_balancer(redis_url)
    wait_nodes_usable(lb, 1)
    phone = SipClient()
    try:
        reply = register(phone, lb.address, accounts["bob"], DESK, reg_id=1)
        assert reply.get("require") == b"outbound"
        assert reply.get("flow-timer") == b"25"  # a UDP flow through the balancer
    finally:
        phone.close()
