"""Overload shedding, sans-IO: :class:`AdmissionControl` with an injected clock, and the
balancer core shedding new INVITEs/REGISTERs (never in-dialog requests, ACK, BYE, OPTIONS)
when every node is at its limit.  The real-process test is test_balancer_overload.py."""

from __future__ import annotations

import secrets

import pytest
from test_balancer_unit import CLIENT, NODES, Harness, _response, members, node_for, register, request

from sipfarm.balancer.overload import ADMITTED_TTL, AdmissionControl, OverloadPolicy
from sipfarm.sip.message import SipMessage

POLICY = OverloadPolicy(target=0.2, initial_limit=4, min_limit=2, max_limit=50, late_after=2.0)


def fill(ac: AdmissionControl, node: str, count: int, now: float = 0.0, prefix: str = "k") -> list[bytes]:
    keys = [f"{prefix}{node}{i}".encode() for i in range(count)]
    for key in keys:
        ac.sent(key, node, now)
    return keys


def test_a_node_at_its_limit_is_overloaded_until_it_answers():
    ac = AdmissionControl(POLICY)
    keys = fill(ac, "n1", 3)
    assert not ac.overloaded("n1")
    keys += fill(ac, "n1", 1, prefix="x")
    assert ac.overloaded("n1") and ac.overloaded_count() == 1
    assert not ac.overloaded("n2")  # another node: its own state
    ac.answered(keys[0], 0.001)
    assert not ac.overloaded("n1")


def test_a_retransmission_is_not_counted_again_and_a_second_answer_is_ignored():
    ac = AdmissionControl(POLICY)
    (key,) = fill(ac, "n1", 1)
    ac.sent(key, "n1", 0.3)
    assert len(ac.nodes["n1"].pending) == 1 and ac.is_pending(key)
    ac.answered(key, 0.001)
    ac.answered(key, 0.002)  # the 180 after the 100: nothing pending any more
    assert ac.stats.answered == 1 and not ac.is_pending(key)


def test_fast_answers_from_a_busy_node_raise_the_limit():
    ac = AdmissionControl(POLICY)
    now = 0.0
    for i in range(40):
        keys = fill(ac, "n1", 3, now, prefix=f"r{i}-")
        for key in keys:
            now += 0.001
            ac.answered(key, now)
    assert ac.nodes["n1"].limit > POLICY.initial_limit


def test_an_idle_node_does_not_grow_its_limit():
    ac = AdmissionControl(POLICY)
    for i in range(50):
        (key,) = fill(ac, "n1", 1, float(i), prefix=f"r{i}-")
        ac.answered(key, i + 0.001)
    assert ac.nodes["n1"].limit == POLICY.initial_limit  # one pending of 4: not half busy


def test_the_limit_is_at_least_what_the_node_answers_within_the_target():
    """A node answering 1,000 requests a second one at a time is never half busy, so additive
    increase never moves its limit; the measured throughput does (Little's law: 1,000/s x
    0.2 s), so a pause shorter than the target does not shed. Capped by max_limit; it decays
    when the answers stop, and a cut below it lasts until the next window is measured."""
    policy = OverloadPolicy(target=0.2, initial_limit=4, min_limit=2, max_limit=500)
    ac = AdmissionControl(policy)
    now = 0.0
    for i in range(1000):  # one second of answers at 1,000/s, each within a millisecond
        (key,) = fill(ac, "n1", 1, now, prefix=f"r{i}-")
        if i == 0:
            ac.expire(now)  # the node's window opens at the first tick that knows it
        now += 0.001
        ac.answered(key, now)
        if i % 125 == 124:
            ac.expire(now)  # the balancer's tick (probe_interval / 2)
    load = ac.nodes["n1"]
    assert load.throughput == pytest.approx(1000.0, rel=0.01)
    assert load.limit == pytest.approx(200.0, rel=0.01)
    fill(ac, "n1", 150, now, prefix="pause-")  # 150 ms of requests unanswered: not overloaded
    assert not ac.overloaded("n1")
    capped = AdmissionControl(OverloadPolicy(target=0.2, initial_limit=4, max_limit=50))
    for i in range(400):
        (key,) = fill(capped, "n1", 1, i / 400, prefix=f"c{i}-")
        capped.answered(key, i / 400 + 0.0001)
        if i == 0:
            capped.expire(0.0)  # the node's window opens at the first tick that knows it
    capped.expire(1.0)
    assert capped.nodes["n1"].limit == 50.0
    # the answers stop: the windows measure nothing, the throughput halves each window
    for tick in range(1, 5):
        ac.expire(now + tick * 0.5)
    assert load.throughput < 100.0


