"""``Softphone``: drive one pjsua2 agent process (``pjsua_agent.py``) from a test, plus WAV analysis.

The agent speaks JSON lines (see its docstring). This wrapper spawns it, sends commands and waits for
their replies, and keeps every event it emits in ``events`` so a test can ``wait_for`` one that may
have arrived before it started waiting. Each wait has a timeout; the context manager always ends the
process (``quit``, then kill).

Events are plain dicts with an ``"event"`` key:

* ``{"event": "reg_state", "code": 200, "reason": "OK", "expiration": 300, "active": true, "uri": ...}``
* ``{"event": "incoming_call", "call_id": 0, "remote_uri": ..., "local_uri": ..., "call_id_header": ...}``
* ``{"event": "call_state", "call_id": 0, "state": "CALLING|EARLY|CONNECTING|CONFIRMED|DISCONNECTED",
  "code": 200, "reason": "OK", "role": "UAC|UAS", "remote_uri": ..., "call_id_header": ...,
  "stats": {...}}`` (``stats`` only on DISCONNECTED, the last RTP totals seen)
* ``{"event": "media_active", "call_id": 0, "conf_slot": 1, "codec": "PCMU", "dir": ...}``
* ``{"event": "sdp", "call_id": 0, "local_sdp": ..., "remote_sdp": ...}`` (pjsua made its SDP;
  ``remote_sdp`` is the offer it answers, empty when it offers) and ``{"event": "rx_sdp", "call_id": 0,
  "method": "INVITE", "role": "UAC|UAS", "start_line": "SIP/2.0 200 OK", "sdp": ...}`` (a message of the
  call's transactions carried SDP: the answer in the 200 to our INVITE, an offer in a re-INVITE...)
* ``{"event": "tone_playing"|"recording"|"record_done", "call_id": 0, "path": ...}``
* ``{"event": "media_state", "call_id": 0, "status": "LOCAL_HOLD|REMOTE_HOLD|NONE|...", "dir": ...}``
* ``{"event": "tsx", "call_id": 0, "method": "REFER", "role": "UAC|UAS", "state": "COMPLETED|TERMINATED",
  "code": 202, "reason": ...}`` (in-dialog transactions)
* ``{"event": "xfer_status", "call_id": 0, "code": 200, "reason": "OK", "final": true}`` (a NOTIFY's
  sipfrag received by the transferor)
* ``{"event": "call_adopted", "call_id": 1, ...}``: a call pjsua started itself (the transferee's call
  to the REFER target, the call taking over a dialog by Replaces), then its ``call_state`` so far
* ``{"event": "message", "from_uri": ..., "to_uri": ..., "mime": "text/plain", "body": ...}`` (a
  MESSAGE received) and ``{"event": "message_status", "token": 1, "code": 200, "reason": ...}``
* ``{"event": "error", "where": ..., "error": ...}``, ``{"event": "exit", "reason": ...}``

WAV helpers (pure Python): ``tone_rms``, ``is_non_silent``, ``goertzel_power``, ``dominant_frequency``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from fixtures.startup import wait_started

Event = dict[str, Any]
EventPredicate = Callable[[Event], bool]

AGENT = Path(__file__).resolve().parent / "pjsua_agent.py"
DEFAULT_TIMEOUT_S = 10.0
QUIT_TIMEOUT_S = 8.0
SILENCE_RMS = 300.0
SIP_LOG_ENV = "SIPFARM_PEER_SIP_LOG"


class SoftphoneError(Exception):
    """The agent refused a command, died, or an awaited event did not come in time."""


@dataclass(frozen=True, slots=True)
class CallStats:
    call_id: int
    state: str
    rx_packets: int
    tx_packets: int
    rx_lost: int
    codec: str | None
    peer: str | None = None  # "host:port" the audio stream's RTP comes from ("-" before the first packet)


class Softphone:
    """One pjsua2 softphone in its own process.

    ``with Softphone("alice") as alice: alice.start(); alice.register(...)``
    """

    def __init__(
        self, name: str, *, max_lifetime: float = 300.0, log_dir: str | Path = "/tmp", python: str = sys.executable
    ) -> None:
        self.name = name
        self.events: list[Event] = []
        self.log_path = Path(log_dir) / f"sipfarm-peer-{name}-{os.getpid()}-{id(self):x}.log"
        self._cond = threading.Condition()
        self._replies: dict[int, Event] = {}
        self._next_id = 0
        self._closed = False
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [python, str(AGENT), "--name", name, "--max-lifetime", str(max_lifetime), "--tmp-dir", "/tmp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._reader = threading.Thread(target=self._read, name=f"softphone-{name}", daemon=True)
        self._reader.start()
        try:
            # the agent's first sign of life (Python up, pjsua2 imported): the start-up allowance,
            # not a step's timeout; it stops early if the agent exits (its reader sees EOF)
            wait_started(f"pjsua2 agent {name}", self.proc, self._ready, 'reports {"event": "ready"}',
                         log=self.log_path)  # fmt: skip
        except BaseException:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                msg = {"event": "garbage", "line": raw.decode(errors="replace")}
            with self._cond:
                if "reply" in msg and isinstance(msg.get("id"), int):
                    self._replies[msg["id"]] = msg
                else:
                    self.events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "eof", "returncode": self.proc.poll()})
            self._cond.notify_all()

    def command(self, cmd: str, timeout: float = DEFAULT_TIMEOUT_S, **params: Any) -> Event:
        """Send one command and return its reply; raise ``SoftphoneError`` if it failed."""
        if self._closed or self.proc.stdin is None:
            raise SoftphoneError(f"{self.name}: closed")
        with self._cond:
            self._next_id += 1
            cmd_id = self._next_id
        line = json.dumps({"cmd": cmd, "id": cmd_id, **params}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise SoftphoneError(f"{self.name}: agent gone ({exc}); log {self.log_path}") from exc
        deadline = time.monotonic() + timeout
        with self._cond:
            while cmd_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._dead():
                    raise SoftphoneError(f"{self.name}: no reply to {cmd} in {timeout} s; log {self.log_path}")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(cmd_id)
        if not reply.get("ok"):
            raise SoftphoneError(f"{self.name}: {cmd} failed: {reply.get('error')}")
        return reply

    def _ready(self) -> bool:
        with self._cond:
            return any(e["event"] == "ready" for e in self.events)

    def _dead(self) -> bool:
        return bool(self.events) and self.events[-1]["event"] == "eof"

    def mark(self) -> int:
        """The current length of ``events``: pass it as ``since`` to ignore what came before."""
        with self._cond:
            return len(self.events)

    def wait_for(self, predicate: EventPredicate, timeout: float = DEFAULT_TIMEOUT_S, since: int = 0) -> Event:
        """The first event from index ``since`` on that matches ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    index += 1
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self._dead():
                    recent = self.events[max(since, len(self.events) - 5) :]
                    raise SoftphoneError(
                        f"{self.name}: awaited event did not come in {timeout} s; "
                        f"recent events {recent}; log {self.log_path}"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_call_state(
        self, state: str, call_id: int | None = None, timeout: float = DEFAULT_TIMEOUT_S, since: int = 0
    ) -> Event:
        return self.wait_for(
            lambda e: (
                e["event"] == "call_state" and e["state"] == state and (call_id is None or e["call_id"] == call_id)
            ),
            timeout,
            since,
        )

    # -- commands ---------------------------------------------------------------------------------

    def start(
        self,
        port: int = 0,
        transport: str = "udp",
        bind: str = "127.0.0.1",
        codecs: tuple[str, ...] = ("PCMU", "PCMA"),
        sip_log: bool | None = None,
    ) -> int:
        """Create the endpoint and its SIP transport; returns the local SIP port.

        ``sip_log``: pjsua writes every SIP message to the agent's log (``log_path``, kept when not
        empty); by default on when the environment sets ``SIPFARM_PEER_SIP_LOG=1``.
        """
        if sip_log is None:
            sip_log = os.environ.get(SIP_LOG_ENV, "") == "1"
        reply = self.command("start", port=port, transport=transport, bind=bind, codecs=list(codecs), sip_log=sip_log)
        return int(reply["port"])

    def register(
        self,
        registrar: str,
        user: str,
        domain: str,
        password: str | None = None,
        *,
        transport: str | None = None,
        proxy: str | None = None,
        expires: int = 300,
        timeout: float = DEFAULT_TIMEOUT_S,
        media_public_address: str | None = None,
    ) -> int:
        """REGISTER user@domain at registrar ("host:port"); returns the final status code (200, 401...).

        ``proxy`` is the outbound proxy, by default the registrar, so calls go through it too.
        ``media_public_address``: the address this account's SDP names (c=) instead of the one its
        RTP leaves from, as a phone behind NAT that was told its public address (needs a password).
        """
        since = self.mark()
        params: dict[str, Any] = {
            "registrar": registrar,
            "user": user,
            "domain": domain,
            "expires": expires,
            "proxy": proxy if proxy is not None else registrar,
        }
        if password is not None:
            params["password"] = password
        if transport is not None:
            params["transport"] = transport
        if media_public_address is not None:
            params["media_public_address"] = media_public_address
        self.command("register", **params)
        event = self.wait_for(lambda e: e["event"] == "reg_state" and e["code"] >= 200, timeout, since)
        return int(event["code"])

    def reregister(self, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Refresh the registration now; the final status code of the refresh."""
        since = self.mark()
        self.command("reregister")
        event = self.wait_for(lambda e: e["event"] == "reg_state" and e["code"] >= 200, timeout, since)
        return int(event["code"])

    def auto_answer(self, enabled: bool = True, code: int = 200) -> None:
        self.command("auto_answer", enabled=enabled, code=code)

    def call(self, uri: str) -> int:
        """Start a call to ``uri`` through the registered account; returns its call id."""
        return int(self.command("call", uri=uri)["call_id"])

    def answer(self, call_id: int | None = None, code: int = 200) -> None:
        self.command("answer", call_id=call_id, code=code)

    def hangup(self, call_id: int | None = None, code: int | None = None) -> None:
        self.command("hangup", call_id=call_id, code=code)

    def hangup_all(self) -> None:
        self.command("hangup", all=True)

    def play_tone(self, hz: float, call_id: int | None = None, next_call: bool = False) -> None:
        """Play a sine tone into the call (or, with no call yet or ``next_call``, into later calls)."""
        self.command("play_tone", hz=hz, call_id=call_id, next_call=next_call)

    def record(self, path: str | Path, call_id: int | None = None, next_call: bool = False) -> None:
        """Record what the call receives into a WAV at ``path`` (finalised at hang-up: ``record_done``)."""
        self.command("record", path=str(path), call_id=call_id, next_call=next_call)

    def stop_record(self, call_id: int | None = None) -> None:
        self.command("stop_record", call_id=call_id)

    def hold(self, call_id: int | None = None) -> None:
        """Put the call on hold (re-INVITE with ``a=sendonly``); see ``media_state`` LOCAL_HOLD."""
        self.command("hold", call_id=call_id)

    def unhold(self, call_id: int | None = None) -> None:
        """Resume a held call (re-INVITE with ``a=sendrecv``); see ``media_active``."""
        self.command("unhold", call_id=call_id)

    def xfer(self, uri: str, call_id: int | None = None) -> None:
        """Blind transfer: REFER the far end to ``uri``; progress comes as ``xfer_status`` events."""
        self.command("xfer", uri=uri, call_id=call_id)

    def xfer_replaces(self, call_id: int, dest_call_id: int) -> None:
        """Attended transfer: REFER the far end of ``call_id`` to the far end of ``dest_call_id``
        with Replaces (the transfer target's new call takes over ``dest_call_id``)."""
        self.command("xfer_replaces", call_id=call_id, dest_call_id=dest_call_id)

    def message(self, uri: str, text: str, mime: str = "text/plain") -> int:
        """Send a MESSAGE; returns the token its ``message_status`` event carries."""
        return int(self.command("message", uri=uri, text=text, mime=mime)["token"])

    def wait_message_status(self, token: int, timeout: float = DEFAULT_TIMEOUT_S) -> Event:
        """The final ``message_status`` of the MESSAGE ``token`` (code >= 200)."""
        return self.wait_for(
            lambda e: e["event"] == "message_status" and e["token"] == token and e["code"] >= 200, timeout
        )

    def stats(self, call_id: int | None = None) -> CallStats:
        r = self.command("stats", call_id=call_id)
        return CallStats(
            call_id=int(r["call_id"]),
            state=str(r["state"]),
            rx_packets=int(r["rx_packets"]),
            tx_packets=int(r["tx_packets"]),
            rx_lost=int(r["rx_lost"]),
            codec=r["codec"],
            peer=r.get("peer"),
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> int | None:
        """Ask the agent to quit, kill it if it does not; returns its exit status."""
        if self._closed:
            return self.proc.returncode
        self._closed = True
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.write(b'{"cmd": "quit", "id": 0}\n')
                    self.proc.stdin.flush()
                    self.proc.stdin.close()
                try:
                    self.proc.wait(QUIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(QUIT_TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(QUIT_TIMEOUT_S)
            self._reader.join(QUIT_TIMEOUT_S)
            self._log.close()
            if self.proc.returncode == 0 and self.log_path.stat().st_size == 0:
                self.log_path.unlink()  # keep only logs that say something
        return self.proc.returncode

    def __enter__(self) -> Softphone:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- WAV analysis ---------------------------------------------------------------------------------


def read_wav_mono(path: str | Path) -> tuple[list[int], int]:
    """16-bit PCM samples (first channel) and the sample rate."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM is supported")
        channels = wav.getnchannels()
        rate = wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    samples = struct.unpack(f"<{len(raw) // 2}h", raw)
    return list(samples[::channels]), rate


def _rms(samples: list[int]) -> float:
    return math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0


def tone_rms(path: str | Path, skip_s: float = 0.0) -> float:
    """Root-mean-square level of a 16-bit WAV (full scale 32767), after skipping ``skip_s`` seconds."""
    samples, rate = read_wav_mono(path)
    return _rms(samples[int(skip_s * rate) :])


def is_non_silent(path: str | Path, threshold: float = SILENCE_RMS) -> bool:
    """True when the WAV's RMS level exceeds ``threshold`` (a 0.5 full-scale sine is ~11600)."""
    return tone_rms(path) > threshold


def _loudest_window(samples: list[int], size: int) -> list[int]:
    """The window of ``size`` samples (stepping by half a window) with the highest energy."""
    if len(samples) <= size:
        return samples
    best, best_energy = 0, -1.0
    for start in range(0, len(samples) - size + 1, size // 2):
        energy = float(sum(s * s for s in samples[start : start + size : 4]))
        if energy > best_energy:
            best, best_energy = start, energy
    return samples[best : best + size]


def goertzel_power(samples: Sequence[float], rate: int, hz: float) -> float:
    """Power of the ``hz`` component of ``samples`` (Goertzel algorithm, one DFT bin)."""
    coeff = 2.0 * math.cos(2.0 * math.pi * hz / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def _frange(lo: float, hi: float, step: float) -> Iterator[float]:
    n = int((hi - lo) / step)
    for i in range(n + 1):
        yield lo + i * step


def dominant_frequency(path: str | Path, lo: float = 100.0, hi: float = 3400.0, window_s: float = 0.25) -> float:
    """The strongest frequency (Hz, ~1 Hz precision) in the loudest ``window_s`` of a WAV.

    A coarse 10 Hz scan, then a 1 Hz scan around its peak; telephone band by default.
    """
    samples, rate = read_wav_mono(path)
    window = _loudest_window(samples, int(window_s * rate))
    if not window:
        raise ValueError(f"{path}: no samples")
    mean = sum(window) / len(window)
    centred = [s - mean for s in window]
    coarse = max(_frange(lo, hi, 10.0), key=lambda f: goertzel_power(centred, rate, f))
    return max(_frange(max(lo, coarse - 10), min(hi, coarse + 10), 1.0), key=lambda f: goertzel_power(centred, rate, f))
