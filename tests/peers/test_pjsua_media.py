"""pjsua2 softphones whose media the farm anchors at its relays: balancer -> node -> ``sipfarm relay``.

Every phone is a pjsua2 agent (``pjsua_agent.py``) in the loopback-only namespace, registered at
the balancer (over UDP unless said otherwise; RTP is UDP). What a user (or the operator watching
the relay) would notice:

* a call through the relay (SIP over UDP, the caller hangs up; over TCP, the callee does): the
  SDP each phone receives names the relay (127.0.0.1, a port of its range), the RTP each phone
  receives comes from that port (the stream's peer in pjsua's call dump), each side's recording
  holds the other side's tone, the relay's ng ``query`` counts packets on both legs, and after
  the hang-up the relay no longer knows the call and every port of its range is free;
* NAT: a phone whose SDP names an address it does not send from (127.0.0.99 while its RTP leaves
  from 127.0.0.1: a phone behind NAT that believes its public address; nothing leaves loopback)
  still has audio both ways: the relay latches onto the address the RTP comes from;
* failover: with two relays, the relay the latest call used is SIGKILLed while calls go on (one
  every ~0.3 s, hand-made UDP phones: a pjsua call takes longer than that to set up and check);
  every call set up from 2 s after the kill on has media through the survivor, both ways. The
  test prints (and records as the ``failover`` property) how many calls after the kill failed,
  when the first good one was placed and answered, and which calls paid the node's ng timeout.
  The latest call before the kill is left open across it: hanging it up afterwards still works.

The first two run through ``default_farm`` (what ``make run`` starts: one relay, the node
anchoring every call at the relays of the cluster). The failover builds its own farm with two
relays (``start_relay`` + ``SIPFARM_RELAYS`` before the node), named either in a static list
(a call starts on the relay a CRC-32 of its Call-ID picks) or as ``cluster`` (the least
loaded relay of the membership); ``SIPFARM_RELAY_TIMEOUT`` 0.5 s.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from fixtures.default_farm import DefaultFarm
from fixtures.farm import BalancerProcess, NodeProcess, SipClient, wait_nodes_usable
from fixtures.matrix import Cell
from fixtures.media_phones import (
    CALLEE_HOST,
    CALLER_HOST,
    in_dialog,
    phone_sdp,
    rtp,
    rtp_socket,
    sdp_target,
    send_invite,
    ssrc_of,
)
from fixtures.relay import RANGE, RelayProcess, ng_request, start_relay
from fixtures.startup import START_TIMEOUT_S

from sipfarm.sip.message import SipMessage, make_response

from .netns import skip_reason
from .softphone import EventPredicate, Softphone, SoftphoneError, dominant_frequency, tone_rms

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(START_TIMEOUT_S + 60),
]

CLIENT = "pjsua2"
RELAY_HOST = "127.0.0.1"  # start_relay's --media-address
NAT_ADDRESS = "127.0.0.99"  # what a NATed phone's SDP says; its RTP leaves from 127.0.0.1
ALICE_HZ = 660
BOB_HZ = 440
HZ_TOLERANCE = 5
MIN_RMS = 2000.0  # a 0.5 full-scale sine through G.711 is ~11600
SILENT_RMS = 300.0
LISTEN_S = 1.5
SETTLE_S = 0.4  # skipped at the start of a recording: jitter buffer
MIN_PACKETS = 40  # per leg at the relay after LISTEN_S of 50 packets/s each way
EVENT_S = 15.0  # one SIP step on a loaded two-core machine
FREED_S = 5.0  # the relay's metrics are synced once a second
PHONE_LIFETIME_S = 55.0
# failover
RELAY_TIMEOUT_S = 0.5  # SIPFARM_RELAY_TIMEOUT: the node's ng reply timeout
CALL_EVERY_S = 0.3
CALLS_BEFORE_KILL = 4
RUN_AFTER_KILL_S = 7.0  # past the node's 5 s suspect mark on the dead relay (relay_choice.SUSPECT_SECONDS)
FAILOVER_WITHIN_S = 2.0
BYE_WITHIN_S = 2.0  # hanging up a call whose relay died
RTP_COUNT = 10


# -- farms ------------------------------------------------------------------------------------------


@dataclass
class TwoRelayFarm:
    """A balancer, one node, and the two relays the node anchors every call at."""

    node: NodeProcess
    balancer: BalancerProcess
    relays: list[RelayProcess]
    accounts: dict[str, str]

    def logs(self) -> str:
        parts = [f"--- node log\n{self.node.log()[-4000:]}", f"--- balancer log\n{self.balancer.log()[-2000:]}"]
        parts += [f"--- relay {r.relay_id} log\n{r.log()[-2000:]}" for r in self.relays]
        return "\n".join(parts)


@pytest.fixture(params=["list", "cluster"], ids=["relay-list", "relays-of-the-cluster"])
def two_relay_farm(  # type: ignore[no-untyped-def]
    request, redis_url, accounts, start_node, start_balancer, tmp_path, monkeypatch
) -> Iterator[TwoRelayFarm]:
    relays: list[RelayProcess] = []
    try:
        while len(relays) < 2:
            relays.append(start_relay(redis_url, tmp_path))
        listed = ",".join(f"{r.ng[0]}:{r.ng[1]}" for r in relays)
        monkeypatch.setenv("SIPFARM_RELAYS", listed if request.param == "list" else "cluster")
        monkeypatch.setenv("SIPFARM_RELAY_TIMEOUT", str(RELAY_TIMEOUT_S))
        node = start_node(redis_url, "node1")
        balancer = start_balancer(redis_url, allow_loopback=True)
        wait_nodes_usable(balancer, 1)
        yield TwoRelayFarm(node, balancer, relays, dict(accounts))
    finally:
        for relay in relays:
            relay.stop()


# -- relay observations -------------------------------------------------------------------------------


def in_range(relay: RelayProcess, address: tuple[str, int]) -> bool:
    return address[0] == RELAY_HOST and relay.port_min <= address[1] < relay.port_min + RANGE


def query(relay: RelayProcess, call_id: str) -> dict[bytes, Any]:
    return ng_request(relay.ng, {"command": "query", "call-id": call_id})


def legs(reply: dict[bytes, Any]) -> dict[int, dict[bytes, Any]]:
    """The RTP stream of each tag of an ng query reply, by the relay port it receives on."""
    streams = [tag[b"medias"][0][b"streams"][0] for tag in reply[b"tags"].values()]
    return {int(s[b"local port"]): s for s in streams}


def free_ports(relay: RelayProcess) -> int:
    with urllib.request.urlopen(f"http://{relay.metrics}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "sipfarm_relay_free_ports":
            return int(float(value))
    raise AssertionError(f"no sipfarm_relay_free_ports in {relay.metrics}")


def eventually(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# -- phones ------------------------------------------------------------------------------------------


class Farm(Protocol):
    domain: str
    accounts: dict[str, str]

    def proxy(self, transport: str) -> str: ...

    def logs(self) -> str: ...


@contextlib.contextmanager
def phones(
    farm: Farm, tmp_path: Path, transport: str = "udp", **public: str | None
) -> Iterator[tuple[Softphone, Softphone]]:
    """alice and bob, registered over ``transport``, auto-answering, each playing its tone into
    every call; ``public``: a phone's media public address (``alice="127.0.0.99"``)."""
    with contextlib.ExitStack() as stack:
        started = []
        for name in ("alice", "bob"):
            phone = stack.enter_context(Softphone(name, max_lifetime=PHONE_LIFETIME_S, log_dir=tmp_path))
            phone.start(transport=transport)
            started.append(phone)
        for phone, hz in zip(started, (ALICE_HZ, BOB_HZ), strict=True):
            code = phone.register(
                farm.proxy(transport),
                phone.name,
                farm.domain,
                farm.accounts[phone.name],
                timeout=EVENT_S,
                media_public_address=public.get(phone.name),
            )
            assert code == 200, f"{phone.name} REGISTER: {code}\n{farm.logs()}"
            phone.auto_answer(True, 200)
            phone.play_tone(hz, next_call=True)
        yield started[0], started[1]


