"""Sans-IO tests of the static cluster: group rules, the node set's group rings, and the core
dispatching pinned requests only to their group's nodes (503 when it has none).

The balancer is 10.0.0.1:5060; nodes a1, a2 (group A), b1 (group B) and d1, d2 (no group) at
10.0.2.x:5060.  Messages are fed as the transport would (parsed, the Via stamped).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.groups import MAX_USER, GroupRules, parse_rules, target_account
from sipfarm.balancer.nodes import NodeSet
from sipfarm.cluster.membership import Member, Role
from sipfarm.config import BalancerConfig, ConfigError, NodeConfig, load
from sipfarm.edge import FlowTokens
from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import parse_message
from sipfarm.sip.via import stamp_received

SECRET = b"unit-test-flow-secret-0123456789"
LB = Address("udp", "10.0.0.1", 5060)
CLIENT = Address("udp", "203.0.113.7", 40000)
GROUP_OF = {"a1": "A", "a2": "A", "b1": "B", "d1": None, "d2": None}
NODES = {node_id: Address("udp", f"10.0.2.{i}", 5060) for i, node_id in enumerate(GROUP_OF, start=1)}
RULES = [
    {"domain": "a.test", "group": "A"},
    {"domain": "b.test", "user_prefix": "+1", "group": "B"},
    {"domain": "b.test", "user_regex": "9[0-9]{3}", "group": "A"},
]


def members(ids: list[str] | None = None) -> list[Member]:
    return [Member(i, Role.NODE, (str(NODES[i]),), group=GROUP_OF[i]) for i in (ids or list(NODES))]


class Harness:
    def __init__(self, rules: list[dict[str, str]] | None = None, ids: list[str] | None = None) -> None:
        self.nodes = NodeSet()
        self.nodes.update_members(members(ids))
        self.sent: list[tuple[SipMessage, Address]] = []
        self.core = BalancerCore(
            self.nodes, FlowTokens(SECRET), public={"udp": LB}, internal=LB, send=self._send,
            send_response=lambda data, dest: self._send(data, dest), retry_after=7, hop_secret=SECRET,
            groups=parse_rules(RULES if rules is None else rules),
        )  # fmt: skip

    def _send(self, data: bytes, dest: Address, local: Address | None = None) -> bool:
        self.sent.append((parse_message(data), dest))
        return True

    def one(self, data: bytes) -> tuple[SipMessage, Address]:
        msg = parse_message(data)
        stamp_received(msg, CLIENT)
        before = len(self.sent)
        self.core.on_message(msg, CLIENT, LB)
        out = self.sent[before:]
        assert len(out) == 1, out
        return out[0]

    def node_of(self, data: bytes) -> str:
        msg, dest = self.one(data)
        assert msg.is_request, (msg.status, msg.reason)
        return next(node_id for node_id, addr in NODES.items() if addr == dest)


def request(method: str, uri: str, *, to: str | None = None, call_id: str | None = None, extra: str = "") -> bytes:
    return (
        f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 192.168.1.5:5062;branch=z9hG4bK{secrets.token_hex(6)};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:caller@x.test>;tag=f1\r\nTo: {to or f'<{uri}>'}\r\n"
        f"Call-ID: {call_id or secrets.token_hex(8)}\r\nCSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def register(aor: str) -> bytes:
    domain = aor.partition("@")[2]
    return request("REGISTER", f"sip:{domain}", to=f"<sip:{aor}>", extra=f"Contact: <sip:{aor}@192.168.1.5>\r\n")


# -- rules ---------------------------------------------------------------------------------------


def test_first_matching_rule_wins_domain_without_case_user_with_case():
    rules = parse_rules([
        {"domain": "B.test", "user_prefix": "+1", "group": "B1"},
        {"domain": "b.test", "user_regex": "[a-z]+", "group": "Blower"},
        {"user_prefix": "+44", "group": "UK"},  # any domain (and tel: numbers)
        {"domain": "b.test", "group": "B"},
    ])  # fmt: skip
    assert rules.match("+1555", "b.test") == "B1"
    assert rules.match("alice", "b.test") == "Blower"
    assert rules.match("Alice", "b.test") == "B"  # the regex matches the whole user part, with case
    assert rules.match("alice9", "b.test") == "B"
    assert rules.match("+4420", "b.test") == "UK"  # rules keep their order across domains
    assert rules.match("+4420", "z.test") == "UK"
    assert rules.match("+1555", "z.test") is None
    assert rules.match("alice", "a.test") is None
    assert rules.groups == {"B1", "Blower", "UK", "B"}
    long_user = "a" * (MAX_USER + 1)
    assert rules.match(long_user, "b.test") == "B"  # a user too long for any pattern: the next rule


def test_target_account_is_the_to_uri_of_a_register_and_the_request_uri_otherwise():
    def account(data: bytes) -> tuple[str, str] | None:
        return target_account(parse_message(data))

    assert account(register("alice@A.Test")) == ("alice", "a.test")
    assert account(request("INVITE", "sip:%2B1555@b.test;user=phone")) == ("+1555", "b.test")
    assert account(request("MESSAGE", "sip:b.test", to="<sip:bob@c.test>")) == ("", "b.test")
    assert account(request("INVITE", "tel:+4420", to="<tel:+4420>")) == ("+4420", "")
    assert account(request("REGISTER", "sip:a.test", to="garbage<")) is None


@pytest.mark.parametrize(
    ("rules", "error"),
    [
        ([{"domain": "a.test"}], "rule 1: group is required"),
        ([{"domain": "a.test", "group": "A"}, {"domian": "b.test", "group": "B"}], "rule 2: unknown key 'domian'"),
        ([{"group": "A"}], "rule 1: needs a domain, a user_prefix or a user_regex"),
        ([{"domain": "a.test", "group": "A B"}], "rule 1: group 'A B' is not a group name"),
        ([{"domain": "bob@a.test", "group": "A"}], "rule 1: domain 'bob@a.test' is not a host name"),
        ([{"domain": "a.test:5060", "group": "A"}], "rule 1: domain 'a.test:5060' is not a host name"),
        ([{"domain": "a.test", "user_regex": "(", "group": "A"}], "rule 1: user_regex '('"),
        ([{"domain": "a.test", "user_regex": "a" * 300, "group": "A"}], "rule 1: user_regex is longer than 256"),
        ([{"domain": "a", "user_prefix": "1", "user_regex": "1", "group": "A"}], "rule 1: user_prefix and user_regex"),
        ([{"domain": "a.test", "group": 7}], "rule 1: group must be a non-empty string"),
        (["a.test"], "rule 1: expected a table"),
    ],
)
def test_bad_rules_are_refused_naming_the_rule(rules: list[dict[str, str]], error: str):
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(").replace("[", r"\[")):
        parse_rules(rules)
    with pytest.raises(ConfigError, match="^groups: " + error.replace("(", r"\(").replace("[", r"\[")):
        load(BalancerConfig, None, {"groups": rules}, environ={})


def test_config_from_toml_and_environment(tmp_path: Path):
    path = tmp_path / "farm.toml"
    path.write_text(
        '[balancer]\ngroups = [\n  {domain = "a.test", group = "A"},\n'
        '  {domain = "b.test", user_prefix = "+1", group = "B"},\n]\n'
        '[node]\ngroup = "A"\n'
    )
    cfg = load(BalancerConfig, path, section="balancer", environ={})
    assert cfg.groups == [{"domain": "a.test", "group": "A"}, {"domain": "b.test", "user_prefix": "+1", "group": "B"}]
    assert load(NodeConfig, path, section="node", environ={}).group == "A"
    env = {"SIPFARM_GROUPS": '[{"domain": "c.test", "group": "C"}]', "SIPFARM_GROUP": "C"}
    assert load(BalancerConfig, None, environ=env).groups == [{"domain": "c.test", "group": "C"}]
    assert load(NodeConfig, None, environ=env).group == "C"
    with pytest.raises(ConfigError, match=r"^groups: expected a JSON list"):
        load(BalancerConfig, None, environ={"SIPFARM_GROUPS": "a.test=A"})
    with pytest.raises(ConfigError, match=r"^group: 'A/B' is not a group name"):
        load(NodeConfig, None, {"group": "A/B"}, environ={})
    assert load(BalancerConfig, None, environ={}).groups == []


def test_member_record_carries_its_group_only_when_set():
    grouped = Member("a1", Role.NODE, ("udp:10.0.2.1:5060",), group="A")
    assert Member.from_json(grouped.to_json()) == grouped
    plain = Member("d1", Role.NODE, ("udp:10.0.2.4:5060",))
    assert '"group"' not in plain.to_json()
    assert Member.from_json(plain.to_json()).group is None


# -- node set ------------------------------------------------------------------------------------


def test_unpinned_keys_go_to_ungrouped_nodes_else_to_any():
    nodes = NodeSet()
    nodes.update_members(members())
    keys = [secrets.token_hex(8).encode() for _ in range(300)]
    assert {nodes.pick(k).id for k in keys} == {"d1", "d2"}  # type: ignore[union-attr]
    assert {nodes.pick_in("A", k).id for k in keys} == {"a1", "a2"}  # type: ignore[union-attr]
    assert {nodes.pick_in("B", k).id for k in keys} == {"b1"}  # type: ignore[union-attr]
    assert nodes.pick_in("C", b"k") is None
    assert (nodes.usable_in("A"), nodes.usable_in("C"), nodes.usable_count) == (2, 0, 5)
    for node_id in ("d1", "d2"):
        nodes.mark_down(nodes.nodes[node_id])
    assert {nodes.pick(k).id for k in keys} == {"a1", "a2", "b1"}  # type: ignore[union-attr]
    nodes.mark_down(nodes.nodes["b1"])
    assert nodes.pick_in("B", b"k") is None and nodes.usable_in("B") == 0


# -- dispatch ------------------------------------------------------------------------------------


def test_pinned_registers_and_calls_reach_only_their_groups_nodes():
    h = Harness()
    for i in range(40):
        assert h.node_of(register(f"user{i}@a.test")) in ("a1", "a2")
        assert h.node_of(register(f"+1{i}@b.test")) == "b1"
        assert h.node_of(request("INVITE", f"sip:user{i}@a.test", to="<sip:x@elsewhere.test>")) in ("a1", "a2")
        assert h.node_of(request("INVITE", f"sip:+1{i}@b.test")) == "b1"
        assert h.node_of(request("MESSAGE", f"sip:9{i:03d}@b.test")) in ("a1", "a2")  # the regex rule
        # no rule: the dynamic pool (the ungrouped nodes)
        assert h.node_of(register(f"user{i}@b.test")) in ("d1", "d2")
        assert h.node_of(request("INVITE", f"sip:user{i}@c.test")) in ("d1", "d2")
    spread = {h.node_of(register(f"user{i}@a.test")) for i in range(40)}
    assert spread == {"a1", "a2"}  # hashed over the group
    refreshes = {h.node_of(register("alice@a.test")) for _ in range(10)}
    assert len(refreshes) == 1  # one AOR's refreshes meet one node of its group


def test_cancel_follows_its_pinned_invite():
    h = Harness()
    for _ in range(10):
        call_id = secrets.token_hex(8)
        invite = h.node_of(request("INVITE", "sip:bob@a.test", call_id=call_id))
        assert h.node_of(request("CANCEL", "sip:bob@a.test", call_id=call_id)) == invite


def test_group_without_live_node_gives_503_for_its_accounts_only():
    h = Harness()
    for node_id in ("a1", "a2"):
        h.nodes.mark_down(h.nodes.nodes[node_id])
    for data in (register("alice@a.test"), request("INVITE", "sip:bob@a.test"), request("INVITE", "sip:9123@b.test")):
        answer, dest = h.one(data)
        assert (answer.status, dest) == (503, CLIENT)
        assert answer.get("retry-after") == b"7"
    assert h.core.stats.group_unavailable == {"A": 3}
    assert h.node_of(register("+1555@b.test")) == "b1"
    assert h.node_of(request("INVITE", "sip:bob@c.test")) in ("d1", "d2")  # never to the grouped
    # a group no node announces at all
    h = Harness(rules=[{"domain": "a.test", "group": "Nowhere"}])
    assert h.one(register("alice@a.test"))[0].status == 503
    assert h.core.stats.group_unavailable == {"Nowhere": 1}
    assert h.core.stats.no_node == 0


def test_without_ungrouped_nodes_unpinned_requests_go_to_any_node():
    h = Harness(ids=["a1", "a2", "b1"])
    assert {h.node_of(request("INVITE", f"sip:u{i}@c.test")) for i in range(60)} == {"a1", "a2", "b1"}


def test_without_rules_groups_of_nodes_only_keep_them_for_last():
    h = Harness(rules=[])
    assert h.core.groups is None
    assert {h.node_of(register(f"user{i}@a.test")) for i in range(40)} == {"d1", "d2"}


@pytest.mark.parametrize("how", ["probes", "left_membership"])
def test_dialog_of_a_dead_grouped_node_is_rehashed_within_its_group(how: str):
    h = Harness()
    if how == "probes":
        h.nodes.mark_down(h.nodes.nodes["a1"])
    else:
        h.nodes.update_members(members(["a2", "b1", "d1", "d2"]))
    a1 = NODES["a1"]
    route = f"Route: <sip:{a1.host}:{a1.port};lr>\r\n"
    for _ in range(10):
        # in-dialog: its Request-URI is a Contact, which no rule matches
        bye = request("BYE", "sip:bob@192.168.9.9:5060", to="<sip:bob@a.test>;tag=t", extra=route)
        assert h.node_of(bye) == "a2"
    assert h.core.stats.rehashed == 10
    h.nodes.mark_down(h.nodes.nodes["a2"])
    bye = request("BYE", "sip:bob@192.168.9.9:5060", to="<sip:bob@a.test>;tag=t", extra=route)
    assert h.one(bye)[0].status == 503
    # an ungrouped node's dialog: the dynamic pool
    d1 = NODES["d1"]
    h.nodes.mark_down(h.nodes.nodes["d1"])
    bye = request("BYE", "sip:bob@192.168.9.9:5060", to="<sip:bob@a.test>;tag=t",
                  extra=f"Route: <sip:{d1.host}:{d1.port};lr>\r\n")  # fmt: skip
    assert h.node_of(bye) == "d2"


def test_in_dialog_request_for_a_live_node_follows_its_route_whatever_the_rules():
    h = Harness()
    d1 = NODES["d1"]
    bye = request(
        "BYE", "sip:bob@a.test", to="<sip:bob@a.test>;tag=t", extra=f"Route: <sip:{d1.host}:{d1.port};lr>\r\n"
    )
    assert h.node_of(bye) == "d1"


def test_rules_object_is_empty_falsy():
    assert not GroupRules()
    assert len(parse_rules(RULES)) == 3
