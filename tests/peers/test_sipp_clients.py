"""SIPp 3.6.1 (Debian ``sip-tester``) as the farm's client, over UDP and TCP, through the balancer of
``default_farm``: the client matrix's SIPp cells.

Each test runs SIPp processes on their own loopback addresses, every run bounded (``-m 1``,
``-timeout``) and killed at teardown: alice's UAC on 127.0.0.2, bob's phone on 127.0.0.3. A
scenario cannot both register and answer calls (their Call-IDs differ, PEERS.md), and a UAS run
apart from the registration is not reachable: the farm sends a call over the flow the REGISTER
came from (a TCP connection, or a UDP source port; ``default_farm``'s balancer takes a UDP
Contact on another port only where loopback destinations are allowed). So bob's phone is one
SIPp run: ``register.xml`` registers (digest) and waits, and its out-of-call scenario
(``-oocsf uas_*.xml``) answers the calls that come in on the same socket, logging
"<scenario> done" when it has seen all it waits for. Alice's UAC calls ``sip:bob@farm.test`` with
digest auth (the 407 round trip) and passes when SIPp exits 0: every message of its scenario
came in order, and an unexpected one fails it.

- register: 401, REGISTER with credentials, 200.
- call: 180, 200, ACK, BYE, 200 along the route set the farm recorded.
- audio: SIPp keeps no RTP statistics, so each side's SDP offers the port of a test socket on
  its own address and both SIPps play ``g711a.pcap`` (G.711 A-law) for 1.5 s to the address the
  other's SDP names; each socket must receive RTP (version 2, payload type 8). The farm relays
  no media on its default configuration: what the farm does for audio is carry each side's SDP
  intact, and the audio really reaches the other side.
- early media: bob answers 183 with SDP and plays an announcement for a second before his 200;
  alice's scenario fails unless the 183 (with ``m=audio``) comes before the 200, and her socket
  must receive the announcement's RTP.
- busy: 486, ACKed on the INVITE's branch. No answer: 180, then alice CANCELs after 2 s: 200 for
  the CANCEL, 487 for the INVITE, ACK; bob's phone must have seen the CANCEL.
- message: MESSAGE with digest auth; bob's phone checks the text and answers 200. To carol, who
  has no binding, the farm answers 480 Temporarily Unavailable (it keeps no copy).

TLS: Debian's SIPp 3.6.1 is built without TLS (``-t l1`` is refused), so there is no SIPp TLS
cell; the note is on the UDP cell's register feature.

Scenarios: ``tests/peers/scenarios/``. Each run's messages, errors and logs are in the test's
``tmp_path`` (``-trace_msg``, ``-trace_err``, ``-trace_logs``) and shown when it fails.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures.default_farm import DefaultFarm
from fixtures.startup import START_TIMEOUT_S, StartupError, wait_started

from benchmarks.sipp import free_media_port
from sipfarm.ports import free_port

from .loopback_capture import LoopbackCapture

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
SIPP = "sipp"
TLS_NOTE = "Debian's SIPp 3.6.1 is built without TLS (-t l1 refused): no TLS cell"
CALLER_IP = "127.0.0.2"  # alice's UAC
CALLEE_IP = "127.0.0.3"  # bob's registration and UAS
TRANSPORT_FLAG = {"udp": "u1", "tcp": "t1"}  # one socket for the whole run
RUN_TIMEOUT_S = 20  # SIPp's own -timeout; the test waits a little longer, then kills
MIN_RTP_PACKETS = 20  # g711a.pcap sends ~33 packets a second
PCMA = 8
PHONE_HOLD_MS = 60_000  # a phone stays registered this long, unless killed at teardown

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 90)


@pytest.fixture(autouse=True)
def _sipp_installed() -> None:
    # not a skip: make setup installs it, so a missing SIPp is a broken setup
    if shutil.which(SIPP) is None:
        pytest.fail("sipp missing (Debian package sip-tester): run make setup")


@dataclass
class SippRun:
    """One SIPp process, bounded by ``-m 1`` and ``-timeout``."""

    name: str
    workdir: Path
    process: subprocess.Popen[bytes]

    def wait(self, timeout: float = RUN_TIMEOUT_S + 5) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait(5)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    def logged(self) -> str:
        """What the scenario's <log> actions wrote."""
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def report(self) -> str:
        """Output, errors and the messages seen, for an assertion message."""
        parts = []
        for suffix in ("out", "log", "errors.log", "messages.log"):
            path = self.workdir / f"{self.name}.{suffix}"
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


