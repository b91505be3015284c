"""The balancer's request fast path (``BalancerCore.forward_request`` with
``request_scan``/``request_out`` in sipfarm/sip/_fastparse.c) against the general path.

Two balancers with the same secrets and clock, one with ``TransportManager.fast_request`` set
as ``sipfarm balancer`` sets it and one without, take the same requests: a client's in-dialog
ACK/BYE routed by our Record-Route entry then the node's sealed one (to the node), a node's
ACK/BYE routed by the entry with the client's flow token (to the client), and a node's
initial INVITE (SUBSCRIBE, MESSAGE...) routed by our Path entries to the client its token
names, Record-Routed by us (UDP flows whose Request-URI names the flow's IP or not, TCP, TLS
and WS flows, with and without the node's Record-Route, SDP bodies, one or two listeners), canonical
and mutated (whitespace, names, repeated or missing headers, compact forms, bare CR/LF,
folding, Route shapes, forged or foreign tokens, Max-Forwards 0 or huge, a node down, sends
that fail, a scanner's User-Agent, random bytes, truncation).  Whatever the fast path takes, it
must send the same bytes to the same hop (or answer the same error), count the same, and leave
the front door and the admission control in the same state as the general path; whatever it
declines goes the general way.  The canonical shapes must really be the C's, or a fast path
that always declined would pass.

The C reader exists only in the compiled build (scripts/test-compiled.sh).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from wire_mutations import ATTACKER, BARE, CLIENT, LB, NODE, PROPERTY, SECRET, mutate, replace_header

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.frontdoor import FrontDoor, FrontDoorPolicy
from sipfarm.balancer.nodes import NodeSet
from sipfarm.balancer.overload import AdmissionControl
from sipfarm.cluster.membership import Member, Role
from sipfarm.edge import ChallengeTags, FlowTokens
from sipfarm.sip.address import Address
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.destinations import DestinationPolicy
from sipfarm.transport.manager import TransportManager

fastparse = pytest.importorskip("sipfarm.sip._fastparse")

UAS = Address("udp", "127.0.0.3", 5064)
MAX = 65535


class Balancer:
    def __init__(self, fast: bool, public: dict[str, Address] | None = None) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.fail = False  # every send fails (the node unreachable, the client's flow gone)
        nodes = NodeSet()
        nodes.update_members([Member("node1", Role.NODE, (str(NODE),))])
        self.front = FrontDoor(FrontDoorPolicy(domains=("example.com",)))
        self.core = BalancerCore(
            nodes,
            FlowTokens(SECRET),
            public=public if public is not None else {"udp": LB},
            internal=LB,
            send=self._send,
            send_response=self._send_response,
            destinations=DestinationPolicy(allow=["127.0.0.0/8"], own=[LB]),
            hop_secret=SECRET,
            admission=AdmissionControl(),
            front=self.front,
            stamp_via=True,
        )
        self.core._clock = lambda: 100.0
        self.core._to_tag = b"5ca1ab1e"  # random per balancer: the same in both (error answers)
        self.core._node_to_tag = b"0dd5ca1e"
        # as `sipfarm balancer`: the core stamps clients' requests, the transport does not
        self.transports = TransportManager(self.core.on_message, config=TransportConfig(stamp_via=False))
        if fast:
            self.transports.fast_request = self.core.request_fast_path()
            assert self.transports.fast_request is not None

    def _send(self, data: bytes, dest: Address, local: Address) -> bool:
        self.sent.append((data, dest))
        return not self.fail

    def _send_response(self, data: bytes, dest: Address) -> bool:
        self.sent.append((data, dest))
        return not self.fail

    def deliver(self, data: bytes, source: Address) -> None:
        try:
            self.transports.deliver(data, source, LB)
        except RuntimeError as exc:
            # a callback error is logged with the loop's time, and there is no loop here (the
            # general path lets a HeaderError of a Via it reads for the branch out): counted
            # in callback_errors all the same, and recorded for the comparison
            self.sent.append((str(exc).encode(), source))

    def state(self) -> tuple[object, ...]:
        admission = self.core.admission
        assert admission is not None
        t = self.transports.stats
        return (
            self.sent,
            self.core.stats.flat(),
            self.core.stats.errors,
            admission.stats.answered,
            sorted(admission._pending),
            dict(t.received),
            dict(t.parse_errors),
            dict(t.rejected),
            t.callback_errors,
            self.front.stats,
            sorted(self.front._bans),
        )


def pair() -> tuple[Balancer, Balancer]:
    return Balancer(fast=False), Balancer(fast=True)


def entry(core: BalancerCore, flow: Address) -> bytes:
    """Our Record-Route entry for ``flow`` (one: the balancer's public and internal are one)."""
    (value,) = core._own_entries(flow, "udp", path=False)
    return value


NODE_ENTRY = b"<sip:127.0.0.1:5070;lr;sf=6cc544c17029e07f36e1>"


def routes_not_quite_ours(core: BalancerCore) -> tuple[bytes, list[list[bytes]]]:
    """Our entry for the UAS's flow, and Route sets the general path treats otherwise: a forged
    token, another farm's token, ours without a token, not ours, ours then another element's."""
    token = entry(core, UAS)
    forged = token.replace(b"<sip:", b"<sip:0", 1).replace(b"0", b"1", 2)
    foreign = FlowTokens(b"another-farm-secret-0123456789ab").encode(ATTACKER, "127.0.0.1", 5060).encode()
    return token, [
        [forged],
        [b"<sip:%s@127.0.0.1:5060;lr>" % foreign],
        [b"<sip:127.0.0.1:5060;lr>"],  # ours, no token: a node's request to its Request-URI
        [b"<sip:10.9.9.9:5060;lr>"],  # not ours
        [token, b"<sip:127.0.0.66:5099;lr>"],  # ours, then another element's: kept
    ]


def from_client(core: BalancerCore, method: bytes = b"BYE", *, routes: list[bytes] | None = None,
                body: bytes = b"", agent: bytes | None = None) -> bytes:  # fmt: skip
    """The client's in-dialog request: its route set is our entry, the node's, our entry."""
    if routes is None:
        routes = [entry(core, CLIENT), NODE_ENTRY, entry(core, UAS)]
    return b"\r\n".join(
        [
            method + b" sip:bob@127.0.0.3:5064;transport=UDP SIP/2.0",
            b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-9;rport",
            *([b"Route: " + b", ".join(routes)] if routes else []),
            b"Max-Forwards: 70",
            b"From: <sip:alice@example.com>;tag=a1",
            b"To: <sip:bob@example.com>;tag=b2",
            b"Call-ID: dialog-1@127.0.0.2",
            b"CSeq: 3 " + method,
            *([b"User-Agent: " + agent] if agent is not None else []),
            b"Content-Length: %d" % len(body),
            b"",
            body,
        ]
    )


def from_node(core: BalancerCore, method: bytes = b"BYE", *, routes: list[bytes] | None = None) -> bytes:
    """The node's request to the UAS: routed by our entry with the UAS flow's token."""
    if routes is None:
        routes = [entry(core, UAS)]
    return b"\r\n".join(
        [
            method + b" sip:bob@127.0.0.3:5064;transport=UDP SIP/2.0",
            b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK766754832df4.312e29e2633f",
            b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKlb-1237f9b361a0dd2c5f0700047f000001573a",
            b"Via: SIP/2.0/UDP 127.0.0.2:5062;received=127.0.0.2;branch=z9hG4bK-client-9;rport=5062",
            *([b"Route: " + b", ".join(routes)] if routes else []),
            b"Max-Forwards: 68",
            b"From: <sip:alice@example.com>;tag=a1",
            b"To: <sip:bob@example.com>;tag=b2",
            b"Call-ID: dialog-1@127.0.0.2",
            b"CSeq: 3 " + method,
            b"Content-Length: 0",
            b"",
            b"",
        ]
    )


def both(data: bytes, source: Address, slow: Balancer, fast: Balancer) -> None:
    slow.deliver(data, source)
    fast.deliver(data, source)
    assert fast.state() == slow.state(), data


def taken(data: bytes) -> bool:
    """Whether the C reads ``data`` as the common shape (the decisions are the caller's)."""
    return fastparse.request_scan(data, MAX) is not None


def forwarded_fast(data: bytes, source: Address, public: dict[str, Address] | None = None) -> bool:
    """Whether a fresh balancer's fast path takes ``data`` from ``source`` (C and decisions)."""
    return Balancer(fast=True, public=public).core.forward_request(data, source, LB, MAX)


def test_canonical_requests_take_the_fast_path() -> None:
    slow, fast = pair()
    for method in (b"ACK", b"BYE", b"INFO", b"INVITE", b"UPDATE"):
        data = from_client(fast.core, method)
        assert taken(data)
        both(data, CLIENT, slow, fast)
        assert fast.sent[-1][1] == NODE
        data = from_node(fast.core, method)
        assert taken(data)
        both(data, NODE, slow, fast)
        assert fast.sent[-1][1] == UAS
    assert fast.core.stats.to_node == 5 and fast.core.stats.to_client == 5
    # the fast path really took them: the general path parses, the fast one did not
    fast.transports.on_message = None  # type: ignore[assignment]
    fast.deliver(from_client(fast.core), CLIENT)
    fast.deliver(from_node(fast.core), NODE)
    assert fast.core.stats.to_node == 6 and fast.core.stats.to_client == 6
    assert fast.transports.stats.callback_errors == 0
    out = fast.sent[-2][0]
    assert out.startswith(
        b"BYE sip:bob@127.0.0.3:5064;transport=UDP SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch="
    )
    assert b"\r\nRoute: " + NODE_ENTRY + b", " in out and b"\r\nMax-Forwards: 69\r\n" in out
    assert b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-9;rport=5062;received=127.0.0.2\r\n" in out


def test_a_nodes_address_off_the_internal_socket_is_a_clients_on_both_paths() -> None:
    """With a socket facing the nodes of its own (``--internal``), a node's in-dialog request
    arriving on the public socket is a client's on the fast path as on the general one: never
    sent to the client its token names (without the screen that drops it first)."""
    slow, fast = pair()
    for b in (slow, fast):
        b.core.nodes.facing = Address("udp", "127.0.0.1", 5999)  # not LB, where deliver puts it
    for method in (b"BYE", b"INVITE", b"ACK"):
        both(from_node(fast.core, method), NODE, slow, fast)
    assert all(dest != UAS for _, dest in fast.sent)
    assert fast.core.stats.to_client == 0


def test_ack_of_a_non_2xx_takes_the_fast_path_to_its_invite_node() -> None:
    slow, fast = pair()
    invite = from_client(fast.core, b"INVITE", routes=[]).replace(b";tag=b2", b"", 1)
    both(invite, CLIENT, slow, fast)  # the general path: pinned to its node
    ack = from_client(fast.core, b"ACK", routes=[])
    assert taken(ack) and forwarded_fast(ack, CLIENT)
    both(ack, CLIENT, slow, fast)
    assert fast.sent[-1][1] == NODE and b"\r\nMax-Forwards: 69\r\n" in fast.sent[-1][0]
    # from a node, with static-cluster groups, with no node: the general path
    assert not forwarded_fast(ack, NODE)
    for b in (slow, fast):
        b.core.nodes.mark_down(b.core.nodes.nodes["node1"])
    both(ack, CLIENT, slow, fast)
    assert fast.core.stats.no_node == 1
    for method in (b"BYE", b"CANCEL", b"INFO"):  # only the ACK: the rest is new work or hashed
        assert not forwarded_fast(from_client(fast.core, method, routes=[]), CLIENT)


def test_the_ack_of_a_stateless_challenge_ends_on_both_paths() -> None:
    """The ACK of a node's stateless 407 (its To tag a challenge tag for this Call-ID and
    CSeq number) ends at the balancer on both paths, with or without our Route entries, after
    the same side effects; a scanner's is dropped by the front door on both."""
    slow, fast = pair()
    tag = ChallengeTags(SECRET).tag(CLIENT, b"dialog-1@127.0.0.2", 3)
    for routes in ([], [entry(fast.core, CLIENT)]):
        ack = from_client(fast.core, b"ACK", routes=routes).replace(b";tag=b2", b";tag=" + tag, 1)
        assert taken(ack) and forwarded_fast(ack, CLIENT)
        both(ack, CLIENT, slow, fast)
    assert fast.core.stats.acks_ended == 2 and not fast.sent
    scanner = from_client(fast.core, b"ACK", routes=[], agent=b"friendly-scanner")
    both(scanner.replace(b";tag=b2", b";tag=" + tag, 1), CLIENT, slow, fast)
    assert fast.core.stats.acks_ended == 2
    # the same tag on another request's ACK (CSeq 4) is forwarded as before
    other = from_client(fast.core, b"ACK", routes=[]).replace(b";tag=b2", b";tag=" + tag, 1)
    both(other.replace(b"CSeq: 3 ACK", b"CSeq: 4 ACK"), CLIENT, slow, fast)
    assert fast.sent[-1][1] == NODE


def test_body_and_user_agent() -> None:
    slow, fast = pair()
    data = from_client(fast.core, b"INFO", body=b"Signal=1\r\nDuration=100\r\n", agent=b"PolyCom 1.0")
    assert taken(data)
    both(data, CLIENT, slow, fast)
    assert len(fast.sent) == 1


def test_scanner_is_dropped_by_both_and_banned_by_neither_over_udp() -> None:
    """Over UDP the source address proves nothing: a scanner's request is dropped, its
    address not banned (a forger would ban its victim); both paths alike."""
    slow, fast = pair()
    data = from_client(fast.core, agent=b"friendly-scanner")
    assert taken(data)
    both(data, ATTACKER, slow, fast)
    assert fast.sent == [] and fast.front.stats.get("scanner") == 1 and not fast.front._bans
    assert fast.front.stats.get("not_banned_udp") == 1


@pytest.mark.parametrize("method", [b"ACK", b"BYE"])
def test_failed_sends_answer_the_same(method: bytes) -> None:
    slow, fast = pair()
    slow.fail = fast.fail = True
    both(from_client(fast.core, method), CLIENT, slow, fast)
    both(from_node(fast.core, method), NODE, slow, fast)
    if method == b"BYE":
        assert fast.core.stats.errors == {"service_unavailable": 1, "flow_failed": 1} or fast.core.stats.errors
        assert any(d.startswith(b"SIP/2.0 430") for d, _ in fast.sent)
        assert any(d.startswith(b"SIP/2.0 503") for d, _ in fast.sent)
    else:
        assert fast.core.stats.drops == {"ack_unsent": 2}


def test_node_down_or_gone_is_rehashed_by_the_general_path() -> None:
    slow, fast = pair()
    for b in (slow, fast):
        b.core.nodes.mark_down(b.core.nodes.nodes["node1"])
    both(from_client(fast.core), CLIENT, slow, fast)
    assert fast.core.stats.rehashed == 1
    other = b"<sip:127.0.0.1:5999;lr;sf=6cc544c17029e07f36e1>"
    both(from_client(fast.core, routes=[entry(fast.core, CLIENT), other]), CLIENT, slow, fast)


def test_forged_and_foreign_routes_behave_as_today() -> None:
    slow, fast = pair()
    token, cases = routes_not_quite_ours(fast.core)
    cases.append([b"<sip:127.0.0.66:5099;lr>", token])
    for routes in cases:
        both(from_node(fast.core, routes=routes), NODE, slow, fast)
        both(from_node(fast.core, routes=routes), ATTACKER, slow, fast)
        both(from_client(fast.core, routes=routes), CLIENT, slow, fast)
    # whatever went out went to the node, the Request-URI's UAS or the token's own flow
    assert {dest for _, dest in fast.sent} <= {NODE, UAS, ATTACKER, CLIENT}


def _line(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    return lambda data: data.replace(old, new, 1)


# each must be declined by the C (the general path's bytes or verdict would differ otherwise)
DECLINED: dict[str, Callable[[bytes], bytes]] = {
    "no_to_tag": _line(b";tag=b2", b""),
    "no_route": lambda data: b"\r\n".join(x for x in data.split(b"\r\n") if not x.startswith(b"Route:")),
    "register": lambda data: data.replace(b"BYE", b"REGISTER"),
    "options": lambda data: data.replace(b"BYE", b"OPTIONS"),
    "cseq_method_differs": _line(b"CSeq: 3 BYE", b"CSeq: 3 ACK"),
    "cseq_big": _line(b"CSeq: 3 BYE", b"CSeq: 2147483648 BYE"),
    "no_max_forwards": _line(b"Max-Forwards: 70\r\n", b""),
    "max_forwards_twice": _line(b"Max-Forwards: 70", b"Max-Forwards: 70\r\nMax-Forwards: 70"),
    "max_forwards_huge": _line(b"Max-Forwards: 70", b"Max-Forwards: 4294967296"),
    "max_forwards_sign": _line(b"Max-Forwards: 70", b"Max-Forwards: +70"),
    "to_twice": _line(b"To:", b"To: <sip:bob@example.com>;tag=b2\r\nTo:"),
    "call_id_space": _line(b"Call-ID: dialog-1", b"Call-ID: dialog 1"),
    "compact_to": _line(b"To:", b"t:"),
    "compact_via": _line(b"Via:", b"v:"),
    "path": _line(b"Max-Forwards:", b"Path: <sip:10.0.0.1;lr>\r\nMax-Forwards:"),
    "expires": _line(b"Max-Forwards:", b"Expires: 10\r\nMax-Forwards:"),
    "via_two_parms": _line(b";rport\r\n", b";rport, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-x\r\n"),
    "route_display_name": _line(b"Route: <", b'Route: "lb" <'),
    "route_params_after": _line(b";lr>, ", b";lr>;x=1, "),
    "route_space_inside": _line(b";lr>, ", b"; lr>, "),
    "route_bare_uri": _line(b"Route: <", b"Route: sip:x@y, <"),
    "route_double_comma": _line(b";lr>, ", b";lr>,, "),
    "route_trailing_comma": lambda data: data.replace(b"\r\nMax-Forwards", b",\r\nMax-Forwards", 1),
    "bare_lf": _line(b"From: <sip:alice", b"From: <sip:\nalice"),
    "bare_cr": _line(b"From: <sip:alice", b"From: <sip:\ralice"),
    # RFC 3261 25.1: a control character but HTAB only escaped in a quoted string or comment
    # (the parser judges those; a raw one gets a 400 on both paths)
    "header_nul": _line(b"From: <sip:alice", b"From: <sip:\x00alice"),
    "header_escape": _line(b"CSeq:", b"User-Agent: x\x1b[2J\r\nCSeq:"),
    "header_del": _line(b"CSeq:", b"Subject: \x7f\r\nCSeq:"),
    "header_escaped_bel": _line(b"CSeq:", b'Subject: "\\\x07"\r\nCSeq:'),
    "request_line_nul": _line(b";transport=UDP SIP", b";transport=\x00UDP SIP"),
    "fold": _line(b"From: <sip:alice", b"From:\r\n <sip:alice"),
    "leading_crlf": lambda data: b"\r\n" + data,
    "no_space_after_colon": _line(b"From: ", b"From:"),
    "space_before_colon": _line(b"From: ", b"From : "),
    "lower_case_version": _line(b"SIP/2.0\r\n", b"sip/2.0\r\n"),
    "tel_uri": _line(b"sip:bob@127.0.0.3:5064;transport=UDP SIP", b"tel:+1234 SIP"),
    "clen_long": _line(b"Content-Length: 0", b"Content-Length: 1"),
    "clen_twice": _line(b"Content-Length: 0", b"Content-Length: 0\r\nContent-Length: 0"),
    "no_end_of_headers": lambda data: data.split(b"\r\n\r\n")[0] + b"\r\n",
    "too_many_lines": _line(b"CSeq:", b"X-A: 1\r\n" * 256 + b"CSeq:"),
    "too_many_routes": _line(b"Route: ", b"Route: " + b"<sip:10.0.0.1;lr>, " * 16),
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_uncommon_shapes_take_the_general_path(case: str) -> None:
    slow, fast = pair()
    canonical = from_client(fast.core)
    assert taken(canonical)
    data = DECLINED[case](canonical)
    assert data != canonical
    assert not forwarded_fast(data, CLIENT)
    both(data, CLIENT, slow, fast)


@pytest.mark.parametrize(
    "case",
    [
        _line(b"Content-Length: ", b"Content-Length:    "),
        _line(b"From: <sip:alice@example.com>;tag=a1", b"From:  <sip:alice@example.com>;tag=a1 \t"),
        _line(b"Call-ID:", b"CALL-ID:"),
        _line(b"Route: ", b"route: "),
        _line(b"CSeq:", b"Subject: \r\nCSeq:"),
        _line(b", <sip:127", b",<sip:127"),
        _line(b", <sip:127", b"\r\nRoute: <sip:127"),
        _line(b"Content-Length: 0\r\n", b""),
        _line(b"Max-Forwards:", b"Record-Route: <sip:10.0.0.1;lr>\r\nMax-Forwards:"),  # passed on as it is
    ],
)
def test_common_variants_take_the_fast_path(case: Callable[[bytes], bytes]) -> None:
    slow, fast = pair()
    data = case(from_client(fast.core))
    assert forwarded_fast(data, CLIENT)
    both(data, CLIENT, slow, fast)
    assert len(fast.sent) == 1


def test_over_max_size_takes_the_general_path() -> None:
    _slow, fast = pair()
    data = from_client(fast.core)
    assert fastparse.request_scan(data, len(data) - 1) is None
    assert fastparse.request_scan(data, len(data)) is not None


def _split_route(lines: list[bytes], i: int, pick: int) -> None:
    lines[i] = lines[i].replace(b", ", [b"\r\nRoute: ", b",", b" ,", b",\t"][pick % 4], 1)


def _max_forwards(lines: list[bytes], _i: int, pick: int) -> None:
    replace_header(lines, b"max-forwards", [b"Max-Forwards: 0", b"Max-Forwards: 1", b"Max-Forwards: 255",
                   b"Max-Forwards: 007", b"Max-Forwards: 4294967295", b"Max-Forwards: 99999999999"], pick)  # fmt: skip


def _mutate(data: bytes, op: str, at: int, pick: int) -> bytes:
    return mutate(data, op, at, pick, bare=(*BARE, b">"), line_ops={"split_route": _split_route, "mf": _max_forwards})


OPS = st.sampled_from(
    ["pad", "trail", "name", "dup", "drop", "split_route", "fold", "bare", "byte", "truncate", "mf", "leading"]
)
BENIGN = st.sampled_from(["pad", "trail", "name", "split_route", "mf"])  # mostly still the fast path's
TOP_VIAS = st.sampled_from(
    [
        None,
        b"SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-9",
        b"SIP/2.0/UDP 127.0.0.2:5062;rport;branch=z9hG4bK-client-9;received=127.0.0.2",
        b"SIP/2.0/UDP 10.1.1.1:5062;branch=z9hG4bK-client-9",
        b"SIP/2.0/UDP 127.0.0.2:5062",
        b"SIP/2.0/UDP 127.0.0.2:5062;BRANCH=z9hG4bK-x",
        b"SIP/2.0/UDP 127.0.0.2:5062 ; branch = z9hG4bK-x",
        b"SIP/2.0/UDP [::1]:5062;branch=z9hG4bK-x",
        b"SIP/2.0/TCP phone.example.com;branch=z9hG4bK-x;rport",
    ]
)
ROUTE_SETS = st.sampled_from(
    ["canonical", "ours_only", "node_only", "twice_ours", "token_of_attacker", "upper", "none", "past_node"]
)


def _routes(core: BalancerCore, kind: str) -> list[bytes] | None:
    if kind == "canonical":
        return None
    if kind == "ours_only":
        return [entry(core, CLIENT)]
    if kind == "node_only":
        return [NODE_ENTRY]
    if kind == "none":
        return []  # the ACK of a non-2xx: no route set
    if kind == "twice_ours":
        return [entry(core, CLIENT), entry(core, UAS), NODE_ENTRY]
    if kind == "token_of_attacker":
        return [entry(core, ATTACKER), NODE_ENTRY]
    if kind == "past_node":
        return [entry(core, CLIENT), SEALED_NODE_ENTRY, entry(core, UAS)]
    return [entry(core, CLIENT).upper(), NODE_ENTRY]


@PROPERTY
@given(
    method=st.sampled_from([b"ACK", b"BYE", b"INVITE", b"INFO", b"CANCEL", b"bye"]),
    sender=st.sampled_from(["client", "node"]),
    routes=ROUTE_SETS,
    top_via=TOP_VIAS,
    agent=st.sampled_from([None, b"SIPp", b"friendly-scanner", b"sipvicious 1"]),
    mutations=st.one_of(
        st.just([]),
        st.lists(st.tuples(BENIGN, st.integers(0, 50), st.integers(0, 10_000)), max_size=3),
        st.lists(st.tuples(OPS, st.integers(0, 50), st.integers(0, 10_000)), max_size=3),
    ),
    source=st.sampled_from([NODE, ATTACKER, CLIENT]),
    fail=st.booleans(),
    node_down=st.booleans(),
)
def test_fast_path_matches_general_path(
    method: bytes,
    sender: str,
    routes: str,
    top_via: bytes | None,
    agent: bytes | None,
    mutations: list[tuple[str, int, int]],
    source: Address,
    fail: bool,
    node_down: bool,
) -> None:
    slow, fast = pair()
    for b in (slow, fast):
        b.fail = fail
        if node_down:
            b.core.nodes.mark_down(b.core.nodes.nodes["node1"])
    if sender == "client":
        data = from_client(fast.core, method, routes=_routes(fast.core, routes), agent=agent)
    else:
        node_routes = _routes(fast.core, routes)
        data = from_node(fast.core, method, routes=None if routes == "canonical" else node_routes)
    if top_via is not None:
        first = data.index(b"\r\nVia: ") + 7
        data = data[:first] + top_via + data[data.index(b"\r\n", first) :]
    for op, at, pick in mutations:
        data = _mutate(data, op, at, pick)
    event("fast" if forwarded_fast(data, source) else "general")
    both(data, source, slow, fast)
    # a retransmission: the caches' answers, the same again
    both(data, source, slow, fast)


def test_the_fast_path_is_offered() -> None:
    assert Balancer(fast=True).core.request_fast_path() is not None


# -- a node's initial request to the client its flow token names (Record-Routed here) ----------

UAS_TCP = Address("tcp", "127.0.0.4", 40001)
UAS_TLS = Address("tls", "127.0.0.4", 40002)
UAS_WS = Address("ws", "127.0.0.4", 40003)
UAS_ON_NODE_HOST = Address("udp", "127.0.0.1", 5999)  # a phone on the node's host (its URI may name the node)
UAS_REMOTE = Address("udp", "10.0.0.5", 5062)  # off loopback
FLOWS = (UAS, UAS_TCP, UAS_TLS, UAS_WS, UAS_ON_NODE_HOST, UAS_REMOTE)
# the balancer's listeners: one UDP socket facing clients and nodes (one Record-Route entry for
# a UDP flow), or one per transport (two entries, RFC 5658, for every flow)
PUBLICS: dict[str, dict[str, Address]] = {
    "one": {"udp": LB},
    "split": {
        "udp": Address("udp", "127.0.0.1", 5080),
        "tcp": Address("tcp", "127.0.0.1", 5080),
        "tls": Address("tls", "127.0.0.1", 5081),
        "ws": Address("ws", "127.0.0.1", 5082),
    },
}
NODE_RR = b"<sip:127.0.0.1:5070;lr;sf=6cc544c17029e07f36e1>"
SDP = (
    b"v=0\r\no=- 53655765 2353687637 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n"
    b"m=audio 22752 RTP/AVP 8 0\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n"
)


def path_routes(core: BalancerCore, flow: Address) -> list[bytes]:
    """The route set a node gives a request for a registered client: our Path entries."""
    return list(core._own_entries(flow, "udp", path=True))


def contact_uri(flow: Address, port: int | None = None) -> bytes:
    """The client's registered Contact on ``flow``'s host (its port unless ``port``)."""
    transport = b"" if flow.transport == "udp" else b";transport=" + flow.transport.encode()
    return b"sip:bob@%s:%d%s" % (flow.host.encode(), flow.port if port is None else port, transport)


def initial(core: BalancerCore, flow: Address = UAS, *, method: bytes = b"INVITE", uri: bytes | None = None,
            routes: list[bytes] | None = None, record_route: tuple[bytes, ...] = (NODE_RR,),
            rr_after_via: bool = False, body: bytes = SDP) -> bytes:  # fmt: skip
    """The node's initial request to the client on ``flow``, as a node sends it: routed by our
    Path entries (the flow's token), its own Record-Route, the client's Via below the node's."""
    if routes is None:
        routes = path_routes(core, flow)
    rr = [b"Record-Route: " + value for value in record_route]
    vias = [
        b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK4b3c63c9e52a.69b13b021f37",
        b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKlb-c63b96ba07deef71901e00047f000001573a",
        b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-4883-1-8",
    ]
    return b"\r\n".join(
        [
            method + b" " + (uri if uri is not None else contact_uri(flow)) + b" SIP/2.0",
            *([b"Route: " + b", ".join(routes)] if routes else []),
            b"P-Asserted-Identity: <sip:alice@example.com>",
            *(vias + rr if rr_after_via else rr + vias),
            b"Max-Forwards: 68",
            b"From: <sip:alice@example.com>;tag=4883SIPpTag001",
            b"To: <sip:bob@example.com>",
            b"Call-ID: 1-4883@127.0.0.2",
            b"CSeq: 2 " + method,
            b"Contact: <sip:alice@127.0.0.2:5062;transport=UDP>",
            *([b"Content-Type: application/sdp"] if body else []),
            b"Content-Length: %d" % len(body),
            b"",
            body,
        ]
    )


def pair_with(public: str) -> tuple[Balancer, Balancer]:
    return Balancer(fast=False, public=PUBLICS[public]), Balancer(fast=True, public=PUBLICS[public])


@pytest.mark.parametrize("public", sorted(PUBLICS))
@pytest.mark.parametrize("flow", [UAS, UAS_TCP, UAS_TLS, UAS_WS])
def test_initial_requests_take_the_fast_path(public: str, flow: Address) -> None:
    slow, fast = pair_with(public)
    shapes = [
        {},
        {"record_route": ()},
        {"record_route": (NODE_RR, b"<sip:10.9.9.9;lr>")},
        {"rr_after_via": True},
        {"body": b""},
        {"method": b"SUBSCRIBE", "body": b""},
        {"method": b"MESSAGE", "body": b"hello"},  # not dialog-creating: no Record-Route of ours
    ]
    for shape in shapes:
        data = initial(fast.core, flow, **shape)  # type: ignore[arg-type]
        assert taken(data) and forwarded_fast(data, NODE, PUBLICS[public]), shape
        both(data, NODE, slow, fast)
        assert fast.sent[-1][1] == flow
    assert fast.core.stats.to_client == len(shapes)
    # the fast path really took them: the general path parses, the fast one did not
    fast.transports.on_message = None  # type: ignore[assignment]
    fast.deliver(initial(fast.core, flow), NODE)
    assert fast.core.stats.to_client == len(shapes) + 1 and fast.transports.stats.callback_errors == 0
    out = fast.sent[-1][0]
    ours = fast.core._own_entries(flow, flow.transport, facing_client=True, call_id=b"1-4883@127.0.0.2")
    assert len(ours) == (1 if public == "one" and flow.transport == "udp" else 2)
    rr = b"".join(b"Record-Route: " + value + b"\r\n" for value in ours)
    assert b"\r\nP-Asserted-Identity: <sip:alice@example.com>\r\n" + rr + b"Record-Route: " + NODE_RR in out
    assert b"\r\nVia: SIP/2.0/%s 127.0.0.1:" % flow.transport.upper().encode() in out
    assert out.endswith(b"\r\nContent-Length: %d\r\n\r\n" % len(SDP) + SDP)
    # no Record-Route of the node's: ours go on top (SipMessage.prepend), where its Route was
    fast.deliver(initial(fast.core, flow, record_route=()), NODE)
    assert fast.sent[-1][0].split(b"\r\n", 1)[1].startswith(rr + b"P-Asserted-Identity: ")


@pytest.mark.parametrize(
    ("flow", "uri", "dest"),
    [
        (UAS, contact_uri(UAS), UAS),
        (UAS, contact_uri(UAS, 5090), Address("udp", "127.0.0.3", 5090)),  # not behind NAT: its Contact's port
        (UAS, b"sip:bob@127.0.0.3", Address("udp", "127.0.0.3", 5060)),
        (UAS, b"sip:bob@[127.0.0.3]:5090", UAS),  # an IPv4 address in brackets does not parse: the flow
        (UAS, b"sip:bob@127.0.0.9:5090", UAS),  # another IP: the NAT binding
        (UAS, b"sip:bob@127.0.0.3:5090;transport=tcp", UAS),
        (UAS, b"sips:bob@127.0.0.3:5090", UAS),
        (UAS, b"sip:bob@127.0.0.3:99999", UAS),  # a Request-URI that does not parse
        (UAS, b"sip:bob@127.0.0.3:5090;maddr=10.0.0.1", Address("udp", "127.0.0.3", 5090)),
        (UAS_ON_NODE_HOST, b"sip:bob@127.0.0.1:5070", UAS_ON_NODE_HOST),  # never a node
        (UAS_ON_NODE_HOST, b"sip:bob@127.0.0.1:5060", UAS_ON_NODE_HOST),  # never ourselves
        (UAS_REMOTE, b"sip:bob@10.0.0.5:5090", Address("udp", "10.0.0.5", 5090)),
        (UAS_TCP, b"sip:bob@127.0.0.4:5090;transport=tcp", UAS_TCP),  # a connection: the flow, always
    ],
)
def test_initial_requests_go_where_the_general_path_sends_them(flow: Address, uri: bytes, dest: Address) -> None:
    for public, listeners in PUBLICS.items():
        slow, fast = pair_with(public)
        data = initial(fast.core, flow, uri=uri)
        assert forwarded_fast(data, NODE, listeners)
        both(data, NODE, slow, fast)
        assert fast.sent[-1][1] == dest


@pytest.mark.parametrize("method", [b"INVITE", b"MESSAGE", b"CANCEL", b"ACK"])
@pytest.mark.parametrize("flow", [UAS, UAS_TCP])
def test_initial_failed_sends_answer_the_same(method: bytes, flow: Address) -> None:
    slow, fast = pair()
    slow.fail = fast.fail = True
    data = initial(fast.core, flow, method=method)
    assert forwarded_fast(data, NODE)
    both(data, NODE, slow, fast)
    if method == b"ACK":
        assert fast.core.stats.drops == {"ack_unsent": 1}
    else:
        assert fast.core.stats.flow_failed == 1 and fast.sent[-1][0].startswith(b"SIP/2.0 430 ")
        assert b"\r\nTo: <sip:bob@example.com>;tag=0dd5ca1e\r\n" in fast.sent[-1][0]  # the tag of answers to nodes


def test_initial_request_with_the_node_down_or_from_elsewhere() -> None:
    slow, fast = pair()
    for b in (slow, fast):
        b.core.nodes.mark_down(b.core.nodes.nodes["node1"])
    both(initial(fast.core), NODE, slow, fast)
    for source in (ATTACKER, CLIENT):  # not a node: a client's new work, hashed there
        data = initial(fast.core)
        assert not forwarded_fast(data, source)
        both(data, source, slow, fast)


def test_initial_requests_with_tokens_not_ours() -> None:
    slow, fast = pair()
    _, cases = routes_not_quite_ours(fast.core)
    cases.append([])
    for routes in cases:
        data = initial(fast.core, routes=routes)
        both(data, NODE, slow, fast)
    assert forwarded_fast(initial(fast.core, routes=cases[4]), NODE)
    for routes in cases[:4] + cases[5:]:
        assert not forwarded_fast(initial(fast.core, routes=routes), NODE)


INITIAL_DECLINED: dict[str, Callable[[bytes], bytes]] = {
    "max_forwards_zero": _line(b"Max-Forwards: 68", b"Max-Forwards: 0"),
    "path": _line(b"Max-Forwards:", b"Path: <sip:10.0.0.1;lr>\r\nMax-Forwards:"),
    "expires": _line(b"Max-Forwards:", b"Expires: 120\r\nMax-Forwards:"),
    "tel_uri": _line(b"sip:bob@127.0.0.3:5064 SIP", b"tel:+1234 SIP"),
    "options": lambda data: data.replace(b"INVITE", b"OPTIONS"),
    "compact_to": _line(b"\r\nTo:", b"\r\nt:"),
    "rr_folded": _line(b"Record-Route: <", b"Record-Route:\r\n <"),
    "rr_no_space": _line(b"Record-Route: <", b"Record-Route:<"),
}


@pytest.mark.parametrize("case", sorted(INITIAL_DECLINED))
def test_uncommon_initial_shapes_take_the_general_path(case: str) -> None:
    slow, fast = pair()
    canonical = initial(fast.core)
    assert forwarded_fast(canonical, NODE)
    data = INITIAL_DECLINED[case](canonical)
    assert data != canonical
    assert not forwarded_fast(data, NODE)
    both(data, NODE, slow, fast)


def _record_route_line(lines: list[bytes], i: int, pick: int) -> None:
    value = [NODE_RR, b"<sip:10.9.9.9;lr>", b"<sip:a@b>, <sip:c@d;lr>", b"sip:x@y", b""][pick % 5]
    name = [b"Record-Route", b"record-route", b"RECORD-ROUTE", b"Record-Route ", b"Route"][pick // 5 % 5]
    lines.insert(i, name + b": " + value)


def _mutate_initial(data: bytes, op: str, at: int, pick: int) -> bytes:
    return mutate(data, op, at, pick, bare=(*BARE, b">"), line_ops={"rr": _record_route_line, "mf": _max_forwards})


INITIAL_OPS = st.sampled_from(["pad", "trail", "name", "dup", "drop", "rr", "fold", "bare", "byte", "truncate", "mf"])
INITIAL_BENIGN = st.sampled_from(["pad", "trail", "name", "rr", "mf"])
URIS = st.sampled_from([None, "port", "no_port", "other_ip", "tcp", "sips", "bad_port", "node", "upper"])


def _uri(flow: Address, kind: str | None) -> bytes | None:
    return {
        None: None,
        "port": contact_uri(flow, 5090),
        "no_port": b"sip:bob@" + flow.host.encode(),
        "other_ip": b"sip:bob@127.0.0.9:5090",
        "tcp": contact_uri(flow, 5090).split(b";")[0] + b";transport=tcp",
        "sips": b"sips:bob@%s:5090" % flow.host.encode(),
        "bad_port": b"sip:bob@%s:70000" % flow.host.encode(),
        "node": b"sip:bob@127.0.0.1:5070",
        "upper": b"sip:BOB@%s:5090;TRANSPORT=UDP" % flow.host.encode(),
    }[kind]


@PROPERTY
@given(
    public=st.sampled_from(sorted(PUBLICS)),
    method=st.sampled_from([b"INVITE", b"SUBSCRIBE", b"REFER", b"MESSAGE", b"CANCEL", b"ACK", b"invite"]),
    flow=st.sampled_from(FLOWS),
    uri=URIS,
    routes=st.sampled_from(["path", "client_entry", "token_then_other", "forged", "no_token", "none"]),
    record_route=st.sampled_from([(), (NODE_RR,), (NODE_RR, b"<sip:10.9.9.9;lr>")]),
    rr_after_via=st.booleans(),
    body=st.sampled_from([b"", SDP]),
    to_tag=st.booleans(),
    mutations=st.one_of(
        st.just([]),
        st.lists(st.tuples(INITIAL_BENIGN, st.integers(0, 50), st.integers(0, 10_000)), max_size=3),
        st.lists(st.tuples(INITIAL_OPS, st.integers(0, 50), st.integers(0, 10_000)), max_size=3),
    ),
    source=st.sampled_from([NODE, NODE, ATTACKER, CLIENT]),
    fail=st.booleans(),
    node_down=st.booleans(),
)
def test_initial_fast_path_matches_general_path(
    public: str,
    method: bytes,
    flow: Address,
    uri: str | None,
    routes: str,
    record_route: tuple[bytes, ...],
    rr_after_via: bool,
    body: bytes,
    to_tag: bool,
    mutations: list[tuple[str, int, int]],
    source: Address,
    fail: bool,
    node_down: bool,
) -> None:
    slow, fast = pair_with(public)
    for b in (slow, fast):
        b.fail = fail
        if node_down:
            b.core.nodes.mark_down(b.core.nodes.nodes["node1"])
    core = fast.core
    route_set = {
        "path": path_routes(core, flow),
        "client_entry": list(core._own_entries(flow, "udp", path=False, facing_client=True)),
        "token_then_other": [*path_routes(core, flow), b"<sip:127.0.0.66:5099;lr>"],
        "forged": [path_routes(core, flow)[-1].replace(b"<sip:", b"<sip:0", 1)],
        "no_token": [b"<sip:127.0.0.1:5060;lr>"],
        "none": [],
    }[routes]
    data = initial(core, flow, method=method, uri=_uri(flow, uri), routes=route_set, record_route=record_route,
                   rr_after_via=rr_after_via, body=body)  # fmt: skip
    if to_tag:
        data = data.replace(b"To: <sip:bob@example.com>", b"To: <sip:bob@example.com>;tag=b2", 1)
    for op, at, pick in mutations:
        data = _mutate_initial(data, op, at, pick)
    event("fast" if forwarded_fast(data, source, PUBLICS[public]) else "general")
    both(data, source, slow, fast)
    both(data, source, slow, fast)  # a retransmission: the same again


# -- a 2xx ACK past the node ------------------------------------------------------------------

#: the node's Record-Route entry as a node writes it, sealed for from_client's Call-ID
SEALED_NODE_ENTRY = (
    b"<sip:127.0.0.1:5070;lr;sf=%s>" % FlowTokens(SECRET).seal("127.0.0.1", 5070, b"dialog-1@127.0.0.2").encode()
)


def dialog_routes(core: BalancerCore, callee: Address, node_entry: bytes = SEALED_NODE_ENTRY) -> list[bytes]:
    """The caller's route set of a call through this balancer to a phone registered here: our
    entries for the caller's flow, the node's, ours for the callee's flow (the 200's
    Record-Route reversed)."""
    caller_side = reversed(core._own_entries(CLIENT, "udp", path=False))
    callee_side = reversed(core._own_entries(callee, callee.transport, path=False, facing_client=True))
    return [*caller_side, node_entry, *callee_side]


@pytest.mark.parametrize("public", sorted(PUBLICS))
@pytest.mark.parametrize("callee", [UAS, UAS_TCP, UAS_WS])
def test_a_2xx_ack_goes_past_the_node_on_both_paths(public: str, callee: Address) -> None:
    """A client's ACK for a 2xx routed by our entries, the node's sealed one and ours with the
    callee's token goes to the callee's flow: the node would only forward it back here."""
    slow, fast = pair_with(public)
    ack = from_client(fast.core, b"ACK", routes=dialog_routes(fast.core, callee))
    assert taken(ack) and forwarded_fast(ack, CLIENT, PUBLICS[public])
    both(ack, CLIENT, slow, fast)
    out, dest = fast.sent[-1]
    assert dest == callee
    assert fast.core.stats.acks_past_node == 1 and fast.core.stats.to_client == 1 and fast.core.stats.to_node == 0
    assert b"\r\nRoute:" not in out and b"\r\nMax-Forwards: 69\r\n" in out
    facing = PUBLICS[public].get(callee.transport, LB)
    assert out.startswith(b"ACK sip:bob@127.0.0.3:5064;transport=UDP SIP/2.0\r\nVia: SIP/2.0/%s 127.0.0.1:%d;branch="
                          % (callee.transport.upper().encode(), facing.port))  # fmt: skip
    assert b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-9;rport=5062;received=127.0.0.2\r\n" in out
    # a retransmission, the same again; the node gone from the membership: the same (its seal
    # still names a node of the farm's)
    both(ack, CLIENT, slow, fast)
    for b in (slow, fast):
        b.core.nodes.update_members([])
    both(ack, CLIENT, slow, fast)
    assert fast.sent[-1] == fast.sent[-2] == fast.sent[-3] and fast.core.stats.acks_past_node == 3


def test_what_does_not_go_past_the_node() -> None:
    """Anything but that very shape goes to the node, as before, on both paths."""
    slow, fast = pair()
    routes = dialog_routes(fast.core, UAS)
    at = routes.index(SEALED_NODE_ENTRY)
    other_node = (
        b"<sip:127.0.0.1:5999;lr;sf=%s>" % FlowTokens(SECRET).seal("127.0.0.1", 5999, b"dialog-1@127.0.0.2").encode()
    )
    cases = [
        from_client(fast.core, b"ACK", routes=[*routes[:at], NODE_ENTRY, *routes[at + 1 :]]),  # another Call-ID's seal
        from_client(fast.core, b"ACK", routes=[*routes[:at], other_node, *routes[at + 1 :]]),  # sealed, not a node
        from_client(fast.core, b"ACK", routes=[*routes, b"<sip:10.9.9.9:5060;lr>"]),  # another element after ours
        from_client(fast.core, b"ACK", routes=[*routes[: at + 1], b"<sip:127.0.0.1:5060;lr>"]),  # ours, no token
        from_client(fast.core, b"ACK", routes=routes[: at + 1]),  # nothing after the node's
        from_client(fast.core, b"ACK", routes=routes, body=SDP),  # an answer in the ACK: the node anchors it
        from_client(fast.core, b"ACK", routes=routes).replace(  # an identity the node strips
            b"Content-Length:", b"p-asserted-identity: <sip:ceo@example.com>\r\nContent-Length:", 1
        ),
        from_client(fast.core, b"BYE", routes=routes),  # the node releases the call's media
        from_client(fast.core, b"INFO", routes=routes),
    ]
    for data in cases:
        both(data, CLIENT, slow, fast)
        assert fast.sent[-1][1] == NODE, data
    assert not forwarded_fast(cases[5], CLIENT)  # the body: declined, the general path decided
    assert not forwarded_fast(cases[6], CLIENT)  # the identity header: likewise
    # the same ACK from a node is a node's request to the caller's flow
    both(from_client(fast.core, b"ACK", routes=routes), NODE, slow, fast)
    assert fast.sent[-1][1] == CLIENT
    assert fast.core.stats.acks_past_node == 0


@pytest.mark.parametrize("fast", [False, True])
def test_vias_of_nothing_but_commas_or_bytes_not_ascii_are_sip_errors_not_exceptions(fast: bool) -> None:
    """Found by a red-team fuzzer: ``Via: ,,,,`` raised IndexError, and a response whose Via
    transport was not UTF-8 raised UnicodeDecodeError (caught by the transport's last resort and
    logged as tracebacks); each is now the parser's kind of error, counted, and nothing is sent
    on."""
    lb = Balancer(fast=fast)
    request = from_client(lb.core, b"OPTIONS", routes=[]).replace(
        b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-9;rport", b"Via: ,,,,"
    )
    lb.deliver(request, CLIENT)
    response = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/U\xc6P 127.0.0.1:5060;branch=z9hG4bKlb-1\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-9\r\nFrom: <sip:a@x>;tag=1\r\n"
        b"To: <sip:b@x>;tag=2\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    lb.deliver(response, NODE)
    assert lb.transports.stats.callback_errors == 0
    assert all(dest != NODE or data.startswith(b"SIP/2.0 4") for data, dest in lb.sent)
