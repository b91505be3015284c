"""The balancer's per-message shortcuts answer exactly what the long way would, and stay bounded.

* :class:`HopBranches` remembers the branches it made or verified (two bounded generations):
  a response is matched by a look-up only under the very branch and transaction key the
  branch was made for; anything else (forged, moved under another transaction, tampered) is
  verified by its MAC and refused.
* :class:`OwnRoutes` remembers our own Route entries with a valid token (or none): a forged
  token is refused every time, entries not ours are never remembered.
* :func:`plain_route_parts` reads only what the URI parser reads the same way.
* The core recognises the Vias it wrote by their start; a Via naming us otherwise is still
  read the long way, and one naming anyone else is not ours.
* With ``stamp_via`` the core stamps received/rport on clients' requests, not on nodes'.
"""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_balancer_unit import CLIENT, LB_UDP, NODES, SECRET, Harness, _response, members, request

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.nodes import NodeSet
from sipfarm.edge import (
    NO_FLOW,
    NO_VALUE,
    VERIFIED_LIMIT,
    FlowTokens,
    HopBranches,
    OwnRoutes,
    first_value_at,
    plain_route_parts,
    pop_value_at,
    route_uri,
)
from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage
from sipfarm.sip.headers import parse_via
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import parse_message

HOP = Address("udp", "203.0.113.7", 40000)


def _key() -> bytes:
    return b"z9hG4bK" + secrets.token_hex(8).encode()


# -- hop branches ----------------------------------------------------------------------------------


def test_a_branch_decodes_to_its_hop_under_its_own_transaction_key_only():
    hops = HopBranches(SECRET)
    key = _key()
    branch = hops.encode(HOP, key)
    assert hops.decode(branch, key) == HOP
    assert hops.decode(branch, _key()) is None  # a real branch moved under another transaction
    assert hops.decode(branch, key + b"x") is None
    tampered = branch[:-1] + (b"0" if branch[-1:] != b"0" else b"1")
    assert hops.decode(tampered, key) is None
    # what the look-up answers is what the MAC answers: a fresh instance (nothing remembered)
    assert HopBranches(SECRET).decode(branch, key) == HOP
    assert HopBranches(SECRET).decode(branch, _key()) is None
    assert HopBranches(b"another-secret-0123456789abcdef!").decode(branch, key) is None


def test_the_same_hop_decodes_to_the_same_address_however_it_was_written():
    hops = HopBranches(SECRET)
    key = _key()
    v6 = hops.encode(Address("tcp", "[2001:DB8::1]", 5060), key)
    assert hops.decode(v6, key) == Address("tcp", "2001:db8::1", 5060)
    assert HopBranches(SECRET).decode(v6, key) == Address("tcp", "2001:db8::1", 5060)


def test_remembered_branches_are_bounded_and_forgotten_ones_still_verify():
    hops = HopBranches(SECRET)
    first_key = _key()
    first = hops.encode(HOP, first_key)
    made = [(hops.encode(HOP, key), key) for key in (b"k%d" % i for i in range(2 * VERIFIED_LIMIT + 10))]
    assert len(hops._verified) + len(hops._verified_old) <= 2 * VERIFIED_LIMIT
    assert first not in hops._verified and first not in hops._verified_old
    assert hops.decode(first, first_key) == HOP  # by its MAC
    assert hops.decode(first, _key()) is None
    branch, key = made[-1]
    assert hops.decode(branch, key) == HOP


def test_a_branch_made_by_another_balancer_is_verified_then_remembered():
    ours, theirs = HopBranches(SECRET), HopBranches(SECRET)
    key = _key()
    branch = theirs.encode(HOP, key)
    assert ours.decode(branch, key) == HOP
    assert branch in ours._verified
    assert ours.decode(branch, _key()) is None


# -- our own Route entries -------------------------------------------------------------------------


def _ours(host: str, port: int) -> bool:
    return host == "10.0.0.1" and port == 5060


def _with_routes(*routes: str) -> SipMessage:
    extra = "".join(f"Route: {r}\r\n" for r in routes)
    return parse_message(request("BYE", "sip:bob@192.168.1.5:5062", extra=extra, to="<sip:b@x>;tag=t"))


