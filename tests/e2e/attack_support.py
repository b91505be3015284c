"""Attackers, victims and phones for the attack suite (``test_attacks.py``).

* :class:`Victim`: a TCP listener and a UDP socket on one loopback port, standing in for a
  Redis with no password or an internal service; it records every byte that reaches it.
* :class:`Attacker`: raw UDP datagrams from another "host" of 127.0.0.0/8 (127.0.0.66...).
* :class:`Phone`: a hand-made UDP user agent that registers, answers every request (200, SDP
  for INVITE) and records what it received.
* :class:`Caller`: an authenticated UAC placing one INVITE with the From and headers it likes,
  keeping the credentials it sent (what a sniffer would capture).
* :func:`svcrack` / :func:`svwar`: SIPVicious 0.3.8 from PyPI run as subprocesses, bounded in
  time, their results parsed from the table they print.
* :func:`running_farm`: the farm the attack suites share (a balancer, two nodes, registered
  phones bob and carol), with each process's Prometheus counters at hand (:class:`Farm`).

Everything stays on loopback and every loop is bounded in count and time.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fixtures.farm import (
    DOMAIN,
    USERS,
    BalancerProcess,
    NodeProcess,
    SipClient,
    add_accounts,
    free_udp_tcp_port,
    launch_balancer,
    launch_node,
    wait_nodes_usable,
)
from fixtures.redis_server import RedisProcess, flushall
from fixtures.startup import udp_bound, wait_started

from sipfarm.balancer.keepalive import KEEPALIVE_PREFIX
from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.parser import parse_message

SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)

Dest = tuple[str, int]


def branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def tag() -> str:
    return secrets.token_hex(4)


def call_id() -> str:
    return secrets.token_hex(10)


# -- victims ---------------------------------------------------------------------------------------


@dataclass
class Hit:
    transport: str
    peer: Dest
    data: bytes


class Victim:
    """A loopback service that must never hear from the farm: TCP and UDP on one port."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        """On ``host`` (IPv4 or IPv6 loopback) at ``port`` (default: one free on both)."""
        self.host = host
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        self.port = port or free_udp_tcp_port(host)
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._tcp = socket.socket(family, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind((host, self.port))
        self._tcp.listen(16)
        self._tcp.setblocking(False)
        self._udp = socket.socket(family, socket.SOCK_DGRAM)
        self._udp.bind((host, self.port))
        self._udp.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._tcp, selectors.EVENT_READ, "accept")
        self._selector.register(self._udp, selectors.EVENT_READ, "udp")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"victim-{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> Dest:
        return (self.host, self.port)

    def _record(self, transport: str, peer: Dest, data: bytes) -> None:
        with self._lock:
            self.hits.append(Hit(transport, peer, data))

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if key.data == "accept":
                        conn, peer = sock.accept()
                        conn.setblocking(False)
                        self._record("tcp-connect", peer[:2], b"")
                        self._selector.register(conn, selectors.EVENT_READ, ("tcp", peer[:2]))
                    elif key.data == "udp":
                        data, peer = sock.recvfrom(65535)
                        self._record("udp", peer[:2], data)
                    else:
                        data = sock.recv(65535)
                        if data:
                            self._record("tcp", key.data[1], data)
                        else:
                            self._selector.unregister(sock)
                            sock.close()
                except OSError:
                    continue

    def received(self, settle: float = 0.5) -> list[Hit]:
        """What reached the victim, after ``settle`` seconds for anything in flight."""
        time.sleep(settle)
        with self._lock:
            return list(self.hits)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


# -- attackers ---------------------------------------------------------------------------------------


class Attacker:
    """Raw UDP from another loopback host (``127.0.0.N``)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port: int = self.sock.getsockname()[1]

    def via(self, branch_id: str | None = None) -> str:
        return f"SIP/2.0/UDP {self.host}:{self.port};branch={branch_id or branch()};rport"

    def send(self, data: bytes | str | SipMessage, dest: Dest) -> None:
        if isinstance(data, SipMessage):
            data = data.to_bytes()
        elif isinstance(data, str):
            data = data.encode()
        self.sock.sendto(data, dest)

    def replies(
        self, timeout: float, *, call_id: str | None = None, cseq: int | None = None, until_final: bool = False
    ) -> list[SipMessage]:
        """Responses received within ``timeout`` (only ``call_id``'s, and CSeq number ``cseq``'s,
        if given: a phone's transaction layer matches them so); with ``until_final``, stop at the
        first final response."""
        got: list[SipMessage] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                break
            try:
                msg = parse_message(data)
            except Exception:
                continue  # an attacker ignores what it cannot read
            if call_id is not None and msg.call_id.decode("latin-1") != call_id:
                continue
            if cseq is not None and (msg.is_request or msg.cseq[0] != cseq):
                continue
            got.append(msg)
            if until_final and msg.status >= 200:
                break
        return got

    def final(self, timeout: float = 3.0, *, call_id: str | None = None, cseq: int | None = None) -> SipMessage | None:
        finals = [m for m in self.replies(timeout, call_id=call_id, cseq=cseq, until_final=True) if m.status >= 200]
        return finals[0] if finals else None

    def close(self) -> None:
        self.sock.close()