def is_call_state(state: str, call_id: int) -> EventPredicate:
    return lambda e: e["event"] == "call_state" and e["state"] == state and e["call_id"] == call_id


@dataclass
class Call:
    """One connected pjsua call between alice (caller) and bob (callee), and the SDPs involved."""

    alice_id: int
    bob_id: int
    call_id: str  # the SIP Call-ID
    alice_sent: str  # alice's own offer
    bob_sent: str  # bob's own answer
    alice_got: str  # the answer in the 200 alice received
    bob_got: str  # the offer in the INVITE bob received


def connect(farm: Farm, alice: Softphone, bob: Softphone) -> Call:
    """alice calls bob, who auto-answers; a failure says what both phones and the farm saw."""
    a_since, b_since = alice.mark(), bob.mark()
    try:
        return _connect(farm, alice, bob, a_since, b_since)
    except SoftphoneError as exc:
        seen = {phone.name: phone.events[since:][-8:] for phone, since in ((alice, a_since), (bob, b_since))}
        raise AssertionError(f"{exc}\nphones saw {seen}\n{farm.logs()}") from exc


def _connect(farm: Farm, alice: Softphone, bob: Softphone, a_since: int, b_since: int) -> Call:
    alice_id = alice.call(f"sip:bob@{farm.domain}")
    incoming = bob.wait_for(lambda e: e["event"] == "incoming_call", EVENT_S, b_since)
    bob_id = int(incoming["call_id"])
    confirmed = alice.wait_for(is_call_state("CONFIRMED", alice_id), EVENT_S, a_since)
    bob.wait_for(is_call_state("CONFIRMED", bob_id), EVENT_S, b_since)
    for phone, cid, since in ((alice, alice_id, a_since), (bob, bob_id, b_since)):
        phone.wait_for(lambda e, c=cid: e["event"] == "media_active" and e["call_id"] == c, EVENT_S, since)
    offered = alice.wait_for(lambda e: e["event"] == "sdp" and e["call_id"] == alice_id, EVENT_S, a_since)
    answered = alice.wait_for(
        lambda e: e["event"] == "rx_sdp" and e["call_id"] == alice_id and e["start_line"].startswith("SIP/2.0 200"),
        EVENT_S,
        a_since,
    )
    got = bob.wait_for(lambda e: e["event"] == "sdp" and e["call_id"] == bob_id, EVENT_S, b_since)
    return Call(
        alice_id,
        bob_id,
        str(confirmed["call_id_header"]),
        alice_sent=offered["local_sdp"],
        bob_sent=got["local_sdp"],
        alice_got=answered["sdp"],
        bob_got=got["remote_sdp"],
    )