def test_own_routes_pop_ours_and_name_the_flow_of_the_token():
    tokens = FlowTokens(SECRET)
    routes = OwnRoutes(_ours, tokens)
    mine = f"<sip:{tokens.encode(CLIENT, '10.0.0.1', 5060)}@10.0.0.1:5060;lr>"
    for _ in range(2):  # parsed, then remembered: the same answer
        msg = _with_routes(mine, "<sip:10.0.0.1:5060;lr>", "<sip:10.0.1.1:5060;lr>")
        flow, top, plain = routes.pop(msg)
        assert flow == CLIENT and top == b"<sip:10.0.1.1:5060;lr>" and plain == (b"", "10.0.1.1", 5060)
        assert msg.values("route") == [b"<sip:10.0.1.1:5060;lr>"]
    assert routes._known[b"<sip:10.0.0.1:5060;lr>"] is NO_FLOW
    assert b"<sip:10.0.1.1:5060;lr>" not in routes._known  # not ours: never remembered


def test_own_routes_read_a_sealed_entry_of_ours_without_keeping_it():
    """A node's Path entry for one request (sealed for its Call-ID) is ours and names the flow;
    read in the plain shape or parsed, the same flow; sealed ones are not remembered."""
    tokens = FlowTokens(SECRET)
    routes = OwnRoutes(_ours, tokens)
    token = tokens.encode(CLIENT, '10.0.0.1', 5060)
    for value in (
        f"<sip:{token}@10.0.0.1:5060;lr;ob;sf=cdc0e62f3e729d5bdab3>",
        f"<sip:{token}@10.0.0.1:5060;lr;ob;sf=ab12>",
    ):
        assert routes.pop(_with_routes(value)) == (CLIENT, None, None)
    assert len(routes) == 0
    # not in the plain shape (upper case): parsed, the same answer, remembered
    odd = f"<sip:{token}@10.0.0.1:5060;lr;transport=UDP>"
    assert plain_route_parts(odd.encode()) is None
    assert routes.pop(_with_routes(odd)) == (CLIENT, None, None)
    assert len(routes) == 1


def test_own_routes_refuse_a_forged_token_every_time_and_do_not_remember_it():
    tokens = FlowTokens(SECRET)
    routes = OwnRoutes(_ours, tokens)
    real = tokens.encode(CLIENT, '10.0.0.1', 5060)
    forged = real[:-1] + ("0" if real[-1] != "0" else "1")
    for _ in range(2):
        with pytest.raises(BadMessage):
            routes.pop(_with_routes(f"<sip:{forged}@10.0.0.1:5060;lr>"))
    assert len(routes) == 0
    # a token signed with another secret neither
    other = FlowTokens(b"another-secret-0123456789abcdef!").encode(CLIENT, "10.0.0.1", 5060)
    with pytest.raises(BadMessage):
        routes.pop(_with_routes(f"<sip:{other}@10.0.0.1:5060;lr>"))


def test_own_routes_are_bounded():
    tokens = FlowTokens(SECRET)
    routes = OwnRoutes(_ours, tokens, limit=8)
    for port in range(40000, 40020):
        flow = Address("udp", "203.0.113.7", port)
        token = tokens.encode(flow, "10.0.0.1", 5060)
        assert routes.pop(_with_routes(f"<sip:{token}@10.0.0.1:5060;lr>")) == (flow, None, None)
        assert len(routes) <= 8


def _outcome(call):
    try:
        return ("ok", call())
    except BadMessage as exc:
        return ("error", str(exc))


