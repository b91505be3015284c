"""One pyVoIP 1.6.8 phone in its own process, driven by its arguments, reporting JSON lines.

pyVoIP runs a thread per socket (SIP receive, RTP send and receive, re-REGISTER timers) that
do not all stop cleanly, so each phone is a process: ``PyvoipPhone`` (below) starts
``python pyvoip_phone.py ...``, reads its events and always ends it (a watchdog in the phone
exits after ``--lifetime`` seconds too).

pyVoIP has no outbound proxy setting: it sends every SIP message to the host it takes as its
domain. The phone is configured with ``farm.test`` as its server and a socket class that sends
what is addressed to ``farm.test`` to the balancer instead (the test's DNS). Everything is bound
to ``--ip`` (pyVoIP binds 0.0.0.0 unless given an address): SIP, RTP and SDP stay on loopback.

Modes:

* ``answer``: answers an incoming call, plays a ``--tone-hz`` sine (8-bit PCM, G.711 on the
  wire) for ``--talk-s`` seconds and records what it receives into ``--wav``; then hangs up
  itself (``--hangup``) or waits for the caller's BYE;
* ``busy``: declines an incoming call (486 Busy Here);
* ``call``: calls ``--target`` (a user name in the domain) and reports what became of it.

Events (one JSON object a line, key ``event``): ``registered`` / ``register_failed``,
``incoming``, ``answered``, ``denied``, ``heard`` (``wav``, ``bytes``), ``hung_up``, ``ended``
(the far end's BYE came), ``no_bye``, ``call_state`` (outgoing), ``error``, ``exit``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

RATE = 8000
AMPLITUDE = 100  # of 127: 8-bit unsigned PCM around 128, as pyVoIP reads and writes it


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def route_domain_to(domain: str, proxy: tuple[str, int]) -> None:
    """Sends to ``(domain, port)`` go to ``proxy`` instead: the phone's only way to a proxy."""

    class ProxySocket(socket.socket):
        def sendto(self, data: Any, *args: Any) -> int:  # type: ignore[override]
            address = args[-1]
            if isinstance(address, tuple) and address[0] == domain:
                args = (*args[:-1], proxy)
            trace("sent to", args[-1], data)
            return super().sendto(data, *args)

        def recv(self, size: int, *args: Any) -> bytes:
            data = super().recv(size, *args)
            trace("received", None, data)
            return data

    socket.socket = ProxySocket  # type: ignore[misc]


def trace(what: str, address: object, data: bytes) -> None:
    """SIP messages (not RTP) on stderr, the phone's log."""
    if data[:1].isalpha():
        sys.stderr.write(f"--- {what} {address or ''} at {time.monotonic():.3f}\n{data.decode(errors='replace')}\n")
        sys.stderr.flush()


def sine(hz: float, seconds: float) -> bytes:
    """8-bit unsigned PCM at 8 kHz."""
    return bytes(128 + round(AMPLITUDE * math.sin(2 * math.pi * hz * i / RATE)) for i in range(int(seconds * RATE)))


