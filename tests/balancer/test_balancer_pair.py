"""Two balancers side by side: stateless apart from their connections, sharing the flow-token
secret through Redis.  A phone registered through balancer A is called through balancer B; the
call reaches it through A (the Path names A) and the dialog completes."""

from __future__ import annotations

import threading

import pytest
from fixtures.farm import SipClient, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from lbhelpers import Caller, answer, wait_request

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def test_call_through_the_other_balancer(redis_url, accounts, start_node, start_balancer):
    start_node(redis_url, "node1")
    start_node(redis_url, "node2")
    lb_a = start_balancer(redis_url)
    lb_b = start_balancer(redis_url)
    wait_nodes_usable(lb_a, 2)
    wait_nodes_usable(lb_b, 2)  # the call goes in through B: it must know the nodes too
    callee = SipClient()
    caller_socket = SipClient()
    try:
        reply = callee.register(lb_a.address, "bob", accounts["bob"])
        assert reply is not None and reply.status == 200, lb_a.log()[-1500:]

        received: dict[str, object] = {}

        def uas() -> None:
            invite = wait_request(callee, b"INVITE")
            received["invite"] = invite
            if invite is None:
                return
            # the INVITE came out of balancer A: its Via is on top
            received["via"] = invite.top_via_value
            callee.send(answer(invite, f"<sip:bob@127.0.0.1:{callee.port}>"), lb_a.address)
            received["ack"] = wait_request(callee, b"ACK", 5.0)
            bye = wait_request(callee, b"BYE", 8.0)
            received["bye"] = bye
            if bye is not None:
                callee.send(answer(bye, f"<sip:bob@127.0.0.1:{callee.port}>"), lb_a.address)

        thread = threading.Thread(target=uas, daemon=True)
        thread.start()
        caller = Caller(caller_socket, lb_b.address, "alice", accounts["alice"])
        final = caller.invite("bob")
        assert final is not None and final.status == 200, (final, lb_b.log()[-1500:])
        caller.ack()
        bye_reply = caller.bye()
        thread.join(10)
        assert received.get("invite") is not None and received.get("ack") is not None
        assert b":%d;" % lb_a.port in received["via"], received["via"]  # type: ignore[operator]
        assert received.get("bye") is not None
        assert bye_reply is not None and bye_reply.status == 200
    finally:
        callee.close()
        caller_socket.close()
