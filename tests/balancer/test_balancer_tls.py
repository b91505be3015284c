"""TLS terminated at the balancer: a phone registers over TLS (certificate checked against the
farm's self-signed CA) and a call to it from a UDP caller arrives over that TLS connection."""

from __future__ import annotations

import secrets
import socket
import ssl
import threading
import time

import pytest
from fixtures.farm import DOMAIN, SipClient, free_udp_tcp_port, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from lbhelpers import Caller, TcpSip, answer

from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage
from sipfarm.transport.tls import client_context, make_self_signed_cert

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


class TlsSip(TcpSip):
    def __init__(self, dest: tuple[str, int], context: ssl.SSLContext) -> None:
        raw = socket.create_connection(dest, timeout=5)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.host, self.port = self.sock.getsockname()[:2]
        self._buf = b""


def tls_register(conn: TlsSip, call_id: str, cseq: int, authorization: bytes | None = None) -> bytes:
    lines = [
        f"REGISTER sip:{DOMAIN} SIP/2.0",
        f"Via: SIP/2.0/TLS {conn.host}:{conn.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70",
        f"From: <sip:carol@{DOMAIN}>;tag=t{cseq}",
        f"To: <sip:carol@{DOMAIN}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <sip:carol@{conn.host}:{conn.port};transport=tls>",
    ]
    if authorization is not None:
        lines.append("Authorization: " + authorization.decode())
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


def recv_status(conn: TlsSip, status: int) -> SipMessage | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = conn.recv(deadline - time.monotonic())
        if msg is None or msg.status == status:
            return msg
    return None


def test_tls_register_and_call(redis_url, accounts, start_node, start_balancer, tmp_path):
    cert, key = make_self_signed_cert(tmp_path, ip="127.0.0.1")
    tls_port = free_udp_tcp_port()
    start_node(redis_url, "node1")
    lb = start_balancer(redis_url, extra=["--listen", f"tls:127.0.0.1:{tls_port}",
                                          "--tls-cert", str(cert), "--tls-key", str(key)])
    wait_nodes_usable(lb, 1)
    conn = TlsSip(("127.0.0.1", tls_port), client_context(cert))  # verifies the certificate
    caller_socket = SipClient()
    try:
        call_id = secrets.token_hex(8)
        conn.send(tls_register(conn, call_id, 1))
        challenge_msg = recv_status(conn, 401)
        assert challenge_msg is not None, lb.log()[-1500:]
        challenge = auth.parse_challenge(challenge_msg.get_all("www-authenticate")[0])
        creds = auth.build_credentials(challenge, "carol", accounts["carol"], "REGISTER", f"sip:{DOMAIN}",
                                       secrets.token_hex(4))
        conn.send(tls_register(conn, call_id, 2, creds))
        assert recv_status(conn, 200) is not None, lb.log()[-1500:]

        caller = Caller(caller_socket, lb.address, "alice", accounts["alice"])
        result: list[SipMessage | None] = []
        thread = threading.Thread(target=lambda: result.append(caller.invite("carol", 8.0)))
        thread.start()
        deadline = time.monotonic() + 8
        invite = None
        while invite is None and time.monotonic() < deadline:
            msg = conn.recv(deadline - time.monotonic())
            if msg is not None and msg.method == b"INVITE":
                invite = msg
        assert invite is not None, lb.log()[-1500:]
        assert invite.top_via.transport == "TLS"
        conn.send(answer(invite, f"<sip:carol@{conn.host}:{conn.port};transport=tls>"))
        thread.join(10)
        assert result and result[0] is not None and result[0].status == 200
    finally:
        conn.close()
        caller_socket.close()
