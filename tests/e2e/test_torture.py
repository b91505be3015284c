"""The RFC 4475 and RFC 5118 torture messages sent through a running farm, made dangerous.

``tests/sip/test_rfc4475.py`` checks the parser alone; here every vector (valid and invalid,
requests and responses) goes through the farm's receive paths: to the balancer over UDP, TCP
and WebSocket, and straight to a node's UDP port. Before sending, every host a message names
(Via sent-by, Route, Record-Route, Request-URI, Contact, From/To, even Call-ID words) is
rewritten by one small deterministic substitution (:func:`dangerous`) to a victim listener on
another loopback address (IPv6 references to one on ``::1``), always with the victims' port,
so that a farm that relayed, answered or connected where a message says would hit a victim.

Each UDP attacker sends from its own loopback host *at the victims' port*: the farm answers a
request at the ``received`` address and the sent-by port (RFC 3261 18.2.2), which is then the
attacker, while any use of the sent-by host itself reaches a victim.

Everything is sent at once (one source address per message and transport) and the answers are
collected for a few seconds; the module then asserts, for the whole volley:

* each message's outcome (:func:`check_outcome`): a malformed request gets its 400 (505, 501
  where RFC 4475 says so) or, when it cannot be answered (no Call-ID... to copy, or a stream
  whose framing it breaks), nothing; a response gets nothing; a well-formed request gets a
  final answer that is not a server failure (no 500/503/504);
* no victim heard a datagram or a connection;
* the balancer and both nodes still run, and a REGISTER and an authenticated call still work;
* every malformed request is counted (parse errors, ``rejected_bad_message``, streams closed
  for abuse), and no callback or parser failure is counted or logged.

What it found when first run (fixed with it): the node acted on requests before validating
them (a malformed From/To/Contact/Via got 401/407/403, not 400), and a request broken in its
start line (LWS in the Request-URI, SIP/7.0) or repeating CSeq/Call-ID before its From and To
was dropped unanswered.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from attack_support import ACCOUNTS, Caller, Farm, Victim, running_farm
from fixtures.farm import free_udp_tcp_port
from fixtures.redis_server import RedisProcess
from fixtures.startup import START_TIMEOUT_S
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect as ws_connect

from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import StreamFramer, parse_message

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 90)

VECTORS = Path(__file__).resolve().parents[1] / "sip" / "vectors"
SETS = ("rfc4475", "rfc5118")

VICTIM_HOSTS = ("127.0.0.101", "127.0.0.102", "127.0.0.103")
VICTIM6_HOST = "::1"
# one loopback /24 of attacker hosts per way in: 127.0.<n>.<vector index + 1>
TRANSPORTS = {"lb-udp": 11, "lb-tcp": 12, "lb-ws": 13, "node-udp": 14}
WINDOW = 3.0  # seconds to collect answers after the volley (a final ends a UDP exchange early)


@dataclass(frozen=True)
class Torture:
    rfc: str
    name: str
    section: str
    title: str
    data: bytes
    valid: bool
    expect: str  # "parse", "drop" or a status code (the manifest's outcome)
    alternatives: tuple[str, ...] = ()  # other outcomes the RFC allows

    @property
    def is_response(self) -> bool:
        return self.data.startswith(b"SIP/")

    @property
    def id(self) -> str:
        return f"{self.rfc}-{self.name}"


def load_vectors() -> list[Torture]:
    found = []
    for rfc in SETS:
        manifest = VECTORS / rfc / "manifest.json"
        for entry in json.loads(manifest.read_text(encoding="utf-8"))["messages"]:
            data = (manifest.parent / entry["file"]).read_bytes()
            found.append(
                Torture(
                    rfc, entry["name"], entry["section"], entry["title"], data, entry["valid"], str(entry["expect"]),
                    tuple(entry.get("alternatives", ())),
                )
            )  # fmt: skip
    return found


def _crafted_request(extra: str, *, via: str = "SIP/2.0/UDP client.example.com:5060;branch=z9hG4bKcrafted") -> bytes:
    return (
        f"OPTIONS sip:bob@biloxi.example.com SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n"
        "From: <sip:alice@atlanta.example.com>;tag=c1\r\nTo: <sip:bob@biloxi.example.com>\r\n"
        f"Call-ID: crafted@client.example.com\r\nCSeq: 1 OPTIONS\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def _lines(name: str, count: int, value: str) -> str:
    return "".join(f"{name}: {value.format(i=i)}\r\n" for i in range(count))


def crafted_vectors() -> list[Torture]:
    """sipfarm's own: requests over the parser's bounds (too many lines, lists, values; see
    tests/sip/test_limits.py), each answered 400 with what a response copies, never followed to
    the hosts it names (the ``dangerous`` rewrite points them all at the victims)."""
    shapes = {
        "routes-500-lines": _lines("Route", 500, "<sip:r{i}.example.com;lr>"),
        "vias-800-lines": _lines("Via", 800, "SIP/2.0/UDP v{i}.example.com;branch=z9hG4bK{i}"),
        "headers-300-unknown": _lines("X-N{i}", 300, "v"),
        "route-list-800": "Route: " + ",".join(f"<sip:r{i}.example.com;lr>" for i in range(800)) + "\r\n",
        "via-list-70": "Via: " + ",".join(f"SIP/2.0/UDP v{i}.example.com;branch=b{i}" for i in range(70)) + "\r\n",
        "contacts-70-lines": _lines("Contact", 70, "<sip:c{i}.example.com>"),
    }
    controls = {  # RFC 3261 25.1: no control character in a header value but HTAB, or escaped
        "control-nul-subject": "Subject: call\x00me\r\n",
        "control-esc-user-agent": "User-Agent: phone \x1b[2J\x1b[31mowned\r\n",
        "control-del-quoted": 'X-Note: "a\x7fb"\r\n',
        "control-bel-comment": "Server: box (v1 \x07)\r\n",
    }
    return [
        Torture("sipfarm", name, "limits", "over a parser bound", _crafted_request(extra), False, "400")
        for name, extra in shapes.items()
    ] + [
        Torture("sipfarm", name, "controls", "a control character", _crafted_request(extra), False, "400")
        for name, extra in controls.items()
    ] + [
        Torture(
            "sipfarm", "control-escaped", "controls", "control characters in quoted-pairs (valid)",
            _crafted_request('X-Note: "bell \\\x07 nul \\\x00" (del \\\x7f)\r\n'), True, "parse",
        )
    ]  # fmt: skip


ALL = load_vectors() + crafted_vectors()

# -- making a message dangerous ---------------------------------------------------------------------

# A host as these messages write them: an IPv6 reference, an IPv4 address, or a DNS name
# under one of the documentation/test domains (example.com, company.com ...), with its port.
_HOST = re.compile(
    rb"(?<![\w.%-])(?P<host>\[[0-9A-Fa-f:.]+\]|(?:\d{1,3}\.){3}\d{1,3}|"
    rb"(?:[A-Za-z0-9-]+\.)+(?:com|net|org|edu))(?P<port>:\d+)?(?![\w-])"
)


_BRANCH = re.compile(rb"(branch\s*=\s*)([^;,\s]+)", re.IGNORECASE)


def dangerous(data: bytes, port: int, branch_suffix: str = "") -> bytes:
    """``data`` with every host in its header section replaced by a victim's, at ``port``.

    The n-th distinct host (in order of appearance) becomes victim n mod 3; an IPv6 reference
    becomes ``[::1]``. A host that had no port gets one (else 5060, where anything may listen),
    except as a parameter value (``received=``, ``maddr=``), where a port is not allowed. The
    body is left alone: its Content-Length, right or wrong, stays what the RFC wrote.

    ``branch_suffix`` is appended to every Via branch: many of these messages share a branch
    (z9hG4bKkdjuw) and, once their hosts are the same victims, a sent-by too, which makes one
    a retransmission of another to a node (RFC 3261 17.2.3), answered to the first sender."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if branch_suffix:
        head = _BRANCH.sub(lambda m: m.group(1) + m.group(2) + branch_suffix.encode(), head)
    seen: dict[bytes, int] = {}

    def swap(m: re.Match[bytes]) -> bytes:
        host = m.group("host")
        if host.startswith(b"["):
            new = b"[" + VICTIM6_HOST.encode() + b"]"
        else:
            index = seen.setdefault(host.lower(), len(seen))
            new = VICTIM_HOSTS[index % len(VICTIM_HOSTS)].encode()
        if head[m.start() - 1 : m.start()] == b"=":
            return new
        return new + b":" + str(port).encode()

    return _HOST.sub(swap, head) + sep + body


