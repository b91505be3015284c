"""``TwinklePhone``: Twinkle 1.10 (Debian ``twinkle``) headless, ``twinkle -c`` driven on stdin.

Debian's ``twinkle-console`` cannot stand in: it reads its first argument as a profile name.

Each phone has its own HOME (the phone's directory) holding ``~/.twinkle/<user>.cfg`` (the user
profile) and ``~/.twinkle/twinkle.sys`` (the system settings), and runs as
``twinkle -c -f <user> --force`` (``--force``: start even if a lock file says another Twinkle
runs). Commands: ``call URI``, ``answer``, ``reject``, ``bye`` (also cancels a call still ringing),
``hold``, ``retrieve``, ``transfer URI``, ``message URI TEXT``, ``auto_answer -a on|off``,
``deregister``, ``quit`` (deregisters first). What it prints and the tests wait for:
``<user>: registration succeeded``, ``Line N: incoming call``, ``Line N: far end answered call``,
``Line N: call established`` (callee), ``Line N: far end ended call``, ``Line N: call failed``,
and a received MESSAGE as a block under ``Received message`` with its text.

Quirks found driving it against sipfarm (2026-12-02):

* ``outbound_proxy`` is ``HOST:PORT;transport=udp`` without ``sip:`` (Twinkle prepends it; with it
  the profile is refused); ``registrar`` empty sends REGISTER sip:<domain> to the outbound proxy;
  ``all_requests_to_proxy=yes`` keeps in-dialog requests on the proxy too.
* No sound card: ``dev_ringtone``, ``dev_speaker`` and ``dev_mic`` are ``alsa:null`` and
  ``validate_audio_dev=no``. Twinkle still sends RTP (silence from the null device) and counts on
  it; ``speex_dsp_vad=no``, or the "VAD hack" suppresses silent packets altogether.
* UDP and TCP only: Twinkle 1.10 has no SIP over TLS.
* It prints "Local IP: 255.255.255.255" in a namespace with only ``lo``, and still puts 127.0.0.1
  (where it is bound) in Via, Contact and SDP.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fixtures.relay import udp_free
from fixtures.startup import START_TIMEOUT_S

from sipfarm.ports import free_port

from .console_phone import DEFAULT_TIMEOUT_S, ConsolePhone, PhoneError

TWINKLE = "twinkle"
RTP_PORTS = 8  # Twinkle takes rtp_port + 2 per line (two lines, a third for transfers)


def installed() -> bool:
    return shutil.which(TWINKLE) is not None


def free_rtp_base() -> int:
    """An even port with the RTP_PORTS ports from it free on 127.0.0.1 (UDP)."""
    for _ in range(50):
        base = free_port("127.0.0.1", udp=True) & ~1
        if all(udp_free(p) for p in range(base, base + RTP_PORTS)):
            return base
    raise PhoneError("no free RTP port range on 127.0.0.1")


class TwinklePhone(ConsolePhone):
    """One ``twinkle -c`` with one user profile.

    ``with TwinklePhone("alice", tmp_path) as alice: alice.start("alice", "pw", "farm.test",
    "127.0.0.1:5060"); alice.wait_registered()``
    """

    def __init__(self, name: str, workdir: Path, *, max_lifetime_s: int = 80) -> None:
        super().__init__(f"twinkle-{name}", workdir, max_lifetime_s=max_lifetime_s)
        self.user = ""
        self.sip_port = 0

    def start(self, user: str, password: str, domain: str, proxy: str, *, transport: str = "udp") -> None:
        """Write the profile and system settings, start Twinkle; it registers at once.

        ``proxy`` is HOST:PORT of the balancer: REGISTER and every request go there over
        ``transport`` (udp or tcp)."""
        if transport not in ("udp", "tcp"):
            raise ValueError(f"Twinkle 1.10 has no SIP over {transport}")
        self.user = user
        self.sip_port = free_port("127.0.0.1", udp=True, tcp=True)
        rtp_port = free_rtp_base()
        config = self.dir / ".twinkle"
        config.mkdir(exist_ok=True)
        profile = {
            "user_name": user, "user_domain": domain, "user_display": user,
            "auth_realm": "", "auth_name": user, "auth_pass": password,
            "outbound_proxy": f"{proxy};transport={transport}",  # no "sip:": Twinkle prepends it
            "all_requests_to_proxy": "yes", "non_resolvable_to_proxy": "no",
            "registrar": "",  # empty: REGISTER sip:<domain> goes to the outbound proxy
            "register_at_startup": "yes", "registration_time": "60",
            "sip_transport": transport, "persistent_tcp": "yes", "enable_nat_keepalive": "no",
            "codecs": "g711u,g711a", "ext_100rel": "supported", "ext_replaces": "yes",
            "allow_refer": "yes", "ask_user_to_refer": "no", "referee_hold": "no", "referrer_hold": "yes",
            "hold_variant": "rfc3264", "mwi_sollicited": "no", "zrtp_enabled": "no",
            "pres_publish_startup": "no", "im_send_iscomposing": "no", "timer_noanswer": "60",
            # the VAD "hack" drops silent packets: the null microphone would send nothing
            "speex_dsp_vad": "no", "speex_dsp_agc": "no", "speex_dsp_nrd": "no",
        }  # fmt: skip
        (config / f"{user}.cfg").write_text("".join(f"{k}={v}\n" for k, v in profile.items()))
        system = {
            "dev_ringtone": "alsa:null", "dev_speaker": "alsa:null", "dev_mic": "alsa:null",
            "validate_audio_dev": "no", "sip_udp_port": self.sip_port, "sip_port": self.sip_port,
            "rtp_port": rtp_port, "log_max_size": 20, "log_show_sip": "yes", "log_show_debug": "no",
            "play_ringtone": "no", "play_ringback": "no", "start_user_profile": user,
        }  # fmt: skip
        (config / "twinkle.sys").write_text("".join(f"{k}={v}\n" for k, v in system.items()))
        self._spawn([TWINKLE, "-c", "-f", user, "--force"], {"HOME": str(self.dir)})

    def wait_registered(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Until Twinkle reports its registration (``timeout`` after it started: its first start
        on a machine took 7 s to load); ``PhoneError`` if it failed."""
        self.wait_for(rf"^{self.user}: registering phone", START_TIMEOUT_S)
        outcome = self.wait_for(rf"^{self.user}: registration (succeeded|failed)", timeout)
        if outcome.group(1) != "succeeded":
            raise PhoneError(f"{self.name}: registration failed: {self.tail()}")

    def sip_log(self) -> str:
        """Twinkle's own log (every SIP message it sent and received: ``log_show_sip``)."""
        path = self.dir / ".twinkle" / "twinkle.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- phone actions (each returns the console mark taken before it) ---------------------------

    def call(self, uri: str) -> int:
        return self._command(f"call {uri}")

    def answer(self) -> int:
        return self._command("answer")

    def hangup(self) -> int:
        """BYE of an established call, CANCEL of a call still ringing."""
        return self._command("bye")

    def hold(self) -> int:
        """re-INVITE with a=sendonly (``hold_variant=rfc3264``)."""
        return self._command("hold")

    def resume(self) -> int:
        return self._command("retrieve")

    def message(self, uri: str, text: str) -> int:
        return self._command(f'message {uri} "{text}"')

    def _command(self, command: str) -> int:
        mark = self.mark()
        self.send(command)
        return mark