def test_a_slow_answer_cuts_the_limit_in_proportion_once_per_target():
    ac = AdmissionControl(OverloadPolicy(target=0.2, initial_limit=100, min_limit=2, max_limit=100))
    keys = fill(ac, "n1", 10)
    ac.answered(keys[0], 1.0)  # 1 s for a 0.2 s target: x0.2
    assert ac.nodes["n1"].limit == pytest.approx(20.0)
    ac.answered(keys[1], 1.1)  # within the same target period: no second cut
    assert ac.nodes["n1"].limit == pytest.approx(20.0)
    ac.answered(keys[2], 1.25)  # later: cut again (x0.16), never below min_limit
    assert ac.nodes["n1"].limit == pytest.approx(20.0 * 0.2 / 1.25)
    for i, key in enumerate(keys[3:]):
        ac.answered(key, 2.0 + i)
    assert ac.nodes["n1"].limit == 2.0
    assert ac.stats.slow == 10 and ac.stats.cuts >= 3


def test_unanswered_requests_expire_as_late_and_free_their_slots():
    ac = AdmissionControl(POLICY)
    fill(ac, "n1", 4)
    assert ac.overloaded("n1")
    ac.expire(1.9)
    assert ac.overloaded("n1")
    ac.expire(2.0)
    assert not ac.overloaded("n1") and ac.stats.late == 4
    assert ac.nodes["n1"].limit < POLICY.initial_limit  # late counts as slow


def test_requests_with_credentials_are_admitted_up_to_twice_the_limit():
    ac = AdmissionControl(POLICY)
    fill(ac, "n1", 5)
    assert ac.overloaded("n1") and not ac.overloaded("n1", credentials=True)
    fill(ac, "n1", 3, prefix="y")
    assert ac.overloaded("n1", credentials=True)


def test_heartbeat_load_above_node_load_is_overload_and_gone_nodes_are_forgotten():
    ac = AdmissionControl(OverloadPolicy(node_load=100))
    ac.heartbeat("n1", 150)
    ac.heartbeat("n2", 50)
    assert ac.overloaded("n1") and not ac.overloaded("n2")
    keys = fill(ac, "n1", 2)
    ac.forget({"n2"})
    assert "n1" not in ac.nodes and not ac.is_pending(keys[0])
    assert not AdmissionControl(OverloadPolicy()).overloaded("n1")  # node_load 0: unused


def test_an_admitted_call_id_lets_two_credentialed_follow_ups_through_for_a_while():
    ac = AdmissionControl(POLICY)
    ac.admitted(b"call-1", "n2", 10.0)
    ac.admitted(b"call-1", "n3", 10.5)  # a retransmission or a second new request: the first stays
    assert ac.follow_up(b"call-1", 11.0) == "n2"
    assert ac.follow_up(b"call-1", 12.0) == "n2"
    assert ac.follow_up(b"call-1", 13.0) is None  # ADMITTED_RETRIES used: a reused Call-ID is shed as any
    assert ac.follow_up(b"unknown", 13.0) is None
    ac.admitted(b"call-2", "n1", 20.0)
    assert ac.follow_up(b"call-2", 20.0 + ADMITTED_TTL + 1) is None  # too late
    ac.admitted(b"call-3", "n1", 30.0)
    ac.expire(30.0 + ADMITTED_TTL + 1)
    assert not ac._admitted