# -- sending and collecting ------------------------------------------------------------------------


@dataclass
class Outcome:
    transport: str
    vector: Torture
    sent: bytes
    messages: list[SipMessage] = field(default_factory=list)
    unreadable: list[bytes] = field(default_factory=list)  # what came back and did not parse
    closed: bool = False  # the farm closed the connection
    error: str = ""  # the exchange's own failure (connect refused...)

    @property
    def finals(self) -> list[int]:
        """Final statuses, with those of responses only the status line of which reads (a 400
        must copy the request's CSeq, even an overlarge one: RFC 4475 3.1.2.4)."""
        unreadable = [int(m.group(1)) for d in self.unreadable if (m := _STATUS_LINE.match(d))]
        return [m.status for m in self.messages if m.status >= 200] + [s for s in unreadable if s >= 200]

    @property
    def requests(self) -> list[bytes]:
        return [m.method for m in self.messages if m.is_request]

    def describe(self) -> str:
        got = [m.to_bytes()[:200] for m in self.messages]
        return (
            f"{self.transport} {self.vector.id} ({self.vector.rfc} {self.vector.section} {self.vector.title}): "
            f"finals={self.finals} closed={self.closed} error={self.error!r} got={got} unreadable={self.unreadable}"
        )


_STATUS_LINE = re.compile(rb"SIP/2\.0 ([1-6]\d\d) ")


