"""The pjsua2 cells of the client matrix: a real softphone's call features through the default farm.

Every phone is a pjsua2 agent (``pjsua_agent.py``, one process each) that registers with digest
auth at the balancer of ``default_farm`` only, over UDP or TCP (pjsua2-pybind11 has no TLS
transport: a note in the matrix, not a cell). Each test asserts what the users would notice and
marks the feature in its matrix cell right after:

* register, call, audio, hold: 200 to REGISTER; the callee rings (incoming call, 180 at the
  caller) and answers (CONFIRMED on both sides); each side plays its own tone and records the
  other, and the recording holds that tone; held, the holder hears silence (the held phone
  answers the sendonly re-INVITE with recvonly and stops sending), resumed, both tones again;
* blind and attended transfer: the transferee's new call to the third party connects with audio
  both ways, and the transferor's calls end;
* early media, busy, no answer: a 183 with SDP plays the callee's tone before any 200; 486 ends
  the call with 486; a call nobody answers is given up by the caller (487 to both);
* forking cancel: two devices of one account both ring, the caller hangs up, both stop ringing;
* message: a MESSAGE reaches a registered user's phone; to an offline user it gets 480.

Tones go through G.711 (PCMU), recordings are analysed with ``dominant_frequency`` and
``tone_rms``. Waits are generous (a loaded two-core machine), each phone is a context manager.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.default_farm import DefaultFarm
from fixtures.matrix import Cell
from fixtures.startup import START_TIMEOUT_S

from .netns import skip_reason
from .softphone import EventPredicate, Softphone, dominant_frequency, tone_rms

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(START_TIMEOUT_S + 90),
]

TRANSPORTS = ["udp", "tcp"]
CLIENT = "pjsua2"
ALICE_HZ = 660
BOB_HZ = 440
CAROL_HZ = 550
HZ_TOLERANCE = 5
MIN_RMS = 2000.0  # a 0.5 full-scale sine through G.711 is ~11600
SILENT_RMS = 300.0  # what a stream that stopped sending leaves in a recording: ~0
LISTEN_S = 1.5  # each recording
SETTLE_S = 0.4  # skipped at the start of a recording: jitter buffer, stream restart after a re-INVITE
EVENT_S = 15.0  # any one SIP step; ~20 ms on an idle loopback, seconds on a loaded 2-core machine
GIVE_UP_S = 3.0  # how long the caller lets an unanswered call ring
PHONE_LIFETIME_S = 80.0  # an agent left behind by a crashed test still exits
NO_TLS = "pjsua2-pybind11 0.1a3 has no TLS transport (PJSIP_EUNSUPTRANSPORT)"


# -- helpers ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def phones(farm: DefaultFarm, transport: str, tmp_path: Path, *names: str) -> Iterator[dict[str, Softphone]]:
    """Started and registered agents, by name; ``bob-2`` registers as ``bob`` (a second device)."""
    with contextlib.ExitStack() as stack:
        started: dict[str, Softphone] = {}
        for name in names:
            phone = stack.enter_context(Softphone(name, max_lifetime=PHONE_LIFETIME_S, log_dir=tmp_path))
            phone.start(transport=transport)
            started[name] = phone
        for name, phone in started.items():
            user = name.split("-", 1)[0]
            code = phone.register(farm.proxy(transport), user, farm.domain, farm.accounts[user], timeout=EVENT_S)
            assert code == 200, f"{name} REGISTER: {code}\n{farm.logs()}"
        yield started


def aor(farm: DefaultFarm, user: str) -> str:
    return f"sip:{user}@{farm.domain}"


def is_call_state(state: str, call_id: int | None = None, code: int | None = None) -> EventPredicate:
    return lambda e: (
        e["event"] == "call_state"
        and e["state"] == state
        and (call_id is None or e["call_id"] == call_id)
        and (code is None or e["code"] == code)
    )


def listen(*ears: tuple[Softphone, int, Path], seconds: float = LISTEN_S) -> list[tuple[float, float]]:
    """Record what each (phone, call id, WAV path) receives, all during the same ``seconds``;
    returns (RMS, dominant Hz) of each recording, in order."""
    marks = [phone.mark() for phone, _, _ in ears]
    for phone, call_id, path in ears:
        phone.record(path, call_id=call_id)
    time.sleep(seconds)
    for phone, call_id, _ in ears:
        phone.stop_record(call_id)
    for (phone, _, path), since in zip(ears, marks, strict=True):
        phone.wait_for(lambda e, p=str(path): e["event"] == "record_done" and e["path"] == p, EVENT_S, since)
    return [heard(path) for _, _, path in ears]


def heard(path: Path) -> tuple[float, float]:
    rms = tone_rms(path, skip_s=SETTLE_S)
    return round(rms), (dominant_frequency(path) if rms > SILENT_RMS else 0.0)


def assert_tone(what: tuple[float, float], hz: int, who: str) -> None:
    rms, dominant = what
    assert rms > MIN_RMS and abs(dominant - hz) <= HZ_TOLERANCE, f"{who}: heard RMS {rms} at {dominant} Hz, not {hz}"


def connect(caller: Softphone, callee: Softphone, uri: str) -> tuple[int, int]:
    """``caller`` calls ``uri``; ``callee`` (auto-answering 200) picks up. Returns both call ids."""
    caller_since, callee_since = caller.mark(), callee.mark()
    call_id = caller.call(uri)
    incoming = callee.wait_for(lambda e: e["event"] == "incoming_call", EVENT_S, callee_since)
    caller.wait_for(is_call_state("CONFIRMED", call_id), EVENT_S, caller_since)
    callee.wait_for(is_call_state("CONFIRMED", incoming["call_id"]), EVENT_S, callee_since)
    for phone, cid, since in ((caller, call_id, caller_since), (callee, incoming["call_id"], callee_since)):
        phone.wait_for(lambda e, c=cid: e["event"] == "media_active" and e["call_id"] == c, EVENT_S, since)
    return call_id, int(incoming["call_id"])


# -- register, call, audio, hold ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_with_audio_and_hold(default_farm: DefaultFarm, matrix, tmp_path: Path, transport: str) -> None:
    cell: Cell = matrix(CLIENT, transport, "register", "call", "audio", "hold")
    if transport == "tcp":
        cell.note("register", NO_TLS)
    with phones(default_farm, transport, tmp_path, "alice", "bob") as p:
        alice, bob = p["alice"], p["bob"]
        cell.ok("register")
        alice.play_tone(ALICE_HZ, next_call=True)
        bob.play_tone(BOB_HZ, next_call=True)

        # bob's phone rings (180) until he picks up
        call_id = alice.call(aor(default_farm, "bob"))
        incoming = bob.wait_for(lambda e: e["event"] == "incoming_call", EVENT_S)
        bob_call = int(incoming["call_id"])
        alice.wait_for(is_call_state("EARLY", call_id, code=180), EVENT_S)
        bob.answer(bob_call, 200)
        alice.wait_for(is_call_state("CONFIRMED", call_id), EVENT_S)
        bob.wait_for(is_call_state("CONFIRMED", bob_call), EVENT_S)
        cell.ok("call")

        alice_heard, bob_heard = listen(
            (alice, call_id, tmp_path / "alice-talk.wav"), (bob, bob_call, tmp_path / "bob-talk.wav")
        )
        assert_tone(alice_heard, BOB_HZ, "alice")
        assert_tone(bob_heard, ALICE_HZ, "bob")
        cell.ok("audio")

        since_alice, since_bob = alice.mark(), bob.mark()
        alice.hold(call_id)
        alice.wait_for(lambda e: e["event"] == "media_state" and e["status"] == "LOCAL_HOLD", EVENT_S, since_alice)
        bob.wait_for(lambda e: e["event"] == "media_state" and e["status"] == "REMOTE_HOLD", EVENT_S, since_bob)
        # bob's phone answered recvonly and stops sending; alice's phone mutes its microphone
        alice_heard, bob_heard = listen(
            (alice, call_id, tmp_path / "alice-held.wav"), (bob, bob_call, tmp_path / "bob-held.wav")
        )
        assert bob_heard[0] < SILENT_RMS, f"bob still hears alice while she holds: RMS {bob_heard[0]}"
        assert alice_heard[0] < SILENT_RMS, f"alice still hears bob while he is held: RMS {alice_heard[0]}"

        since_alice, since_bob = alice.mark(), bob.mark()
        alice.unhold(call_id)
        alice.wait_for(lambda e: e["event"] == "media_active" and e["call_id"] == call_id, EVENT_S, since_alice)
        bob.wait_for(lambda e: e["event"] == "media_active" and e["call_id"] == bob_call, EVENT_S, since_bob)

        alice_heard, bob_heard = listen(
            (alice, call_id, tmp_path / "alice-resumed.wav"), (bob, bob_call, tmp_path / "bob-resumed.wav")
        )
        assert_tone(alice_heard, BOB_HZ, "alice after resume")
        assert_tone(bob_heard, ALICE_HZ, "bob after resume")
        cell.ok("hold")

        since = bob.mark()
        alice.hangup(call_id)
        assert bob.wait_for(is_call_state("DISCONNECTED", bob_call), EVENT_S, since)["code"] == 200


# -- blind and attended transfer ----------------------------------------------------------------------


def transferred_call(phone: Softphone, since: int) -> int:
    """The call pjsua started on its own (transferee's call to the target, or the Replaces take-over)."""
    return int(phone.wait_for(lambda e: e["event"] == "call_adopted", EVENT_S, since)["call_id"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blind_and_attended_transfer(default_farm: DefaultFarm, matrix, tmp_path: Path, transport: str) -> None:
    cell: Cell = matrix(CLIENT, transport, "blind transfer", "attended transfer")
    with phones(default_farm, transport, tmp_path, "alice", "bob", "carol") as p:
        alice, bob, carol = p["alice"], p["bob"], p["carol"]
        for phone, hz in ((alice, ALICE_HZ), (bob, BOB_HZ), (carol, CAROL_HZ)):
            phone.auto_answer(True, 200)
            phone.play_tone(hz, next_call=True)

        # blind: bob REFERs alice to carol, then hangs up when the NOTIFY says carol answered
        alice_bob, bob_alice = connect(alice, bob, aor(default_farm, "bob"))
        since_alice, since_bob, since_carol = alice.mark(), bob.mark(), carol.mark()
        bob.xfer(aor(default_farm, "carol"), bob_alice)
        alice_carol = transferred_call(alice, since_alice)
        carol_alice = int(carol.wait_for(lambda e: e["event"] == "incoming_call", EVENT_S, since_carol)["call_id"])
        alice.wait_for(is_call_state("CONFIRMED", alice_carol), EVENT_S, since_alice)
        carol.wait_for(is_call_state("CONFIRMED", carol_alice), EVENT_S, since_carol)
        status = bob.wait_for(lambda e: e["event"] == "xfer_status" and e["final"], EVENT_S, since_bob)
        assert status["code"] == 200, status
        bob.hangup(bob_alice)
        assert alice.wait_for(is_call_state("DISCONNECTED", alice_bob), EVENT_S, since_alice)["code"] == 200
        alice_heard, carol_heard = listen(
            (alice, alice_carol, tmp_path / "alice-hears-carol.wav"),
            (carol, carol_alice, tmp_path / "carol-hears-alice.wav"),
        )
        assert_tone(alice_heard, CAROL_HZ, "alice (blind transfer)")
        assert_tone(carol_heard, ALICE_HZ, "carol (blind transfer)")
        cell.ok("blind transfer")
        since = carol.mark()
        alice.hangup(alice_carol)
        carol.wait_for(is_call_state("DISCONNECTED", carol_alice), EVENT_S, since)

        # attended: bob consults carol, then REFERs alice to carol with Replaces naming that call
        alice_bob, bob_alice = connect(alice, bob, aor(default_farm, "bob"))
        bob_carol, carol_bob = connect(bob, carol, aor(default_farm, "carol"))
        since_alice, since_bob, since_carol = alice.mark(), bob.mark(), carol.mark()
        bob.xfer_replaces(bob_alice, bob_carol)
        alice_carol = transferred_call(alice, since_alice)
        carol_alice = transferred_call(carol, since_carol)
        alice.wait_for(is_call_state("CONFIRMED", alice_carol), EVENT_S, since_alice)
        carol.wait_for(is_call_state("CONFIRMED", carol_alice), EVENT_S, since_carol)
        # carol's phone ends the replaced consultation call by itself (RFC 3891 3)
        bob.wait_for(is_call_state("DISCONNECTED", bob_carol), EVENT_S, since_bob)
        carol.wait_for(is_call_state("DISCONNECTED", carol_bob), EVENT_S, since_carol)
        status = bob.wait_for(lambda e: e["event"] == "xfer_status" and e["final"], EVENT_S, since_bob)
        assert status["code"] == 200, status
        bob.hangup(bob_alice)
        alice.wait_for(is_call_state("DISCONNECTED", alice_bob), EVENT_S, since_alice)
        alice_heard, carol_heard = listen(
            (alice, alice_carol, tmp_path / "alice-hears-carol-2.wav"),
            (carol, carol_alice, tmp_path / "carol-hears-alice-2.wav"),
        )
        assert_tone(alice_heard, CAROL_HZ, "alice (attended transfer)")
        assert_tone(carol_heard, ALICE_HZ, "carol (attended transfer)")
        cell.ok("attended transfer")
        since = carol.mark()
        alice.hangup(alice_carol)
        carol.wait_for(is_call_state("DISCONNECTED", carol_alice), EVENT_S, since)


# -- early media, busy, no answer ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_early_media_busy_and_no_answer(default_farm: DefaultFarm, matrix, tmp_path: Path, transport: str) -> None:
    cell: Cell = matrix(CLIENT, transport, "early media", "busy", "no answer")
    bob_uri = aor(default_farm, "bob")
    with phones(default_farm, transport, tmp_path, "alice", "bob") as p:
        alice, bob = p["alice"], p["bob"]
        bob.play_tone(BOB_HZ, next_call=True)

        # early media: bob's phone answers 183 with SDP and plays its tone (an announcement)
        bob.auto_answer(True, 183)
        since_alice, since_bob = alice.mark(), bob.mark()
        call_id = alice.call(bob_uri)
        bob_call = int(bob.wait_for(lambda e: e["event"] == "incoming_call", EVENT_S, since_bob)["call_id"])
        alice.wait_for(is_call_state("EARLY", call_id, code=183), EVENT_S, since_alice)
        alice.wait_for(lambda e: e["event"] == "media_active" and e["call_id"] == call_id, EVENT_S, since_alice)
        (early,) = listen((alice, call_id, tmp_path / "alice-early.wav"))
        assert_tone(early, BOB_HZ, "alice before the answer")
        assert not [e for e in alice.events[since_alice:] if e["event"] == "call_state" and e["state"] == "CONFIRMED"]
        bob.answer(bob_call, 200)
        alice.wait_for(is_call_state("CONFIRMED", call_id), EVENT_S, since_alice)
        cell.ok("early media")
        alice.hangup(call_id)
        bob.wait_for(is_call_state("DISCONNECTED", bob_call), EVENT_S, since_bob)

        # busy: bob's phone declines with 486
        bob.auto_answer(True, 486)
        since_alice, since_bob = alice.mark(), bob.mark()
        call_id = alice.call(bob_uri)
        bob.wait_for(lambda e: e["event"] == "incoming_call", EVENT_S, since_bob)
        ended = alice.wait_for(is_call_state("DISCONNECTED", call_id), EVENT_S, since_alice)
        assert ended["code"] == 486, ended
        cell.ok("busy")

        # no answer: bob's phone rings; the farm's own limits are far off (Timer C 180 s, a serial
        # fork group 30 s), so alice gives up: CANCEL, 487 to her INVITE, bob stops ringing
        bob.auto_answer(False)
        since_alice, since_bob = alice.mark(), bob.mark()
        call_id = alice.call(bob_uri)
        bob_call = int(bob.wait_for(lambda e: e["event"] == "incoming_call", EVENT_S, since_bob)["call_id"])
        alice.wait_for(is_call_state("EARLY", call_id, code=180), EVENT_S, since_alice)
        time.sleep(GIVE_UP_S)
        alice.hangup(call_id)
        ended = alice.wait_for(is_call_state("DISCONNECTED", call_id), EVENT_S, since_alice)
        assert ended["code"] == 487, ended
        stopped = bob.wait_for(is_call_state("DISCONNECTED", bob_call), EVENT_S, since_bob)
        assert stopped["code"] == 487, stopped
        cell.ok("no answer")
        cell.note("no answer", "the caller gives up (487): the farm's Timer C is 180 s")


# -- forking: CANCEL while two devices of one account ring ----------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_while_two_devices_ring(default_farm: DefaultFarm, matrix, tmp_path: Path, transport: str) -> None:
    cell: Cell = matrix(CLIENT, transport, "forking cancel")
    with phones(default_farm, transport, tmp_path, "alice", "bob", "bob-2") as p:
        alice, devices = p["alice"], (p["bob"], p["bob-2"])
        marks = [device.mark() for device in devices]
        since_alice = alice.mark()
        call_id = alice.call(aor(default_farm, "bob"))
        rings = [
            int(device.wait_for(lambda e: e["event"] == "incoming_call", EVENT_S, since)["call_id"])
            for device, since in zip(devices, marks, strict=True)
        ]
        alice.wait_for(is_call_state("EARLY", call_id, code=180), EVENT_S, since_alice)
        alice.hangup(call_id)
        ended = alice.wait_for(is_call_state("DISCONNECTED", call_id), EVENT_S, since_alice)
        assert ended["code"] == 487, ended
        for device, ring, since in zip(devices, rings, marks, strict=True):
            stopped = device.wait_for(is_call_state("DISCONNECTED", ring), EVENT_S, since)
            assert stopped["code"] == 487, (device.name, stopped)
            assert not [e for e in device.events[since:] if e["event"] == "call_state" and e["state"] == "CONFIRMED"]
        cell.ok("forking cancel")


# -- MESSAGE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_message(default_farm: DefaultFarm, matrix, tmp_path: Path, transport: str) -> None:
    cell: Cell = matrix(CLIENT, transport, "message")
    text = f"hello bob over {transport}, from alice"
    with phones(default_farm, transport, tmp_path, "alice", "bob") as p:
        alice, bob = p["alice"], p["bob"]
        token = alice.message(aor(default_farm, "bob"), text)
        received = bob.wait_for(lambda e: e["event"] == "message", EVENT_S)
        assert received["body"] == text and "alice@" in received["from_uri"], received
        assert alice.wait_message_status(token, EVENT_S)["code"] == 200
        # carol has no phone registered: the farm does not keep messages for later
        token = alice.message(aor(default_farm, "carol"), "are you there, carol?")
        offline = alice.wait_message_status(token, EVENT_S)
        assert offline["code"] == 480, offline
        cell.ok("message")
        cell.note("message", "offline user: 480, the farm stores no messages")