class Sipp:
    """Starts SIPp runs in a test's directory; every one is killed at teardown."""

    def __init__(self, workdir: Path, farm: DefaultFarm, transport: str) -> None:
        self.workdir = workdir
        self.farm = farm
        self.transport = transport
        self.runs: list[SippRun] = []

    def start(
        self,
        name: str,
        scenario: str,
        *,
        ip: str,
        timeout_s: int = RUN_TIMEOUT_S,
        injection: list[tuple[str, ...]] | None = None,
        variables: dict[str, str] | None = None,
        extra: list[str] | None = None,
    ) -> SippRun:
        argv = [
            SIPP, self.farm.proxy(self.transport),
            "-sf", str(SCENARIOS / f"{scenario}.xml"),
            "-t", TRANSPORT_FLAG[self.transport],
            "-i", ip, "-p", str(free_port(ip)),
            # the media socket is the SDP's audio port when the test gives one (RtpCounter)
            "-mp", (variables or {}).get("rtp_port") or str(free_media_port(ip)),
            "-m", "1", "-timeout", f"{timeout_s}s", "-timeout_error",
            "-nostdin",
            "-trace_err", "-error_file", str(self.workdir / f"{name}.errors.log"),
            "-trace_msg", "-message_file", str(self.workdir / f"{name}.messages.log"),
            "-trace_logs", "-log_file", str(self.workdir / f"{name}.log"),
            *(extra or []),
        ]  # fmt: skip
        if injection is not None:
            csv = self.workdir / f"{name}.csv"
            csv.write_text("SEQUENTIAL\n" + "".join(";".join(row) + "\n" for row in injection))
            argv += ["-inf", str(csv)]
        for key, value in (variables or {}).items():
            argv += ["-set", key, value]
        with (self.workdir / f"{name}.out").open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, start_new_session=True)  # fmt: skip
        run = SippRun(name, self.workdir, proc)
        self.runs.append(run)
        return run

    def kill_all(self) -> None:
        for run in self.runs:
            run.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.process.wait(5)

    def phone(self, user: str, uas: str, rtp_port: int | None = None) -> SippRun:
        """``user``'s phone: registers (digest) and answers calls on the same socket with the
        ``uas`` scenario (``rtp_port``: its SDP's audio port); returns once registered."""
        variables = {"domain": self.farm.domain}
        if rtp_port is not None:
            variables["rtp_port"] = str(rtp_port)
        run = self.start(user, "register", ip=CALLEE_IP,
                         injection=[(user, self.farm.accounts[user])], variables=variables,
                         timeout_s=PHONE_HOLD_MS // 1000 + 5,
                         extra=["-oocsf", str(SCENARIOS / f"{uas}.xml"), "-d", str(PHONE_HOLD_MS)])  # fmt: skip
        # its first sign of life: SIPp has no other, so the start-up allowance
        try:
            wait_started(f"SIPp {user}", run.process, lambda: "registered" in run.logged(), "logs registered")
        except StartupError as exc:
            raise AssertionError(f"{exc}\n{run.report()}\n{farm_logs(self.farm)}") from None
        return run

    def uac(self, scenario: str, callee: str, *, rtp_port: int | None = None) -> SippRun:
        """Alice's UAC running ``scenario`` to ``callee`` (``rtp_port``: her SDP's audio port)."""
        variables = {"domain": self.farm.domain}
        if rtp_port is not None:
            variables["rtp_port"] = str(rtp_port)
        return self.start(scenario, scenario, ip=CALLER_IP,
                          injection=[(callee, "alice", self.farm.accounts["alice"])],
                          variables=variables)  # fmt: skip


def farm_logs(farm: DefaultFarm) -> str:
    """The farm's logs without the balancer's OPTIONS probes of the node."""
    return "\n".join(line for line in farm.logs().splitlines() if "method=OPTIONS" not in line)