def _keep(outcome: Outcome, data: bytes) -> bool:
    """Record one message from the farm; True when it was a final response."""
    try:
        msg = parse_message(data)
    except SipError:
        outcome.unreadable.append(data[:200])
        return False
    outcome.messages.append(msg)
    return msg.status >= 200


def _udp(outcome: Outcome, host: str, port: int, dest: tuple[str, int], deadline: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))
        sock.sendto(outcome.sent, dest)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(65535)
            except TimeoutError:
                return
            if _keep(outcome, data):
                deadline = min(deadline, time.monotonic() + 0.3)  # a retransmission or a second final


def _tcp(outcome: Outcome, host: str, dest: tuple[str, int], deadline: float) -> None:
    with socket.create_connection(dest, timeout=2, source_address=(host, 0)) as sock:
        sock.sendall(outcome.sent)
        framer = StreamFramer()
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return
            except ConnectionResetError:
                outcome.closed = True
                return
            if not chunk:
                outcome.closed = True
                return
            framer.receive_data(chunk)
            while (event := framer.next_event()) is not None:
                if event is not StreamFramer.PING:
                    _keep(outcome, event)


def _ws(outcome: Outcome, host: str, url: str, deadline: float) -> None:
    sock = socket.create_connection(url.removeprefix("ws://").rsplit(":", 1), timeout=2, source_address=(host, 0))  # type: ignore[arg-type]
    with ws_connect(url, sock=sock, subprotocols=["sip"], open_timeout=2) as ws:  # type: ignore[list-item]
        ws.send(outcome.sent)
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = ws.recv(timeout=left)
            except TimeoutError:
                return
            except WebSocketException:
                outcome.closed = True
                return
            _keep(outcome, data.encode() if isinstance(data, str) else data)


def _exchange(outcome: Outcome, farm: Farm, index: int, port: int, deadline: float) -> None:
    host = f"127.0.{TRANSPORTS[outcome.transport]}.{index + 1}"
    try:
        if outcome.transport == "lb-udp":
            _udp(outcome, host, port, farm.lb.address, deadline)
        elif outcome.transport == "node-udp":
            _udp(outcome, host, port, farm.nodes[index % len(farm.nodes)].address, deadline)
        elif outcome.transport == "lb-tcp":
            _tcp(outcome, host, farm.lb.address, deadline)
        else:
            _ws(outcome, host, f"ws://{farm.lb.host}:{farm.lb.ws_port}", deadline)
    except OSError as exc:
        outcome.error = repr(exc)


# -- the verdict on one message ------------------------------------------------------------------