def request(
    method: str,
    uri: str,
    via: str,
    *,
    from_: str = f"<sip:mallory@{DOMAIN}>",
    to: str | None = None,
    cid: str | None = None,
    cseq: int = 1,
    max_forwards: int = 70,
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
) -> bytes:
    """A hand-made request, serialized exactly as given."""
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: {via}",
        f"Max-Forwards: {max_forwards}",
        f"From: {from_};tag={tag()}",
        f"To: {to or f'<{uri}>'}",
        f"Call-ID: {cid or call_id()}",
        f"CSeq: {cseq} {method}",
        *(f"{name}: {value}" for name, value in headers),
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- phones ------------------------------------------------------------------------------------------


def is_keepalive(msg: SipMessage) -> bool:
    """A balancer's OPTIONS keepalive to a registered phone: its only Via is the balancer's own,
    with the keepalive branch."""
    return (
        msg.method == b"OPTIONS"
        and len(msg.values("via")) == 1
        and (msg.top_via.branch or "").encode().startswith(KEEPALIVE_PREFIX)
    )


class Phone:
    """A registered UDP phone that answers everything and records every request it gets."""

    def __init__(self, user: str, host: str = "127.0.0.1") -> None:
        self.user = user
        self.client = SipClient(host)
        self.requests: list[SipMessage] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@{self.client.host}:{self.client.port}>"

    def register(self, registrar: Dest, password: str, expires: int = 300) -> int:
        """REGISTER from the phone's own socket (before it starts answering); the status."""
        reply = self.client.register(registrar, self.user, password, expires=expires)
        return reply.status if reply is not None else 0

    def start(self) -> Phone:
        self._thread = threading.Thread(target=self._run, name=f"phone-{self.user}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sock = self.client.sock
        sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                msg = parse_message(data)
            except Exception:
                continue  # a phone drops what it cannot read
            if msg.status:
                continue
            with self._lock:
                self.requests.append(msg)
            if msg.method == b"ACK":
                continue
            body = SDP if msg.method == b"INVITE" else b""
            reply = make_response(
                msg, 200, to_tag=msg.to_tag or ("ph" + tag()).encode(),
                headers=(("contact", self.contact.encode()),), body=body,
                content_type=b"application/sdp" if body else None, record_route=True,
            )  # fmt: skip
            sock.sendto(reply.to_bytes(), peer)

    def received(
        self, settle: float = 0.3, method: bytes | None = None, *, keepalives: bool = True
    ) -> list[SipMessage]:
        """The requests received (of ``method`` if given), after ``settle`` seconds.
        ``keepalives=False``: without the balancer's own OPTIONS keepalives (RFC 5626 4.4.1), which a
        phone registered over UDP gets after 30 s without a word, whatever the test does: one
        Via, the balancer's, with its keepalive branch (a request relayed from a client carries
        the client's Via too)."""
        time.sleep(settle)
        with self._lock:
            got = [m for m in self.requests if method is None or m.method == method]
        return got if keepalives else [m for m in got if not is_keepalive(m)]

    def wait_for(self, method: bytes, timeout: float = 3.0) -> SipMessage | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for msg in self.requests:
                    if msg.method == method:
                        return msg
            time.sleep(0.02)
        return None

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.client.close()


# -- an authenticated caller ---------------------------------------------------------------------------


@dataclass
class Placed:
    """One authenticated INVITE: its final response and the credentials it carried."""

    final: SipMessage | None
    authorization: str = ""
    sent: bytes = b""
    responses: list[SipMessage] = field(default_factory=list)


class Caller:
    """A UDP UAC that answers one 407 and keeps what it sent."""

    def __init__(self, user: str, password: str, host: str = "127.0.0.1") -> None:
        self.user = user
        self.password = password
        self.attacker = Attacker(host)

    def invite(
        self,
        proxy: Dest,
        callee: str,
        *,
        from_: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        timeout: float = 3.0,
    ) -> Placed:
        uri = f"sip:{callee}@{DOMAIN}"
        cid = call_id()
        from_value = f"{from_ or f'<sip:{self.user}@{DOMAIN}>'};tag={tag()}"
        contact = ("Contact", f"<sip:{self.user}@{self.attacker.host}:{self.attacker.port}>")

        def build(cseq: int, branch_id: str, extra: tuple[tuple[str, str], ...]) -> bytes:
            lines = [
                f"INVITE {uri} SIP/2.0", f"Via: {self.attacker.via(branch_id)}", "Max-Forwards: 70",
                f"From: {from_value}", f"To: <{uri}>", f"Call-ID: {cid}", f"CSeq: {cseq} INVITE",
                f"{contact[0]}: {contact[1]}", *(f"{n}: {v}" for n, v in (*headers, *extra)),
                "Content-Type: application/sdp", f"Content-Length: {len(SDP)}",
            ]  # fmt: skip
            return ("\r\n".join(lines) + "\r\n\r\n").encode() + SDP

        first_branch = branch()
        self.attacker.send(build(1, first_branch, ()), proxy)
        final = self.attacker.final(timeout, call_id=cid, cseq=1)
        if final is None or final.status != 407:
            return Placed(final)
        self._ack(final, uri, first_branch, proxy)
        challenge = auth.parse_challenge(final.get_all("proxy-authenticate")[0])
        creds = auth.build_credentials(challenge, self.user, self.password, "INVITE", uri, secrets.token_hex(4))
        authorization = creds.decode() if isinstance(creds, bytes) else str(creds)
        second_branch = branch()
        sent = build(2, second_branch, (("Proxy-Authorization", authorization),))
        self.attacker.send(sent, proxy)
        responses = self.attacker.replies(timeout, call_id=cid, cseq=2, until_final=True)
        finals = [m for m in responses if m.status >= 200]
        result = Placed(finals[0] if finals else None, authorization, sent, responses)
        if result.final is not None and result.final.status >= 300:
            self._ack(result.final, uri, second_branch, proxy)
        return result

    def _ack(self, final: SipMessage, uri: str, branch_id: str, proxy: Dest) -> None:
        """The ACK of a non-2xx: same branch as its INVITE (RFC 3261 17.1.1.3)."""
        to = (final.get("to") or b"").decode("latin-1")
        from_ = (final.get("from") or b"").decode("latin-1")
        ack = (
            f"ACK {uri} SIP/2.0\r\nVia: {self.attacker.via(branch_id)}\r\nMax-Forwards: 70\r\n"
            f"From: {from_}\r\nTo: {to}\r\nCall-ID: {final.call_id.decode('latin-1')}\r\n"
            f"CSeq: {final.cseq[0]} ACK\r\nContent-Length: 0\r\n\r\n"
        )
        self.attacker.send(ack, proxy)

    def close(self) -> None:
        self.attacker.close()


# -- the farm ----------------------------------------------------------------------------------------

ACCOUNTS = {**USERS, "dave": "dave-secret", "erin": "erin-secret"}


def scrape(port: int) -> dict[str, float]:
    """A Prometheus page on 127.0.0.1:``port`` as ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        lines = page.read().decode().splitlines()
    samples: dict[str, float] = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@dataclass
class Farm:
    lb: BalancerProcess
    nodes: list[NodeProcess]
    metrics: dict[str, int]  # node id (and "lb") -> metrics port
    bob: Phone
    carol: Phone

    def transactions(self) -> float:
        """Transactions in flight on all nodes (the gauge is refreshed every second)."""
        return sum(scrape(self.metrics[n.node_id]).get("sipfarm_node_transactions", 0.0) for n in self.nodes)

    def counters(self) -> dict[str, dict[str, float]]:
        """Every process's metrics page, by node id ("lb" for the balancer)."""
        return {name: scrape(port) for name, port in self.metrics.items()}

    def still_serves(self) -> None:
        """A real user (erin, from 127.0.0.1) still registers through the balancer."""
        client = SipClient()
        try:
            reply = client.register(self.lb.address, "erin", ACCOUNTS["erin"], expires=60)
        finally:
            client.close()
        assert reply is not None and reply.status == 200, self.lb.log()[-1500:]

    def processes(self) -> list[NodeProcess | BalancerProcess]:
        return [self.lb, *self.nodes]

    def logs(self, tail: int = 600) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-tail:]}" for p in self.processes())