def write_wav(path: Path, pcm8: bytes) -> None:
    """8-bit unsigned samples as a 16-bit mono WAV (what the WAV helpers of softphone.py read)."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(b"".join(((b - 128) << 8).to_bytes(2, "little", signed=True) for b in pcm8))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True, help="host:port of the balancer")
    parser.add_argument("--domain", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--ip", required=True)
    parser.add_argument("--sip-port", type=int, required=True)
    parser.add_argument("--rtp-port", type=int, required=True, help="first of 10 RTP ports")
    parser.add_argument("--mode", choices=("answer", "busy", "call", "idle"), required=True)
    parser.add_argument("--tone-hz", type=float, default=660.0)
    parser.add_argument("--talk-s", type=float, default=2.0)
    parser.add_argument("--wav", default="")
    parser.add_argument("--hangup", action="store_true")
    parser.add_argument("--target", default="")
    parser.add_argument("--lifetime", type=float, default=40.0)
    parser.add_argument("--codecs", default="", help="answer with these only (PCMU,PCMA), not every one offered")
    args = parser.parse_args()

    def watchdog() -> None:
        time.sleep(args.lifetime)
        emit("exit", reason="lifetime")
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    host, port = args.proxy.rsplit(":", 1)
    route_domain_to(args.domain, (host, int(port)))

    import pyVoIP  # noqa: PLC0415 - after the socket patch
    from pyVoIP.VoIP import CallState, VoIPCall, VoIPPhone  # noqa: PLC0415

    if args.codecs:
        wanted = [pyVoIP.RTP.PayloadType[name] for name in args.codecs.split(",")]
        pyVoIP.RTPCompatibleCodecs = [*wanted, pyVoIP.RTP.PayloadType.EVENT]

    done = threading.Event()

    def on_call(call: VoIPCall) -> None:
        try:
            emit("incoming", from_=call.request.headers["From"]["raw"], call_id=call.call_id)
            if args.mode == "busy":
                call.deny()
                emit("denied")
                return
            call.answer()
            emit("answered")
            call.write_audio(sine(args.tone_hz, args.talk_s + 1))
            deadline = time.monotonic() + args.talk_s
            while time.monotonic() < deadline and call.state == CallState.ANSWERED:
                time.sleep(0.05)
            heard = call.read_audio(int(args.talk_s * RATE), blocking=False)
            if args.wav:
                write_wav(Path(args.wav), heard)
            emit("heard", wav=args.wav, bytes=len(heard))
            if args.hangup and call.state == CallState.ANSWERED:
                call.hangup()
                emit("hung_up")
            else:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and call.state == CallState.ANSWERED:
                    time.sleep(0.05)
                emit("ended" if call.state == CallState.ENDED else "no_bye")
        except Exception as exc:
            emit("error", where="call", error=repr(exc))
        finally:
            done.set()

    phone = VoIPPhone(
        args.domain, int(port), args.user, args.password, myIP=args.ip, callCallback=on_call,
        sipPort=args.sip_port, rtpPortLow=args.rtp_port, rtpPortHigh=args.rtp_port + 9,
    )  # fmt: skip
    try:
        phone.start()  # REGISTER (its 401 round trip) before it returns
    except Exception as exc:
        emit("register_failed", error=repr(exc))
        return 1
    emit("registered", status=str(phone.get_status()))
    if args.mode == "call":
        result: dict[str, Any] = {}

        def place() -> None:
            try:
                call = phone.call(args.target)
                result["call"] = call
            except Exception as exc:
                result["error"] = repr(exc)

        caller = threading.Thread(target=place, daemon=True)
        caller.start()
        caller.join(5)
        if "error" in result or "call" not in result:
            emit("call_state", state="failed", error=result.get("error", "INVITE got no answer pyVoIP understands"))
        else:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and result["call"].state == CallState.DIALING:
                time.sleep(0.05)
            emit("call_state", state=str(result["call"].state))
    elif args.mode != "idle":
        done.wait(args.lifetime)
    else:
        time.sleep(args.lifetime)
    emit("exit", reason="done")
    os._exit(0)  # pyVoIP's threads (re-REGISTER timer, receivers) would keep the process alive


class PyvoipPhone:
    """A phone process (this file as a script); ``events`` fills as it reports; always ended."""

    def __init__(self, name: str, workdir: Path, argv: list[str]) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.log_path = workdir / f"pyvoip-{name}.log"
        self._cond = threading.Condition()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )  # fmt: skip
        threading.Thread(target=self._read, name=f"pyvoip-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "garbage", "line": raw.decode(errors="replace")}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "eof"})
            self._cond.notify_all()

    def wait_for(self, *names: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first event named one of ``names`` (or ``eof``), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if event["event"] in (*names, "eof"):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"event": "timeout", "waited_for": names}
                self._cond.wait(left)

    def log(self) -> str:
        with self._cond:
            events = list(self.events)
        code = self.proc.poll()
        state = f"running (pid {self.proc.pid})" if code is None else f"exited with status {code}"
        return f"process {state}; events {events}; stderr: {self.log_path.read_text(errors='replace')[-2000:]}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
