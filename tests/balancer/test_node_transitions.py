"""The balancer's view of the nodes reports each change once (``NodeSet.take_transitions``,
logged by ``sipfarm balancer`` as ``event=node_<event>``): in memory, no clock but the one
passed in.  The fold the process tests wait on (fixtures.balancer_view) is checked here against
the view itself."""

from __future__ import annotations

from fixtures.balancer_view import NodeView, fold, views_from_log
from hypothesis import given, settings
from hypothesis import strategies as st

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.nodes import MAX_TRANSITIONS, NodeEvent, NodeSet, NodeTransition
from sipfarm.cluster.membership import Member, MemberState, Role
from sipfarm.edge import FlowTokens
from sipfarm.sip.address import Address

NODES = {f"node{i}": Address("udp", f"10.0.1.{i}", 5060) for i in (1, 2, 3)}
LB = Address("udp", "10.0.0.1", 5060)


def member(node: str, *, draining: bool = False, group: str | None = None, address: Address | None = None) -> Member:
    state = MemberState.DRAINING if draining else MemberState.ACTIVE
    return Member(node, Role.NODE, (str(address or NODES[node]),), state=state, group=group)


def events(nodes: NodeSet) -> list[tuple[str, str, str]]:
    return [(t.event.value, t.node, t.reason) for t in nodes.take_transitions()]


def test_joining_and_leaving_nodes_are_reported_once_each():
    nodes = NodeSet()
    nodes.update_members([member("node1"), member("node2", group="b")])
    taken = nodes.take_transitions()
    assert taken == [
        NodeTransition(NodeEvent.JOINED, "node1", NODES["node1"], None, "membership"),
        NodeTransition(NodeEvent.JOINED, "node2", NODES["node2"], "b", "membership"),
    ]
    nodes.update_members([member("node1"), member("node2", group="b")])  # the next poll: no change
    assert nodes.take_transitions() == []
    nodes.update_members([member("node1")])
    assert nodes.take_transitions() == [NodeTransition(NodeEvent.LEFT, "node2", NODES["node2"], "b", "membership")]
    nodes.update_members([member("node1")])
    assert events(nodes) == []


def test_a_node_down_after_missed_probes_then_up_is_two_lines_however_many_probes():
    nodes = NodeSet(down_after=2, probe_interval=0.25)
    nodes.update_members([member("node1"), member("node2")])
    nodes.take_transitions()
    now = 0.0
    for _ in range(8):  # node1 answers, node2 is silent for 8 intervals
        for entry in nodes.due_probes(now):
            nodes.probe_sent(entry, now, b"z9hG4bK" + entry.id.encode())
        nodes.probe_answered(nodes.nodes["node1"], now + 0.001)
        now += 0.25
    assert events(nodes) == [("down", "node2", "probes_missed")]
    assert nodes.usable_count == 1
    nodes.probe_answered(nodes.nodes["node2"], now)
    nodes.probe_answered(nodes.nodes["node2"], now + 0.25)
    assert events(nodes) == [("up", "node2", "probe_answered")]


def test_a_down_node_heard_from_is_up_by_reason_heard():
    nodes = NodeSet(down_after=1, probe_interval=0.25)
    nodes.update_members([member("node1")])
    entry = nodes.nodes["node1"]
    nodes.probe_sent(entry, 0.0, b"b1")
    nodes.due_probes(0.25)  # missed: down
    nodes.probe_sent(entry, 0.25, b"b2")
    entry.heard = True  # a response from it (what BalancerCore.on_message records)
    nodes.due_probes(0.5)
    assert events(nodes)[1:] == [("down", "node1", "probes_missed"), ("up", "node1", "heard")]


def test_a_probe_the_balancer_cannot_send_marks_the_node_down_once():
    nodes = NodeSet()
    nodes.update_members([member("node1")])
    nodes.take_transitions()
    core = BalancerCore(
        nodes, FlowTokens(b"s" * 32), public={"udp": LB}, internal=LB, send=lambda data, dest, local: False,
        send_response=lambda data, dest: False, retry_after=5,
    )  # fmt: skip
    for _ in range(3):
        core.probe(nodes.nodes["node1"])
    assert events(nodes) == [("down", "node1", "send_failed")]
    assert nodes.usable_count == 0


def test_draining_and_back_and_a_draining_newcomer():
    nodes = NodeSet()
    nodes.update_members([member("node1"), member("node2", draining=True)])
    assert events(nodes) == [
        ("joined", "node1", "membership"),
        ("joined", "node2", "membership"),
        ("draining", "node2", "membership"),
    ]
    nodes.update_members([member("node1", draining=True), member("node2")])
    assert events(nodes) == [("draining", "node1", "membership"), ("active", "node2", "membership")]
    assert nodes.usable_count == 1


