"""RFC 5626 outbound and RFC 5627 GRUU with a real client: baresip 1.0.0 (Debian ``baresip-core``,
libre 1.1.0) through the balancer of ``default_farm``, over UDP (and TCP for the flow).

What baresip does (its source, v1.0.0 ``src/ua.c``, ``src/reg.c``; libre v1.1.0
``src/sipreg/reg.c``, ``src/sip/keepalive*.c``), and what these tests rely on:

* ``;sipnat=outbound`` with an ``;outbound=`` proxy: the REGISTER's Contact carries
  ``+sip.instance="<urn:uuid:...>"`` (the UUID of the ``uuid`` module, mandatory for outbound) and
  ``reg-id=1``, and the request ``Supported: gruu, outbound, path``.
* A 200 with ``Require: outbound`` starts libre's keepalive on the flow, at the 200's
  ``Flow-Timer`` (UDP default 29 s without one): on UDP a STUN Binding request to the address
  the 200 came from, at once (to learn the mapped address) and then every 80-100 % of the
  interval; a STUN timeout or a changed mapped address re-registers. On TCP a CRLFCRLF every
  80-100 % of the interval (none at once), the connection closed if no pong comes in 10 s.
* The ``pub-gruu`` of the 200's Contact becomes its contact (``ua_cuser``): the Contact of the
  requests and responses of its calls (180, 200...) is its public GRUU from then on.
* The ``uuid`` module reads the UUID from the config dir's ``uuid`` file with ``fgets``: a
  trailing newline would end up inside ``+sip.instance`` (a malformed REGISTER the farm drops),
  so ``BaresipPhone`` writes it without one.

The tests watch the wire with a raw ``AF_PACKET`` socket on ``lo`` (root in the loopback-only
namespace; no tcpdump needed), for the balancer's SIP port:

- keepalive: baresip registers with outbound; its REGISTER has ``reg-id``, ``+sip.instance`` and
  ``Supported: outbound``; the 200 it got has ``Require: outbound`` and ``Flow-Timer: 25``.
  baresip sends a STUN Binding request on its SIP port to the balancer's, which answers a Binding
  success with the phone's own address (XOR-MAPPED-ADDRESS) at once, and again for the periodic
  keepalive 20-25 s later (80-100 % of Flow-Timer 25). baresip is still registered
  and did not register again, and a call to bob rings his phone.
- gruu: bob's two baresips (two instances) get ``pub-gruu`` and ``temp-gruu`` in their 200s;
  alice's baresip dials bob-1's public GRUU: bob-1 rings, bob-2 does not; then bob-2's temporary
  GRUU: bob-2 rings, bob-1 does not (a call to ``sip:bob@farm.test`` rings both: the control).
  bob-1's 180 names its public GRUU as Contact; alice calls that GRUU again and bob-1 answers: the
  dialog's remote target is the GRUU (alice's BYE is addressed to it) and the farm delivers the
  BYE to bob-1, whose call ends.
- outbound over TCP (no matrix cell): the 200 has ``Flow-Timer: 110`` and a call rings bob through
  his TCP flow. libre's first CRLF keepalive comes 88-110 s after the 200, beyond these tests'
  budget, so the TCP keepalive itself (CRLF, the farm's CRLF pong) is not waited for.

About 45 s for the three tests; in the loopback-only namespace (``scripts/in-netns.sh``).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures.default_farm import DefaultFarm
from fixtures.startup import START_TIMEOUT_S

from .baresip_phone import BARESIP, BaresipPhone
from .loopback_capture import Packet, capture
from .netns import skip_reason

CLIENT = "baresip"
TONE_HZ = {"alice": 660, "bob": 440}
FLOW_TIMER_UDP = 25  # the farm's defaults (README "GRUU")
FLOW_TIMER_STREAM = 110
STUN_MAGIC = b"\x21\x12\xa4\x42"
STUN_BINDING_REQUEST = 0x0001
STUN_BINDING_SUCCESS = 0x0101
STUN_XOR_MAPPED_ADDRESS = 0x0020
RING_S = 10.0
NO_RING_S = 2.0  # after the right device rang: enough for the other one to have rung too

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(START_TIMEOUT_S + 60),
]


@pytest.fixture(autouse=True)
def _baresip_installed() -> None:
    if shutil.which(BARESIP) is None:
        pytest.fail(f"{BARESIP} missing (Debian package baresip-core): run make setup")


# -- the wire -------------------------------------------------------------------------------------


def sip_messages(
    packets: list[Packet], *, src_port: int = 0, dst_port: int = 0, proto: str = "udp"
) -> list[tuple[Packet, str]]:
    """(packet, text) of the SIP messages from/to the given ports (0: any): UDP datagrams, or TCP
    segments that start a message (enough for the short ones looked at here)."""
    found = []
    for p in packets:
        if p.proto != proto or p.payload[:4] == b"\x00\x01\x00\x00" or p.payload[4:8] == STUN_MAGIC:
            continue
        if (src_port and p.src[1] != src_port) or (dst_port and p.dst[1] != dst_port):
            continue
        text = p.payload.decode("utf-8", "replace")
        if text.startswith(("SIP/2.0 ", "REGISTER ", "INVITE ", "OPTIONS ", "ACK ", "BYE ", "CANCEL ")):
            found.append((p, text))
    return found


def header(text: str, name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive) in a SIP message's text."""
    head = text.partition("\r\n\r\n")[0]
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s*:(.*)$", head, re.MULTILINE | re.IGNORECASE)]