@contextmanager
def running_farm(redis_server: RedisProcess, workdir: Path, *, node_args: tuple[str, ...] = ()) -> Iterator[Farm]:
    """A balancer and two nodes (with ``node_args``) on a flushed redis, each serving metrics;
    bob and carol registered (UDP phones answering everything). Everything stopped on exit."""
    redis_server.start()
    flushall(redis_server.port)
    url = redis_server.url
    add_accounts(url, ACCOUNTS)
    started: list[NodeProcess | BalancerProcess] = []
    phones: list[Phone] = []
    try:
        metrics: dict[str, int] = {}
        nodes = []
        for name in ("node1", "node2"):
            metrics[name] = free_udp_tcp_port()
            extra = ["--metrics", f"127.0.0.1:{metrics[name]}", *node_args]
            node = launch_node(url, workdir, node_id=name, extra=extra)
            started.append(node)
            nodes.append(node)
        metrics["lb"] = free_udp_tcp_port()
        lb = launch_balancer(url, workdir, extra=["--metrics", f"127.0.0.1:{metrics['lb']}"])
        started.append(lb)
        wait_nodes_usable(lb, 2)
        for user in ("bob", "carol"):
            phone = Phone(user)
            phones.append(phone)
            assert phone.register(lb.address, ACCOUNTS[user]) == 200, lb.log()[-1500:]
            phone.start()
        yield Farm(lb, nodes, metrics, phones[0], phones[1])
    finally:
        for phone in phones:
            phone.close()
        for proc in reversed(started):
            proc.stop()


