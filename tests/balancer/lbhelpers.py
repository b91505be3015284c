"""Small hand-made user agents for the balancer tests: a caller over UDP (SipClient) that
authenticates its INVITE, answers for callees, in-dialog ACK/BYE along the route set, and
a blocking TCP SIP connection."""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

from fixtures.farm import DOMAIN, SipClient

from sipfarm.sip import auth
from sipfarm.sip.headers import parse_name_addr
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.parser import parse_message

SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def _branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


class Caller:
    """A UDP UA placing one call through ``proxy`` and holding its dialog."""

    def __init__(self, client: SipClient, proxy: tuple[str, int], user: str, password: str) -> None:
        self.client = client
        self.proxy = proxy
        self.user = user
        self.password = password
        self.call_id = secrets.token_hex(8)
        self.from_tag = secrets.token_hex(4)
        self.cseq = 0
        self.to: bytes = b""
        self.route: list[bytes] = []
        self.target: bytes = b""

    def _request(self, method: str, uri: str, *, to: str, cseq: int, branch: str | None = None,
                 headers: tuple[tuple[str, str | bytes], ...] = (), body: bytes = b"") -> SipMessage:
        c = self.client
        msg = SipMessage.request(method, uri, [
            ("via", f"SIP/2.0/UDP {c.host}:{c.port};branch={branch or _branch()};rport"),
            ("max-forwards", "70"),
            ("from", f"<sip:{self.user}@{DOMAIN}>;tag={self.from_tag}"),
            ("to", to),
            ("call-id", self.call_id),
            ("cseq", f"{cseq} {method}"),
            *headers,
        ])
        if body:
            msg.set_body(body, b"application/sdp")
        msg.cseq = (cseq, method.encode())
        return msg

    def invite(self, callee: str, timeout: float = 5.0) -> SipMessage | None:
        """INVITE ``callee`` (answering a 407 once); the final response."""
        uri = f"sip:{callee}@{DOMAIN}"
        to = f"<{uri}>"
        contact = ("contact", f"<sip:{self.user}@{self.client.host}:{self.client.port}>")
        self.cseq += 1
        req = self._request("INVITE", uri, to=to, cseq=self.cseq, headers=(contact,), body=SDP)
        self.client.send(req, self.proxy)
        final = self.client.recv_final(timeout, call_id=self.call_id, cseq=self.cseq)
        if final is None or final.status != 407:
            return self._answered(final)
        # ACK of the 407: the INVITE's branch (RFC 3261 17.1.1.3)
        ack = SipMessage.request("ACK", uri, [
            ("via", req.top_via_value), ("max-forwards", "70"), ("from", req.get("from") or b""),
            ("to", final.get("to") or b""), ("call-id", self.call_id), ("cseq", f"{self.cseq} ACK"),
        ])
        self.client.send(ack, self.proxy)
        challenge = auth.parse_challenge(final.get_all("proxy-authenticate")[0])
        creds = auth.build_credentials(challenge, self.user, self.password, "INVITE", uri, secrets.token_hex(4))
        self.cseq += 1
        req = self._request("INVITE", uri, to=to, cseq=self.cseq,
                            headers=(contact, ("proxy-authorization", creds)), body=SDP)
        self.client.send(req, self.proxy)
        # this INVITE's answer: not a request to this phone nor a late answer to CSeq 1
        return self._answered(self.client.recv_final(timeout, call_id=self.call_id, cseq=self.cseq))

    def _answered(self, final: SipMessage | None) -> SipMessage | None:
        if final is not None and 200 <= final.status < 300:
            self.to = final.get("to") or b""
            self.route = list(reversed(final.values("record-route")))  # RFC 3261 12.1.2
            contact = final.values("contact")
            self.target = parse_name_addr(contact[0]).raw_uri if contact else b""
        return final

    def in_dialog(self, method: str, *, cseq: int | None = None) -> SipMessage:
        """An ACK or BYE for the dialog: to the remote target through the route set."""
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        routes = tuple(("route", value) for value in self.route)
        return self._request(method, self.target.decode(), to=self.to.decode(), cseq=cseq, headers=routes)

    def ack(self) -> None:
        self.client.send(self.in_dialog("ACK", cseq=self.cseq), self.proxy)

    def bye(self, *, retransmit_for: float = 4.0) -> SipMessage | None:
        """BYE with UDP retransmissions (Timer E-like, every 0.5 s); its final response."""
        bye = self.in_dialog("BYE")
        deadline = time.monotonic() + retransmit_for
        while time.monotonic() < deadline:
            self.client.send(bye, self.proxy)
            reply = self.client.recv_final(0.5, call_id=self.call_id, cseq=bye.cseq[0], method="BYE")
            if reply is not None:
                return reply
        return None


def loopback_peers(workdir: Path) -> list[str]:
    """Balancer flags for tests whose peers sit on loopback at other ports than they register
    from (SIPp's UAS, a softphone's separate sockets): the balancer refuses loopback
    destinations unless the operator allows them, so these tests say so explicitly."""
    path = workdir / "balancer-loopback-peers.toml"
    path.write_text('[balancer]\nallow_destinations = ["127.0.0.0/8"]\n')
    return ["--config", str(path)]


def answer(request: SipMessage, contact: str, status: int = 200) -> SipMessage:
    """A UAS answer to ``request`` (Record-Route copied, SDP for a 2xx to INVITE)."""
    body = SDP if status == 200 and request.method == b"INVITE" else b""
    return make_response(request, status, to_tag=b"callee" + secrets.token_hex(3).encode(),
                         headers=(("contact", contact),), body=body,
                         content_type=b"application/sdp" if body else None, record_route=True)


def wait_request(
    client: SipClient, method: bytes, timeout: float = 5.0, *, call_id: str | bytes | None = None
) -> SipMessage | None:
    """The first ``method`` request (of ``call_id`` if given); anything else is passed over (a
    retransmission of an earlier request, a late response)."""
    return client.recv_request(method, timeout, call_id=call_id)


class TcpSip:
    """One blocking TCP connection carrying SIP, framed by Content-Length."""

    def __init__(self, dest: tuple[str, int], source: str | None = None) -> None:
        self.sock = socket.create_connection(dest, timeout=5, source_address=(source, 0) if source else None)
        self.host, self.port = self.sock.getsockname()[:2]
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: SipMessage | bytes) -> None:
        self.sock.sendall(msg if isinstance(msg, bytes) else msg.to_bytes())

    def recv(self, timeout: float = 5.0) -> SipMessage | None:
        deadline = time.monotonic() + timeout
        while True:
            head_end = self._buf.find(b"\r\n\r\n")
            if head_end >= 0:
                head = self._buf[:head_end].lower()
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip() in (b"content-length", b"l"):
                        length = int(value)
                end = head_end + 4 + length
                if len(self._buf) >= end:
                    data, self._buf = self._buf[:end], self._buf[end:]
                    return parse_message(data)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            self._buf += chunk.lstrip(b"\r\n") if not self._buf else chunk