def test_a_node_on_a_new_address_or_group_is_moved():
    nodes = NodeSet()
    nodes.update_members([member("node1")])
    nodes.take_transitions()
    other = Address("udp", "10.0.9.9", 5070)
    nodes.update_members([member("node1", address=other)])
    nodes.update_members([member("node1", address=other, group="a")])
    assert nodes.take_transitions() == [
        NodeTransition(NodeEvent.MOVED, "node1", other, None, "membership"),
        NodeTransition(NodeEvent.MOVED, "node1", other, "a", "membership"),
    ]


def test_untaken_transitions_are_bounded_and_the_rest_counted():
    nodes = NodeSet()
    rounds = MAX_TRANSITIONS  # a join and a leave each
    for _ in range(rounds):
        nodes.update_members([member("node1")])
        nodes.update_members([])
    assert len(nodes.take_transitions()) == MAX_TRANSITIONS
    assert nodes.transitions_dropped == 2 * rounds - MAX_TRANSITIONS
    nodes.update_members([member("node1")])
    assert events(nodes) == [("joined", "node1", "membership")]  # room again once taken


# -- any sequence: the transitions, folded, are the view (what the process tests rely on) --------

STEPS = st.lists(
    st.tuples(
        st.sampled_from(["poll", "probe_round", "answer", "send_fails", "heard"]),
        st.sampled_from(list(NODES)),
        st.frozensets(st.sampled_from(list(NODES))),  # members present (for poll)
        st.frozensets(st.sampled_from(list(NODES))),  # of which draining
        st.booleans(),  # node2 in group b (for poll)
    ),
    max_size=40,
)


def assert_a_change(view: NodeView, t: NodeTransition) -> None:
    known, down, draining = t.node in view.known, t.node in view.down, t.node in view.draining
    expected = {
        NodeEvent.JOINED: not known,
        NodeEvent.LEFT: known,
        NodeEvent.DOWN: known and not down,
        NodeEvent.UP: known and down,
        NodeEvent.DRAINING: known and not draining,
        NodeEvent.ACTIVE: known and draining,
        NodeEvent.MOVED: known,
    }[t.event]
    assert expected, (t, view.known, view.down, view.draining)


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_folding_the_transitions_gives_the_usable_nodes(steps):
    nodes = NodeSet(down_after=2, probe_interval=0.25)
    now = 0.0
    log: list[tuple[str, str]] = []
    for action, node, present, draining, grouped in steps:
        entry = nodes.nodes.get(node)
        if action == "poll":
            group = {"node2": "b"} if grouped else {}
            nodes.update_members([member(n, draining=n in draining, group=group.get(n)) for n in sorted(present)])
        elif action == "probe_round":
            now += 0.25
            for due in nodes.due_probes(now):
                nodes.probe_sent(due, now, b"b")
        elif entry is not None and action == "answer":
            nodes.probe_answered(entry, now)
        elif entry is not None and action == "send_fails":
            nodes.mark_down(entry)
        elif entry is not None and action == "heard":
            entry.heard = True
        for t in nodes.take_transitions():
            assert_a_change(fold(log), t)  # each change reported once: every event changes the view
            log.append((t.event.value, t.node))
        view = fold(log)
        assert view.usable == {n.id for n in nodes.nodes.values() if n.usable}
        assert view.known == set(nodes.nodes)


def test_the_log_lines_of_two_workers_fold_apart():
    text = "\n".join(
        [
            "ts=x level=info component=sipfarm.balancer event=balancer_started id=lb-1 listen=udp:127.0.0.1:5060",
            "ts=x level=info component=sipfarm.balancer event=node_joined node=node1 address=udp:127.0.0.1:5070 "
            "group=- reason=membership usable=1 worker=0",
            "ts=x level=info component=sipfarm.balancer event=node_joined node=node1 address=udp:127.0.0.1:5070 "
            "group=- reason=membership usable=1 worker=1",
            "ts=x level=info component=sipfarm.balancer event=node_down node=node1 address=udp:127.0.0.1:5070 "
            "group=- reason=probes_missed usable=0 worker=1",
            "ts=x level=info component=sipfarm.cluster event=cluster_member_joined member=node2 role=node state=active",
        ]
    )
    views = views_from_log(text)
    assert {w: v.usable for w, v in views.items()} == {"0": {"node1"}, "1": set()}
