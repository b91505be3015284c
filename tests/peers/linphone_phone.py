"""``LinphonePhone``: linphonec 5.1 (Debian ``linphone-cli``) headless, driven on stdin.

Each phone has its own HOME and rc file and runs as ``stdbuf -oL linphonec -c <rc> -d 6 -l <log>``
(``stdbuf``: linphonec's stdout is a pipe here, block-buffered without it; ``-d 6 -l``: liblinphone's
full log, every SIP message among it, in ``linphone.log``). The rc has one account (``[proxy_0]``:
REGISTER and every request through the balancer, ``reg_route`` keeping in-dialog requests there
too) with its password (``[auth_info_0]``), the SIP port of the transport used (the others 0:
unused), video off.

Commands: ``call URI``, ``answer``, ``terminate`` (BYE, CANCEL of a ringing call, or a decline of
an incoming one), ``pause``, ``resume``, ``transfer``, ``chat URI "text"``, ``autoanswer enable``,
``states proxies`` (registration state), ``soundcard use files``, ``play F``, ``record F``,
``unregister``, ``quit``. Lines the tests wait for: ``Receiving new incoming call from``,
``Call N with ... connected.``, ``Call N with ... ended``, ``paused``/``resumed``, and a received
MESSAGE as ``Message received from <uri>: text``.

Quirks found driving it against sipfarm (2026-12-02):

* Registration is only shown on demand: ``states proxies`` is polled until
  ``LinphoneRegistrationOk`` (or ``Failed``).
* With a sound card absent, ``soundcard use files`` then ``play F`` (the microphone: a WAV file)
  and ``record F`` (the speaker) give working media; without them the daemon segfaulted a few
  seconds into every call (/work/shared/PEERS.md).
* ``[misc] tone_indications=0``: otherwise it freezes for ~7 s after each call, playing a
  call-ended tone to no sound card.
* ``auto_net_state_mon=0``: a namespace with only ``lo`` reads as "network down" and it would
  never register.
* TLS: ``verify_server_certs=0`` (mbedTLS ignores IP subjectAltNames, so 127.0.0.1 never
  verifies against the balancer's certificate).
* It does not unREGISTER at ``quit``: ``close()`` sends ``unregister`` first.
* Its Contact is its public GRUU when the registrar hands one out, and its responses spell
  ``Record-route:`` (legal, but Twinkle does not read that spelling).
"""

from __future__ import annotations

import math
import shutil
import struct
import time
import wave
from pathlib import Path

from fixtures.startup import START_TIMEOUT_S

from sipfarm.ports import free_port

from .console_phone import DEFAULT_TIMEOUT_S, ConsolePhone, PhoneError

LINPHONEC = "linphonec"
TONE_RATE = 8000
TONE_SECONDS = 20
TONE_AMPLITUDE = 0.5
UNREGISTER_S = 0.5  # for the unREGISTER to leave before quit
POLL_S = 2.0  # for linphonec to answer a command


def installed() -> bool:
    return shutil.which(LINPHONEC) is not None and shutil.which("stdbuf") is not None


def write_tone(path: Path, hz: float, seconds: int = TONE_SECONDS, rate: int = TONE_RATE) -> None:
    """A 16-bit mono sine WAV, what linphonec plays as its microphone."""
    peak = TONE_AMPLITUDE * 32767
    frames = b"".join(
        struct.pack("<h", round(peak * math.sin(2 * math.pi * hz * n / rate))) for n in range(rate * seconds)
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)


