"""A whole call between two pjsua2 softphones, with a tone each way: the shared e2e check.

alice registers at ``alice_registrar``, bob at ``bob_registrar`` (a node or the balancer), both
with digest auth; alice calls bob, bob auto-answers; each side plays its own tone (alice 660 Hz,
bob 440 Hz) and records the other, so a recording proves audio crossed in that direction; alice
hangs up and both see the call end.  Raises AssertionError (or SoftphoneError) on any failure.
"""

from __future__ import annotations

import time
from pathlib import Path

from .softphone import Softphone, dominant_frequency, tone_rms

DOMAIN = "farm.test"
ALICE_HZ = 660
BOB_HZ = 440
TALK_S = 3.0
HZ_TOLERANCE = 5
MIN_RMS = 2000.0  # a 0.5 full-scale sine through G.711 is ~11600; silence is ~0
PHONE_LIFETIME_S = 45.0  # an agent left behind by a crashed test still exits
RING_TIMEOUT_S = 5.0  # call setup takes ~15 ms on loopback


def call_with_tones(
    alice_registrar: str, bob_registrar: str, transport: str, passwords: dict[str, str], tmp_path: Path
) -> dict[str, tuple[int, float]]:
    """Run the call; returns what each side heard: {name: (RMS, dominant Hz)}."""
    alice_wav, bob_wav = tmp_path / "alice-heard.wav", tmp_path / "bob-heard.wav"
    with (
        Softphone("alice", max_lifetime=PHONE_LIFETIME_S, log_dir=tmp_path) as alice,
        Softphone("bob", max_lifetime=PHONE_LIFETIME_S, log_dir=tmp_path) as bob,
    ):
        alice.start(transport=transport)
        bob.start(transport=transport)
        assert alice.register(alice_registrar, "alice", DOMAIN, passwords["alice"]) == 200
        assert bob.register(bob_registrar, "bob", DOMAIN, passwords["bob"]) == 200

        bob.auto_answer(True, 200)
        alice.play_tone(ALICE_HZ, next_call=True)
        bob.play_tone(BOB_HZ, next_call=True)
        alice.record(alice_wav, next_call=True)
        bob.record(bob_wav, next_call=True)
        call_id = alice.call(f"sip:bob@{DOMAIN}")
        incoming = bob.wait_for(lambda e: e["event"] == "incoming_call", RING_TIMEOUT_S)
        confirmed = alice.wait_call_state("CONFIRMED", call_id)
        assert confirmed["code"] == 200
        bob.wait_call_state("CONFIRMED", incoming["call_id"])
        answer = bob.wait_for(lambda e: e["event"] == "sdp")  # bob's answer to alice's offer
        assert "c=IN IP4 127.0.0.1" in answer["remote_sdp"]
        assert "c=IN IP4 127.0.0.1" in answer["local_sdp"]
        time.sleep(TALK_S)
        alice_stats, bob_stats = alice.stats(call_id), bob.stats(incoming["call_id"])

        alice.hangup(call_id)
        # bob's DISCONNECTED means the BYE crossed the farm along the Record-Route set
        bob_end = bob.wait_call_state("DISCONNECTED", incoming["call_id"])
        alice_end = alice.wait_call_state("DISCONNECTED", call_id)
        for phone in (alice, bob):
            phone.wait_for(lambda e: e["event"] == "record_done")

    assert alice.proc.returncode == 0 and bob.proc.returncode == 0
    assert alice_end["code"] == 200, alice_end
    assert bob_end["code"] == 200, bob_end
    for stats in (alice_stats, bob_stats):
        assert stats.codec in ("PCMU", "PCMA")
        # 50 packets a second for ~3 s each way
        assert stats.rx_packets >= 100 and stats.tx_packets >= 100, stats
    heard = {
        name: (round(tone_rms(wav, skip_s=0.2)), dominant_frequency(wav))
        for name, wav in (("alice", alice_wav), ("bob", bob_wav))
    }
    print(f"{transport}: heard (RMS, Hz) {heard}; alice {alice_stats}; bob {bob_stats}")
    assert heard["alice"][0] > MIN_RMS and heard["bob"][0] > MIN_RMS, heard
    assert abs(heard["alice"][1] - BOB_HZ) <= HZ_TOLERANCE, heard
    assert abs(heard["bob"][1] - ALICE_HZ) <= HZ_TOLERANCE, heard
    return heard
