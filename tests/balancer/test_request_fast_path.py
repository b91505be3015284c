"""The balancer's in-dialog request fast path (``BalancerCore.forward_request`` with
``request_scan``/``request_out`` in sipfarm/sip/_fastparse.c) against the general path.

Two balancers with the same secrets and clock, one with ``TransportManager.fast_request`` set
as ``sipfarm balancer`` sets it and one without, take the same in-dialog requests: a client's
ACK/BYE routed by our Record-Route entry then the node's sealed one (to the node), and a
node's ACK/BYE routed by the entry with the client's flow token (to the client), canonical
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
from sipfarm.edge import FlowTokens
from sipfarm.sip.address import Address
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.destinations import DestinationPolicy
from sipfarm.transport.manager import TransportManager

fastparse = pytest.importorskip("sipfarm.sip._fastparse")

UAS = Address("udp", "127.0.0.3", 5064)
MAX = 65535


class Balancer:
    def __init__(self, fast: bool) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.fail = False  # every send fails (the node unreachable, the client's flow gone)
        nodes = NodeSet()
        nodes.update_members([Member("node1", Role.NODE, (str(NODE),))])
        self.front = FrontDoor(FrontDoorPolicy(domains=("example.com",)))
        self.core = BalancerCore(
            nodes,
            FlowTokens(SECRET),
            public={"udp": LB},
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


def forwarded_fast(data: bytes, source: Address) -> bool:
    """Whether a fresh balancer's fast path takes ``data`` from ``source`` (C and decisions)."""
    return Balancer(fast=True).core.forward_request(data, source, MAX)


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


def test_body_and_user_agent() -> None:
    slow, fast = pair()
    data = from_client(fast.core, b"INFO", body=b"Signal=1\r\nDuration=100\r\n", agent=b"PolyCom 1.0")
    assert taken(data)
    both(data, CLIENT, slow, fast)
    assert len(fast.sent) == 1


def test_scanner_is_banned_by_both() -> None:
    slow, fast = pair()
    data = from_client(fast.core, agent=b"friendly-scanner")
    assert taken(data)
    both(data, ATTACKER, slow, fast)
    assert fast.sent == [] and fast.front.stats.get("scanner") == 1 and fast.front._bans


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
    token = entry(fast.core, UAS)
    forged = token.replace(b"<sip:", b"<sip:0", 1).replace(b"0", b"1", 2)
    foreign = FlowTokens(b"another-farm-secret-0123456789ab").encode(ATTACKER).encode()
    cases = [
        [forged],
        [b"<sip:%s@127.0.0.1:5060;lr>" % foreign],
        [b"<sip:127.0.0.1:5060;lr>"],  # ours, no token: a node's request to its Request-URI
        [b"<sip:10.9.9.9:5060;lr>"],  # not ours
        [b"<sip:127.0.0.66:5099;lr>", token],
        [token, b"<sip:127.0.0.66:5099;lr>"],
    ]
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
    "record_route": _line(b"Max-Forwards:", b"Record-Route: <sip:10.0.0.1;lr>\r\nMax-Forwards:"),
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
    ["canonical", "ours_only", "node_only", "twice_ours", "token_of_attacker", "upper", "none"]
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