def register_200s(packets: list[Packet], phone_port: int, proto: str = "udp") -> list[str]:
    """The 200 OKs to REGISTER the balancer sent ``phone_port`` (0: any)."""
    return [
        text
        for _, text in sip_messages(packets, dst_port=phone_port, proto=proto)
        if text.startswith("SIP/2.0 200") and any("REGISTER" in v for v in header(text, "CSeq"))
    ]


@dataclass(frozen=True)
class Stun:
    packet: Packet
    kind: int
    tid: bytes
    mapped: tuple[str, int] | None


def stun_messages(packets: list[Packet], phone_port: int, balancer_port: int) -> list[Stun]:
    """STUN messages between the phone's SIP port and the balancer's (either way), decoded."""
    found = []
    for p in packets:
        data = p.payload
        if p.proto != "udp" or len(data) < 20 or data[4:8] != STUN_MAGIC:
            continue
        if {p.src[1], p.dst[1]} != {phone_port, balancer_port}:
            continue
        kind, length = struct.unpack("!HH", data[:4])
        mapped = None
        at = 20
        while at + 4 <= 20 + length:
            attr, size = struct.unpack("!HH", data[at : at + 4])
            value = data[at + 4 : at + 4 + size]
            if attr == STUN_XOR_MAPPED_ADDRESS and len(value) >= 8 and value[1] == 1:
                port = struct.unpack("!H", value[2:4])[0] ^ 0x2112
                addr = bytes(a ^ b for a, b in zip(value[4:8], STUN_MAGIC, strict=True))
                mapped = (str(ipaddress.IPv4Address(addr)), port)
            at += 4 + size + (-size % 4)
        found.append(Stun(p, kind, data[8:20], mapped))
    return found


def stun_exchanges(packets: list[Packet], phone: BaresipPhone, balancer_port: int) -> list[tuple[Stun, Stun | None]]:
    """Each Binding request from the phone to the balancer, with the balancer's Binding success
    for it (same transaction ID, to the phone) or None."""
    messages = stun_messages(packets, phone.sip_port, balancer_port)
    answers = {m.tid: m for m in messages if m.kind == STUN_BINDING_SUCCESS and m.packet.dst[1] == phone.sip_port}
    return [
        (m, answers.get(m.tid))
        for m in messages
        if m.kind == STUN_BINDING_REQUEST and m.packet.src[1] == phone.sip_port
    ]


# -- phones ---------------------------------------------------------------------------------------


class Phones(dict[str, BaresipPhone]):
    def __init__(self, stack: ExitStack, farm: DefaultFarm, tmp_path: Path) -> None:
        super().__init__()
        self.stack, self.farm, self.tmp_path = stack, farm, tmp_path

    def add(self, name: str, *, outbound: bool = False, transport: str = "udp", **options: object) -> BaresipPhone:
        """Start and register ``name`` (``bob-2``: bob's second device) over ``transport``;
        ``outbound``: ``;sipnat=outbound`` with an instance UUID of its own."""
        user = name.partition("-")[0]
        phone = self.stack.enter_context(BaresipPhone(name, self.tmp_path, tone_hz=TONE_HZ[user]))
        self[name] = phone
        if outbound:
            options.update(sipnat="outbound", instance=str(uuid.uuid4()))
        phone.start(
            user, self.farm.accounts[user], self.farm.domain, self.farm.proxy(transport),
            transport=transport, **options,  # type: ignore[arg-type]
        )  # fmt: skip
        assert phone.registration() == "OK", phone.log()[-2000:]
        return phone