# -- SIPVicious ----------------------------------------------------------------------------------------


def find_sipvicious(tool: str) -> str | None:
    """Path of a SIPVicious entry point installed beside this Python (or on PATH)."""
    local = Path(sys.executable).parent / f"sipvicious_{tool}"
    return str(local) if local.exists() else shutil.which(f"sipvicious_{tool}")


def sipvicious(tool: str) -> str:
    found = find_sipvicious(tool)
    if found is None:
        raise FileNotFoundError(f"sipvicious_{tool}: pip install 'sipvicious>=0.3.8' (the test extras)")
    return found


@dataclass
class ToolRun:
    argv: list[str]
    returncode: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    seconds: float
    rows: list[tuple[str, str]]  # the result table SIPVicious prints (found users / passwords)

    @property
    def tried(self) -> list[str]:
        """Passwords svcrack tried (its debug log)."""
        return re.findall(r"trying (\S+)", self.stderr)

    def describe(self) -> str:
        return (
            f"{' '.join(self.argv)}\nexit={self.returncode} after {self.seconds:.1f}s\n"
            f"stdout:\n{self.stdout[-1000:]}\nstderr (end):\n{self.stderr[-1000:]}"
        )


_ROW = re.compile(r"^\|\s*(\S.*?)\s*\|\s*(\S.*?)\s*\|$")


def _rows(stdout: str) -> list[tuple[str, str]]:
    rows = []
    for line in stdout.splitlines():
        m = _ROW.match(line.strip())
        if m and m.group(1) != "Extension":
            rows.append((m.group(1), m.group(2)))
    return rows


def _start(argv: list[str]) -> tuple[list[str], float, subprocess.Popen[str]]:
    return argv, time.monotonic(), subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_bound(started: tuple[list[str], float, subprocess.Popen[str]], bind: tuple[str, int]) -> None:
    """Until the tool has bound its source port (or exited, which ``_finish`` reports): its
    interpreter's start, under the start-up allowance, so that the time limit counts its run."""
    argv, _, proc = started
    name = Path(argv[0]).name if argv[0] != sys.executable else "svcrack"
    wait_started(name, proc, lambda: proc.poll() is not None or udp_bound(*bind), f"binds UDP {bind[0]}:{bind[1]}")


