"""The node as a proxy, against real peers: hand-made requests (``SipClient``) as the caller and
SIPp UASes (``benchmarks/scenarios/uas_answer.xml`` and this directory's ``scenarios/``) as
callees registered at the node.

What a caller sees: 407 challenges, 404/480/403/483 for requests that cannot be routed, CANCEL
of a ringing call (200 + 487, and the callee gets the CANCEL), parallel and serial forking,
in-dialog requests routed by their Route set through any node, and a node that survives a
flood of garbage while its metrics count it.
"""

from __future__ import annotations

import secrets
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fixtures.farm import DOMAIN, NodeProcess, SipClient, free_udp_tcp_port
from fixtures.startup import START_TIMEOUT_S

from benchmarks.sipp import UAS_ANSWER, SippServer
from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
UAS_RING_CANCEL = SCENARIOS / "uas_ring_cancel.xml"
UAS_BUSY = SCENARIOS / "uas_busy.xml"

SDP = (
    b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


# -- a caller that speaks just enough SIP ------------------------------------------------------


@dataclass
class Dialog:
    """What a UAC keeps of one call: its identifiers and, once answered, the route set."""

    client: SipClient
    uri: str
    call_id: str = field(default_factory=lambda: secrets.token_hex(8))
    from_tag: str = field(default_factory=lambda: secrets.token_hex(4))
    cseq: int = 1
    invite: SipMessage | None = None  # the INVITE last sent (its branch is the transaction's)
    answer: SipMessage | None = None  # the 2xx

    def build(self, method: str, uri: str | None = None, *, branch: str | None = None, cseq: int | None = None,
              to: bytes | None = None, headers: tuple[tuple[str, bytes | str], ...] = (), body: bytes = b"",
              max_forwards: int = 70) -> SipMessage:
        c = self.client
        branch = branch or f"z9hG4bK{secrets.token_hex(8)}"
        number = self.cseq if cseq is None else cseq
        msg = SipMessage.request(method, uri or self.uri, [
            ("via", f"SIP/2.0/UDP {c.host}:{c.port};branch={branch};rport"),
            ("max-forwards", str(max_forwards)),
            ("from", f"<sip:alice@{DOMAIN}>;tag={self.from_tag}"),
            ("to", to or f"<{self.uri}>".encode()),
            ("call-id", self.call_id),
            ("cseq", f"{number} {method}"),
            ("contact", f"<sip:alice@{c.host}:{c.port}>"),
            *headers,
        ], body)  # fmt: skip
        msg.cseq = (number, method.encode())
        if body:
            msg.set_body(body, "application/sdp")
        return msg

    def send_invite(self, dest: tuple[str, int], *, headers: tuple[tuple[str, bytes | str], ...] = (),
                    max_forwards: int = 70) -> None:
        self.invite = self.build("INVITE", headers=headers, body=SDP, max_forwards=max_forwards)
        self.client.send(self.invite, dest)

    def ack_failure(self, response: SipMessage, dest: tuple[str, int]) -> None:
        """ACK of a non-2xx final answer: same branch as the INVITE (RFC 3261 17.1.1.3)."""
        assert self.invite is not None
        branch = self.invite.top_via_value.split(b"branch=")[1].split(b";")[0].decode()
        self.client.send(self.build("ACK", branch=branch, to=response.get("to")), dest)

    def invite_with_credentials(self, dest: tuple[str, int], password: str, *, user: str = "alice",
                                max_forwards: int = 70) -> SipMessage:
        """INVITE, answer the 407 with credentials; the first response after that (final or not)."""
        self.send_invite(dest)
        challenge = self.recv_final()
        assert challenge is not None and challenge.status == 407, challenge
        self.ack_failure(challenge, dest)
        proxy_auth = auth.parse_challenge(challenge.get_all("proxy-authenticate")[0])
        creds = auth.build_credentials(proxy_auth, user, password, "INVITE", self.uri, secrets.token_hex(4))
        self.cseq += 1
        self.send_invite(dest, headers=(("proxy-authorization", creds),), max_forwards=max_forwards)
        # this INVITE's answer, not a late one to CSeq 1 nor a request to this phone
        reply = self.client.recv_response(3.0, call_id=self.call_id, cseq=self.cseq)
        assert reply is not None, "no answer to the authenticated INVITE"
        return reply

    def recv_final(self, timeout: float = 3.0, method: str = "INVITE") -> SipMessage | None:
        """The final response to this dialog's last ``method`` request (INVITE: the one last
        sent); anything else arriving meanwhile is skipped (a request to this phone, an answer to
        an earlier CSeq, the 200 to the INVITE retransmitted while a BYE's answer is awaited)."""
        cseq = self.cseq if method == "INVITE" else None
        return self.client.recv_final(timeout, call_id=self.call_id, cseq=cseq, method=method)

    def wait_final(self, timeout: float = 5.0) -> SipMessage:
        reply = self.recv_final(timeout)
        assert reply is not None, "no final response"
        if 200 <= reply.status < 300:
            self.answer = reply
        return reply

    def in_dialog(self, method: str) -> tuple[SipMessage, list[bytes]]:
        """ACK/BYE for the answered call: to the remote target through the route set (RFC 3261 12.2.1.1)."""
        answer = self.answer
        assert answer is not None
        target = answer.name_addr("contact").uri
        routes = list(reversed(answer.values("record-route")))
        cseq = self.cseq if method == "ACK" else self.cseq + 1
        if method != "ACK":
            self.cseq = cseq
        headers = tuple(("route", r) for r in routes)
        return self.build(method, str(target), cseq=cseq, to=answer.get("to"), headers=headers), routes


def route_dest(route: bytes) -> tuple[str, int]:
    hostport = route.split(b"sip:")[1].split(b";")[0].split(b">")[0].decode()
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def metric(port: int, name: str, labels: str = "") -> float:
    """One sample of the node's Prometheus endpoint (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        text = page.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line) and not line.startswith(name + "_created"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name:
                total += float(value)
    return total


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def successful_calls(uas: SippServer) -> int:
    value = uas.stats().get("SuccessfulCall(C)", "0")
    return int(value) if value.isdigit() else 0


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[SipClient]:
    c = SipClient()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def uas(tmp_path: Path) -> Iterator[Callable[[Path], SippServer]]:
    """Start SIPp UASes (any scenario); all stopped at teardown."""
    servers: list[SippServer] = []

    def start(scenario: Path) -> SippServer:
        server = SippServer(tmp_path / f"uas{len(servers)}", scenario=scenario)
        servers.append(server)
        return server

    yield start
    for server in servers:  # SIPp's graceful quit for all at once, then stop each
        if server.process.alive():
            server.process.proc.send_signal(signal.SIGUSR1)
    for server in servers:
        server.stop()


def register_contact(node: NodeProcess, user: str, password: str, contact: str) -> None:
    registrar = SipClient()
    try:
        reply = registrar.register(node.address, user, password, contact=contact)
        assert reply is not None and reply.status == 200, reply
    finally:
        registrar.close()


# -- rejections --------------------------------------------------------------------------------


def test_invite_without_credentials_is_challenged_with_407(redis_url, accounts, start_node, client):
    node = start_node(redis_url)
    dialog = Dialog(client, f"sip:bob@{DOMAIN}")
    dialog.send_invite(node.address)
    reply = dialog.recv_final()
    assert reply is not None and reply.status == 407
    challenges = reply.get_all("proxy-authenticate")
    assert challenges and all(c.startswith(b"Digest ") for c in challenges)
    assert auth.parse_challenge(challenges[0]).realm == DOMAIN
    assert reply.to_tag is not None


def test_wrong_credentials_get_407_again_and_are_counted(redis_url, accounts, start_node, client):
    metrics_port = free_udp_tcp_port()
    node = start_node(redis_url, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    before = metric(metrics_port, "sipfarm_node_auth_failures_total", 'reason="failed"')
    dialog = Dialog(client, f"sip:bob@{DOMAIN}")
    reply = dialog.invite_with_credentials(node.address, "not-alices-password")
    if reply.status < 200:
        reply = dialog.wait_final()
    assert reply.status == 407
    assert reply.get_all("proxy-authenticate")
    assert metric(metrics_port, "sipfarm_node_auth_failures_total", 'reason="failed"') == before + 1


@pytest.mark.parametrize(("callee", "status"), [("nobody", 480), ("carol", 480)])
def test_unknown_user_and_unregistered_user_both_480(redis_url, accounts, start_node, client, callee, status):
    node = start_node(redis_url)
    dialog = Dialog(client, f"sip:{callee}@{DOMAIN}")
    reply = dialog.invite_with_credentials(node.address, accounts["alice"])
    if reply.status < 200:
        reply = dialog.wait_final()
    assert reply.status == status


def test_non_local_domain_is_forbidden(redis_url, accounts, start_node, client):
    node = start_node(redis_url)
    dialog = Dialog(client, "sip:bob@elsewhere.example")
    dialog.send_invite(node.address)
    reply = dialog.recv_final()
    assert reply is not None and reply.status == 403


def test_max_forwards_zero_gets_483(redis_url, accounts, start_node, client):
    node = start_node(redis_url)
    register_contact(node, "bob", accounts["bob"], f"<sip:bob@127.0.0.1:{free_udp_tcp_port()}>")
    dialog = Dialog(client, f"sip:bob@{DOMAIN}")
    dialog.send_invite(node.address, max_forwards=0)
    reply = dialog.recv_final()
    assert reply is not None and reply.status == 483


def test_options_to_the_node_gets_200_with_allow(redis_url, start_node, client):
    node = start_node(redis_url)
    host, port = node.address
    dialog = Dialog(client, f"sip:{host}:{port}")
    client.send(dialog.build("OPTIONS"), node.address)
    reply = dialog.recv_final(method="OPTIONS")
    assert reply is not None and reply.status == 200
    allow = {m.strip() for m in (reply.get("allow") or b"").split(b",")}
    assert {b"INVITE", b"ACK", b"CANCEL", b"BYE", b"OPTIONS", b"REGISTER"} <= allow


# -- calls through SIPp UASes ------------------------------------------------------------------


def test_cancel_of_a_ringing_call(redis_url, accounts, start_node, client, uas):
    node = start_node(redis_url)
    ringing = uas(UAS_RING_CANCEL)
    register_contact(node, "bob", accounts["bob"], f"<sip:bob@{ringing.contact}>")
    dialog = Dialog(client, f"sip:bob@{DOMAIN}")
    reply = dialog.invite_with_credentials(node.address, accounts["alice"])
    while reply.status == 100:
        nxt = client.recv_response(3.0, call_id=dialog.call_id, cseq=dialog.cseq)
        assert nxt is not None, "no 180"
        reply = nxt
    assert reply.status == 180
    invite = dialog.invite
    assert invite is not None
    client.send(cancel_for(invite, dialog.cseq), node.address)
    answers = collect_cancel_answers(dialog, node.address, 5.0)
    assert answers == {b"CANCEL": 200, b"INVITE": 487}
    assert wait_for(lambda: successful_calls(ringing) == 1), ringing.stats()  # the callee got the CANCEL


def cancel_for(invite: SipMessage, cseq: int) -> SipMessage:
    """RFC 3261 9.1: the INVITE's top Via, Request-URI, Call-ID, From, To and CSeq number."""
    return SipMessage.request("CANCEL", invite.uri, [
        ("via", invite.top_via_value), ("max-forwards", b"70"), ("from", invite.get("from") or b""),
        ("to", invite.get("to") or b""), ("call-id", invite.call_id), ("cseq", f"{cseq} CANCEL"),
    ])  # fmt: skip


def collect_cancel_answers(dialog: Dialog, dest: tuple[str, int], timeout: float) -> dict[bytes, int]:
    """Final answers to the CANCEL and to the INVITE, by CSeq method (the 487 is ACKed); only
    the last INVITE's transaction (not a late copy of the 407 to the first one)."""
    answers: dict[bytes, int] = {}
    deadline = time.monotonic() + timeout
    while len(answers) < 2 and (left := deadline - time.monotonic()) > 0:
        msg = dialog.client.recv_final(min(left, 1.0), call_id=dialog.call_id, cseq=dialog.cseq)
        if msg is not None:
            answers[msg.cseq[1]] = msg.status
            if msg.cseq[1] == b"INVITE":
                dialog.ack_failure(msg, dest)
    return answers


def _cancelled_before_any_provisional(node, accounts, client, callee: SipClient) -> SipMessage:
    """alice calls bob (at ``callee``), which sends nothing back; alice CANCELs and gets 200 for
    the CANCEL and 487 for the INVITE at once. Returns the INVITE as bob received it."""
    register_contact(node, "bob", accounts["bob"], f"<sip:bob@127.0.0.1:{callee.port}>")
    dialog = Dialog(client, f"sip:bob@{DOMAIN}")
    trying = dialog.invite_with_credentials(node.address, accounts["alice"])
    assert trying.status == 100
    invite = callee.recv(3.0)
    assert invite is not None and invite.method == b"INVITE"
    assert dialog.invite is not None
    client.send(cancel_for(dialog.invite, dialog.cseq), node.address)
    assert collect_cancel_answers(dialog, node.address, 3.0) == {b"CANCEL": 200, b"INVITE": 487}
    return invite


def _answer(invite: SipMessage, status: int, reason: bytes, to_tag: bytes) -> SipMessage:
    """The callee's response to ``invite``, built by hand (Via, Record-Route, From, To, Call-ID, CSeq)."""
    response = SipMessage(status=status, reason=reason)
    for key in ("via", "record-route"):
        for value in invite.get_all(key):
            response.append(key, value)
    response.append("from", invite.get("from") or b"")
    response.append("to", (invite.get("to") or b"") + b";tag=" + to_tag)
    for key in ("call-id", "cseq"):
        response.append(key, invite.get(key) or b"")
    response.set_body(b"", None)
    return response


def _wait_for(sock: SipClient, wanted, timeout: float = 3.0) -> SipMessage | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = sock.recv(1.0)
        if got is not None and wanted(got):
            return got
    return None


def test_cancel_before_the_callee_sent_a_provisional(redis_url, accounts, start_node, client):
    """A callee that has not answered yet (no 1xx): the caller still gets its 487 at once, and
    the callee gets the CANCEL as soon as it sends a provisional (RFC 3261 9.1)."""
    node = start_node(redis_url)
    callee = SipClient()
    try:
        invite = _cancelled_before_any_provisional(node, accounts, client, callee)
        callee.send(_answer(invite, 180, b"Ringing", b"late"), node.address)
        got = _wait_for(callee, lambda m: m.method == b"CANCEL")
        assert got is not None and got.method == b"CANCEL"
    finally:
        callee.close()


def test_a_2xx_after_the_callers_487_is_still_forwarded(redis_url, accounts, start_node, client):
    """The callee answers 200 although the caller already got 487 for its CANCEL (the callee
    never saw the CANCEL: no provisional came): the 200 still reaches the caller (RFC 3261
    16.7 step 5, RFC 6026 7.2), so it can ACK and BYE the call."""
    node = start_node(redis_url)
    callee = SipClient()
    try:
        invite = _cancelled_before_any_provisional(node, accounts, client, callee)
        ok = _answer(invite, 200, b"OK", b"answered-anyway")
        ok.append("contact", f"<sip:bob@127.0.0.1:{callee.port}>".encode())
        callee.send(ok, node.address)
        got = _wait_for(client, lambda m: m.status == 200 and m.cseq[1] == b"INVITE")
        assert got is not None and got.status == 200 and got.cseq[1] == b"INVITE"
        assert got.to_tag == b"answered-anyway"
    finally:
        callee.close()


def test_parallel_forking_first_answer_wins_other_branch_cancelled(redis_url, accounts, start_node, client, uas):
    node = start_node(redis_url)
    answering = uas(UAS_ANSWER)
    ringing = uas(UAS_RING_CANCEL)
    registrar = SipClient()
    try:
        call_id = secrets.token_hex(6)
        # one REGISTER with both contacts, both q=1.0: one group, forked in parallel
        contacts = f"<sip:bob@{answering.contact}>, <sip:bob@{ringing.contact}>"
        reply = registrar.register(node.address, "bob", accounts["bob"], contact=contacts, call_id=call_id)
        assert reply is not None and reply.status == 200 and len(reply.values("contact")) == 2
    finally:
        registrar.close()
    dialog = Dialog(client, f"sip:bob@{DOMAIN}")
    dialog.invite_with_credentials(node.address, accounts["alice"])
    final = dialog.wait_final()
    assert final.status == 200
    assert (final.get("contact") or b"").find(answering.contact.encode()) > 0
    ack, routes = dialog.in_dialog("ACK")
    assert routes and route_dest(routes[0]) == node.address  # the node Record-Routed
    client.send(ack, node.address)
    assert wait_for(lambda: successful_calls(ringing) == 1), ringing.stats()
    bye, _ = dialog.in_dialog("BYE")
    client.send(bye, node.address)
    bye_ok = dialog.recv_final(method="BYE")  # not the 200 to the INVITE, retransmitted until the ACK
    assert bye_ok is not None and bye_ok.status == 200 and bye_ok.cseq[1] == b"BYE"


def test_serial_forking_by_q_value(redis_url, accounts, start_node, client, uas):
    node = start_node(redis_url)
    busy = uas(UAS_BUSY)
    answering = uas(UAS_ANSWER)
    register_contact(node, "bob", accounts["bob"], f"<sip:bob@{busy.contact}>;q=1.0")
    register_contact(node, "bob", accounts["bob"], f"<sip:bob@{answering.contact}>;q=0.5")
    dialog = Dialog(client, f"sip:bob@{DOMAIN}")
    dialog.invite_with_credentials(node.address, accounts["alice"])
    final = dialog.wait_final()
    assert final.status == 200, final
    assert answering.contact.encode() in (final.get("contact") or b"")
    assert wait_for(lambda: successful_calls(busy) == 1), busy.stats()  # its 486 was tried first, and ACKed
    ack, _ = dialog.in_dialog("ACK")
    client.send(ack, node.address)
    bye, _ = dialog.in_dialog("BYE")
    client.send(bye, node.address)
    bye_ok = dialog.recv_final(method="BYE")  # not the 200 to the INVITE, retransmitted until the ACK
    assert bye_ok is not None and bye_ok.status == 200


# -- in-dialog routing through a node that never saw the INVITE --------------------------------


@pytest.mark.parametrize("route_via", ["node1", "node2"])
def test_in_dialog_bye_routed_by_route_set_through_another_node(redis_url, accounts, start_node, client,
                                                                route_via):
    """The BYE carries node1's sealed Record-Route; sent to node2 (which never saw the call, as
    after node1 died and the balancer picked another node) node2 takes that entry as the farm's
    own and forwards the BYE itself: nodes keep no dialog state."""
    node1 = start_node(redis_url, "node1")
    node2 = start_node(redis_url, "node2")
    callee = SipClient()
    try:
        register_contact(node1, "bob", accounts["bob"], f"<sip:bob@127.0.0.1:{callee.port}>")
        dialog = Dialog(client, f"sip:bob@{DOMAIN}")
        dialog.invite_with_credentials(node1.address, accounts["alice"])
        invite = callee.recv(3.0)
        assert invite is not None and invite.method == b"INVITE"
        record_route = invite.values("record-route")
        assert record_route and route_dest(record_route[0]) == node1.address
        callee_contact = f"<sip:bob@127.0.0.1:{callee.port}>"
        ok = SipMessage(status=200, reason=b"OK")
        for key in ("via", "record-route"):
            for value in invite.get_all(key):
                ok.append(key, value)
        ok.append("from", invite.get("from") or b"")
        ok.append("to", (invite.get("to") or b"") + b";tag=bobtag")
        ok.append("call-id", invite.call_id)
        ok.append("cseq", f"{invite.cseq[0]} INVITE")
        ok.append("contact", callee_contact)
        ok.set_body(b"", None)
        callee.send(ok, node1.address)
        final = dialog.wait_final()
        assert final.status == 200
        ack, _ = dialog.in_dialog("ACK")
        client.send(ack, node1.address)
        got_ack = callee.recv_request("ACK", 3.0)  # an INVITE the node retransmitted before our 200 is skipped
        assert got_ack is not None and got_ack.method == b"ACK"

        bye, _ = dialog.in_dialog("BYE")
        if route_via == "node2":
            # a Route the caller wrote itself, not the farm's sealed Record-Route: no dialog of
            # the farm, so no relay (issue 8)
            bye.remove("route")
            host, port = node2.address
            bye.append("route", f"<sip:{host}:{port};lr>")
            client.send(bye, node2.address)
            refused = dialog.recv_final(3.0, method="BYE")
            assert refused is not None and refused.status == 404
            assert callee.recv(0.5) is None
            return
        # node1's sealed Record-Route, sent to node2, which never saw this call (as after node1
        # died and the balancer picked another node): node2 takes it as the farm's own
        client.send(bye, node2.address)
        got_bye = callee.recv_request("BYE", 3.0)
        assert got_bye is not None and got_bye.method == b"BYE"
        assert got_bye.values("route") == []  # every Route naming a node was consumed
        assert len(got_bye.values("via")) == 2  # caller + node2: no detour through node1
        reply = SipMessage(status=200, reason=b"OK")
        for value in got_bye.get_all("via"):
            reply.append("via", value)
        for key in ("from", "to", "call-id", "cseq"):
            reply.append(key, got_bye.get(key) or b"")
        reply.set_body(b"", None)
        first_hop = got_bye.top_via
        callee.send(reply, (first_hop.host, first_hop.port or 5060))
        bye_ok = dialog.recv_final(method="BYE")
        assert bye_ok is not None and bye_ok.status == 200 and bye_ok.cseq[1] == b"BYE"
    finally:
        callee.close()


# -- robustness --------------------------------------------------------------------------------


def test_final_response_echoing_only_the_node_via_still_reaches_the_caller(redis_url, accounts, start_node,
                                                                           client):
    """A callee that answers with the proxy's Via alone (as if answering a CANCEL's Via set)."""
    node = start_node(redis_url)
    callee = SipClient()
    try:
        register_contact(node, "bob", accounts["bob"], f"<sip:bob@127.0.0.1:{callee.port}>")
        dialog = Dialog(client, f"sip:bob@{DOMAIN}")
        dialog.invite_with_credentials(node.address, accounts["alice"])
        invite = callee.recv(3.0)
        assert invite is not None and invite.method == b"INVITE"
        busy = SipMessage(status=486, reason=b"Busy Here")
        busy.append("via", invite.values("via")[0])
        for key in ("from", "to", "call-id", "cseq"):
            busy.append(key, invite.get(key) or b"")
        busy.set_body(b"", None)
        callee.send(busy, node.address)
        final = dialog.wait_final()
        assert final.status == 486
        assert dialog.invite is not None
        assert [v.split(b";")[1] for v in final.values("via")] == [dialog.invite.top_via_value.split(b";")[1]]
    finally:
        callee.close()


def test_flood_of_malformed_datagrams_does_not_stop_the_node(redis_url, accounts, start_node, client):
    metrics_port = free_udp_tcp_port()
    node = start_node(redis_url, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    requests_before = metric(metrics_port, "sipfarm_node_requests_total")
    garbage = [
        b"\x00\xff\xfe garbage",
        b"INVITE sip:bob@farm.test SIP/2.0\r\nVia: nonsense\r\n\r\n",
        b"SIP/2.0 200 OK\r\nCSeq: x\r\n\r\n",
        b"REGISTER sip:farm.test SIP/2.0\r\nContent-Length: 99999\r\n\r\nshort",
        b"OPTIONS  SIP/2.0\r\n\r\n",
        b"\r\n\r\n\r\n",
        bytes(range(256)),
        b"BYE sip:x SIP/3.0\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKx\r\n\r\n",
    ]
    for i in range(2000):
        client.send(garbage[i % len(garbage)] + str(i).encode(), node.address)
        if i % 200 == 199:
            time.sleep(0.01)  # bounded burst, not a socket-buffer overflow test
    time.sleep(0.2)
    while client.recv(0.05) is not None:
        pass  # 400s for the parseable ones
    assert node.process.poll() is None
    reply = client.register(node.address, "alice", accounts["alice"])
    assert reply is not None and reply.status == 200

    def moved() -> bool:
        events = metric(metrics_port, "sipfarm_node_transport_events_total", 'kind="parse_errors')
        return events >= 1000 and metric(metrics_port, "sipfarm_node_requests_total") > requests_before

    assert wait_for(moved, timeout=5)