@contextmanager
def phones(farm: DefaultFarm, tmp_path: Path) -> Iterator[Phones]:
    """Phones closed when the test ends; the farm's and every phone's log printed if it fails."""
    with ExitStack() as stack:
        started = Phones(stack, farm, tmp_path)
        try:
            yield started
        except BaseException:
            print(farm.logs())
            for phone in started.values():
                print(f"--- {phone.name}\n{phone.log()[-3000:]}")
            raise


def instance_of(phone: BaresipPhone) -> str:
    return "urn:uuid:" + (phone.dir / "uuid").read_text().strip()


def after(phone: BaresipPhone, mark: int, kind: str) -> int:
    """How many ``kind`` events ``phone`` got since ``mark`` (an index into its events)."""
    return sum(1 for e in phone.events[mark:] if e.get("type") == kind)


def wait_after(phone: BaresipPhone, mark: int, kind: str, what: str = "") -> None:
    """Until ``phone`` gets a ``kind`` event after ``mark`` (an index into its events)."""
    deadline = time.monotonic() + RING_S
    while after(phone, mark, kind) == 0:
        assert time.monotonic() < deadline, f"{phone.name}: no {kind} {what}: {phone.events[mark:]}"
        time.sleep(0.05)


def ring(caller: BaresipPhone, uri: str, rings: list[BaresipPhone], silent: list[BaresipPhone]) -> None:
    """``caller`` dials ``uri``: each of ``rings`` gets the call, none of ``silent`` does; the
    caller hears ringing (180), then gives up (CANCEL) and every call closes."""
    marks = {p.name: len(p.events) for p in [caller, *rings, *silent]}
    caller.dial(uri)
    for phone in rings:
        wait_after(phone, marks[phone.name], "CALL_INCOMING", f"for {uri}")
    wait_after(caller, marks[caller.name], "CALL_RINGING", f"for {uri}")
    time.sleep(NO_RING_S)
    for phone in silent:
        assert after(phone, marks[phone.name], "CALL_INCOMING") == 0, f"{phone.name} rang for {uri}"
    caller.hangup()
    for phone in [caller, *rings]:
        wait_after(phone, marks[phone.name], "CALL_CLOSED", f"for {uri}")


# -- tests ----------------------------------------------------------------------------------------