# -- the balancer core ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def shed() -> tuple[Harness, Clock]:
    h = Harness()
    h.nodes.update_members(members())
    h.core.admission = AdmissionControl(OverloadPolicy(initial_limit=2, min_limit=2, max_limit=2))
    clock = Clock()
    h.core._clock = clock  # the injected clock
    return h, clock


def _invites(h: Harness, count: int, *, node: str | None = None) -> list[tuple[SipMessage, object]]:
    """``count`` new INVITEs; ``node``: all with Call-IDs that hash to that node."""
    out = []
    for i in range(count):
        call_id = f"c{i}-{secrets.token_hex(4)}"
        while node is not None and node_for(h, call_id.encode()) != NODES[node]:
            call_id = f"c{i}-{secrets.token_hex(4)}"
        out += h.feed(request("INVITE", "sip:bob@farm.test", call_id=call_id), CLIENT)
    return out


def test_new_invites_go_to_other_nodes_then_are_shed_with_503_and_retry_after(shed: tuple[Harness, Clock]):
    h, _ = shed
    forwarded = _invites(h, 6, node="node1")  # 3 nodes x limit 2, all hashed to node1
    assert all(m.method == b"INVITE" for m, _ in forwarded)
    assert sorted(str(d) for _, d in forwarded) == sorted(str(a) for a in NODES.values() for _ in range(2))
    assert h.core.admission is not None and h.core.admission.stats.diverted == 4
    for out, dest in _invites(h, 3):
        assert out.status == 503 and dest == CLIENT
        assert 1 <= int(out.get("retry-after") or b"0") <= 5
    out, _ = h.one(register(), CLIENT)
    assert out.status == 503
    assert h.core.stats.shed == {"INVITE": 3, "REGISTER": 1}


def test_a_retransmission_of_a_diverted_invite_goes_to_the_same_node(shed: tuple[Harness, Clock]):
    h, _ = shed
    _invites(h, 2, node="node1")  # node1 at its limit
    call_id = "diverted-1"
    while node_for(h, call_id.encode()) != NODES["node1"]:
        call_id += "x"
    invite = request("INVITE", "sip:bob@farm.test", call_id=call_id)
    _, first = h.one(invite, CLIENT)
    assert first != NODES["node1"]
    for _ in range(3):
        assert h.one(invite, CLIENT)[1] == first
    assert h.one(request("CANCEL", "sip:bob@farm.test", call_id=call_id), CLIENT)[1] == first


def test_the_credentialed_invite_of_an_admitted_call_finishes_on_its_node(shed: tuple[Harness, Clock]):
    h, _ = shed
    _invites(h, 2, node="node1")  # node1 at its limit: the next INVITE is diverted
    call_id = "challenged-1"
    while node_for(h, call_id.encode()) != NODES["node1"]:
        call_id += "x"
    _, admitted_at = h.one(request("INVITE", "sip:bob@farm.test", call_id=call_id), CLIENT)
    assert admitted_at != NODES["node1"]
    _invites(h, 6)  # now every node is full (and the excess shed)
    creds = (
        'Proxy-Authorization: Digest username="alice", realm="farm.test", nonce="n", '
        'uri="sip:bob@farm.test", response="r"\r\n'
    )
    retry = request("INVITE", "sip:bob@farm.test", call_id=call_id, cseq=2, extra=creds)
    out, dest = h.one(retry, CLIENT)
    assert out.method == b"INVITE" and dest == admitted_at  # its challenge came from there: not shed