def listen(alice: Softphone, bob: Softphone, call: Call, tmp_path: Path, label: str) -> tuple[float, float]:
    """Both phones record what they receive during the same LISTEN_S; (alice, bob) heard (RMS, Hz)."""
    ears = ((alice, call.alice_id, tmp_path / f"alice-{label}.wav"), (bob, call.bob_id, tmp_path / f"bob-{label}.wav"))
    marks = [phone.mark() for phone, _, _ in ears]
    for phone, cid, path in ears:
        phone.record(path, call_id=cid)
    time.sleep(LISTEN_S)
    for phone, cid, _ in ears:
        phone.stop_record(cid)
    for (phone, _, path), since in zip(ears, marks, strict=True):
        phone.wait_for(lambda e, p=str(path): e["event"] == "record_done" and e["path"] == p, EVENT_S, since)
    heard = []
    for _, _, path in ears:
        rms = tone_rms(path, skip_s=SETTLE_S)
        heard.append((round(rms), dominant_frequency(path) if rms > SILENT_RMS else 0.0))
    return heard[0], heard[1]


def assert_tone(heard: tuple[float, float], hz: int, who: str) -> None:
    rms, dominant = heard
    assert rms > MIN_RMS and abs(dominant - hz) <= HZ_TOLERANCE, f"{who}: heard RMS {rms} at {dominant} Hz, not {hz}"


def hang_up(alice: Softphone, bob: Softphone, call: Call, by: str = "alice") -> None:
    a_since, b_since = alice.mark(), bob.mark()
    if by == "alice":
        alice.hangup(call.alice_id)
    else:
        bob.hangup(call.bob_id)
    alice.wait_for(is_call_state("DISCONNECTED", call.alice_id), EVENT_S, a_since)
    bob.wait_for(is_call_state("DISCONNECTED", call.bob_id), EVENT_S, b_since)


def target(sdp: str) -> tuple[str, int]:
    return sdp_target(sdp.encode())


