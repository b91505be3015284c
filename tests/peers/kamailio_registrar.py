"""A throw-away Kamailio registrar + record-routing proxy with digest auth, for validating the peers.

sipfarm's own server replaces it in sipfarm's tests; Kamailio is here to prove the softphone peer
against a known-good implementation. It runs in the foreground (``-DD -E``) on a loopback port, its
configuration and log in a private directory under /tmp, and ``stop()`` always terminates it.

Passwords are checked with ``pv_www_authenticate``/``pv_proxy_authenticate`` against a table written
into the script, so no database is needed. A wrong password is challenged again, so a UA gives up
with 401 (REGISTER) or 407 (INVITE), as most registrars do.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fixtures.startup import wait_started

from sipfarm import ports

KAMAILIO = "/usr/sbin/kamailio"
MODULE_DIR = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
STOP_TIMEOUT_S = 5.0
DOMAIN = "sipfarm.test"

_CONFIG = """#!KAMAILIO
debug=1
log_stderror=yes
fork=yes
children=2
tcp_children=2
auto_aliases=no
listen=udp:{host}:{port}
listen=tcp:{host}:{port}
alias="{domain}"
mpath="{module_dir}"

loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "auth.so"

modparam("usrloc", "db_mode", 0)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    if (!is_method("ACK")) {{
        if (t_precheck_trans()) {{
            t_check_trans();
            exit;
        }}
        t_check_trans();
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            t_relay();
            exit;
        }}
        if (is_method("ACK") && t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    remove_hf("Route");
    if (is_method("REGISTER")) {{
        route(AUTH);
        if (!save("location")) {{
            sl_reply_error();
        }}
        exit;
    }}
    if (is_method("INVITE")) {{
        route(AUTH);
        record_route();
    }}
    if (!lookup("location")) {{
        sl_send_reply("404", "Not Found");
        exit;
    }}
    if (!t_relay()) {{
        sl_reply_error();
    }}
}}

route[AUTH] {{
    $var(pw) = "";
{password_table}
    if (is_method("REGISTER")) {{
        if (!pv_www_authenticate("$td", "$var(pw)", "0")) {{
            www_challenge("$td", "0");
            exit;
        }}
    }} else {{
        if (!pv_proxy_authenticate("$fd", "$var(pw)", "0")) {{
            proxy_challenge("$fd", "0");
            exit;
        }}
    }}
    consume_credentials();
}}
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on host, below the ephemeral range (sipfarm.ports)."""
    return ports.free_port(host, udp=True, tcp=True)


def _sip_options_ok(host: str, port: int) -> bool:
    """True when something answers a SIP OPTIONS on host:port over UDP."""
    msg = (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:9;branch=z9hG4bK-probe{time.monotonic_ns()}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:probe@invalid>;tag=probe\r\n"
        f"To: <sip:{host}>\r\nCall-ID: probe-{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(0.3)
        # The Via sent-by is a fake port; Kamailio answers to the source address (rport-less
        # UDP replies go to Via), so put our real port there.
        msg = msg.replace(f"{host}:9;", f"{host}:{sock.getsockname()[1]};")
        sock.sendto(msg.encode(), (host, port))
        try:
            data = sock.recv(4096)
        except OSError:
            return False
    return data.startswith(b"SIP/2.0 ")


class KamailioRegistrar:
    """``with KamailioRegistrar({"alice": "pw"}) as k: k.hostport`` -> "127.0.0.1:NNNN"."""

    def __init__(self, passwords: dict[str, str], host: str = "127.0.0.1", port: int = 0,
                 domain: str = DOMAIN) -> None:
        self.passwords = passwords
        self.host = host
        self.port = port or free_port(host)
        self.domain = domain
        self.dir = Path(tempfile.mkdtemp(prefix="sipfarm-kamailio-", dir="/tmp"))
        self.cfg = self.dir / "kamailio.cfg"
        self.log = self.dir / "kamailio.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def config_text(self) -> str:
        lines = []
        for user, password in sorted(self.passwords.items()):
            if '"' in user or '"' in password or "\\" in password:
                raise ValueError("quotes and backslashes are not supported in users and passwords")
            lines.append(f'    if ($fU == "{user}") {{ $var(pw) = "{password}"; }}')
        return _CONFIG.format(host=self.host, port=self.port, domain=self.domain, module_dir=MODULE_DIR,
                              password_table="\n".join(lines))

    def start(self) -> None:
        self.cfg.write_text(self.config_text())
        check = subprocess.run([KAMAILIO, "-c", "-f", str(self.cfg)], capture_output=True, timeout=20,
                               check=False)
        if check.returncode != 0:
            raise RuntimeError(f"kamailio config check failed: {check.stderr.decode(errors='replace')}")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [KAMAILIO, "-DD", "-E", "-f", str(self.cfg), "-Y", str(self.dir), "-m", "32", "-M", "8"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_started("kamailio", self.proc, lambda: _sip_options_ok(self.host, self.port),
                     f"answers OPTIONS on {self.hostport}", log=self.log)  # fmt: skip

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KamailioRegistrar:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.cleanup()
        else:
            self.stop()  # keep the configuration and log for the post-mortem