@given(
    st.lists(
        st.text(alphabet='<>",; ab@:', max_size=14).map(str.strip).filter(bool).map(str.encode),
        min_size=0,
        max_size=3,
    )
)
@settings(max_examples=400, deadline=None)
def test_first_value_at_reads_and_pops_what_first_value_and_pop_first_value_do(lines: list[bytes]):
    def message() -> SipMessage:
        return SipMessage(method=b"BYE", headers=[("via", b"Via", b"x"), *(("route", b"Route", v) for v in lines)])

    reference, fast = message(), message()
    expected = _outcome(lambda: reference.first_value("route"))
    at, first, rest = first_value_at(fast, "route")
    if at >= 0:
        assert expected == ("ok", first)
    elif at == NO_VALUE:
        assert expected == ("ok", None)
    if expected[0] == "ok" and expected[1] is not None:
        reference.pop_first_value("route")
        pop_value_at(fast, "route", at, rest)
        assert fast.headers == reference.headers


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        (b"<sip:127.0.0.1:29520;lr;sf=6cc544c17029e07f36e1>", (b"", "127.0.0.1", 29520)),
        (b"<sip:5bf96cc4298f06fd@10.0.0.1:5060;lr>", (b"5bf96cc4298f06fd", "10.0.0.1", 5060)),
        (b"<sip:node-1.farm.test:5070;lr;transport=udp>", (b"", "node-1.farm.test", 5070)),
        (b"<sip:10.0.0.1;lr>", None),  # no port: the transport's default, the parser's business
        (b"<sip:10.0.0.1:5060;lr>;x=1", None),  # header parameters
        (b"<sip:Node.farm.test:5060;lr>", None),  # upper case
        (b"<sip:[::1]:5060;lr>", None),
        (b"<sip:a@b@10.0.0.1:5060>", None),
        (b"<sip:a:pw@10.0.0.1:5060>", None),
        (b"<sip:10.0.0.1:5060;;lr>", None),
        (b"<sip:10.0.0.1:5060;a=b=c>", None),
        (b"<sip:10.0.0.1:99999>", None),
        (b"<sip:10.0.0.1:5060?x=y>", None),
        (b"<sips:10.0.0.1:5060>", None),
        (b"sip:10.0.0.1:5060", None),
        (b"<sip:@10.0.0.1:5060>", None),
    ],
)
def test_plain_route_parts_reads_the_shape_elements_write_and_nothing_else(value, parts):
    assert plain_route_parts(value) == parts


@given(
    st.text(alphabet="abcz019.-_:;=@<>[]?AZ", max_size=30).map(lambda t: f"<sip:{t}>".encode())
    | st.builds(
        lambda user, host, port, params: f"<sip:{user}{host}:{port}{params}>".encode(),
        st.sampled_from(["", "a1@", "@", "x:y@", "a@b@"]),
        st.sampled_from(["10.0.0.1", "node-1.farm.test", "a..b", "-x", "Up.case", "1.2.3.999"]),
        st.integers(min_value=0, max_value=100_000),
        st.text(alphabet=";=abl r_-", max_size=12),
    )
)
@settings(max_examples=400, deadline=None)
def test_plain_route_parts_agrees_with_the_parser(value: bytes):
    """Whatever the shortcut reads, the parser reads the same (and never refuses)."""
    parts = plain_route_parts(value)
    if parts is None:
        return
    uri = route_uri(SipMessage(), value)
    assert uri is not None
    assert (uri.user or "").encode() == parts[0] and uri.host == parts[1] and uri.port == parts[2]


# -- the core --------------------------------------------------------------------------------------


@pytest.fixture
def lb() -> Harness:
    h = Harness()
    h.nodes.update_members(members())
    return h


@pytest.mark.parametrize(
    ("rewrite", "reason"),
    [
        ((b"10.0.0.1:5060;", b"10.0.0.1:5070;"), "not_ours"),  # another port of the same host
        ((b"SIP/2.0/UDP 10.0.0.1:5060;", b"SIP/2.0/UDP 10.0.0.9:5060;"), "not_ours"),
        ((b"SIP/2.0/UDP 10.0.0.1:5060;", b"SIP/2.0/UDP 10.0.0.1;"), None),  # default port: ours
        ((b"SIP/2.0/UDP 10.0.0.1:5060;", b"SIP/2.0/udp  10.0.0.1:5060 ;"), None),  # odd spelling: ours
    ],
)
def test_responses_are_ours_by_the_via_we_wrote_however_it_is_spelt(lb: Harness, rewrite, reason):
    msg, node = lb.one(request("INVITE", "sip:bob@farm.test"), CLIENT)
    response = _response(msg, 180).replace(*rewrite)
    out = lb.feed(response, node)
    if reason is None:
        assert [dest for _, dest in out] == [CLIENT]
    else:
        assert out == [] and lb.core.stats.flat()[f"dropped_{reason}"] == 1


