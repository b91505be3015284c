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

from .netns import skip_reason
from .softphone import Softphone, dominant_frequency, tone_rms

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(90),
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


def is_call_state(state: str, call_id: int | None = None, code: int | None = None) -> object:
    return lambda e: (
        e["event"] == "call_state"
        and e["state"] == state
        and (call_id is None or e["call_id"] == call_id)
        and (code is None or e["code"] == code)
    )


def listen(phone: Softphone, call_id: int, path: Path, seconds: float = LISTEN_S) -> tuple[float, float]:
    """Record what ``call_id`` receives for ``seconds``; returns (RMS, dominant Hz) of the recording."""
    since = phone.mark()
    phone.record(path, call_id=call_id)
    time.sleep(seconds)
    phone.stop_record(call_id)
    phone.wait_for(lambda e: e["event"] == "record_done" and e["path"] == str(path), EVENT_S, since)
    return heard(path)


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


def hang_up_everything(*phones_: Softphone) -> None:
    for phone in phones_:
        with contextlib.suppress(Exception):
            phone.hangup_all()


# -- register, call, audio, hold ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_with_audio_and_hold(default_farm: DefaultFarm, matrix, tmp_path: Path, transport: str) -> None:
    cell: Cell = matrix(CLIENT, transport, "register", "call", "audio", "hold")
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

        assert_tone(listen(alice, call_id, tmp_path / "alice-talk.wav"), BOB_HZ, "alice")
        assert_tone(listen(bob, bob_call, tmp_path / "bob-talk.wav"), ALICE_HZ, "bob")
        cell.ok("audio")

        since_alice, since_bob = alice.mark(), bob.mark()
        alice.hold(call_id)
        alice.wait_for(lambda e: e["event"] == "media_state" and e["status"] == "LOCAL_HOLD", EVENT_S, since_alice)
        bob.wait_for(lambda e: e["event"] == "media_state" and e["status"] == "REMOTE_HOLD", EVENT_S, since_bob)
        # bob's phone answered recvonly and stops sending; alice's phone mutes its microphone
        held = listen(bob, bob_call, tmp_path / "bob-held.wav")
        assert held[0] < SILENT_RMS, f"bob still hears alice while she holds: RMS {held[0]}"
        held = listen(alice, call_id, tmp_path / "alice-held.wav")
        assert held[0] < SILENT_RMS, f"alice still hears bob while he is held: RMS {held[0]}"

        since_alice, since_bob = alice.mark(), bob.mark()
        alice.unhold(call_id)
        alice.wait_for(lambda e: e["event"] == "media_active" and e["call_id"] == call_id, EVENT_S, since_alice)
        bob.wait_for(lambda e: e["event"] == "media_active" and e["call_id"] == bob_call, EVENT_S, since_bob)

        assert_tone(listen(alice, call_id, tmp_path / "alice-resumed.wav"), BOB_HZ, "alice after resume")
        assert_tone(listen(bob, bob_call, tmp_path / "bob-resumed.wav"), ALICE_HZ, "bob after resume")
        cell.ok("hold")

        since = bob.mark()
        alice.hangup(call_id)
        assert bob.wait_for(is_call_state("DISCONNECTED", bob_call), EVENT_S, since)["code"] == 200