SERVER_FAILURES = {500, 503, 504}
_MANDATORY = {b"via": b"v", b"from": b"f", b"to": b"t", b"call-id": b"i", b"cseq": b""}


def _header_names(data: bytes) -> list[bytes]:
    head = data.partition(b"\r\n\r\n")[0]
    return [line.partition(b":")[0].strip().lower() for line in head.split(b"\r\n")[1:] if line[:1] not in b" \t"]


def unanswerable(data: bytes) -> bool:
    """A request without one of the headers a response must copy (RFC 3261 8.2.6.2): dropping
    it is a fair outcome (RFC 4475 3.3.1 only asks that the element "not break")."""
    names = set(_header_names(data))
    return any(full not in names and compact not in names for full, compact in _MANDATORY.items())


def stream_framed(data: bytes) -> bool:
    """Whether a stream carries ``data`` as exactly one message: one numeric Content-Length, the
    body that long (RFC 3261 18.3). Otherwise the framing breaks and a farm may close the
    connection without a word (what it owes an answer to is then unknowable), or wait."""
    head, _, body = data.partition(b"\r\n\r\n")
    values = [
        line.partition(b":")[2].strip()
        for line in head.split(b"\r\n")[1:]
        if line.partition(b":")[0].strip().lower() in (b"content-length", b"l")
    ]
    return len(values) == 1 and values[0].isdigit() and int(values[0]) == len(body)


def framing_refused(data: bytes) -> bool:
    """Whether a stream cannot frame ``data`` at all (no Content-Length, a non-numeric one, two
    that differ): the framer gives up on the connection, after answering the request."""
    head = data.partition(b"\r\n\r\n")[0]
    values = {
        line.partition(b":")[2].strip()
        for line in head.split(b"\r\n")[1:]
        if line.partition(b":")[0].strip().lower() in (b"content-length", b"l")
    }
    return not values or len(values) > 1 or not next(iter(values)).isdigit()


def check_outcome(outcome: Outcome) -> str | None:
    """What is wrong with one exchange, or None."""
    vector = outcome.vector
    if outcome.error:
        return "exchange failed"
    if outcome.requests:
        return f"the farm sent requests to the attacker: {outcome.requests}"
    finals = outcome.finals
    stream = outcome.transport in ("lb-tcp", "lb-ws")
    if vector.is_response:
        return f"a response was answered: {finals}" if outcome.messages else None
    if not finals:
        answerable = not unanswerable(vector.data) and not vector.data.startswith(b"ACK ")
        if outcome.transport == "lb-tcp" and framing_refused(vector.data) and answerable:
            return "closed without answering a request it could not frame (400 first)"
        if vector.expect == "drop" or unanswerable(vector.data) or (stream and not stream_framed(vector.data)):
            return None
        return "no final answer"
    first = finals[0]
    if set(finals) - {first}:
        return f"different final answers: {finals}"
    if vector.expect == "drop":
        return f"answered {first}, RFC says drop"
    if not vector.valid and "parse" not in vector.alternatives:
        wanted = {400} | {int(code) for code in (vector.expect, *vector.alternatives) if code.isdigit()}
        return None if first in wanted else f"answered {first}, expected one of {sorted(wanted)}"
    if first in SERVER_FAILURES:
        return f"a valid request answered {first}"
    return None


# -- the module's volley ---------------------------------------------------------------------------


@dataclass
class Volley:
    farm: Farm
    outcomes: dict[tuple[str, str], Outcome]
    victims: list[Victim]
    counters_before: dict[str, dict[str, float]]
    counters_after: dict[str, dict[str, float]]
    log_offsets: dict[str, int]
    seconds: float


def _counter_delta(volley: Volley, match: str) -> dict[str, float]:
    """Per process, the increase of every counter sample whose name contains ``match``."""
    out: dict[str, float] = {}
    for proc, after in volley.counters_after.items():
        before = volley.counters_before.get(proc, {})
        for name, value in after.items():
            if match in name and name.split("{")[0].endswith("_total"):
                delta = value - before.get(name, 0.0)
                if delta:
                    out[f"{proc} {name}"] = delta
    return out


