"""`sipfarm up --config examples/routing.toml`: the shipped example, loaded as is, routes a call
from alice to +15551234 to the gateway on 127.0.0.1:15090, a call to an unknown user of
farm.test to the voicemail on 127.0.0.1:15091 (SIPp UAS processes stand in for both), and a
call to sales@farm.test to alice's and bob's phones at once.  Then `sipfarm reload` with a
changed file changes the routing on the running nodes, and a broken file is refused with the
old table kept."""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.farm import DOMAIN, SipClient
from fixtures.media_phones import phone_sdp, send_invite
from fixtures.startup import START_TIMEOUT_S, udp_bound, wait_started
from test_up import free_block, read_ready, wait_registers

from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import parse_message

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 120)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "routing.toml"
SCENARIOS = Path(__file__).resolve().parents[1] / "peers" / "scenarios"
GATEWAY = ("127.0.0.1", 15090)
VOICEMAIL = ("127.0.0.1", 15091)


class Listener:
    """A UAS standing in for a gateway or a voicemail: the requests that reach its port."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)

    def invite(self, within: float = 5.0) -> SipMessage | None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            msg = parse_message(data)
            if msg.is_request and msg.method == b"INVITE":
                return msg
        return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[dict[str, Any]]:
    port, metrics = free_block()
    config = tmp_path / "routing.toml"
    shutil.copy(EXAMPLE, config)
    argv = [
        sys.executable, "-m", "sipfarm", "up", "--config", str(config), "--sip-port", str(port),
        "--dir", str(tmp_path / "run"), "--metrics-port", str(metrics), "--ng-port", str(port + 5),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        ready = read_ready(proc, lines)
        # alice's remove-all (Contact: *, Expires: 0; she has no binding yet): a node's 200
        wait_registers(proc, ("127.0.0.1", port), lines, source="127.0.0.5", contact="*", expires=0)
        yield {"address": ("127.0.0.1", port), "redis": ready["redis"], "config": config, "run": tmp_path / "run"}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def call(farm: dict[str, Any], uri: str, user: str = "alice") -> None:
    phone = SipClient("127.0.0.4")
    try:
        send_invite(
            phone, farm["address"], phone_sdp("127.0.0.4", 40000), secrets.token_hex(8),
            uri=uri, user=user, password=f"{user}-secret",
        )  # fmt: skip
    finally:
        phone.close()


class SippUas:
    """SIPp as the gateway or the voicemail: answers one INVITE 486 (tests/peers/scenarios/
    uas_busy.xml), takes its ACK and exits 0; the INVITE it got is in its message trace."""

    def __init__(self, address: tuple[str, int], workdir: Path) -> None:
        self.trace = workdir / f"sipp-{address[1]}.msg"
        argv = [
            "sipp", "-sf", str(SCENARIOS / "uas_busy.xml"), "-i", address[0], "-p", str(address[1]),
            "-t", "u1", "-m", "1", "-timeout", "20s", "-timeout_error", "-nostdin",
            "-trace_msg", "-message_file", str(self.trace),
        ]  # fmt: skip
        out = workdir / f"sipp-{address[1]}.out"
        with out.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        # bound before the call is placed (a sleep of 0.3 s was a guess, short on a loaded machine)
        wait_started(f"SIPp UAS {address[0]}:{address[1]}", self.proc, lambda: udp_bound(*address),
                     f"binds UDP {address[0]}:{address[1]}", log=out)  # fmt: skip

    def invite_uri(self, within: float = 10.0) -> str:
        """The Request-URI of the INVITE SIPp answered (after its scenario completed)."""
        assert self.proc.wait(within) == 0, "SIPp's UAS scenario did not complete"
        text = self.trace.read_text(errors="replace")
        found = re.search(r"^INVITE (\S+) SIP/2.0", text, re.M)
        assert found, text[-2000:]
        return found.group(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def test_the_example_routes_to_gateway_voicemail_and_an_alias(farm: dict[str, Any], tmp_path: Path) -> None:
    gateway, voicemail = SippUas(GATEWAY, tmp_path), SippUas(VOICEMAIL, tmp_path)
    alice, bob = SipClient("127.0.0.2"), SipClient("127.0.0.3")
    try:
        call(farm, f"sip:+15551234@{DOMAIN}")
        assert gateway.invite_uri() == "sip:+15551234@127.0.0.1:15090"

        call(farm, f"sip:nobody@{DOMAIN}")
        assert voicemail.invite_uri() == "sip:vm@127.0.0.1:15091"

        for phone, user in ((alice, "alice"), (bob, "bob")):
            reply = phone.register(farm["address"], user, f"{user}-secret")
            assert reply is not None and reply.status == 200, reply
        call(farm, f"sip:sales@{DOMAIN}", user="bob")
        for phone in (alice, bob):
            deadline = time.monotonic() + 5
            got = None
            while got is None and time.monotonic() < deadline:
                msg = phone.recv(0.5)
                if msg is not None and msg.is_request and msg.method == b"INVITE":
                    got = msg
            assert got is not None, f"{phone.host} did not ring for sales"
    finally:
        for closable in (gateway, voicemail, alice, bob):
            closable.close()


def node_events(run: Path, event: str) -> dict[str, int]:
    """How many times each node's log has ``event`` (``routing_reloaded``...)."""
    return {p.name: p.read_text().count(f"event={event} ") for p in (run / "logs").glob("node*.log")}


def wait_every_node_logged(run: Path, event: str, before: dict[str, int], within: float = 10.0) -> None:
    """Until every node logged ``event`` once more than ``before`` (each polls the epoch every
    second: a fixed sleep would be a guess on a loaded machine)."""
    deadline = time.monotonic() + within
    while True:
        now = node_events(run, event)
        if before and all(now.get(name, 0) > count for name, count in before.items()):
            return
        assert time.monotonic() < deadline, f"not every node logged {event}: {before} -> {now}"
        time.sleep(0.1)


def test_reload_changes_the_routing_and_a_bad_file_keeps_it(farm: dict[str, Any]) -> None:
    config: Path = farm["config"]
    config.write_text(config.read_text().replace('user_prefix = "+1555"', 'user_prefix = "+1666"'))
    reload = [sys.executable, "-m", "sipfarm", "reload", "--redis", farm["redis"]]
    reloaded = node_events(farm["run"], "routing_reloaded")
    done = subprocess.run(reload, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    wait_every_node_logged(farm["run"], "routing_reloaded", reloaded)
    gateway = Listener(GATEWAY)
    try:
        call(farm, f"sip:+16661234@{DOMAIN}")
        assert gateway.invite() is not None, "the reloaded rule did not route to the gateway"
        config.write_text(config.read_text() + "\n[[routing.rules]]\naction = 'nonsense'\n")
        check = subprocess.run([*reload, "--check", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 2 and "line" in check.stderr, check.stderr
        refused = node_events(farm["run"], "routing_reload_refused")
        done = subprocess.run(reload, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0
        wait_every_node_logged(farm["run"], "routing_reload_refused", refused)
        call(farm, f"sip:+16665678@{DOMAIN}")
        assert gateway.invite() is not None, "the old table was not kept"
    finally:
        gateway.close()
