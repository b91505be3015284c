"""Kamailio's rtpengine module drives sipfarm's relay (``sipfarm relay``) over ng.

Kamailio 5.6 runs as a stateful record-routing proxy with no registrar: an INVITE goes to its
Request-URI (the callee phone's own address) and ``rtpengine_manage()`` sends ng offer, answer
and delete, with the flags Kamailio configs use (:data:`FLAG_SETS`: a typical one, the default
kamailio.cfg's for NATed phones, trust-address with directions), to ``rtpengine_sock``: an ng
recorder in the test that passes every message on to sipfarm's relay and keeps a copy.  Two
hand-made UDP phones (127.0.0.2 calls 127.0.0.3): each SDP a phone receives names the relay,
RTP flows both ways through it, the relay's ng ``query`` counts packets on both sides, a hold
re-INVITE keeps the relay's ports, and after the BYE the call is gone.  The recorder's copy
shows what Kamailio really sends; every key and flag in it must be one media/ng.py honours or
knowingly ignores (:data:`KNOWN_KEYS`).

Then the same sequence without Kamailio: an ng client that builds each dictionary as Kamailio's
module does, with the keys and list flags it can send.
"""

from __future__ import annotations

import secrets
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures.farm import SipClient
from fixtures.media_phones import (
    CALLEE_HOST,
    CALLER_HOST,
    exchange_rtp,
    in_dialog,
    phone_sdp,
    recv_request,
    rtp_socket,
    sdp_direction,
    sdp_target,
    ssrc_of,
)
from fixtures.relay import RANGE, RelayProcess, ng_request, start_relay
from fixtures.startup import START_TIMEOUT_S, wait_started

from media.bencode import decode, encode
from sipfarm.ports import free_port
from sipfarm.sip.message import make_response

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 30)

KAMAILIO_BIN = "/usr/sbin/kamailio"
MODULES_DIR = "/usr/lib/x86_64-linux-gnu/kamailio/modules"
# what a typical Kamailio config passes to rtpengine_manage() for plain RTP phones (no
# trust-address: the module then sends received-from, the SIP source)
KAMAILIO_FLAGS = (
    "replace-origin replace-session-connection ICE=remove RTP/AVP rtcp-mux-demux SDES-off "
    "label=kamailio via-branch=1 record-call=no"
)
FLAG_SETS = {
    "typical": KAMAILIO_FLAGS,
    # Kamailio's own default kamailio.cfg (WITH_RTPENGINE, a NATed phone)
    "default-cfg-nat": "SIP-source-address replace-origin replace-session-connection",
    "trust-address-directions": "trust-address direction=internal direction=external replace-origin ICE=remove",
}
# every ng key Kamailio's module may send, as media/ng.py reads keys (case, '-', '_' and ' '
# alike); what it does with each is in media/ng.py's docstring
KNOWN_KEYS = {
    "command", "call id", "from tag", "to tag", "sdp", "flags", "replace", "ice", "rtcp mux",
    "transport protocol", "direction", "received from", "label", "via branch", "record call",
    "sdes", "supports", "delete delay", "media timeout",
}  # fmt: skip