def test_outbound_keepalive(default_farm: DefaultFarm, matrix, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cell = matrix(CLIENT, "udp", "keepalive")
    farm = default_farm
    lb_port = farm.port("udp")
    with capture(lb_port) as cap, phones(farm, tmp_path) as started:
        bob = started.add("bob", outbound=True, answermode="manual")
        registered_at = time.monotonic()

        registers = [t for _, t in sip_messages(cap.snapshot(), src_port=bob.sip_port) if t.startswith("REGISTER ")]
        assert registers, "no REGISTER from bob seen on lo"
        contact = header(registers[-1], "Contact")[0]
        assert "reg-id=1" in contact and f'+sip.instance="<{instance_of(bob)}>"' in contact, contact
        assert "outbound" in ",".join(header(registers[-1], "Supported")), registers[-1]
        oks = register_200s(cap.snapshot(), bob.sip_port)
        assert oks, "no 200 to bob's REGISTER seen on lo"
        assert "outbound" in ",".join(header(oks[-1], "Require")), oks[-1]
        assert header(oks[-1], "Flow-Timer") == [str(FLOW_TIMER_UDP)], oks[-1]

        # the keepalive: one Binding at once (libre learns its mapped address), the next one
        # 80-100 % of Flow-Timer later; the balancer answers each with bob's own address
        deadline = registered_at + FLOW_TIMER_UDP + 3
        while True:
            exchanges = stun_exchanges(cap.snapshot(), bob, lb_port)
            if len(exchanges) >= 2 and all(answer is not None for _, answer in exchanges[:2]):
                break
            assert time.monotonic() < deadline, f"STUN keepalives seen: {exchanges}"
            time.sleep(0.5)
        (first, first_ok), (second, second_ok) = exchanges[:2]
        assert first_ok is not None and second_ok is not None
        for answer in (first_ok, second_ok):
            assert answer.mapped == ("127.0.0.1", bob.sip_port), answer
            assert answer.packet.src == (farm.host, lb_port), answer
        assert first.packet.t - registered_at < 2, "the first Binding did not come at once"
        interval = second.packet.t - first_ok.packet.t
        print(f"STUN keepalive interval {interval:.1f} s")
        assert 0.8 * FLOW_TIMER_UDP - 0.5 <= interval <= FLOW_TIMER_UDP + 0.5, interval
        cell.note(
            "keepalive", f"outbound (sipnat=outbound): STUN Binding every 80-100 % of Flow-Timer {FLOW_TIMER_UDP} s"
        )

        # still registered, and reachable through the flow: no new REGISTER (a failed
        # keepalive re-registers), and alice's call rings bob's phone
        assert len(register_200s(cap.snapshot(), bob.sip_port)) == len(oks)
        assert bob.registration() == "OK"
        alice = started.add("alice")
        ring(alice, f"sip:bob@{farm.domain}", rings=[bob], silent=[])
        cell.ok("keepalive")


def test_gruu(default_farm: DefaultFarm, matrix, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cell = matrix(CLIENT, "udp", "gruu")
    farm = default_farm
    with capture(farm.port("udp")) as cap, phones(farm, tmp_path) as started:
        bob1 = started.add("bob-1", outbound=True, answermode="manual")
        bob2 = started.add("bob-2", outbound=True, answermode="manual")
        alice = started.add("alice")
        gruus = {}
        for phone in (bob1, bob2):
            oks = register_200s(cap.snapshot(), phone.sip_port)
            assert oks, f"no 200 to {phone.name}'s REGISTER seen on lo"
            mine = [c for c in header(oks[-1], "Contact") if f'+sip.instance="<{instance_of(phone)}>"' in c]
            assert mine, oks[-1]
            pub = re.search(r';pub-gruu="([^"]+)"', mine[0])
            temp = re.search(r';temp-gruu="([^"]+)"', mine[0])
            assert pub and temp, mine[0]
            assert pub.group(1) == f"sip:bob@{farm.domain};gr={instance_of(phone)}", pub.group(1)
            gruus[phone.name] = (pub.group(1), temp.group(1))

        ring(alice, f"sip:bob@{farm.domain}", rings=[bob1, bob2], silent=[])  # the control: forking
        ring(alice, gruus["bob-1"][0], rings=[bob1], silent=[bob2])
        ring(alice, gruus["bob-2"][1], rings=[bob2], silent=[bob1])

        # baresip took its public GRUU as its contact: its 180 says so, and a dialog with it
        # has the GRUU as remote target (alice's ACK and BYE go to it, through the farm)
        ringing = [t for _, t in sip_messages(cap.snapshot(), src_port=bob1.sip_port) if t.startswith("SIP/2.0 180")]
        assert ringing and all(header(t, "Contact") == [f"<{gruus['bob-1'][0]}>"] for t in ringing), ringing
        marks = {p.name: len(p.events) for p in (alice, bob1, bob2)}
        alice.dial(gruus["bob-1"][0])
        wait_after(bob1, marks["bob-1"], "CALL_INCOMING")
        bob1.accept()
        wait_after(alice, marks["alice"], "CALL_ESTABLISHED")
        wait_after(bob1, marks["bob-1"], "CALL_ESTABLISHED")
        alice.hangup()
        wait_after(bob1, marks["bob-1"], "CALL_CLOSED")
        assert after(bob2, marks["bob-2"], "CALL_INCOMING") == 0
        byes = [t for _, t in sip_messages(cap.snapshot(), src_port=alice.sip_port) if t.startswith("BYE ")]
        assert byes and byes[-1].startswith(f"BYE {gruus['bob-1'][0]} SIP/2.0"), byes
        cell.note("gruu", "pub-gruu/temp-gruu reach that device only; baresip uses its pub-gruu as Contact")
        cell.ok("gruu")


def test_outbound_tcp_flow(default_farm: DefaultFarm, tmp_path: Path) -> None:
    farm = default_farm
    with capture(farm.port("tcp")) as cap, phones(farm, tmp_path) as started:
        bob = started.add("bob", outbound=True, answermode="manual", transport="tcp")
        oks = register_200s(cap.snapshot(), 0, proto="tcp")
        assert oks, "no 200 to bob's REGISTER over TCP seen on lo"
        assert "outbound" in ",".join(header(oks[-1], "Require")), oks[-1]
        assert header(oks[-1], "Flow-Timer") == [str(FLOW_TIMER_STREAM)], oks[-1]
        alice = started.add("alice")
        ring(alice, f"sip:bob@{farm.domain}", rings=[bob], silent=[])