def test_never_shed_in_dialog_requests_ack_bye_cancel_retransmissions_or_options(shed: tuple[Harness, Clock]):
    h, _ = shed
    first = request("INVITE", "sip:bob@farm.test", call_id="c-first")
    sent = h.feed(first, CLIENT) + _invites(h, 5)
    assert len(sent) == 6
    # the retransmission of a pending INVITE follows it
    msg, dest = h.one(first, CLIENT)
    assert msg.method == b"INVITE" and dest == sent[0][1]
    for method in ("ACK", "CANCEL"):
        msg, _ = h.one(request(method, "sip:bob@farm.test", call_id="c-first"), CLIENT)
        assert msg.method == method.encode()
    for method in ("BYE", "INVITE", "UPDATE"):  # in dialog: a To tag
        msg, _ = h.one(request(method, "sip:bob@192.168.1.9", to="<sip:bob@farm.test>;tag=b9", cseq=5), CLIENT)
        assert msg.method == method.encode()
    out, _ = h.one(request("OPTIONS", "sip:10.0.0.1:5060"), CLIENT)
    assert out.status == 200
    assert h.core.stats.shed == {}


def test_a_nodes_first_answer_reopens_it(shed: tuple[Harness, Clock]):
    h, clock = shed
    sent = _invites(h, 6)
    assert h.one(request("INVITE", "sip:bob@farm.test"), CLIENT)[0].status == 503
    fwd, node = sent[0]
    clock.now += 0.002
    answer = h.one(_response(fwd, 100), node)
    assert answer[0].status == 100 and answer[1] == CLIENT
    msg, dest = h.one(request("INVITE", "sip:bob@farm.test"), CLIENT)
    assert msg.method == b"INVITE" and dest == node
    admission = h.core.admission
    assert admission is not None and admission.stats.answered == 1


def test_without_admission_control_nothing_is_shed():
    h = Harness()
    h.nodes.update_members(members(["node1"]))
    assert len(_invites(h, 200)) == 200


def test_a_node_heard_from_is_not_marked_down_for_late_probes():
    from sipfarm.balancer.nodes import Health, NodeSet  # noqa: PLC0415

    nodes = NodeSet(down_after=2, probe_interval=0.25)
    nodes.update_members(members(["node1"]))
    entry = nodes.nodes["node1"]
    now = 0.0
    for _ in range(6):  # probes unanswered, calls answered meanwhile (a busy node)
        for due in nodes.due_probes(now):
            nodes.probe_sent(due, now, b"b")
        entry.heard = True
        now += 0.3
    assert entry.health is Health.UP
    for _ in range(3):  # silent: down
        for due in nodes.due_probes(now):
            nodes.probe_sent(due, now, b"b")
        now += 0.3
    assert entry.health is Health.DOWN


def test_shed_settings_from_toml_environment_and_flags_are_validated(tmp_path):
    from sipfarm.balancer.main import overload_policy  # noqa: PLC0415
    from sipfarm.config import BalancerConfig, ConfigError, load  # noqa: PLC0415

    cfg = load(BalancerConfig, environ={})
    assert cfg.shed and cfg.shed_target == 0.1 and (cfg.shed_retry_after_min, cfg.shed_retry_after_max) == (1, 5)
    toml = tmp_path / "lb.toml"
    toml.write_text("[balancer]\nshed = false\nshed_target = 0.25\nshed_limit = 10\nshed_node_load = 500\n")
    cfg = load(BalancerConfig, toml, environ={"SIPFARM_SHED_LATE": "3"}, section="balancer")
    assert not cfg.shed
    policy = overload_policy(cfg)
    assert (policy.target, policy.initial_limit, policy.node_load, policy.late_after) == (0.25, 10, 500.0, 3.0)
    assert load(BalancerConfig, flags={"shed": False}, environ={}).shed is False
    for key, value in (("shed_target", "0"), ("shed_limit", "1"), ("shed_max_limit", "2"),
                       ("shed_late", "0.01"), ("shed_retry_after_max", "0"), ("shed_node_load", "-1")):
        with pytest.raises(ConfigError, match=key):
            load(BalancerConfig, flags={key: value}, environ={})