class NgRecorder:
    """A UDP hop between an ng client and a relay that keeps every message it passes on."""

    def __init__(self, relay: tuple[str, int]) -> None:
        self.relay = relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.sock.getsockname()
        self.messages: list[dict[bytes, Any]] = []
        self.replies: list[dict[bytes, Any]] = []
        self._clients: dict[bytes, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            data, source = self.sock.recvfrom(65535)
            cookie, _, body = data.partition(b" ")
            decoded = decode(body)
            assert isinstance(decoded, dict)
            if source == self.relay:
                self.replies.append(decoded)
                client = self._clients.pop(cookie, None)
                if client is not None:
                    self.sock.sendto(data, client)
            else:
                self.messages.append(decoded)
                self._clients[cookie] = source
                self.sock.sendto(data, self.relay)

    def commands(self) -> list[str]:
        return [m[b"command"].decode() for m in self.messages]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def kamailio_config(port: int, ng: tuple[str, int], flags: str = KAMAILIO_FLAGS) -> str:
    return f"""#!KAMAILIO
debug=2
log_stderror=yes
children=2
disable_tcp=yes
auto_aliases=no
dns=no
rev_dns=no
listen=udp:127.0.0.1:{port}
mpath="{MODULES_DIR}"

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "rtpengine.so"

modparam("rr", "enable_full_lr", 1)
modparam("tm", "fr_timer", 5000)
modparam("rtpengine", "rtpengine_sock", "udp:{ng[0]}:{ng[1]}")
modparam("rtpengine", "rtpengine_tout_ms", 1000)
modparam("rtpengine", "rtpengine_retr", 2)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            if (is_method("BYE") || has_body("application/sdp")) {{
                rtpengine_manage("{flags}");
            }}
            t_on_reply("MEDIA");
            if (!t_relay()) sl_reply_error();
            exit;
        }}
        if (is_method("ACK")) {{
            if (t_check_trans()) t_relay();
            exit;
        }}
        sl_send_reply("404", "Not here");
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            rtpengine_manage();
            t_relay();
        }}
        exit;
    }}
    t_check_trans();
    if (is_method("INVITE")) {{
        record_route();
        if (has_body("application/sdp")) {{
            rtpengine_manage("{flags}");
        }}
        t_on_reply("MEDIA");
        t_on_failure("FAILED");
        if (!t_relay()) sl_reply_error();
        exit;
    }}
    sl_send_reply("405", "Method Not Allowed");
}}

onreply_route[MEDIA] {{
    if (has_body("application/sdp")) {{
        rtpengine_manage("{flags}");
    }}
}}

failure_route[FAILED] {{
    rtpengine_manage();
}}
"""


@dataclass
class Kamailio:
    process: subprocess.Popen[bytes]
    address: tuple[str, int]
    log_path: Path
    flags: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def answers_options(address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.3)
        local = sock.getsockname()[1]
        probe = (
            f"OPTIONS sip:{address[0]}:{address[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=p\r\n"
            f"To: <sip:{address[0]}:{address[1]}>\r\nCall-ID: {secrets.token_hex(6)}\r\n"
            "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
        sock.sendto(probe.encode(), address)
        try:
            return sock.recv(65535).startswith(b"SIP/2.0 ")
        except TimeoutError:
            return False


@pytest.fixture
def relay(redis_url: str, tmp_path: Path) -> Iterator[RelayProcess]:
    proc = start_relay(redis_url, tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def recorder(relay: RelayProcess) -> Iterator[NgRecorder]:
    hop = NgRecorder(relay.ng)
    try:
        yield hop
    finally:
        hop.close()


@pytest.fixture(params=sorted(FLAG_SETS))
def kamailio(request: pytest.FixtureRequest, recorder: NgRecorder, tmp_path: Path) -> Iterator[Kamailio]:
    if shutil.which(KAMAILIO_BIN) is None or not Path(MODULES_DIR, "rtpengine.so").exists():
        pytest.skip("kamailio with its rtpengine module not installed")
    port = free_port(udp=True, tcp=False)
    config = tmp_path / "kamailio.cfg"
    config.write_text(kamailio_config(port, recorder.address, FLAG_SETS[request.param]))
    log_path = tmp_path / "kamailio.log"
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    argv = [KAMAILIO_BIN, "-DD", "-E", "-f", str(config), "-m", "64", "-M", "8", "-Y", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)
    log.close()
    kam = Kamailio(proc, ("127.0.0.1", port), log_path, request.param)
    try:
        wait_started("kamailio", proc, lambda: answers_options(kam.address), f"answers OPTIONS on 127.0.0.1:{port}",
                     log=log_path)  # fmt: skip
        yield kam
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_kamailio_rtpengine_module_drives_sipfarms_relay(
    kamailio: Kamailio, relay: RelayProcess, recorder: NgRecorder
) -> None:
    alice, bob = SipClient(CALLER_HOST), SipClient(CALLEE_HOST)
    alice_rtp, bob_rtp = rtp_socket(CALLER_HOST), rtp_socket(CALLEE_HOST)
    try:
        call_id = secrets.token_hex(10)
        uri = f"sip:bob@{bob.host}:{bob.port}"
        invite = alice.request(
            "INVITE",
            uri,
            call_id=call_id,
            headers=(("contact", f"<sip:alice@{alice.host}:{alice.port}>"), ("content-type", "application/sdp")),
            body=phone_sdp(CALLER_HOST, alice_rtp.getsockname()[1]),
        )
        alice.send(invite, kamailio.address)
        offered = recv_request(bob, b"INVITE", 5.0)
        to_bob_side = sdp_target(offered.body)  # where bob sends: the relay
        assert to_bob_side[0] == "127.0.0.1" and relay.port_min <= to_bob_side[1] < relay.port_min + RANGE
        ok = make_response(
            offered,
            200,
            to_tag=secrets.token_hex(4).encode(),
            headers=(("contact", f"<sip:bob@{bob.host}:{bob.port}>"),),
            body=phone_sdp(CALLEE_HOST, bob_rtp.getsockname()[1]),
            content_type=b"application/sdp",
            record_route=True,
        )
        bob.send(ok, kamailio.address)
        answered = alice.recv_final(5.0, call_id=call_id, cseq=1)
        assert answered is not None and answered.status == 200, answered
        to_alice_side = sdp_target(answered.body)
        assert to_alice_side[0] == "127.0.0.1" and relay.port_min <= to_alice_side[1] < relay.port_min + RANGE
        assert to_alice_side != to_bob_side
        alice.send(in_dialog(alice, "ACK", answered, 1), kamailio.address)
        recv_request(bob, b"ACK")

        at_bob, at_alice = exchange_rtp(alice_rtp, to_alice_side, bob_rtp, to_bob_side)
        assert at_bob and {ssrc_of(p) for p in at_bob} == {0xA1}
        assert at_alice and {ssrc_of(p) for p in at_alice} == {0xB0B}
        status = ng_request(relay.ng, {"command": "query", "call-id": call_id})
        assert status[b"result"] == b"ok", status
        received = {
            tag: sum(s[b"stats"][b"packets"] for m in entry[b"medias"] for s in m[b"streams"])
            for tag, entry in status[b"tags"].items()
        }
        assert len(received) == 2 and all(n >= 10 for n in received.values()), received

        # hold: a re-INVITE through Kamailio is an ng offer with both tags; the same relay ports
        held = phone_sdp(CALLER_HOST, alice_rtp.getsockname()[1], version=2, direction="sendonly")
        alice.send(in_dialog(alice, "INVITE", answered, 2, body=held), kamailio.address)
        got = recv_request(bob, b"INVITE")
        assert sdp_target(got.body) == to_bob_side and sdp_direction(got.body) == "sendonly", got.body
        bob_held = phone_sdp(CALLEE_HOST, bob_rtp.getsockname()[1], version=2, direction="recvonly")
        bob.send(make_response(got, 200, body=bob_held, content_type=b"application/sdp", record_route=True),
                 kamailio.address)  # fmt: skip
        final = alice.recv_final(5.0, call_id=call_id, cseq=2)
        assert final is not None and final.status == 200, final
        assert sdp_target(final.body) == to_alice_side and sdp_direction(final.body) == "recvonly", final.body
        alice.send(in_dialog(alice, "ACK", answered, 2), kamailio.address)
        recv_request(bob, b"ACK")

        alice.send(in_dialog(alice, "BYE", answered, 3), kamailio.address)
        bye = recv_request(bob, b"BYE")
        bob.send(make_response(bye, 200), kamailio.address)
        done = alice.recv_final(call_id=call_id, method="BYE")
        assert done is not None and done.status == 200, done
        deadline = time.monotonic() + 3
        while ng_request(relay.ng, {"command": "query", "call-id": call_id})[b"result"] != b"error":
            assert time.monotonic() < deadline, "the relay still holds the call after BYE"
            time.sleep(0.1)
    finally:
        for closable in (alice, bob, alice_rtp, bob_rtp):
            closable.close()

    # what Kamailio sent: offer, answer, delete, every key one the relay knows
    others = [m for m in recorder.messages if m.get(b"call-id") != call_id.encode()]
    assert all(m == {b"command": b"ping"} for m in others), others  # the module's startup ping
    sent = [m for m in recorder.messages if m.get(b"call-id") == call_id.encode()]
    assert [m[b"command"] for m in sent] == [b"offer", b"answer", b"offer", b"answer", b"delete"], recorder.messages
    for message in sent:
        keys = {k.decode().lower().replace("-", " ").replace("_", " ") for k in message}
        assert keys <= KNOWN_KEYS, keys - KNOWN_KEYS
    assert all(r[b"result"] in (b"ok", b"pong") for r in recorder.replies), recorder.replies
    offer, answer, reoffer, _, delete = sent
    assert reoffer[b"to-tag"] == answer[b"to-tag"]  # in dialog
    assert offer[b"received-from"] == [b"IP4", CALLER_HOST.encode()]  # sent even with trust-address
    assert answer[b"to-tag"] and delete[b"from-tag"] == offer[b"from-tag"]
    if kamailio.flags == "typical":
        assert offer[b"rtcp-mux"] == [b"demux"] and offer[b"SDES"] == [b"off"] and offer[b"record-call"] == b"no"
    elif kamailio.flags == "default-cfg-nat":
        assert offer[b"flags"] == [b"SIP-source-address"]
    else:
        assert offer[b"flags"] == [b"trust-address"] and offer[b"direction"] == [b"internal", b"external"]


# -- the same sequence from a test client that builds messages as Kamailio's module does --------


def kamailio_datagram(cookie: bytes, *pairs: tuple[str, Any]) -> bytes:
    """An ng datagram with its keys in Kamailio's order (not bencode's sorted one)."""
    return cookie + b" d" + b"".join(encode(k) + encode(v) for k, v in pairs) + b"e"


def exchange(relay: tuple[str, int], datagram: bytes) -> dict[bytes, Any]:
    cookie = datagram.partition(b" ")[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.sendto(datagram, relay)
        head, _, body = sock.recv(65535).partition(b" ")
    assert head == cookie
    reply = decode(body)
    assert isinstance(reply, dict)
    return reply


def test_an_ng_sequence_built_as_kamailio_builds_it(relay: RelayProcess) -> None:
    call = ("call-id", secrets.token_hex(8) + "@127.0.0.2")
    common: list[tuple[str, Any]] = [
        ("supports", ["load limit"]),
        ("flags", ["trust-address", "no-rtcp-attribute-unknown-to-this-relay"]),
        ("replace", ["origin", "session-connection"]),
        ("ICE", "remove"),
        ("transport-protocol", "RTP/AVP"),
        ("rtcp-mux", ["demux"]),
        ("SDES", ["off"]),
        ("direction", ["internal", "external"]),
        ("record call", "no"),
        ("media timeout", 60),
    ]
    caller = (
        b"v=0\r\no=alice 2890844526 2890844526 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n"
        b"m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
        b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=rtcp-mux\r\n"
        b"a=ice-ufrag:F7gI\r\na=ice-pwd:x9cml/YzichV2+XlhiMu8g\r\n"
        b"a=candidate:1 1 UDP 2130706431 127.0.0.2 4000 typ host\r\na=sendrecv\r\n"
    )
    assert exchange(relay.ng, kamailio_datagram(b"1_1", ("supports", ["load limit"]), ("command", "ping"))) == {
        b"result": b"pong"
    }
    offered = exchange(
        relay.ng,
        kamailio_datagram(
            b"1_2",
            ("sdp", caller),
            *common,
            ("label", "caller"),
            call,
            ("via-branch", "z9hG4bK776asdhds"),
            ("from-tag", "1928301774"),
            ("command", "offer"),
        ),
    )
    assert offered[b"result"] == b"ok", offered
    to_callee = offered[b"sdp"].decode()
    assert "o=alice 2890844526 2890844526 IN IP4 127.0.0.1\r\n" in to_callee  # replace-origin
    assert "c=IN IP4 127.0.0.1\r\n" in to_callee and "127.0.0.2" not in to_callee
    assert "a=ice-" not in to_callee and "a=candidate" not in to_callee  # ICE=remove
    assert "a=rtcp-mux" not in to_callee  # rtcp-mux demux: a separate RTCP port for the callee
    assert "m=audio " in to_callee and "a=rtpmap:101 telephone-event/8000" in to_callee
    callee = b"v=0\r\no=bob 1 1 IN IP4 127.0.0.3\r\ns=-\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\n"
    callee += b"m=audio 5000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    answered = exchange(
        relay.ng,
        kamailio_datagram(
            b"1_3",
            ("sdp", callee),
            *common[:2],
            ("received-from", ["IP4", "127.0.0.3"]),
            *common[2:],
            ("label", "callee"),
            call,
            ("via-branch", "z9hG4bK776asdhds"),
            ("from-tag", "1928301774"),
            ("to-tag", "a6c85cf"),
            ("command", "answer"),
        ),
    )
    assert answered[b"result"] == b"ok", answered
    to_caller = answered[b"sdp"].decode()
    assert "c=IN IP4 127.0.0.1\r\n" in to_caller and "127.0.0.3" not in to_caller
    # the caller offered rtcp-mux: its side of the relay is one port, and says so
    assert "a=rtcp-mux" in to_caller

    status = exchange(relay.ng, kamailio_datagram(b"1_4", call, ("command", "query")))
    assert status[b"result"] == b"ok"
    assert {e[b"label"] for e in status[b"tags"].values()} == {b"caller", b"callee"}
    deleted = exchange(
        relay.ng,
        kamailio_datagram(
            b"1_5",
            ("supports", ["load limit"]),
            call,
            ("via-branch", "z9hG4bK776asdhds"),
            ("from-tag", "1928301774"),
            ("to-tag", "a6c85cf"),
            ("delete delay", 0),
            ("command", "delete"),
        ),
    )
    assert deleted[b"result"] == b"ok" and b"totals" in deleted
    gone = exchange(relay.ng, kamailio_datagram(b"1_6", call, ("command", "query")))
    assert gone[b"result"] == b"error"
    # a retransmitted delete (same cookie): the cached reply, not an error
    assert exchange(relay.ng, kamailio_datagram(b"1_5", call, ("command", "delete"))) == deleted