class RtpCounter:
    """The audio port a SIPp phone's SDP names, which is also its media socket (``-mp``): SIPp
    plays its pcap from it, so RTP is symmetric as a phone's is, and the relay latches onto it.
    Counts the G.711 A-law RTP packets that reached it on the wire (SIPp reads them itself)."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.port: int = free_port(ip, tcp=False)
        self._capture = LoopbackCapture(self.port)

    def count(self) -> int:
        """RTP v2 packets with payload type 8 that arrived at the port so far."""
        return sum(
            1
            for p in self._capture.snapshot()
            if p.proto == "udp"
            and p.dst == (self.ip, self.port)
            and len(p.payload) >= 12
            and p.payload[0] >> 6 == 2
            and p.payload[1] & 0x7F == PCMA
        )

    def close(self) -> None:
        self._capture.close()


@pytest.fixture(params=["udp", "tcp"])
def sipp(request: pytest.FixtureRequest, default_farm: DefaultFarm, tmp_path: Path) -> Iterator[Sipp]:
    runs = Sipp(tmp_path, default_farm, request.param)
    try:
        yield runs
    finally:
        runs.kill_all()


@pytest.fixture
def rtp() -> Iterator[tuple[RtpCounter, RtpCounter]]:
    """(alice's socket, bob's socket)."""
    caller, callee = RtpCounter(CALLER_IP), RtpCounter(CALLEE_IP)
    try:
        yield caller, callee
    finally:
        caller.close()
        callee.close()


def assert_ran(run: SippRun, farm: DefaultFarm) -> None:
    """The run ended on its own, exit 0: every message of its scenario came, in order."""
    code = run.wait()
    assert code == 0, f"SIPp {run.name} exited {code}\n{run.report()}\n{farm_logs(farm)}"


def assert_answered(phone: SippRun, uas: str, farm: DefaultFarm) -> None:
    """The phone's UAS scenario ran to its end (the CANCEL, BYE or ACK it waits for came)."""
    deadline = time.monotonic() + 5
    while f"{uas} done" not in phone.logged():
        if time.monotonic() > deadline:
            raise AssertionError(f"{uas} did not complete\n{phone.report()}\n{farm_logs(farm)}")
        time.sleep(0.05)


def call(sipp: Sipp, uac: str, uas: str, rtp: tuple[RtpCounter, RtpCounter] | None = None) -> None:
    """Bob's phone answering with ``uas``; alice's UAC (``uac``) calls him; both must complete."""
    caller_rtp, callee_rtp = rtp or (None, None)
    bob = sipp.phone("bob", uas, callee_rtp.port if callee_rtp else None)
    # no media in a busy or unanswered call: the offer names a port nobody reads
    offer_port = caller_rtp.port if caller_rtp else free_port(CALLER_IP, tcp=False)
    assert_ran(sipp.uac(uac, "bob", rtp_port=offer_port), sipp.farm)
    assert_answered(bob, uas, sipp.farm)


def test_register_call_audio(sipp: Sipp, matrix, rtp: tuple[RtpCounter, RtpCounter]) -> None:  # type: ignore[no-untyped-def]
    cell = matrix("sipp", sipp.transport, "register", "call", "audio")
    if sipp.transport == "udp":
        cell.note("register", TLS_NOTE)
    caller_rtp, callee_rtp = rtp
    bob = sipp.phone("bob", "uas_answer", callee_rtp.port)
    cell.ok("register")

    assert_ran(sipp.uac("uac_call", "bob", rtp_port=caller_rtp.port), sipp.farm)
    assert_answered(bob, "uas_answer", sipp.farm)
    cell.ok("call")

    heard_by_bob, heard_by_alice = callee_rtp.count(), caller_rtp.count()
    print(f"{sipp.transport}: RTP packets at bob {heard_by_bob}, at alice {heard_by_alice}")
    assert heard_by_bob >= MIN_RTP_PACKETS, f"bob's side got {heard_by_bob} RTP packets"
    assert heard_by_alice >= MIN_RTP_PACKETS, f"alice's side got {heard_by_alice} RTP packets"
    cell.ok("audio")


def test_early_media(sipp: Sipp, matrix, rtp: tuple[RtpCounter, RtpCounter]) -> None:  # type: ignore[no-untyped-def]
    cell = matrix("sipp", sipp.transport, "early media")
    call(sipp, "uac_early_media", "uas_early_media", rtp)
    heard = rtp[0].count()
    assert heard >= MIN_RTP_PACKETS, f"alice's side got {heard} RTP packets of the announcement"
    cell.ok("early media")


def test_busy(sipp: Sipp, matrix) -> None:  # type: ignore[no-untyped-def]
    cell = matrix("sipp", sipp.transport, "busy")
    call(sipp, "uac_busy", "uas_busy")
    cell.ok("busy")


def test_no_answer(sipp: Sipp, matrix) -> None:  # type: ignore[no-untyped-def]
    cell = matrix("sipp", sipp.transport, "no answer")
    call(sipp, "uac_cancel", "uas_ring")
    cell.ok("no answer")


def test_message(sipp: Sipp, matrix) -> None:  # type: ignore[no-untyped-def]
    cell = matrix("sipp", sipp.transport, "message")
    cell.note("message", "to a user with no binding: 480 (no stored copy)")
    bob = sipp.phone("bob", "uas_message")
    assert_ran(sipp.uac("uac_message", "bob"), sipp.farm)
    assert_answered(bob, "uas_message", sipp.farm)
    assert_ran(sipp.uac("uac_message_offline", "carol"), sipp.farm)
    cell.ok("message")