class LinphonePhone(ConsolePhone):
    """One linphonec with one account, playing a tone into its calls and recording what it hears.

    ``with LinphonePhone("carol", tmp_path, tone_hz=440) as carol: carol.start("carol", "pw",
    "farm.test", "127.0.0.1:5060"); carol.wait_registered()``
    """

    def __init__(self, name: str, workdir: Path, *, tone_hz: int, max_lifetime_s: int = 80) -> None:
        super().__init__(f"linphonec-{name}", workdir, max_lifetime_s=max_lifetime_s)
        self.tone_hz = tone_hz
        self.tone_path = self.dir / f"tone-{tone_hz}.wav"
        self.log_path = self.dir / "linphone.log"
        self.user = ""
        self.recordings = 0

    def start(
        self, user: str, password: str, domain: str, proxy: str, *, transport: str = "udp", autoanswer: bool = False
    ) -> None:
        """Write the rc and start linphonec; it registers at once through ``proxy`` (HOST:PORT of
        the balancer) over ``transport`` (udp, tcp or tls)."""
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"linphonec: no transport {transport}")
        self.user = user
        write_tone(self.tone_path, self.tone_hz)
        sip_port = free_port("127.0.0.1", udp=transport == "udp", tcp=transport != "udp")
        ports = {t: sip_port if t == transport else 0 for t in ("udp", "tcp", "tls")}
        rtp_port = free_port("127.0.0.1", udp=True) & ~1
        route = f"<sip:{proxy};transport={transport}>"
        home = self.dir / "home"
        (home / ".local" / "share" / "linphone").mkdir(parents=True, exist_ok=True)
        rc = self.dir / "linphonerc"
        rc.write_text(
            f"""[sip]
sip_port={ports["udp"]}
sip_tcp_port={ports["tcp"]}
sip_tls_port={ports["tls"]}
default_proxy=0
register_only_when_network_is_up=0
auto_net_state_mon=0
verify_server_certs=0
verify_server_cn=0
root_ca=
use_ipv6=0
inc_timeout=60
ping_with_options=0

[net]
firewall_policy=0

[rtp]
audio_rtp_port={rtp_port}
audio_jitt_comp=60
nortp_timeout=30

[video]
enabled=0
capture=0
display=0
automatically_initiate=0
automatically_accept=0

[sound]
local_ring=
remote_ring=
hold_music=
echocancellation=0

[misc]
tone_indications=0

[proxy_0]
reg_proxy={route}
reg_route={route}
reg_identity="{user}" <sip:{user}@{domain}>
realm={domain}
reg_expires=60
reg_sendregister=1
publish=0
dial_escape_plus=0
quality_reporting_enabled=0
avpf=0

[auth_info_0]
username={user}
userid={user}
passwd={password}
realm={domain}
domain={domain}
"""
        )
        argv = ["stdbuf", "-oL", LINPHONEC, "-c", str(rc), "-d", "6", "-l", str(self.log_path)]
        if autoanswer:
            argv.append("-a")
        self._spawn(argv, {"HOME": str(home)}, stderr=self.dir / "stderr.log")

    def wait_registered(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Poll ``states proxies`` until registered, then plug the tone and a first recording in.
        The first answer may take the start-up allowance (a first start on a machine took 8 s to
        load); ``timeout`` runs from there."""
        first = START_TIMEOUT_S
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            mark = self.mark()
            self.send("states proxies")
            state = self.wait_for(r"\| (LinphoneRegistration\w+)", first or POLL_S, since=mark).group(1)
            if first:
                first, deadline = 0.0, time.monotonic() + timeout
            if state == "LinphoneRegistrationOk":
                break
            if state == "LinphoneRegistrationFailed":
                raise PhoneError(f"{self.name}: registration failed: {self.tail()}")
            time.sleep(0.1)
        else:
            raise PhoneError(f"{self.name}: not registered in {timeout} s ({state}): {self.tail()}")
        mark = self.mark()
        self.send("soundcard use files")
        self.wait_for(r"Using wav files", since=mark)
        self.send(f"play {self.tone_path}")
        self.next_recording()

    def next_recording(self) -> Path:
        """Record what the next call plays to the speaker into a new WAV; its path."""
        self.recordings += 1
        path = self.dir / f"heard-{self.recordings}.wav"
        self.send(f"record {path}")
        return path

    @property
    def recording(self) -> Path:
        """The WAV the current (or last) call is recorded into."""
        return self.dir / f"heard-{self.recordings}.wav"

    def log(self) -> str:
        """liblinphone's log (``-d 6``), SIP messages included."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> int | None:
        if self.alive():
            self.send("unregister")  # linphonec does not unREGISTER at quit
            time.sleep(UNREGISTER_S)
        return super().close()

    # -- phone actions (each returns the console mark taken before it) ---------------------------

    def call(self, uri: str) -> int:
        return self._command(f"call {uri}")

    def answer(self) -> int:
        return self._command("answer")

    def hangup(self) -> int:
        """BYE of an established call, CANCEL of a call still ringing."""
        return self._command("terminate")

    def hold(self) -> int:
        """re-INVITE with a=sendonly."""
        return self._command("pause")

    def resume(self) -> int:
        return self._command("resume")

    def message(self, uri: str, text: str) -> int:
        return self._command(f'chat {uri} "{text}"')

    def _command(self, command: str) -> int:
        mark = self.mark()
        self.send(command)
        return mark
