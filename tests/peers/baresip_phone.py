"""``BaresipPhone``: one baresip 1.0.0 softphone (Debian ``baresip-core``) driven over ``ctrl_tcp``.

Each phone gets its own config directory (``baresip -f DIR``) with only the modules a headless
test needs: ``g711`` (PCMU/PCMA), ``ausine`` as the microphone (a sine at the phone's own
frequency), ``aubridge`` as a null speaker, ``sndfile`` (dumps what is sent and what is heard to
``dump-<time>-enc.wav`` / ``-dec.wav``), ``stdio`` (a UI: what ``menu`` shows, a received
MESSAGE among it, reaches the log), ``account`` (reads ``accounts``), ``contact`` (reads
``contacts``; its ``message`` command sends to the first), ``menu`` (``dial``, ``hangup``,
``accept``, ``hold``, ``resume``, ``transfer``, ``audio_debug``, ``reginfo``...) and ``ctrl_tcp``.

Control is netstring-framed JSON on ``ctrl_tcp_listen``: ``{"command", "params", "token"}`` in,
``{"response": true, "ok", "data", "token"}`` and ``{"event": true, "class", "type", ...}`` out
(REGISTER_OK, REGISTER_FAIL, CALL_INCOMING, CALL_ESTABLISHED, CALL_CLOSED...). Events sent before
the test connects are lost, so registration is read by polling ``reginfo`` as well.

Quirks of baresip 1.0.0 (see also /work/shared/PEERS.md):

* ``ausine`` refuses anything but 48 kHz stereo: ``ausrc_srate 48000``, ``ausrc_channels 2``.
* ``sip_listen 127.0.0.1:P`` opens UDP and TCP on P and TLS on P + 1: phones are spaced apart.
* ``net_interface`` takes an address (127.0.0.1), not an interface name.
* A 401 with two WWW-Authenticate headers (MD5 and SHA-256) fails the REGISTER with
  "Function not implemented" (libre's digest code knows only MD5 and gives up on the first
  challenge it cannot answer).
* A re-INVITE (hold, resume) rebuilds the receiving audio pipeline without the sndfile filter:
  nothing heard after it is dumped. ``audio_debug`` still reports the stream: direction
  (``dir=recvonly``), packets received (``rcvd=``), seconds of audio and level (``audio_level``).
* ``hold`` stops sending altogether (a=sendonly, but no RTP).
* ``answermode early`` answers 183 with SDP and starts receiving only: it sends no early audio.
* A received MESSAGE is no ctrl_tcp event; ``menu`` prints it (``sip:alice@d: "text"``) to a UI.
* libre 1.1.0 checks no TLS server certificate (``sip_cafile`` or not).
* ``;sipnat=outbound`` (RFC 5626) needs the ``uuid`` module (``+sip.instance``); it reads
  DIR/uuid with ``fgets``, so a trailing newline would land inside ``+sip.instance``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from fixtures.startup import StartupError, wait_started

from sipfarm.ports import free_port

BARESIP = "/usr/bin/baresip"
MODULE_PATH = "/usr/lib/baresip/modules"
DEFAULT_TIMEOUT_S = 10.0
QUIT_TIMEOUT_S = 5.0
STATUS_LINE = re.compile(r"^\s*\[\d+:\d\d:\d\d\] audio=")

Event = dict[str, Any]


class BaresipError(Exception):
    """baresip died, refused a command, or an awaited event did not come in time."""


START_ATTEMPTS = 3  # baresip started again on new ports when one was taken meanwhile
PORTS_SETTLE_S = 3.0  # how long its modules take to load, at most


def _free_port_pair() -> int:
    """A port P with P (UDP + TCP) and P + 1 (TCP, baresip's TLS listener) free on 127.0.0.1."""
    for _ in range(50):
        port = free_port("127.0.0.1", udp=True, tcp=True)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise BaresipError("no free port pair on 127.0.0.1")


def _netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class BaresipPhone:
    """One baresip process with one account.

    ``with BaresipPhone("alice", tmp_path, tone_hz=660) as alice:
    alice.start("alice", "pw", "farm.test", "127.0.0.1:5060"); alice.wait_registered()``
    """

    def __init__(self, name: str, workdir: Path, *, tone_hz: int, max_lifetime_s: int = 55) -> None:
        self.name = name
        self.tone_hz = tone_hz
        self.max_lifetime_s = max_lifetime_s
        self.dir = workdir / f"baresip-{name}"
        self.dump_dir = self.dir / "dumps"
        self.log_path = self.dir / "baresip.log"
        self.events: list[Event] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.aor = ""
        self.sip_port = 0
        self._sock: socket.socket | None = None
        self._cond = threading.Condition()
        self._responses: dict[str, Event] = {}
        self._next_token = 0
        self._reader: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(
        self,
        user: str,
        password: str,
        domain: str,
        proxy: str,
        *,
        transport: str = "udp",
        answermode: str = "auto",
        cafile: Path | None = None,
        contacts: tuple[str, ...] = (),
        sipnat: str | None = None,
        instance: str | None = None,
        regint: int = 600,
    ) -> None:
        """Write the config and account, start baresip and connect to its control port.

        ``proxy`` is HOST:PORT of the registrar (the balancer); every request goes through it,
        over ``transport`` (udp, tcp or tls; ``cafile`` is the CA to check the balancer's TLS
        certificate with). ``answermode``: ``auto`` answers at once, ``manual`` rings until
        ``accept()`` or ``hangup()`` (a reject). ``contacts``: SIP URIs, the first one is where
        ``message()`` sends.

        RFC 5626 outbound: ``sipnat="outbound"`` makes the REGISTER carry ``reg-id`` and
        ``Supported: gruu, outbound, path``, and libre keep the flow alive (STUN on UDP, CRLF on
        streams) when the 200 has ``Require: outbound``, at its ``Flow-Timer``. It needs a
        ``+sip.instance``: ``instance`` is the UUID (``urn:uuid:`` + it), loaded by baresip's
        ``uuid`` module from the config dir. ``regint``: the registration interval asked for.
        """
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        # ports are probed free, then bound by baresip: another process (a parallel test's
        # farm or phone) may take one in between, and baresip then runs without it, its
        # ctrl_tcp port answered by whoever holds it. Seen, it starts again on new ports.
        for attempt in range(START_ATTEMPTS):
            last = attempt == START_ATTEMPTS - 1
            try:
                self._spawn(
                    user, domain, password, proxy, transport, cafile, contacts, answermode, regint, sipnat, instance
                )
            except BaresipError:
                if last or "Address already in use" not in self.log():
                    raise
                self._stop_process()  # it quit: its SIP port was taken
                continue
            if self._own_ports():
                break
            self._stop_process()
            if last:
                raise BaresipError(f"{self.name}: its ports were taken {START_ATTEMPTS} times: {self.log()[-1500:]}")
        assert self._sock is not None
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name=f"baresip-{self.name}", daemon=True)
        self._reader.start()

    def _spawn(
        self,
        user: str,
        domain: str,
        password: str,
        proxy: str,
        transport: str,
        cafile: Path | None,
        contacts: tuple[str, ...],
        answermode: str,
        regint: int,
        sipnat: str | None,
        instance: str | None,
    ) -> None:
        """Start baresip on ports probed free and connect to its ctrl_tcp port."""
        sip_port = self.sip_port = _free_port_pair()
        ctrl_port = free_port("127.0.0.1", tcp=True)
        rtp_low = free_port("127.0.0.1", udp=True) & ~1
        self.aor = f"sip:{user}@{domain}"
        (self.dir / "config").write_text(self._config(sip_port, ctrl_port, rtp_low, cafile, instance))
        if instance is not None:
            # the uuid module loads it; no newline: fgets would keep it in +sip.instance
            (self.dir / "uuid").write_text(instance)
        outbound = f"sip:{proxy};transport={transport}"
        nat = f";sipnat={sipnat}" if sipnat else ""
        (self.dir / "accounts").write_text(
            f'<{self.aor}>;auth_pass={password};outbound="{outbound}"{nat};answermode={answermode};'
            f"regint={regint};audio_codecs=PCMU,PCMA;ptime=20\n"
        )
        (self.dir / "contacts").write_text("".join(f"<{uri}>\n" for uri in contacts))
        log = self.log_path.open("wb")
        env = {**os.environ, "HOME": str(self.dir)}
        # -t: baresip quits on its own even if a crashed test never closes it. stdin is a pipe
        # nobody writes to: the stdio module needs a pollable stdin (it prints what menu shows,
        # received MESSAGEs among it, into the log)
        self.proc = subprocess.Popen(
            [BARESIP, "-f", str(self.dir), "-t", str(self.max_lifetime_s)],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir,
        )  # fmt: skip
        log.close()

        def connected() -> bool:
            try:
                self._sock = socket.create_connection(("127.0.0.1", ctrl_port), timeout=1)
            except OSError:
                return False
            return True

        try:
            wait_started(f"baresip {self.name}", self.proc, connected, f"ctrl_tcp accepts on 127.0.0.1:{ctrl_port}",
                         log=self.log_path)  # fmt: skip
        except StartupError as exc:
            raise BaresipError(str(exc)) from None

    def _own_ports(self) -> bool:
        """baresip bound every port it was given (its log says so once its modules loaded)."""
        deadline = time.monotonic() + PORTS_SETTLE_S
        while time.monotonic() < deadline:
            text = self.log()
            if "Address already in use" in text:
                return False
            if "Populated" in text and "audio filter" in text:  # the last module lines
                return True
            time.sleep(0.05)
        return "Address already in use" not in self.log()

    def _stop_process(self) -> None:
        """Kill a baresip that could not bind its ports, to start it again."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(QUIT_TIMEOUT_S)
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc = None

    def _config(
        self, sip_port: int, ctrl_port: int, rtp_low: int, cafile: Path | None, instance: str | None = None
    ) -> str:
        lines = [
            ("poll_method", "epoll"),
            ("sip_listen", f"127.0.0.1:{sip_port}"),
            ("net_interface", "127.0.0.1"),
            ("call_local_timeout", "30"),
            ("call_max_calls", "4"),
            ("audio_player", "aubridge,speaker"),
            ("audio_source", f"ausine,{self.tone_hz}"),
            ("audio_alert", "aubridge,alert"),
            ("ausrc_srate", "48000"),
            ("ausrc_channels", "2"),
            ("auplay_srate", "48000"),
            ("auplay_channels", "2"),
            ("audio_level", "yes"),  # audio_debug reports the received level (dBov)
            ("rtp_ports", f"{rtp_low}-{rtp_low + 20}"),
            ("rtcp_mux", "no"),
            ("jitter_buffer_delay", "1-10"),
            ("rtp_stats", "yes"),
            ("module_path", MODULE_PATH),
            ("module", "g711.so"),
            ("module", "ausine.so"),
            ("module", "aubridge.so"),
            ("module", "sndfile.so"),
            ("module", "stdio.so"),  # a UI: menu's output (a received MESSAGE) reaches the log
            ("module_app", "account.so"),
            ("module_app", "contact.so"),  # the message command (to the current contact)
            ("module_app", "menu.so"),  # dial, hangup, reginfo, accept, hold, resume, transfer
            ("module_app", "ctrl_tcp.so"),
            ("ctrl_tcp_listen", f"127.0.0.1:{ctrl_port}"),
            ("snd_path", str(self.dump_dir)),
        ]
        if cafile is not None:
            lines.append(("sip_cafile", str(cafile)))
        if instance is not None:
            # loaded before the accounts: sets the UUID behind +sip.instance (from DIR/uuid)
            lines.insert(lines.index(("module_app", "account.so")), ("module_tmp", "uuid.so"))
        return "".join(f"{key}\t{value}\n" for key, value in lines)

    def log(self) -> str:
        """baresip's output without the call status line that ``menu`` redraws ten times a second."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(line for line in re.split(r"[\r\n]+", text) if not STATUS_LINE.match(line))

    def rtp_packets(self) -> tuple[int, int]:
        """(sent, received) RTP packets of the last call, from the summary ``rtp_stats yes`` prints
        when a call ends."""
        found = re.findall(r"^packets:\s+(\d+)\s+(\d+)", self.log(), re.MULTILINE)
        if not found:
            raise BaresipError(f"{self.name}: no RTP summary in the log: {self.log()[-1500:]}")
        sent, received = found[-1]
        return int(sent), int(received)

    def close(self) -> None:
        """Quit baresip (kill it if it lingers); safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(_netstring(json.dumps({"command": "quit", "token": "quit"}).encode()))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(QUIT_TIMEOUT_S)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(QUIT_TIMEOUT_S)
        if self.proc.stdin is not None:
            # only once baresip is gone: at EOF its stdin would be readable forever (a busy loop)
            self.proc.stdin.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self._reader is not None:
            self._reader.join(2)

    def __enter__(self) -> BaresipPhone:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- control channel ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        assert self._sock is not None
        buffer = b""
        while True:
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self.events.append({"event": True, "type": "CTRL_CLOSED"})
                    self._cond.notify_all()
                return
            buffer += chunk
            while (colon := buffer.find(b":")) > 0:
                length = int(buffer[:colon])
                end = colon + 1 + length
                if len(buffer) < end + 1:
                    break
                message = json.loads(buffer[colon + 1 : end])
                buffer = buffer[end + 1 :]
                with self._cond:
                    if message.get("response"):
                        self._responses[str(message.get("token"))] = message
                    else:
                        message["t"] = time.monotonic()
                        self.events.append(message)
                    self._cond.notify_all()

    def command(self, command: str, params: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """Run a baresip command (``dial``, ``hangup``, ``reginfo``...); its text output."""
        assert self._sock is not None, "start() first"
        with self._cond:
            self._next_token += 1
            token = f"{self.name}-{self._next_token}"
        payload = {"command": command, "params": params, "token": token}
        self._sock.sendall(_netstring(json.dumps(payload).encode()))
        deadline = time.monotonic() + timeout
        with self._cond:
            while token not in self._responses:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BaresipError(f"{self.name}: no response to {command!r}: {self.log()[-1500:]}")
                self._cond.wait(left)
            response = self._responses.pop(token)
        if not response.get("ok"):
            raise BaresipError(f"{self.name}: {command!r} failed: {response}")
        return str(response.get("data", ""))

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = DEFAULT_TIMEOUT_S) -> Event:
        """The first event (received at any time) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [e.get("type") for e in self.events]
                    raise BaresipError(f"{self.name}: event not seen in {timeout} s (saw {seen}): {self.log()[-1500:]}")
                self._cond.wait(min(left, 0.2))

    def wait_event(self, kind: str, timeout: float = DEFAULT_TIMEOUT_S) -> Event:
        return self.wait_for(lambda e: e.get("type") == kind, timeout)

    # -- phone actions --------------------------------------------------------------------------

    def registration(self, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """``OK`` once registered, or the failure baresip reports ("Function not implemented"...).

        REGISTER_OK/REGISTER_FAIL may come before the control connection exists, so ``reginfo``
        is polled too (its line for the account ends in OK or ERR).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                for event in self.events:
                    if event.get("type") == "REGISTER_OK":
                        return "OK"
                    if event.get("type") == "REGISTER_FAIL":
                        return str(event.get("param", "REGISTER_FAIL"))
            info = re.sub(r"\x1b\[[0-9;]*m", "", self.command("reginfo"))
            for line in info.splitlines():
                if self.aor in line:
                    if re.search(r"\bOK\b", line):
                        return "OK"
                    if "ERR" in line:
                        return line.strip()
            time.sleep(0.1)
        raise BaresipError(f"{self.name}: no registration outcome in {timeout} s: {self.log()[-1500:]}")

    def dial(self, uri: str) -> None:
        self.command("dial", uri)

    def hangup(self) -> None:
        """End the current call; a call still ringing here is rejected (486 Rejected)."""
        self.command("hangup")

    def accept(self) -> None:
        self.command("accept")

    def hold(self) -> None:
        """re-INVITE with a=sendonly; baresip stops sending audio while the call is held."""
        self.command("hold")

    def resume(self) -> None:
        self.command("resume")

    def transfer(self, uri: str) -> None:
        """Blind transfer: REFER the other party of the current call to ``uri``."""
        self.command("transfer", uri)

    def message(self, text: str) -> None:
        """SIP MESSAGE (text/plain) to the first of ``start(contacts=...)``."""
        self.command("message", text)

    def received_messages(self) -> list[tuple[str, str]]:
        """(sender, text) of each MESSAGE received, as menu prints them: ``sip:a@d: "text"``."""
        return re.findall(r'^\s*(sips?:\S+): "(.*)"$', self.log(), re.MULTILINE)

    def audio_debug(self) -> str:
        """baresip's audio stream report of the current call (direction, RTP and jitter figures)."""
        return self.command("audio_debug")

    def dumps(self, direction: str) -> list[Path]:
        """sndfile's WAV files: ``"dec"`` is what the phone heard, ``"enc"`` what it sent."""
        return sorted(self.dump_dir.glob(f"dump-*-{direction}.wav"))
