"""Prove the pjsua2 peer against Kamailio: register, call, two-way tones, recordings, hang-up.

Not a pytest module (the name does not match ``test_*``). Run as root from the repo root:

    .venv/bin/python -m tests.peers.demo_kamailio [--transport udp|tcp] [--seconds 3]

It re-executes itself inside a loopback-only network namespace when not already in one. Exit status
0 when every check passed; a JSON summary goes to stdout. Files go under /tmp/sipfarm-demo-*.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# the peers import fixtures.startup (under pytest, tests/ is on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from .kamailio_registrar import KamailioRegistrar
from .netns import can_make_netns, in_loopback_netns, netns_command
from .softphone import Softphone, dominant_frequency, tone_rms

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}
ALICE_HZ = 660.0  # what alice plays, so what bob must hear
BOB_HZ = 440.0
FREQ_TOLERANCE_HZ = 5.0
MIN_RMS = 2000.0
MIN_PACKETS_PER_S = 40  # 20 ms ptime: 50/s


def run_demo(transport: str, seconds: float) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="sipfarm-demo-", dir="/tmp"))
    checks: dict[str, bool] = {}
    summary: dict[str, Any] = {"transport": transport, "dir": str(out), "checks": checks}
    with KamailioRegistrar(PASSWORDS) as kam, Softphone("alice", max_lifetime=120) as alice, \
            Softphone("bob", max_lifetime=120) as bob, Softphone("mallory", max_lifetime=60) as mallory:
        summary["kamailio"] = kam.hostport
        summary["ports"] = {"alice": alice.start(transport=transport), "bob": bob.start(transport=transport),
                            "mallory": mallory.start(transport=transport)}
        codes = {
            "alice": alice.register(kam.hostport, "alice", kam.domain, PASSWORDS["alice"]),
            "bob": bob.register(kam.hostport, "bob", kam.domain, PASSWORDS["bob"]),
            "mallory_as_alice_wrong_password": mallory.register(kam.hostport, "alice", kam.domain, "guess"),
        }
        summary["register"] = codes
        checks["register_ok"] = codes["alice"] == 200 and codes["bob"] == 200
        checks["wrong_password_rejected"] = codes["mallory_as_alice_wrong_password"] in (401, 403)

        bob.auto_answer(True, 200)
        alice.play_tone(ALICE_HZ, next_call=True)
        bob.play_tone(BOB_HZ, next_call=True)
        alice_wav, bob_wav = out / "alice-heard.wav", out / "bob-heard.wav"
        alice.record(alice_wav, next_call=True)
        bob.record(bob_wav, next_call=True)

        started = time.monotonic()
        call_id = alice.call(f"sip:bob@{kam.domain}")
        incoming = bob.wait_for(lambda e: e["event"] == "incoming_call", 10)
        alice.wait_call_state("CONFIRMED", call_id, 10)
        bob.wait_call_state("CONFIRMED", incoming["call_id"], 10)
        media = {"alice": alice.wait_for(lambda e: e["event"] == "media_active", 10),
                 "bob": bob.wait_for(lambda e: e["event"] == "media_active", 10)}
        summary["setup_s"] = round(time.monotonic() - started, 3)
        summary["codec"] = {who: ev["codec"] for who, ev in media.items()}
        time.sleep(seconds)
        stats = {"alice": alice.stats(call_id), "bob": bob.stats(incoming["call_id"])}
        summary["stats"] = {who: {"rx": s.rx_packets, "tx": s.tx_packets, "lost": s.rx_lost, "codec": s.codec}
                            for who, s in stats.items()}
        min_packets = int(MIN_PACKETS_PER_S * seconds)
        checks["rtp_both_ways"] = all(s.rx_packets >= min_packets and s.tx_packets >= min_packets
                                      for s in stats.values())
        checks["g711"] = all(s.codec in ("PCMU", "PCMA") for s in stats.values())

        alice.hangup(call_id)
        ends = {"alice": alice.wait_call_state("DISCONNECTED", call_id, 10),
                "bob": bob.wait_call_state("DISCONNECTED", incoming["call_id"], 10)}
        summary["disconnected"] = {who: {"code": e["code"], "reason": e["reason"]} for who, e in ends.items()}
        checks["both_disconnected"] = True
        for who, phone in (("alice", alice), ("bob", bob)):
            done = phone.wait_for(lambda e: e["event"] == "record_done", 10)
            summary.setdefault("recordings", {})[who] = done["path"]

    heard = {"alice": (alice_wav, BOB_HZ), "bob": (bob_wav, ALICE_HZ)}
    analysis: dict[str, Any] = {}
    for who, (wav, expected) in heard.items():
        rms = tone_rms(wav, skip_s=0.2)
        freq = dominant_frequency(wav)
        analysis[who] = {"rms": round(rms, 1), "dominant_hz": freq, "expected_hz": expected}
        checks[f"{who}_hears_tone"] = rms > MIN_RMS and abs(freq - expected) <= FREQ_TOLERANCE_HZ
    summary["analysis"] = analysis
    summary["agent_exit"] = {"alice": alice.proc.returncode, "bob": bob.proc.returncode,
                             "mallory": mallory.proc.returncode}
    checks["agents_exit_cleanly"] = all(code == 0 for code in summary["agent_exit"].values())
    summary["ok"] = all(checks.values())
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long the call carries audio")
    args = parser.parse_args()
    if not in_loopback_netns():
        if not can_make_netns():
            print("need root and unshare for a loopback-only network namespace", file=sys.stderr)
            return 2
        module = __spec__.name if __spec__ else "tests.peers.demo_kamailio"
        argv = netns_command([sys.executable, "-m", module, *sys.argv[1:]])
        os.execvp(argv[0], argv)
    summary = run_demo(args.transport, args.seconds)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
