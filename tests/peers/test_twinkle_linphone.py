"""The Twinkle and linphonec cells of the client matrix: Twinkle 1.10 (``twinkle -c``, Debian
``twinkle``; UDP, TCP) and linphonec 5.1 (Debian ``linphone-cli``; UDP, TCP, TLS), both
driven on their command line (``twinkle_phone.py``, ``linphone_phone.py``), through the balancer of
one farm the module shares (the farm of ``default_farm``: a node on the default configuration,
every call's media anchored at the relay).

Per phone and transport (``test_calls``), two phones of that kind register and:

- register: Twinkle prints "registration succeeded", linphonec's ``states proxies`` says
  ``LinphoneRegistrationOk``, after the digest round trip.
- call: alice calls bob, bob's phone rings, he answers, both see the call up; bob hangs up and
  alice sees the far end end it (his BYE crossed the farm along the recorded route).
- audio: the relay received a second of RTP from each party (its ng ``query`` of the call: each
  leg's packets). linphonec also hears: it plays its own tone as microphone and records what it
  hears, which is the other's tone, loud, at its frequency. Twinkle's sound devices are
  ``alsa:null``: its audio cell is the RTP both ways (noted in the matrix).
- hold: alice holds (re-INVITE, a=sendonly) and resumes (sendrecv): her phone reports each
  re-INVITE answered 200 (a held linphonec says it was paused), the call stays up, and the relay
  receives a second of RTP from each party again after the resume.
- message: alice's MESSAGE text shows on bob's console.
- no answer: alice calls, bob's phone rings, alice gives up (CANCEL): bob's ringing call ends,
  unanswered.

Between the two phones (``test_linphonec_calls_twinkle``, ``test_twinkle_calls_linphonec``; UDP):
a call each way with hold, resume and BYE. Twinkle calling linphonec needs the proxy to deliver
route-less in-dialog requests to a GRUU (linphonec's Contact is its GRUU, and Twinkle ignores the
``Record-route:`` spelling of its 200): without that (before 2026-12-02) the hold got 404, the
ACK was dropped and linphonec hung up after 32 s.

Phones of a test start together (both register in parallel). About 45 s for the module (a farm,
seven tests of 4-7 s) on two cores; a binary's first start on a machine can take 7 s more
(loading its libraries), which the start-up allowance covers. Runs in the loopback-only
namespace (``scripts/in-netns.sh``), like the other softphone tests. A test skips when its phone
is not installed (Debian ``twinkle``, ``linphone-cli``), before the farm starts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import pytest
from fixtures.default_farm import DefaultFarm, running_default_farm
from fixtures.farm import USERS
from fixtures.matrix import Cell
from fixtures.redis_server import RedisProcess, flushall
from fixtures.relay import ng_request
from fixtures.startup import START_TIMEOUT_S

from . import linphone_phone, twinkle_phone
from .linphone_phone import LinphonePhone
from .netns import skip_reason
from .softphone import dominant_frequency, tone_rms
from .twinkle_phone import TwinklePhone

TONE_HZ = {"alice": 660, "bob": 440, "carol": 880, "dave": 550}
ACCOUNTS = {**USERS, "dave": "dave-secret"}
FLOW_S = 5.0  # for MIN_PACKETS from each party (~1 s at 50 a second)
HOLD_S = 1.0
RING_S = 0.5
STEP_S = 10.0
HZ_TOLERANCE = 5
MIN_RMS = 2000.0  # a 0.5 full-scale sine is ~11600 after G.711; silence ~0
TWINKLE_AUDIO_NOTE = "RTP both ways through the relay (Twinkle's sound devices are alsa:null: nothing to hear)"
MIN_PACKETS = 50  # a second's worth at 20 ms

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(START_TIMEOUT_S + 60),
]


class Phone(Protocol):
    """What a test does with either phone (``TwinklePhone``, ``LinphonePhone``)."""

    name: str

    def wait_registered(self, timeout: float = ...) -> None: ...
    def call(self, uri: str) -> int: ...
    def answer(self) -> int: ...
    def hangup(self) -> int: ...
    def hold(self) -> int: ...
    def resume(self) -> int: ...
    def message(self, uri: str, text: str) -> int: ...
    def mark(self) -> int: ...
    def wait_for(self, pattern: str, timeout: float = ..., since: int = ...) -> Any: ...
    def find(self, pattern: str, since: int = ...) -> Any: ...
    def tail(self, lines: int = ...) -> str: ...


# What each phone prints (see the drivers' docstrings)
RINGING = {"twinkle": r"Line \d+: incoming call", "linphonec": r"Receiving new incoming call from"}
ANSWERED = {
    "twinkle": r"Line \d+: (far end answered call|call established)",
    "linphonec": r"Call \d+ with .* connected\.",
}
# the holder's re-INVITE answered 200: held, then resumed
HELD = {"twinkle": r"Line \d+: re-INVITE successful", "linphonec": r"Call \d+ with .* is now paused\."}
RESUMED = {"twinkle": r"Line \d+: re-INVITE successful", "linphonec": r"Media streams established"}
FAILED = {
    "twinkle": r"Line \d+: (re-INVITE failed|far end ended call|call ended)",
    "linphonec": r"Call \d+ .*(ended|error)",
}
ENDED = {
    "twinkle": r"Line \d+: (far end ended call|call ended|far end cancelled call|call failed)",
    "linphonec": r"Call \d+ with .* ended",
}


# a skip mark, not a skip in the test: a missing phone must not start the module's farm
NEEDS = {
    "twinkle": pytest.mark.skipif(not twinkle_phone.installed(), reason="twinkle not installed (Debian twinkle)"),
    "linphonec": pytest.mark.skipif(not linphone_phone.installed(), reason="linphonec not installed (linphone-cli)"),
}


def kind(phone: Phone) -> str:
    return "twinkle" if isinstance(phone, TwinklePhone) else "linphonec"


@pytest.fixture(scope="module")
def farm(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultFarm]:
    redis_server.start()
    flushall(redis_server.port)
    with running_default_farm(redis_server.url, tmp_path_factory.mktemp("farm"), ACCOUNTS) as started:
        yield started


def aor(farm: DefaultFarm, user: str) -> str:
    return f"sip:{user}@{farm.domain}"


def start_phones(
    stack: ExitStack, farm: DefaultFarm, tmp_path: Path, transport: str, *wanted: tuple[str, str]
) -> list[Phone]:
    """(kind, user) phones started together, then each waited for until registered."""
    phones: list[Phone] = []
    for phone_kind, user in wanted:
        password, proxy = farm.accounts[user], farm.proxy(transport)
        phone: TwinklePhone | LinphonePhone
        if phone_kind == "twinkle":
            phone = stack.enter_context(TwinklePhone(user, tmp_path))
            phone.start(user, password, farm.domain, proxy, transport=transport)
        else:
            phone = stack.enter_context(LinphonePhone(user, tmp_path, tone_hz=TONE_HZ[user]))
            phone.start(user, password, farm.domain, proxy, transport=transport)
        phones.append(phone)
    for started in phones:
        started.wait_registered(STEP_S)
    return phones


def report(farm: DefaultFarm, phones: list[Phone]) -> str:
    return "\n".join([farm.logs(), *(f"--- {phone.name}\n{phone.tail(60)}" for phone in phones)])


# -- the relay's view of a call -----------------------------------------------------------------


def relay_calls(farm: DefaultFarm) -> set[bytes]:
    reply = ng_request(farm.relay.ng, {"command": "list"})
    return set(reply[b"calls"])


def leg_packets(farm: DefaultFarm, call_id: bytes) -> dict[bytes, int]:
    """RTP packets the relay received from each party of the call, by its tag."""
    reply = ng_request(farm.relay.ng, {"command": "query", "call-id": call_id})
    return {tag: int(leg[b"medias"][0][b"streams"][0][b"stats"][b"packets"]) for tag, leg in reply[b"tags"].items()}


def new_call(farm: DefaultFarm, before: set[bytes]) -> bytes:
    deadline = time.monotonic() + 5
    while not (fresh := relay_calls(farm) - before):
        assert time.monotonic() < deadline, "the relay anchors no new call"
        time.sleep(0.05)
    assert len(fresh) == 1, fresh
    return fresh.pop()


def wait_flowing(farm: DefaultFarm, call_id: bytes, what: str) -> dict[bytes, int]:
    """Until the relay has received MIN_PACKETS more RTP packets from each party (within
    FLOW_S); the packets from each party, counted from the call, when they had."""
    first = leg_packets(farm, call_id)
    deadline = time.monotonic() + FLOW_S
    while True:
        now = leg_packets(farm, call_id)
        if len(now) == 2 and all(now[tag] - first.get(tag, 0) >= MIN_PACKETS for tag in now):
            return now
        if time.monotonic() > deadline:
            reply = ng_request(farm.relay.ng, {"command": "query", "call-id": call_id})
            raise AssertionError(f"{what}: RTP to the relay from each party {first} -> {now} in {FLOW_S} s: {reply}")
        time.sleep(0.1)


# -- scenarios ------------------------------------------------------------------------------------


def outcome(phone: Phone, wanted: dict[str, str], since: int) -> None:
    """Until ``phone`` prints the ``wanted`` line, or fails at once on a failure line."""
    line = phone.wait_for(f"{wanted[kind(phone)]}|{FAILED[kind(phone)]}", STEP_S, since=since)
    assert re.search(wanted[kind(phone)], line.group(0)), f"{phone.name}: {line.group(0)}\n{phone.tail()}"


def call_hold_bye(farm: DefaultFarm, caller: Phone, callee: Phone, cell: Cell | None = None) -> dict[str, Any]:
    """caller calls callee, who answers; talk; caller holds, resumes; talk; callee hangs up.
    Marks call, audio and hold in ``cell`` as each holds; what the relay counted."""
    before = relay_calls(farm)
    callee_user = callee.name.rpartition("-")[2]
    m_caller, m_callee = caller.mark(), callee.mark()
    caller.call(aor(farm, callee_user))
    callee.wait_for(RINGING[kind(callee)], STEP_S, since=m_callee)
    callee.answer()
    caller.wait_for(ANSWERED[kind(caller)], STEP_S, since=m_caller)
    callee.wait_for(ANSWERED[kind(callee)], STEP_S, since=m_callee)
    call_id = new_call(farm, before)
    talk = wait_flowing(farm, call_id, "talking")

    m_caller, m_callee = caller.mark(), callee.mark()
    caller.hold()
    outcome(caller, HELD, m_caller)
    if isinstance(callee, LinphonePhone):
        callee.wait_for(r"Call \d+ has been paused by", STEP_S, since=m_callee)
    time.sleep(HOLD_S)
    m_resume = caller.mark()
    caller.resume()
    outcome(caller, RESUMED, m_resume)
    resumed = wait_flowing(farm, call_id, "resumed")
    for phone, mark in ((caller, m_caller), (callee, m_callee)):
        assert phone.find(FAILED[kind(phone)], since=mark) is None, phone.tail()
    if cell is not None:
        cell.ok("hold")

    m_caller = caller.mark()
    callee.hangup()
    caller.wait_for(ENDED[kind(caller)], STEP_S, since=m_caller)
    if cell is not None:
        cell.ok("call")
    return {"call_id": call_id, "talk": talk, "resumed": resumed}


def heard(phone: LinphonePhone) -> tuple[float, float]:
    """(RMS, dominant Hz) of what a linphonec heard in its current recording."""
    return tone_rms(phone.recording, skip_s=0.2), dominant_frequency(phone.recording)


CELLS = [
    pytest.param("twinkle", "udp", id="twinkle-udp", marks=NEEDS["twinkle"]),
    pytest.param("twinkle", "tcp", id="twinkle-tcp", marks=NEEDS["twinkle"]),
    pytest.param("linphonec", "udp", id="linphonec-udp", marks=NEEDS["linphonec"]),
    pytest.param("linphonec", "tcp", id="linphonec-tcp", marks=NEEDS["linphonec"]),
    pytest.param("linphonec", "tls", id="linphonec-tls", marks=NEEDS["linphonec"]),
]


@pytest.mark.parametrize(("client", "transport"), CELLS)
def test_calls(farm: DefaultFarm, matrix, tmp_path: Path, client: str, transport: str) -> None:  # type: ignore[no-untyped-def]
    cell: Cell = matrix(client, transport, "register", "call", "audio", "hold", "message", "no answer")
    users = ("alice", "bob") if client == "twinkle" else ("carol", "dave")
    phones: list[Phone] = []
    with ExitStack() as stack:
        try:
            phones = start_phones(stack, farm, tmp_path, transport, *((client, u) for u in users))
            cell.ok("register")
            caller, callee = phones
            figures = call_hold_bye(farm, caller, callee, cell)
            print(f"{client}/{transport}: relay packets from each party {figures}")
            if client == "twinkle":
                cell.ok("audio")
                cell.note("audio", TWINKLE_AUDIO_NOTE)

            text = f"hello {users[1]} over {transport}"
            m_callee = callee.mark()
            caller.message(aor(farm, users[1]), text)
            callee.wait_for(text, STEP_S, since=m_callee)
            cell.ok("message")

            # no answer: the callee's phone rings until the caller gives up (CANCEL)
            m_caller, m_callee = caller.mark(), callee.mark()
            caller.call(aor(farm, users[1]))
            callee.wait_for(RINGING[client], STEP_S, since=m_callee)
            time.sleep(RING_S)
            caller.hangup()
            callee.wait_for(ENDED[client], STEP_S, since=m_callee)
            caller.wait_for(ENDED[client], STEP_S, since=m_caller)
            assert callee.find(ANSWERED[client], since=m_callee) is None, callee.tail()
            cell.ok("no answer")
        except BaseException:
            print(report(farm, phones))
            raise
    if client == "linphonec":
        # each recorded the first call only (the second was never answered)
        for phone, other in zip(phones, reversed(users), strict=True):
            assert isinstance(phone, LinphonePhone)
            rms, hz = heard(phone)
            print(f"{phone.name} heard RMS {rms:.0f} at {hz} Hz")
            assert rms > MIN_RMS and abs(hz - TONE_HZ[other]) <= HZ_TOLERANCE, (phone.name, rms, hz)
        cell.ok("audio")


def cross_call(farm: DefaultFarm, tmp_path: Path, caller_kind: str) -> None:
    """Twinkle (alice) and linphonec (carol) over UDP; the ``caller_kind`` one calls the other."""
    phones: list[Phone] = []
    with ExitStack() as stack:
        try:
            phones = start_phones(stack, farm, tmp_path, "udp", ("twinkle", "alice"), ("linphonec", "carol"))
            caller, callee = phones if caller_kind == "twinkle" else reversed(phones)
            figures = call_hold_bye(farm, caller, callee)
            print(f"{caller.name} -> {callee.name}: relay packets from each party {figures}")
        except BaseException:
            print(report(farm, phones))
            raise


@NEEDS["twinkle"]
@NEEDS["linphonec"]
def test_linphonec_calls_twinkle(farm: DefaultFarm, tmp_path: Path) -> None:
    cross_call(farm, tmp_path, "linphonec")


@NEEDS["twinkle"]
@NEEDS["linphonec"]
def test_twinkle_calls_linphonec(farm: DefaultFarm, tmp_path: Path) -> None:
    cross_call(farm, tmp_path, "twinkle")