def _finish(started: tuple[list[str], float, subprocess.Popen[str]], deadline: float) -> ToolRun:
    """Wait for a tool until ``deadline`` (monotonic), then kill it; what it printed."""
    argv, at, proc = started
    try:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
        code = None
    return ToolRun(argv, code, out, err, time.monotonic() - at, _rows(out))


# svcrack 0.3.8 parses -b but never hands it to its scanner, which then sends from whatever
# address the kernel picks (127.0.0.1 here): every attacker would look like every test client.
# This runs svcrack's own main with the scanner bound where -b says.
_SVCRACK_BOUND = """
import sys
import sipvicious.svcrack as svcrack
source = sys.argv.pop(1)
init = svcrack.ASipOfRedWine.__init__
def bound(self, *args, **kwargs):
    kwargs["bindingip"] = source
    init(self, *args, **kwargs)
svcrack.ASipOfRedWine.__init__ = bound
sys.argv[0] = "sipvicious_svcrack"
sys.exit(svcrack.main())
"""


def svcrack(
    target: Dest,
    user: str,
    words: list[str],
    workdir: Path,
    *,
    source: str,
    reusenonce: bool = False,
    max_silence: int = 2,
    time_limit: float = 8.0,
) -> ToolRun:
    """``sipvicious_svcrack`` against ``user`` with ``words`` (a dictionary file), from
    ``source`` (bound and advertised: without ``-x``/``-b`` it hangs looking for its own IP).

    Debug logging (``-vv``) shows each password it tries. It stops at once on a 200 (the
    password is then in its table); a 403 counts as a wrong password (it fetches a new
    challenge and goes on); 404 means "user not found"; other statuses stop it. Having nothing
    more to try, or ``max_silence`` seconds without an answer, it still waits up to 10 s for
    late answers (a fixed socket timeout), and a farm answering 403 even to unauthenticated
    requests keeps it looping forever: hence the time limit, after which it is killed."""
    words_file = workdir / f"words-{secrets.token_hex(3)}.txt"
    words_file.write_text("".join(w + "\n" for w in words))
    sipvicious("svcrack")  # installed, or a clear message
    port = free_udp_tcp_port(source)
    argv = [
        sys.executable, "-c", _SVCRACK_BOUND, source, "-vv", "-u", user, "-d", str(words_file), f"--domain={DOMAIN}",
        "-x", source, "-b", source, "-P", str(port), "-p", str(target[1]),
        "--maximumtime", str(max_silence), *(["--reusenonce"] if reusenonce else []), target[0],
    ]  # fmt: skip
    started = _start(argv)
    _wait_bound(started, (source, port))
    return _finish(started, time.monotonic() + time_limit)


def svwar(
    target: Dest,
    extensions: list[str],
    workdir: Path,
    *,
    source: str,
    method: str = "REGISTER",
    max_silence: int = 2,
    time_limit: float = 10.0,
) -> list[ToolRun]:
    """``sipvicious_svwar -m METHOD --force``, one run per extension, all at once.

    svwar first asks for a random extension and keeps that answer's status line (with the
    Reason header for INVITE) as the "no such user" fingerprint; any other answer to a later
    extension is a find. ``--force`` keeps it going when that first answer is a challenge
    (otherwise it gives up at once). An answer *equal* to the fingerprint that is not 404,
    481, 480, 503, 603, 1xx or 200 makes it stop ("unknown response"), so against a farm that
    challenges everyone a single run would probe only its first extension: hence one run each.
    """
    procs = []
    binds = []
    for ext in extensions:
        names_file = workdir / f"ext-{ext}-{secrets.token_hex(3)}.txt"
        names_file.write_text(ext + "\n")
        binds.append((source, free_udp_tcp_port(source)))
        argv = [
            sipvicious("svwar"), "-d", str(names_file), "-m", method, "--force", f"--domain={DOMAIN}",
            "-x", source, "-b", source, "-P", str(binds[-1][1]), "-p", str(target[1]),
            "--maximumtime", str(max_silence), target[0],
        ]  # fmt: skip
        procs.append(_start(argv))
    for started, bind in zip(procs, binds, strict=True):
        _wait_bound(started, bind)
    deadline = time.monotonic() + time_limit
    return [_finish(proc, deadline) for proc in procs]
