"""A UA on one TCP connection to the balancer: it registers over it, and a call to it from a
UDP caller arrives over that very connection (RFC 5626 flow, Path with the flow token)."""

from __future__ import annotations

import secrets
import socket
import threading
import time

import pytest
from fixtures.farm import DOMAIN, SipClient, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from lbhelpers import Caller, TcpSip, answer

from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def tcp_register(conn: TcpSip, call_id: str, cseq: int, authorization: bytes | None = None) -> bytes:
    lines = [
        f"REGISTER sip:{DOMAIN} SIP/2.0",
        f"Via: SIP/2.0/TCP {conn.host}:{conn.port};branch=z9hG4bK{secrets.token_hex(8)}",
        "Max-Forwards: 70",
        f"From: <sip:carol@{DOMAIN}>;tag=t{cseq}",
        f"To: <sip:carol@{DOMAIN}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <sip:carol@{conn.host}:{conn.port};transport=tcp>",
        "Supported: path",
    ]
    if authorization is not None:
        lines.append(f"Authorization: {authorization.decode()}")
    return "\r\n".join([*lines, "Content-Length: 0", "", ""]).encode()


def recv_until(conn: TcpSip, method: bytes = b"", status: int = 0, timeout: float = 5.0) -> SipMessage | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = conn.recv(left)
        if msg is None:
            return None
        if (method and msg.method == method) or (status and msg.status == status):
            return msg
    return None


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_tcp_register_and_call_arrives_on_the_same_connection(redis_url, accounts, start_node, start_balancer, workers):
    start_node(redis_url, "node1")
    start_node(redis_url, "node2")
    lb = start_balancer(redis_url, extra=["--workers", str(workers)])
    wait_nodes_usable(lb, 2)
    conn = TcpSip(lb.address)
    client = SipClient()
    try:
        call_id = secrets.token_hex(8)
        conn.send(tcp_register(conn, call_id, 1))
        challenge_msg = recv_until(conn, status=401)
        assert challenge_msg is not None, lb.log()[-2000:]
        challenge = auth.parse_challenge(challenge_msg.get_all("www-authenticate")[0])
        creds = auth.build_credentials(challenge, "carol", accounts["carol"], "REGISTER", f"sip:{DOMAIN}",
                                       secrets.token_hex(4))
        conn.send(tcp_register(conn, call_id, 2, creds))
        assert recv_until(conn, status=200) is not None, lb.log()[-2000:]

        caller = Caller(client, lb.address, "alice", accounts["alice"])
        result: list[SipMessage | None] = []
        thread = threading.Thread(target=lambda: result.append(caller.invite("carol", 8.0)))
        thread.start()
        invite = recv_until(conn, method=b"INVITE", timeout=8.0)
        assert invite is not None, lb.log()[-2000:]
        assert invite.call_id == caller.call_id.encode()
        assert invite.top_via.transport == "TCP"
        contact = f"<sip:carol@{conn.host}:{conn.port};transport=tcp>"
        conn.send(answer(invite, contact))
        thread.join(10)
        assert result and result[0] is not None and result[0].status == 200, (result, lb.log()[-2000:])

        caller.ack()
        assert recv_until(conn, method=b"ACK") is not None
        thread = threading.Thread(target=lambda: result.append(caller.bye()))
        thread.start()
        bye = recv_until(conn, method=b"BYE")
        assert bye is not None
        conn.send(answer(bye, contact))
        thread.join(10)
        assert result[-1] is not None and result[-1].status == 200
    finally:
        conn.close()
        client.close()


def test_a_phone_that_half_closes_after_its_request_gets_the_nodes_answer(redis_url, start_node, start_balancer):
    """A REGISTER over TCP then shutdown(SHUT_WR): the node's 401, a moment later, still comes
    back over the half-closed connection, which the balancer then closes (every request it
    carried answered).  It used to close on the FIN, and the answer was dropped (no flow)."""
    start_node(redis_url, "node1")
    lb = start_balancer(redis_url)
    wait_nodes_usable(lb, 1)
    conn = TcpSip(lb.address)
    try:
        conn.send(tcp_register(conn, "half-closed-1", 1))
        conn.sock.shutdown(socket.SHUT_WR)
        reply = conn.recv(5.0)
        assert reply is not None and reply.status == 401, lb.log()[-2000:]
        conn.sock.settimeout(5.0)
        assert conn.sock.recv(1) == b""  # then closed by the balancer
    finally:
        conn.close()
