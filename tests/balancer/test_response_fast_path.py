"""The balancer's response fast path (``BalancerCore.forward_response`` with ``response_hop`` in
sipfarm/sip/_fastparse.c) against the general path it stands in for.

Two balancers with the same secret and clock, one with ``TransportManager.fast_response`` set
as ``sipfarm balancer`` sets it and one without, take the same client INVITE (so both wrote the
same Via), then the same response from the node: the canonical one, and mutations of it
(whitespace around values, compact and upper-case names, Vias on one line or several, bare CR
or LF, folding, repeated single headers, Content-Length wrong or padded, quotes, the next
Via's branch missing or odd, our branch forged, REGISTER 2xx, random bytes, truncation).
Whatever the fast path takes, it must send the same bytes to the same hop, count the same and
leave the admission control in the same state as the general path; whatever it declines goes
the general way.  The canonical shapes (SIPp's padded Content-Length, Vias on one line)
must really be the C's, or a fast path that always declined would pass.

The C reader exists only in the compiled build (scripts/test-compiled.sh); the interpreted
build forwards every response the general way and has no fast path to compare.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from wire_mutations import ATTACKER, CLIENT, LB, NODE, PROPERTY, SECRET, mutate, replace_header

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.nodes import NodeSet
from sipfarm.balancer.overload import AdmissionControl
from sipfarm.cluster.membership import Member, Role
from sipfarm.edge import HOP_PREFIX, FlowTokens
from sipfarm.sip.address import Address
from sipfarm.transport.destinations import DestinationPolicy
from sipfarm.transport.manager import TransportManager

fastparse = pytest.importorskip("sipfarm.sip._fastparse")


class Balancer:
    def __init__(self, fast: bool) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        nodes = NodeSet()
        nodes.update_members([Member("node1", Role.NODE, (str(NODE),))])
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
            stamp_via=True,
        )
        self.core._clock = lambda: 100.0
        self.transports = TransportManager(self.core.on_message)
        if fast:
            self.transports.fast_response = self.core.response_fast_path()
            assert self.transports.fast_response is not None

    def _send(self, data: bytes, dest: Address, local: Address) -> bool:
        self.sent.append((data, dest))
        return True

    def _send_response(self, data: bytes, dest: Address) -> bool:
        self.sent.append((data, dest))
        return True

    def deliver(self, data: bytes, source: Address) -> None:
        self.transports.deliver(data, source, LB)

    def state(self) -> tuple[object, ...]:
        admission = self.core.admission
        assert admission is not None
        t = self.transports.stats
        return (
            self.sent,
            self.core.stats.flat(),
            admission.stats.answered,
            sorted(admission._pending),
            dict(t.received),
            dict(t.parse_errors),
            t.callback_errors,
        )


def invite(call_id: bytes, method: bytes = b"INVITE") -> bytes:
    return (
        b"%s sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-1;rport\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: <sip:alice@example.com>;tag=a1\r\n"
        b"To: <sip:bob@example.com>\r\n"
        b"Call-ID: %s\r\n"
        b"CSeq: 7 %s\r\n"
        b"Contact: <sip:alice@127.0.0.2:5062>\r\n"
        b"Content-Length: 0\r\n\r\n"
    ) % (method, call_id, method)


def setup_pair(call_id: bytes, method: bytes = b"INVITE") -> tuple[Balancer, Balancer, list[bytes]]:
    """Two balancers that forwarded the same request; the Via lines of what they sent."""
    pair = Balancer(fast=False), Balancer(fast=True)
    for b in pair:
        b.deliver(invite(call_id, method), CLIENT)
        assert len(b.sent) == 1 and b.sent[0][1] == NODE
    assert pair[0].sent == pair[1].sent
    vias = [line for line in pair[0].sent[0][0].split(b"\r\n") if line.startswith(b"Via: ")]
    assert len(vias) == 2 and vias[0].find(HOP_PREFIX) > 0
    for b in pair:
        b.sent.clear()
    return pair[0], pair[1], [v[5:] for v in vias]


def response(vias: list[bytes], *, status: bytes = b"200 OK", method: bytes = b"INVITE", call_id: bytes,
             one_line: bool = False, body: bytes = b"", clen: bytes | None = None) -> bytes:  # fmt: skip
    via_lines = [b"Via: " + b", ".join(vias)] if one_line else [b"Via: " + v for v in vias]
    return b"\r\n".join(
        [
            b"SIP/2.0 " + status,
            *via_lines,
            b"From: <sip:alice@example.com>;tag=a1",
            b"To: <sip:bob@example.com>;tag=b2",
            b"Call-ID: " + call_id,
            b"CSeq: 7 " + method,
            b"Contact: <sip:bob@127.0.0.3:5064>",
            b"Content-Length: " + (clen if clen is not None else b"%d" % len(body)),
            b"",
            body,
        ]
    )


def both(data: bytes, source: Address, slow: Balancer, fast: Balancer) -> None:
    slow.deliver(data, source)
    fast.deliver(data, source)
    assert fast.state() == slow.state(), data


SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.3\r\ns=-\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


@pytest.mark.parametrize("one_line", [False, True])
@pytest.mark.parametrize("clen", [None, b"  %d" % len(SDP)])
def test_canonical_responses_take_the_fast_path(one_line: bool, clen: bytes | None) -> None:
    slow, fast, vias = setup_pair(b"canon-1")
    for status in (b"100 Trying", b"180 Ringing", b"200 OK"):
        data = response(vias, status=status, call_id=b"canon-1", one_line=one_line, body=SDP, clen=clen)
        assert fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, 65535) is not None
        both(data, NODE, slow, fast)
    assert len(fast.sent) == 3 and all(dest == CLIENT for _, dest in fast.sent)
    assert fast.core.stats.responses == 3
    # the admission control saw the first answer to the INVITE, either way
    assert fast.core.admission is not None and fast.core.admission.stats.answered == 1


def test_forged_branch_is_dropped_by_both() -> None:
    slow, fast, vias = setup_pair(b"forged-1")
    ours = vias[0]
    flipped = ours[:-1] + (b"0" if ours[-1:] != b"0" else b"1")
    data = response([flipped, vias[1]], call_id=b"forged-1")
    assert fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, 65535) is not None
    both(data, ATTACKER, slow, fast)
    assert fast.sent == [] and fast.core.stats.drops == {"forged": 1}
    # a genuine branch with another transaction's next Via: forged too
    data = response([ours, b"SIP/2.0/UDP 127.0.0.66:5099;branch=z9hG4bK-other"], call_id=b"forged-1")
    both(data, ATTACKER, slow, fast)
    assert fast.sent == [] and fast.core.stats.drops == {"forged": 2}


def test_a_response_from_a_nodes_address_off_the_internal_socket_keeps_no_node_alive() -> None:
    """With a socket facing the nodes of its own (``--internal``), a response claiming a
    node's address on the public socket is routed by its branch as anyone's, on both paths,
    but marks no node alive (a forger could keep a dead node in the ring)."""
    slow, fast, vias = setup_pair(b"facing-1")
    for b in (slow, fast):
        b.core.nodes.facing = Address("udp", "127.0.0.1", 5999)  # not LB, where deliver puts it
    data = response(vias, call_id=b"facing-1")
    both(data, NODE, slow, fast)
    assert fast.sent and fast.sent[0][1] == CLIENT
    for b in (slow, fast):
        entry = b.core.nodes.by_address(NODE.host, NODE.port)
        assert entry is not None and not entry.heard
    for b in (slow, fast):
        b.core.nodes.facing = LB
    both(data, NODE, slow, fast)
    assert all(b.core.nodes.nodes["node1"].heard for b in (slow, fast))


def test_register_2xx_takes_the_general_path() -> None:
    slow, fast, vias = setup_pair(b"reg-1", b"REGISTER")
    data = response(vias, method=b"REGISTER", call_id=b"reg-1")
    assert fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, 65535) is None
    both(data, NODE, slow, fast)
    data = response(vias, status=b"401 Unauthorized", method=b"REGISTER", call_id=b"reg-1")
    assert fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, 65535) is not None
    both(data, NODE, slow, fast)


def _canonical(vias: list[bytes]) -> bytes:
    return response(vias, call_id=b"case-1", body=SDP)


def _line(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    return lambda data: data.replace(old, new, 1)


def _end_first_via(data: bytes, tail: bytes) -> bytes:
    lines = data.split(b"\r\n")
    lines[1] += tail
    return b"\r\n".join(lines)


# each must be declined by the C (the general path's bytes or verdict would differ otherwise)
DECLINED: dict[str, Callable[[bytes], bytes]] = {
    "clen_long": _line(b"Content-Length: %d" % len(SDP), b"Content-Length: %d" % (len(SDP) + 1)),
    "clen_short": _line(b"Content-Length: %d" % len(SDP), b"Content-Length: %d" % (len(SDP) - 1)),
    "clen_twice": _line(b"Content-Length:", b"Content-Length: %d\r\nContent-Length:" % len(SDP)),
    "clen_not_digits": _line(b"Content-Length: %d" % len(SDP), b"Content-Length: +%d" % len(SDP)),
    "from_twice_differing": _line(b"From:", b"From: <sip:mallory@example.com>;tag=m\r\nFrom:"),
    "to_twice": _line(b"To:", b"t: <sip:bob@example.com>;tag=b2\r\nTo:"),
    "call_id_twice": _line(b"Call-ID:", b"i: other\r\nCall-ID:"),
    "cseq_twice": _line(b"CSeq:", b"CSeq: 8 INVITE\r\nCSeq:"),
    "max_forwards_twice": _line(b"CSeq:", b"Max-Forwards: 1\r\nMax-Forwards: 2\r\nCSeq:"),
    "no_call_id": _line(b"Call-ID: case-1\r\n", b""),
    "no_from": _line(b"From: <sip:alice@example.com>;tag=a1\r\n", b""),
    "cseq_tab": _line(b"CSeq: 7 INVITE", b"CSeq: 7\tINVITE"),
    "cseq_big": _line(b"CSeq: 7 INVITE", b"CSeq: 2147483648 INVITE"),
    "bare_lf": _line(b"Contact: <sip:bob", b"Contact: <sip:\nbob"),
    "bare_cr": _line(b"Contact: <sip:bob", b"Contact: <sip:\rbob"),
    "fold": _line(b"Contact: <sip:bob", b"Contact:\r\n <sip:bob"),
    "leading_crlf": lambda data: b"\r\n" + data,
    "no_space_after_colon": _line(b"Contact: ", b"Contact:"),
    "tab_after_colon": _line(b"Contact: ", b"Contact:\t"),
    "space_before_colon": _line(b"Contact: ", b"Contact : "),
    "bad_name": _line(b"Contact: ", b"Con(tact: "),
    "status_without_reason": _line(b"SIP/2.0 200 OK", b"SIP/2.0 200"),
    "lower_case_version": _line(b"SIP/2.0 200 OK", b"sip/2.0 200 OK"),
    "status_700": _line(b"SIP/2.0 200 OK", b"SIP/2.0 700 OK"),
    # RFC 3261 25.1: no control character but HTAB in a Reason-Phrase (the parser drops it)
    "reason_nul": _line(b"SIP/2.0 200 OK", b"SIP/2.0 200 O\x00K"),
    "reason_escape": _line(b"SIP/2.0 200 OK", b"SIP/2.0 200 OK\x1b[2J"),
    "reason_del": _line(b"SIP/2.0 200 OK", b"SIP/2.0 200 \x7f"),
    "reason_vt": _line(b"SIP/2.0 200 OK", b"SIP/2.0 200 O\x0bK"),
    # nor in a header line but escaped in a quoted string or comment (the parser judges those)
    "header_nul": _line(b"Contact: <sip:bob", b"Contact: <sip:\x00bob"),
    "header_escape": _line(b"CSeq:", b"Server: x\x1b[2J\r\nCSeq:"),
    "header_del": _line(b"CSeq:", b"Subject: \x7f\r\nCSeq:"),
    "header_escaped_bel": _line(b"CSeq:", b'Subject: "\\\x07"\r\nCSeq:'),
    "via_vt_after_comma": lambda data: data.replace(
        b"\r\nVia: SIP/2.0/UDP 127.0.0.2", b",\x0b SIP/2.0/UDP 127.0.0.2", 1
    ),
    "our_via_with_params": lambda data: data.replace(
        b"\r\nVia: SIP/2.0/UDP 127.0.0.2", b";received=1.2.3.4\r\nVia: SIP/2.0/UDP 127.0.0.2", 1
    ),
    "our_branch_upper_hex": lambda data: (
        data.replace(HOP_PREFIX + b"0", HOP_PREFIX + b"A", 1)
        if HOP_PREFIX + b"0" in data
        else data.replace(HOP_PREFIX, HOP_PREFIX + b"A", 1)
    ),
    "our_via_twice_comma": lambda data: data.replace(b"\r\nVia: SIP/2.0/UDP 127.0.0.2", b",,SIP/2.0/UDP 127.0.0.2", 1),
    "our_via_vt_after_comma_end": lambda data: _end_first_via(
        data.replace(b"\r\nVia: SIP/2.0/UDP 127.0.0.2", b", SIP/2.0/UDP 127.0.0.2", 1), b"\x0b"
    ),
    "next_via_no_branch": _line(b";branch=z9hG4bK-client-1", b""),
    "next_via_upper_branch": _line(b";branch=z9hG4bK-client-1", b";BRANCH=z9hG4bK-client-1"),
    "next_via_empty_branch": _line(b";branch=z9hG4bK-client-1", b";branch="),
    "next_via_quote": _line(b";branch=z9hG4bK-client-1", b';x="q";branch=z9hG4bK-client-1'),
    "next_via_angle": _line(b"SIP/2.0/UDP 127.0.0.2:5062;", b"SIP/2.0/UDP <127.0.0.2:5062>, x;"),
    "no_next_via": lambda data: b"\r\n".join(
        line for line in data.split(b"\r\n") if not line.startswith(b"Via: SIP/2.0/UDP 127.0.0.2")
    ),
    "no_end_of_headers": lambda data: data.split(b"\r\n\r\n")[0] + b"\r\n",
    "too_many_lines": _line(b"CSeq:", b"X-A: 1\r\n" * 256 + b"CSeq:"),
    "register_2xx": lambda data: data.replace(b"CSeq: 7 INVITE", b"CSeq: 7 REGISTER"),
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_uncommon_shapes_take_the_general_path(case: str) -> None:
    slow, fast, vias = setup_pair(b"case-1")
    canonical = _canonical(vias)
    assert fastparse.response_hop(canonical, fast.core._via_starts, HOP_PREFIX, 65535) is not None
    data = DECLINED[case](canonical)
    assert data != canonical
    assert fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, 65535) is None
    both(data, NODE, slow, fast)


@pytest.mark.parametrize(
    "case",
    [
        _line(b"Content-Length: ", b"Content-Length:    "),  # SIPp's padding
        _line(b"Contact: <sip:bob@127.0.0.3:5064>", b"Contact:  <sip:bob@127.0.0.3:5064> \t"),
        _line(b"From:", b"f:"),
        _line(b"Call-ID:", b"CALL-ID:"),
        _line(b"Content-Length:", b"l:"),
        _line(b"CSeq:", b"Subject: \r\nCSeq:"),
        lambda data: data.replace(b"\r\nVia: SIP/2.0/UDP 127.0.0.2", b"\r\nv: SIP/2.0/UDP 127.0.0.2", 1),
        _line(b"SIP/2.0 200 OK", b"SIP/2.0 200 O\tK"),  # HTAB: allowed in a Reason-Phrase
        _line(b"SIP/2.0 200 OK", "SIP/2.0 200 Très bien".encode()),  # UTF-8 too
    ],
)
def test_common_variants_take_the_fast_path(case: Callable[[bytes], bytes]) -> None:
    slow, fast, vias = setup_pair(b"case-1")
    data = case(_canonical(vias))
    assert fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, 65535) is not None
    both(data, NODE, slow, fast)
    assert len(fast.sent) == 1


def test_over_max_size_takes_the_general_path() -> None:
    _slow, fast, vias = setup_pair(b"case-1")
    data = _canonical(vias)
    assert fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, len(data) - 1) is None
    assert fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, len(data)) is not None


_COMPACT = {b"Via": b"v", b"From": b"f", b"To": b"t", b"Call-ID": b"i", b"Content-Length": b"l"}


def _compact(lines: list[bytes], i: int, _pick: int) -> None:
    name, colon, value = lines[i].partition(b":")
    lines[i] = _COMPACT.get(name, name) + colon + value


def _content_length(lines: list[bytes], _i: int, pick: int) -> None:
    replace_header(lines, b"content-length", [b"Content-Length: 999", b"Content-Length: 0", b"Content-Length: -1",
                   b"Content-Length: 00000000000", b"Content-Length: 0x1"], pick)  # fmt: skip


def _mutate(data: bytes, op: str, at: int, pick: int) -> bytes:
    return mutate(data, op, at, pick, line_ops={"compact": _compact, "clen": _content_length})


OPS = st.sampled_from(
    ["pad", "trail", "name", "compact", "dup", "drop", "fold", "bare", "byte", "truncate", "clen", "leading"]
)
BENIGN = st.sampled_from(["pad", "trail", "name", "compact"])  # mostly still the fast path's
NEXT_VIAS = st.sampled_from(
    [
        None,  # the client's, as forwarded
        b"SIP/2.0/UDP 127.0.0.2:5062;BRANCH=z9hG4bK-client-1;rport",
        b"SIP/2.0/UDP 127.0.0.2:5062;rport",
        b"SIP/2.0/UDP 127.0.0.2:5062;branch=;rport",
        b"SIP/2.0/UDP 127.0.0.2:5062 ; branch = z9hG4bK-client-1",
        b"SIP/2.0/UDP <127.0.0.2:5062>;branch=z9hG4bK-client-1",
        b"SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-1\x0b",
        b'SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-1;x="a,b"',
        b"SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-client-1 , SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK-9",
    ]
)


@PROPERTY
@given(
    status=st.sampled_from(
        [
            b"100 Trying",
            b"180 Ringing",
            b"200 OK",
            b"407 Proxy Authentication Required",
            b"486 Busy Here",
            b"699 X",
            b"200 ",
            b"200",
            b"200 OK",
            b"180 Ringing",
            b"200 O\x00K",
            b"486 Busy\x1b[2J",
            b"180 Ring\x7fing",
            b"200 O\tK",
            "603 Refusé".encode(),
        ]
    ),
    method=st.sampled_from([b"INVITE", b"BYE", b"REGISTER", b"invite", b"OPTIONS"]),
    one_line=st.booleans(),
    separator=st.sampled_from([b", ", b",", b" ,  ", b",\x0b", b",,"]),
    next_via=st.one_of(st.just(None), NEXT_VIAS),
    body=st.sampled_from([b"", SDP]),
    clen=st.sampled_from([None, b"  %d" % len(SDP), b"%d " % len(SDP)]),
    mutations=st.one_of(
        st.just([]),
        st.lists(st.tuples(BENIGN, st.integers(0, 50), st.integers(0, 10_000)), max_size=3),
        st.lists(st.tuples(OPS, st.integers(0, 50), st.integers(0, 10_000)), max_size=3),
    ),
    source=st.sampled_from([NODE, ATTACKER, CLIENT]),
)
def test_fast_path_matches_general_path(
    status: bytes,
    method: bytes,
    one_line: bool,
    separator: bytes,
    next_via: bytes | None,
    body: bytes,
    clen: bytes | None,
    mutations: list[tuple[str, int, int]],
    source: Address,
) -> None:
    slow, fast, vias = setup_pair(b"prop-1", b"REGISTER" if method == b"REGISTER" else b"INVITE")
    if next_via is not None:
        vias = [vias[0], next_via]
    clen_value = None if clen is None or len(body) != len(SDP) else clen
    data = response(vias, status=status, method=method, call_id=b"prop-1", body=body, clen=clen_value)
    if one_line:
        data = data.replace(b"\r\nVia: ", separator, 2).replace(separator, b"\r\nVia: ", 1)
    for op, at, pick in mutations:
        data = _mutate(data, op, at, pick)
    event("fast" if fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, 65535) is not None else "general")
    both(data, source, slow, fast)
    # a retransmission: the verified-branch cache's answer, the same again
    both(data, source, slow, fast)


_REASON_CONTROLS = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"


@PROPERTY
@given(reason=st.binary(max_size=24), source=st.sampled_from([NODE, ATTACKER]))
def test_a_reason_phrase_the_parser_refuses_is_never_forwarded(reason: bytes, source: Address) -> None:
    """Whatever bytes a callee writes in its reason, both paths agree; one with a control
    character but HTAB (RFC 3261 25.1) goes nowhere, dropped as malformed and counted."""
    slow, fast, vias = setup_pair(b"reason-1")
    data = response(vias, status=b"200 " + reason, call_id=b"reason-1", body=SDP)
    fast_taken = fastparse.response_hop(data, fast.core._via_starts, HOP_PREFIX, 65535) is not None
    event("fast" if fast_taken else "general")
    both(data, source, slow, fast)
    controls = reason.translate(None, _REASON_CONTROLS) != reason
    if controls and reason.find(b"\r") < 0 and reason.find(b"\n") < 0:  # (a CR LF: a line of its own)
        assert not fast_taken and fast.sent == [] and slow.sent == []
        assert sum(fast.transports.stats.parse_errors.values()) == 1
    elif not controls and source == NODE:
        assert fast_taken and len(fast.sent) == 1 and fast.sent[0][0].startswith(b"SIP/2.0 200 " + reason + b"\r\n")


def test_interpreted_build_has_no_fast_path_to_compare() -> None:
    # (here: the compiled build) the core offers its fast path only with the C reader
    core = Balancer(fast=True).core
    assert core.response_fast_path() is not None
