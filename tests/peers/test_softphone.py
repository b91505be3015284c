"""The softphone peer itself: WAV analysis, call-dump parsing, the namespace probe, and a real call.

The call test needs the loopback-only network namespace (see netns.py) and Kamailio; it is skipped
with the reason otherwise. sipfarm's own media tests use ``Softphone`` the same way against sipfarm.
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest

from .kamailio_registrar import KAMAILIO, KamailioRegistrar
from .netns import NETNS_PREFIX, can_make_netns, in_loopback_netns, skip_reason
from .pjsua_agent import parse_call_dump
from .softphone import Softphone, dominant_frequency, goertzel_power, is_non_silent, read_wav_mono, tone_rms

HERE = Path(__file__).resolve().parent


def write_wav(path: Path, hz: float, seconds: float, rate: int, amplitude: float) -> None:
    n = int(seconds * rate)
    frames = b"".join(struct.pack("<h", round(amplitude * 32767 * math.sin(2 * math.pi * hz * i / rate)))
                      for i in range(n))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)


@pytest.mark.parametrize(("hz", "rate"), [(440.0, 8000), (660.0, 16000), (1000.0, 16000)])
def test_dominant_frequency_finds_the_tone(tmp_path: Path, hz: float, rate: int) -> None:
    wav = tmp_path / "tone.wav"
    write_wav(wav, hz, 0.5, rate, 0.5)
    assert abs(dominant_frequency(wav) - hz) <= 1.0
    assert tone_rms(wav) == pytest.approx(0.5 * 32767 / math.sqrt(2), rel=0.01)
    assert is_non_silent(wav)


def test_silence_is_silent(tmp_path: Path) -> None:
    wav = tmp_path / "silence.wav"
    write_wav(wav, 440.0, 0.5, 8000, 0.0)
    assert tone_rms(wav) == 0.0
    assert not is_non_silent(wav)


def test_goertzel_separates_two_tones(tmp_path: Path) -> None:
    wav = tmp_path / "tone.wav"
    write_wav(wav, 440.0, 0.25, 8000, 0.5)
    samples, rate = read_wav_mono(wav)
    assert goertzel_power(samples, rate, 440.0) > 1000 * goertzel_power(samples, rate, 660.0)


CALL_DUMP = """Call time: 00h:00m:03s, 1st res in 10 ms, conn in 12ms
  #0 audio PCMU @8kHz, sendrecv, peer=127.0.0.1:4002
     SRTP status: Not active Crypto-suite:
     RX pt=0, last update:00h:00m:00.012s ago
        total 150pkt 24.0KB (30.0KB +IP hdr) @avg=64.0Kbps/80.0Kbps
        pkt loss=2 (1.3%), discrd=0 (0.0%), dup=0 (0.0%), reord=0 (0.0%)
     TX pt=0, ptime=20, last update:00h:00m:00.005s ago
        total 151pkt 24.1KB (30.2KB +IP hdr) @avg=64.2Kbps/80.2Kbps
        pkt loss=0 (0.0%), dup=0 (0.0%), reord=0 (0.0%)
"""


def test_parse_call_dump() -> None:
    assert parse_call_dump(CALL_DUMP) == {
        "has_media": True, "rx_packets": 150, "tx_packets": 151, "rx_lost": 2, "codec": "PCMU"}
    assert parse_call_dump("")["has_media"] is False


@pytest.mark.skipif(not can_make_netns(), reason="needs root and unshare -n")
def test_netns_probe_agrees_with_unshare() -> None:
    probe = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import netns; "
             "print(netns.in_loopback_netns())", str(HERE)]
    inside = subprocess.run([*NETNS_PREFIX, *probe], capture_output=True, timeout=20, check=True)
    assert inside.stdout.strip() == b"True"


def test_agent_exits_when_stdin_closes() -> None:
    phone = Softphone("orphan", max_lifetime=30)
    assert phone.proc.stdin is not None
    phone.proc.stdin.close()
    try:
        assert phone.proc.wait(10) == 0
        assert phone.wait_for(lambda e: e["event"] == "exit", 5)["reason"] == "stdin closed"
    finally:
        phone.close()


def test_agent_exits_after_max_lifetime() -> None:
    with Softphone("ephemeral", max_lifetime=0.5) as phone:
        started = time.monotonic()
        assert phone.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        assert phone.wait_for(lambda e: e["event"] == "exit", 5)["reason"] == "max lifetime"


def test_agent_reports_bad_commands() -> None:
    with Softphone("confused", max_lifetime=30) as phone:
        with pytest.raises(Exception, match="unknown command"):
            phone.command("dance")
        with pytest.raises(Exception, match="not started"):
            phone.command("call", uri="sip:bob@127.0.0.1")


needs_netns = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
needs_kamailio = pytest.mark.skipif(shutil.which(KAMAILIO) is None, reason=f"{KAMAILIO} not installed")


@pytest.mark.softphone
@needs_netns
@needs_kamailio
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_two_softphones_talk_through_kamailio(tmp_path: Path, transport: str) -> None:
    assert in_loopback_netns()
    passwords = {"alice": "alice-pw", "bob": "bob-pw"}
    with KamailioRegistrar(passwords) as kam, Softphone("alice", max_lifetime=60) as alice, \
            Softphone("bob", max_lifetime=60) as bob, Softphone("eve", max_lifetime=60) as eve:
        for phone in (alice, bob, eve):
            phone.start(transport=transport)
        assert alice.register(kam.hostport, "alice", kam.domain, passwords["alice"]) == 200
        assert bob.register(kam.hostport, "bob", kam.domain, passwords["bob"]) == 200
        assert eve.register(kam.hostport, "bob", kam.domain, "wrong") in (401, 403)

        bob.auto_answer(True, 200)
        alice.play_tone(660, next_call=True)
        bob.play_tone(440, next_call=True)
        alice.record(tmp_path / "alice.wav", next_call=True)
        bob.record(tmp_path / "bob.wav", next_call=True)
        call_id = alice.call(f"sip:bob@{kam.domain}")
        incoming = bob.wait_for(lambda e: e["event"] == "incoming_call")
        alice.wait_call_state("CONFIRMED", call_id)
        sdp = alice.wait_for(lambda e: e["event"] == "sdp")
        assert "c=IN IP4 127.0.0.1" in sdp["local_sdp"]
        time.sleep(2)
        for stats in (alice.stats(call_id), bob.stats(incoming["call_id"])):
            assert stats.codec == "PCMU"
            assert stats.rx_packets >= 80 and stats.tx_packets >= 80
        alice.hangup(call_id)
        bob.wait_call_state("DISCONNECTED", incoming["call_id"])
        alice.wait_call_state("DISCONNECTED", call_id)
        for phone in (alice, bob):
            phone.wait_for(lambda e: e["event"] == "record_done")

    assert alice.proc.returncode == 0 and bob.proc.returncode == 0
    assert tone_rms(tmp_path / "alice.wav", skip_s=0.2) > 2000
    assert abs(dominant_frequency(tmp_path / "alice.wav") - 440) <= 5
    assert abs(dominant_frequency(tmp_path / "bob.wav") - 660) <= 5