# -- a call through the relay --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "hanger"),
    [("udp", "alice"), ("tcp", "bob")],
    ids=["udp-caller-hangs-up", "tcp-callee-hangs-up"],
)
def test_call_media_through_the_relay_both_ways_and_freed_after_hangup(
    default_farm: DefaultFarm, matrix: Callable[..., Cell], tmp_path: Path, transport: str, hanger: str
) -> None:
    farm = default_farm
    relay = farm.relay
    cell = matrix(CLIENT, transport, "relay")
    assert free_ports(relay) == RANGE
    with phones(farm, tmp_path, transport) as (alice, bob):
        call = connect(farm, alice, bob)

        # each phone was told to send its RTP to the relay, each to its own port there
        alice_to, bob_to = target(call.alice_got), target(call.bob_got)
        assert in_range(relay, alice_to), f"alice's 200 names {alice_to}:\n{call.alice_got}"
        assert in_range(relay, bob_to), f"bob's INVITE names {bob_to}:\n{call.bob_got}"
        assert alice_to != bob_to
        assert target(call.alice_sent) != alice_to and target(call.bob_sent) != bob_to  # not end to end

        alice_heard, bob_heard = listen(alice, bob, call, tmp_path, "relayed")
        assert_tone(alice_heard, BOB_HZ, "alice")
        assert_tone(bob_heard, ALICE_HZ, "bob")
        # what each phone hears comes from the relay port it sends to (symmetric RTP)
        assert alice.stats(call.alice_id).peer == f"{alice_to[0]}:{alice_to[1]}"
        assert bob.stats(call.bob_id).peer == f"{bob_to[0]}:{bob_to[1]}"

        # the relay counted both legs: what alice sent arrived on her port, bob's on his
        reply = query(relay, call.call_id)
        assert reply[b"result"] == b"ok", reply
        streams = legs(reply)
        assert set(streams) == {alice_to[1], bob_to[1]}, reply
        for who, port in (("alice", alice_to[1]), ("bob", bob_to[1])):
            packets = streams[port][b"stats"][b"packets"]
            assert packets > MIN_PACKETS, f"{who}'s leg at the relay forwarded {packets} packets: {reply}"
        assert free_ports(relay) < RANGE

        hang_up(alice, bob, call, by=hanger)
    eventually(lambda: query(relay, call.call_id)[b"result"] == b"error", FREED_S, "the relay still holds the call")
    eventually(lambda: free_ports(relay) == RANGE, FREED_S, f"ports not returned: {free_ports(relay)} of {RANGE}")
    cell.ok("relay")


# -- NAT: the SDP names an address the phone does not send from --------------------------------------


@pytest.mark.parametrize("natted", ["alice", "bob"], ids=["caller-behind-nat", "callee-behind-nat"])
def test_phone_whose_sdp_names_another_address_has_audio_both_ways(
    default_farm: DefaultFarm, matrix: Callable[..., Cell], tmp_path: Path, natted: str
) -> None:
    farm = default_farm
    relay = farm.relay
    cell = matrix(CLIENT, "udp", "nat latching")
    with phones(farm, tmp_path, **{natted: NAT_ADDRESS}) as (alice, bob):
        call = connect(farm, alice, bob)
        sent, got = (call.alice_sent, call.alice_got) if natted == "alice" else (call.bob_sent, call.bob_got)
        natted_sdp = target(sent)
        assert natted_sdp[0] == NAT_ADDRESS, f"{natted}'s own SDP does not name {NAT_ADDRESS}:\n{sent}"
        relay_port = target(got)
        assert in_range(relay, relay_port), got

        alice_heard, bob_heard = listen(alice, bob, call, tmp_path, f"nat-{natted}")
        assert_tone(alice_heard, BOB_HZ, "alice")
        assert_tone(bob_heard, ALICE_HZ, "bob")

        # the relay answers the NATed phone where its RTP comes from, not where its SDP says
        reply = query(relay, call.call_id)
        leg = legs(reply)[relay_port[1]]
        endpoint = leg[b"endpoint"]
        assert (endpoint[b"address"], endpoint[b"port"]) == (b"127.0.0.1", natted_sdp[1]), reply
        hang_up(alice, bob, call)
    cell.ok("nat latching")
    cell.note("nat latching", f"SDP c={NAT_ADDRESS}, RTP from 127.0.0.1: the relay latches")


# -- failover: the relay of the latest call is killed while calls go on --------------------------------