def test_the_core_stamps_clients_requests_and_not_nodes():
    nodes = NodeSet()
    nodes.update_members(members())
    sent: list[tuple[SipMessage, Address]] = []

    def send(data: bytes, dest: Address, local: Address | None = None) -> bool:
        sent.append((parse_message(data), dest))
        return True

    core = BalancerCore(
        nodes, FlowTokens(SECRET), public={"udp": LB_UDP}, internal=LB_UDP, send=send,
        send_response=lambda data, dest: send(data, dest), hop_secret=SECRET, stamp_via=True,
    )  # fmt: skip
    # from a client: received and rport filled in (RFC 3261 18.2.1, RFC 3581 4)
    core.on_message(parse_message(request("INVITE", "sip:bob@farm.test")), CLIENT, LB_UDP)
    out, _ = sent[-1]
    client_via = parse_via(out.values("via")[1])
    assert client_via.received == CLIENT.host and client_via.rport == str(CLIENT.port)
    # from a node: left as written
    node = NODES["node1"]
    core.on_message(
        parse_message(request("OPTIONS", "sip:bob@198.51.100.9:5060", via="SIP/2.0/UDP 10.0.1.1:7777;rport")),
        node,
        LB_UDP,
    )
    out, dest = sent[-1]
    assert dest == Address("udp", "198.51.100.9", 5060)
    node_via = parse_via(out.values("via")[1])
    assert node_via.received is None and node_via.rport == ""


# -- the front door's User-Agent verdicts ----------------------------------------------------------


def test_scanner_verdicts_are_remembered_per_value_and_bounded():
    from test_balancer_frontdoor import POLICY, admitted  # noqa: PLC0415
    from test_balancer_frontdoor import request as front_request  # noqa: PLC0415

    from sipfarm.balancer import frontdoor  # noqa: PLC0415

    front = frontdoor.FrontDoor(POLICY)
    phone, scanner = "Linphone/5.1", "friendly-scanner"
    for i in range(3):  # judged, then remembered: the same answer each time, per source
        assert admitted(front, front_request("OPTIONS", "sip:1@farm.test", agent=phone), "198.51.100.3", i)
        assert not admitted(front, front_request("OPTIONS", "sip:1@farm.test", agent=scanner), f"198.51.100.{9 + i}", i)
    assert front.stats["scanner"] == 3
    for i in range(frontdoor._AGENT_CACHE_LIMIT + 10):
        front._is_scanner(b"phone/%d" % i)
        assert len(front._agent_verdicts) <= frontdoor._AGENT_CACHE_LIMIT
    assert front._is_scanner(b"X-" + scanner.upper().encode()) and not front._is_scanner(phone.encode())


def test_a_token_of_the_earlier_format_is_taken_only_where_it_names_us():
    """Tokens written before they named their place (MAC over the flow alone) still route the
    Paths and dialogs set up before the upgrade when the entry names us; whether a URI naming
    someone else is the farm's, they never tell (the relay they allowed), and they are not
    remembered."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    from sipfarm.edge import FlowTokenError, pack_flow  # noqa: PLC0415

    tokens = FlowTokens(SECRET)
    packed = pack_flow(CLIENT)
    legacy = (hmac.digest(SECRET, packed, hashlib.sha256)[:8] + packed).hex()
    assert tokens.decode(legacy, "10.0.0.1", 5060, ours=True) == CLIENT
    with pytest.raises(FlowTokenError):
        tokens.decode(legacy, "10.0.0.1", 5060)
    assert not tokens._decoded
    routes = OwnRoutes(_ours, tokens)
    assert routes.pop(_with_routes(f"<sip:{legacy}@10.0.0.1:5060;lr>")) == (CLIENT, None, None)