def _victim_port() -> int:
    """A port free on every victim host (the attackers bind it too, on their own hosts)."""
    for _ in range(20):
        port = free_udp_tcp_port(VICTIM_HOSTS[0])
        try:
            for host in (*VICTIM_HOSTS[1:], VICTIM6_HOST):
                family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    with socket.socket(family, kind) as probe:
                        probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every victim host")


@pytest.fixture(scope="module")
def volley(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volley]:
    with running_farm(redis_server, tmp_path_factory.mktemp("torture")) as farm:
        port = _victim_port()
        victims = [Victim(host, port) for host in (*VICTIM_HOSTS, VICTIM6_HOST)]
        try:
            offsets = {p.log_path.name: p.log_path.stat().st_size for p in farm.processes()}
            before = farm.counters()
            outcomes = {
                (transport, v.id): Outcome(transport, v, dangerous(v.data, port, f".{index}"))
                for transport in TRANSPORTS
                for index, v in enumerate(ALL)
            }
            started = time.monotonic()
            deadline = started + WINDOW
            threads = [
                threading.Thread(target=_exchange, args=(o, farm, ALL.index(o.vector), port, deadline), daemon=True)
                for o in outcomes.values()
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WINDOW + 5)
            seconds = time.monotonic() - started
            time.sleep(1.2)  # the metrics pages are refreshed every second
            yield Volley(farm, outcomes, victims, before, farm.counters(), offsets, seconds)
        finally:
            for victim in victims:
                victim.close()


# -- the assertions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("vector", ALL, ids=[v.id for v in ALL])
def test_torture_message_outcome(volley: Volley, transport: str, vector: Torture) -> None:
    outcome = volley.outcomes[(transport, vector.id)]
    problem = check_outcome(outcome)
    assert problem is None, f"{problem}: {outcome.describe()}"


def test_no_victim_is_reached(volley: Volley) -> None:
    hits = [(v.host, h) for v in volley.victims for h in v.received(0.3)]
    assert not hits, f"{len(hits)} hits, first: {hits[:3]}"


def test_farm_still_runs_and_serves(volley: Volley) -> None:
    farm = volley.farm
    dead = [p.log_path.name for p in farm.processes() if p.process.poll() is not None]
    assert not dead, farm.logs(3000)
    farm.still_serves()
    farm.bob.clear()
    alice = Caller("alice", ACCOUNTS["alice"])
    try:
        placed = alice.invite(farm.lb.address, "bob")
    finally:
        alice.close()
    assert placed.final is not None and placed.final.status == 200, (placed.final, farm.logs())


def test_every_bad_request_is_counted(volley: Volley) -> None:
    """Each malformed request sent (the RFC's invalid requests) is counted by the process that
    refused it: a parse error, a 400 from a handler (rejected_bad_message) or a stream closed for
    its framing (abuse_*). The balancer and a node may both count one: at least, not exactly."""
    malformed = [
        o for o in volley.outcomes.values()
        if not o.vector.is_response and not o.vector.valid and "parse" not in o.vector.alternatives
    ]  # fmt: skip
    counted = {
        name: n
        for name, n in _counter_delta(volley, "_events_total").items()
        if re.search(r'kind="(parse_errors_\w+|rejected_bad_message|abuse_\w+)"', name)
    }
    assert sum(counted.values()) >= len(malformed), (len(malformed), counted)
    answered_400 = sum(1 for o in malformed if 400 in o.finals)
    bad_message = sum(_counter_delta(volley, "bad_message").values())
    assert bad_message >= answered_400, (answered_400, counted)


def test_no_handler_failure(volley: Volley) -> None:
    failures = {
        **_counter_delta(volley, "callback_errors"),
        **_counter_delta(volley, "internal_errors"),
    }
    logged = []
    for proc in volley.farm.processes():
        text = proc.log_path.read_bytes()[volley.log_offsets[proc.log_path.name] :].decode(errors="replace")
        logged += [
            f"{proc.log_path.name}: {line}"
            for line in text.splitlines()
            if "Traceback" in line or re.search(r"level=(error|critical)|event=(callback|parse|fast_\w+)_failed", line)
        ]
    assert not failures and not logged, (failures, logged[:20])


def test_volley_is_quick(volley: Volley) -> None:
    assert volley.seconds < WINDOW + 3, volley.seconds