@dataclass
class Attempt:
    started: float  # monotonic
    call_id: str
    status: int = 0  # final response to the INVITE (0: none)
    setup_s: float = 0.0  # INVITE sent (after the 407) to the final response
    relay: int | None = None  # index of the relay whose ports the SDPs name
    media: bool = False  # RTP both ways through the relay
    known_at: list[str] = field(default_factory=list)  # relays whose ng query knew the call, mid-call
    hang_up: Callable[[], tuple[int, float]] | None = None  # a call left open: BYE -> (final status, seconds)
    notes: list[str] = field(default_factory=list)


def recv_for(client: SipClient, call_id: str, want: Callable[[SipMessage], bool], timeout: float) -> SipMessage | None:
    """The first message of ``call_id`` that ``want`` accepts (others, from earlier calls, are dropped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = client.recv(left)
        if msg is None:
            return None
        if msg.call_id == call_id.encode() and want(msg):
            return msg
    return None


def place_call(
    farm: TwoRelayFarm, bob: SipClient, bob_rtp_host: str, ask: list[RelayProcess], *, keep_open: bool = False
) -> Attempt:
    """alice (a fresh UDP phone) calls bob through the balancer; bob answers; RTP both ways; the
    relays in ``ask`` are queried for the call; BYE (``keep_open``: later, by ``hang_up``)."""
    attempt = Attempt(time.monotonic(), secrets.token_hex(10))
    lb = farm.balancer.address
    alice, alice_rtp, bob_rtp = SipClient(CALLER_HOST), rtp_socket(CALLER_HOST), rtp_socket(bob_rtp_host)
    sockets = (alice, alice_rtp, bob_rtp)

    def bye(answered: SipMessage) -> tuple[int, float]:
        started = time.monotonic()
        try:
            alice.send(in_dialog(alice, "BYE", answered, 3), lb)
            got = recv_for(bob, attempt.call_id, lambda m: m.method == b"BYE", 3.0)
            if got is None:
                attempt.notes.append("no BYE at bob")
                return 0, time.monotonic() - started
            bob.send(make_response(got, 200), lb)
            final = alice.recv_final(3.0, call_id=attempt.call_id, method="BYE")
            return (final.status if final is not None else 0), time.monotonic() - started
        finally:
            for closable in sockets:
                closable.close()

    try:
        send_invite(alice, lb, phone_sdp(CALLER_HOST, alice_rtp.getsockname()[1]), attempt.call_id)
        invited = time.monotonic()
        invite = recv_for(bob, attempt.call_id, lambda m: m.method == b"INVITE", 5.0)
        if invite is None:
            final = alice.recv_final(3.0, call_id=attempt.call_id, cseq=2)
            attempt.status = final.status if final is not None else 0
            attempt.setup_s = time.monotonic() - invited
            attempt.notes.append("bob's phone did not ring")
            return attempt
        bob_to = sdp_target(invite.body)
        ok = make_response(
            invite,
            200,
            to_tag=secrets.token_hex(4).encode(),
            headers=(("contact", f"<sip:bob@{bob.host}:{bob.port}>"),),
            body=phone_sdp(bob_rtp_host, bob_rtp.getsockname()[1]),
            content_type=b"application/sdp",
            record_route=True,
        )
        bob.send(ok, lb)
        answered = alice.recv_final(5.0, call_id=attempt.call_id, cseq=2)
        attempt.status = answered.status if answered is not None else 0
        attempt.setup_s = time.monotonic() - invited
        if answered is None or answered.status != 200:
            return attempt
        alice_to = sdp_target(answered.body)
        alice.send(in_dialog(alice, "ACK", answered, 2), lb)
        owners = {i for i, r in enumerate(farm.relays) for a in (alice_to, bob_to) if in_range(r, a)}
        if len(owners) == 1:
            attempt.relay = owners.pop()
        else:
            attempt.notes.append(f"SDPs name {alice_to} and {bob_to}")
        # RTP both ways (the first packets latch each side), each phone's packets reach the other
        for seq in range(RTP_COUNT):
            alice_rtp.sendto(rtp(seq, 0xA1), alice_to)
            bob_rtp.sendto(rtp(seq, 0xB0B), bob_to)
            time.sleep(0.005)
        at_bob, at_alice = received(bob_rtp), received(alice_rtp)
        attempt.media = bool(at_bob) and bool(at_alice)
        attempt.media &= all(ssrc_of(p) == 0xA1 for p in at_bob) and all(ssrc_of(p) == 0xB0B for p in at_alice)
        if not attempt.media:
            attempt.notes.append(f"RTP: {len(at_bob)} at bob, {len(at_alice)} at alice")
        attempt.known_at = [r.relay_id for r in ask if query(r, attempt.call_id)[b"result"] == b"ok"]
        if keep_open:
            attempt.hang_up = lambda: bye(answered)
        else:
            bye(answered)
        return attempt
    finally:
        if attempt.hang_up is None:
            for closable in sockets:
                closable.close()


def received(sock: Any, within: float = 0.5) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and len(got) < RTP_COUNT:
        try:
            got.append(sock.recv(2048))
        except TimeoutError:
            if got:
                break
    return got


def failover_summary(
    victim: RelayProcess, survivor: RelayProcess, killed_at: float, after: list[Attempt], good: list[Attempt]
) -> str:
    """One line for the report: calls after the kill, the failed ones, the first good one, the slow ones."""

    def at(a: Attempt) -> str:
        return f"+{a.started - killed_at:.2f}s"

    failed = [f"{at(a)} {a.status} relay={a.relay} {a.notes}" for a in after if a not in good]
    slow = [f"{at(a)}: {a.setup_s:.2f} s" for a in after if a.setup_s > RELAY_TIMEOUT_S]
    first = min(good, key=lambda a: a.started) if good else None
    first_text = (
        "never" if first is None else f"placed {at(first)}, answered +{first.started + first.setup_s - killed_at:.2f}s"
    )
    return (
        f"killed {victim.relay_id}; {len(after)} calls after the kill, {len(failed)} without media through "
        f"{survivor.relay_id} {failed}; first good call {first_text}; {len(slow)} took over the ng timeout to "
        f"set up {slow}"
    )


def test_new_calls_get_media_through_the_other_relay_when_one_is_killed(
    two_relay_farm: TwoRelayFarm, record_property: Callable[[str, object], None]
) -> None:
    farm = two_relay_farm
    bob = SipClient(CALLEE_HOST)
    attempts: list[Attempt] = []
    hang_up_latest: Callable[[], tuple[int, float]] | None = None  # the call left open across the kill
    try:
        reply = bob.register(farm.balancer.address, "bob", farm.accounts["bob"])
        assert reply is not None and reply.status == 200, reply

        def call_paced(ask: list[RelayProcess], *, keep_open: bool = False) -> Attempt:
            if attempts:
                time.sleep(max(0.0, attempts[-1].started + CALL_EVERY_S - time.monotonic()))
            attempt = place_call(farm, bob, CALLEE_HOST, ask, keep_open=keep_open)
            attempts.append(attempt)
            return attempt

        for n in range(CALLS_BEFORE_KILL):
            call_paced(farm.relays, keep_open=n == CALLS_BEFORE_KILL - 1)
        latest = attempts[-1]
        hang_up_latest, latest.hang_up = latest.hang_up, None
        healthy = [a for a in attempts if a.status == 200 and a.media and a.relay is not None]
        assert len(healthy) == CALLS_BEFORE_KILL and hang_up_latest is not None, f"{attempts}\n{farm.logs()}"
        # the relay the latest call used (still up): the one whose ng query knew it during the call
        assert latest.relay is not None and latest.known_at == [farm.relays[latest.relay].relay_id], latest
        victim_index = latest.relay
        victim, survivor = farm.relays[victim_index], farm.relays[1 - victim_index]

        victim.process.kill()
        victim.process.wait(5)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < RUN_AFTER_KILL_S:
            call_paced([])
        # the call whose relay died can still be hung up: the BYE does not wait for the dead relay
        bye_status, bye_s = hang_up_latest()
        hang_up_latest = None

        after = [a for a in attempts if a.started >= killed_at]
        good = [a for a in after if a.status == 200 and a.media and a.relay == 1 - victim_index]
        late = [a for a in after if a.started - killed_at >= FAILOVER_WITHIN_S]
        summary = failover_summary(victim, survivor, killed_at, after, good)
        summary += f"; the call left on it hung up: {bye_status} in {bye_s:.2f} s"
        print(summary)
        record_property("failover", summary)
        assert late, "no call was placed 2 s after the kill"
        assert all(a in good for a in late), f"{summary}\n{farm.logs()}"
        assert good and min(a.started for a in good) - killed_at < FAILOVER_WITHIN_S, summary
        assert bye_status == 200 and bye_s < BYE_WITHIN_S, f"{summary}\n{farm.logs()}"
    finally:
        if hang_up_latest is not None:
            hang_up_latest()
        bob.close()
