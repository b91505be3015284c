"""RFC 3263 server location: a host name to an ordered list of (transport, ip, port) targets.

Theory of operation.  Three layers, the first two without I/O:

* :class:`DnsClient` is a sans-IO stub resolver (the aioquic shape): :meth:`DnsClient.lookup`
  asks for one ``(qname, qtype)``; :meth:`DnsClient.datagrams_to_send` returns the queries to
  put on the wire, :meth:`DnsClient.receive_datagram` takes the answers, and
  :meth:`DnsClient.get_timer` / :meth:`DnsClient.handle_timer` drive the retries.  Answers are
  cached by ``(qname, qtype)`` for their TTL (clamped to 1 s .. 1 h), NXDOMAIN and NODATA for the
  SOA's negative TTL (at most ``negative_ttl``); the cache is bounded.  One query is outstanding
  per key whatever the number of waiters; each waiter is called exactly once, at once on a hit.
* :class:`Locator` runs the RFC 3263 procedure on top of it: 4.1 picks the transport (the URI's
  parameter, else UDP/TLS for an IP literal or an explicit port, else NAPTR, else SRV probing),
  4.2 the addresses (SRV ordered by priority then weighted random per RFC 2782, each SRV target
  to A/AAAA; an explicit port skips SRV).  The result is the whole ordered list, so that the
  proxy can try the next target after a 503, a timeout or a transport error (RFC 3263 4.3).
* :class:`ServerLocator` is the asyncio glue: one non-blocking UDP socket per address family
  read with ``add_reader``, one ``call_at`` timer, nothing that waits.

What is left out: TCP retry of a truncated answer (the records a truncated answer carries are
used, an empty truncated answer counts as a server failure; queries advertise a 1232-byte EDNS0
buffer so that SRV/NAPTR sets rarely truncate), the resolv.conf ``search`` list (gateway names
are fully qualified), and source port randomisation per query (one socket per family; the
nameserver is expected to be a local or trusted recursive resolver).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import random as random_module
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import dnslib  # type: ignore[import-untyped]

from sipfarm.edge import is_ip_literal
from sipfarm.sip.address import Address
from sipfarm.sip.uri import SipURI
from sipfarm.sip.via import default_port

log = logging.getLogger("sipfarm.rfc3263")

Nameserver = tuple[str, int]

MIN_TTL = 1.0  # an answer is kept at least this long, whatever its TTL says (a TTL of 0 included)
MAX_TTL = 3600.0  # ... and at most an hour
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no fragmentation on common paths
DNS_PORT = 53


class QType(enum.IntEnum):
    A = 1
    SRV = 33
    AAAA = 28
    NAPTR = 35


# RFC 1035 4.1.1 response codes this client tells apart
RCODE_NOERROR = 0
RCODE_NXDOMAIN = 3

# RFC 3263 4.1 (and RFC 7118 5 for WebSocket): NAPTR services to transports
NAPTR_SERVICES: dict[str, str] = {
    "SIP+D2U": "udp",
    "SIP+D2T": "tcp",
    "SIPS+D2T": "tls",
    "SIP+D2W": "ws",
    "SIPS+D2W": "wss",
}
# RFC 3263 4.1: SRV service names of the transports that have one
SRV_PREFIXES: dict[str, str] = {"udp": "_sip._udp", "tcp": "_sip._tcp", "tls": "_sips._tcp"}
SECURE_TRANSPORTS = frozenset({"tls", "wss"})
KNOWN_TRANSPORTS = frozenset({"udp", "tcp", "tls", "ws", "wss"})
DEFAULT_TRANSPORTS = ("udp", "tcp", "tls")  # in the order SRV probing prefers them


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One place to send a request to, in the order RFC 3263 says to try them."""

    transport: str  # lower case: udp, tcp, tls, ws, wss
    ip: str  # no brackets around an IPv6 address
    port: int

    @property
    def address(self) -> Address:
        return Address(self.transport, self.ip, self.port)


class LocateFailure(enum.Enum):
    NXDOMAIN = "nxdomain"  # the name does not exist
    NO_RECORDS = "no_records"  # it exists but has no usable SRV/A/AAAA record
    TIMEOUT = "timeout"  # no nameserver answered in time
    SERVFAIL = "servfail"  # nameservers answered with an error (or an empty truncated answer)
    UNSUPPORTED_TRANSPORT = "unsupported_transport"
    OVERLOADED = "overloaded"  # too many queries or waiters outstanding
    CLOSED = "closed"  # the locator was closed with the location under way


class LocateError(Exception):
    """Why a host could not be located; passed to the callback (not raised by the locator)."""

    def __init__(self, host: str, reason: LocateFailure) -> None:
        super().__init__(f"{host}: {reason.value}")
        self.host = host
        self.reason = reason


LocateCallback = Callable[[list[Target] | LocateError], None]


@dataclass(frozen=True, slots=True)
class Naptr:
    order: int
    preference: int
    flags: str
    service: str
    replacement: str  # a domain name without the trailing dot, lower case


@dataclass(frozen=True, slots=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str  # a domain name without the trailing dot, lower case; "" for RFC 2782's "."


Rdata = Naptr | Srv | str  # an A/AAAA record is its address text


class AnswerStatus(enum.Enum):
    OK = "ok"  # records found
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"  # the name exists, no record of that type
    SERVFAIL = "servfail"
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"
    CLOSED = "closed"


NEGATIVE = frozenset({AnswerStatus.NXDOMAIN, AnswerStatus.NODATA})


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    status: AnswerStatus
    records: tuple[Rdata, ...] = ()
    ttl: float = 0.0  # seconds the answer may be cached (already clamped)


@dataclass(frozen=True, slots=True)
class DnsResponse:
    """One decoded response message, as far as this client reads it."""

    qid: int
    qname: str
    qtype: int
    rcode: int
    truncated: bool
    records: tuple[Rdata, ...]  # of qtype, owned by qname or the end of its CNAME chain
    ttl: float | None  # smallest TTL of those records (and of the CNAMEs followed)
    negative_ttl: float | None  # RFC 2308 5: min(SOA TTL, SOA MINIMUM) from the authority section


def normalize_name(name: str) -> str:
    return name.rstrip(".").lower()


# --- wire format (dnslib packs and parses; nothing else here touches it) ----------------------


def encode_query(qid: int, qname: str, qtype: QType) -> bytes:
    """A recursive query (RD set) advertising an EDNS0 buffer of EDNS_PAYLOAD bytes."""
    record = dnslib.DNSRecord(dnslib.DNSHeader(id=qid, rd=1), q=dnslib.DNSQuestion(qname, int(qtype)))
    record.add_ar(dnslib.EDNS0(udp_len=EDNS_PAYLOAD))
    return bytes(record.pack())


def _rdata(rtype: int, rdata: object) -> Rdata | None:
    if rtype in (QType.A, QType.AAAA):
        return str(ipaddress.ip_address(str(rdata)))  # ValueError for a malformed address
    if rtype == QType.SRV:
        srv: dnslib.SRV = rdata
        return Srv(int(srv.priority), int(srv.weight), int(srv.port), normalize_name(str(srv.target)))
    if rtype == QType.NAPTR:
        naptr: dnslib.NAPTR = rdata
        return Naptr(
            int(naptr.order),
            int(naptr.preference),
            bytes(naptr.flags).decode("ascii", "replace").lower(),
            bytes(naptr.service).decode("ascii", "replace").upper(),
            normalize_name(str(naptr.replacement)),
        )
    return None


def decode_response(data: bytes) -> DnsResponse:
    """Decode a response; ValueError for anything that is not a well-formed one-question response."""
    try:
        message = dnslib.DNSRecord.parse(data)
        header = message.header
        if not header.qr or len(message.questions) != 1:
            raise ValueError("DNS message is not a response to one question")
        qname = normalize_name(str(message.q.qname))
        qtype = int(message.q.qtype)
        # RFC 1034 3.6.2: follow the CNAME chain inside the answer section
        owner = qname
        ttl: float | None = None
        for _ in range(8):
            alias = next(
                (rr for rr in message.rr if rr.rtype == dnslib.QTYPE.CNAME and normalize_name(str(rr.rname)) == owner),
                None,
            )
            if alias is None or qtype == dnslib.QTYPE.CNAME:
                break
            owner = normalize_name(str(alias.rdata.label))
            ttl = float(alias.ttl) if ttl is None else min(ttl, float(alias.ttl))
        records: list[Rdata] = []
        for rr in message.rr:
            if rr.rtype != qtype or normalize_name(str(rr.rname)) != owner:
                continue
            value = _rdata(int(rr.rtype), rr.rdata)
            if value is not None:
                records.append(value)
                ttl = float(rr.ttl) if ttl is None else min(ttl, float(rr.ttl))
        negative_ttl: float | None = None
        for rr in message.auth:
            if rr.rtype == dnslib.QTYPE.SOA:
                negative_ttl = float(min(int(rr.ttl), int(rr.rdata.times[4])))
                break
        return DnsResponse(
            int(header.id),
            qname,
            qtype,
            int(header.rcode),
            bool(header.tc),
            tuple(records),
            ttl if records else None,
            negative_ttl,
        )
    except ValueError:
        raise
    except Exception as exc:  # dnslib's error types are not a documented set: one typed error out
        raise ValueError(f"malformed DNS response: {exc}") from exc


# --- the sans-IO stub resolver ---------------------------------------------------------------

Key = tuple[str, QType]
AnswerCallback = Callable[[DnsAnswer], None]


@dataclass(slots=True)
class _Query:
    key: Key
    qid: int
    packet: bytes
    waiters: list[AnswerCallback]
    tries: int = 0  # datagrams sent so far
    deadline: float = 0.0


@dataclass(slots=True)
class DnsStats:
    queries_sent: int = 0  # datagrams, retries included
    cache_hits: int = 0
    timeouts: int = 0  # queries that ran out of tries
    responses_ignored: int = 0  # malformed, unknown id, wrong question or wrong source
    callback_errors: int = 0


class DnsClient:
    """A sans-IO stub resolver with a cache; see the module's theory of operation."""

    def __init__(
        self,
        nameservers: Sequence[Nameserver],
        *,
        timeout: float = 1.0,
        attempts: int = 2,
        negative_ttl: float = 30.0,
        max_entries: int = 10_000,
        max_outstanding: int = 1_000,
        max_waiters: int = 1_000,
        id_random: random_module.Random | None = None,
    ) -> None:
        if not nameservers:
            raise ValueError("nameservers: at least one is needed")
        if timeout <= 0 or attempts < 1:
            raise ValueError("timeout must be positive and attempts at least 1")
        self.nameservers = [(host.strip("[]"), int(port)) for host, port in nameservers]
        self.timeout = timeout
        # each try goes to the next nameserver (the first one first): with several servers every
        # one of them is tried at least `attempts` times before the query fails
        self.max_tries = attempts * len(self.nameservers)
        self.negative_ttl = max(MIN_TTL, negative_ttl)
        self.max_entries = max_entries
        self.max_outstanding = max_outstanding
        self.max_waiters = max_waiters
        self.now = 0.0  # the latest time any input carried
        self.stats = DnsStats()
        self._ids = id_random or random_module.SystemRandom()  # query ids resist off-path guessing
        self._cache: OrderedDict[Key, tuple[DnsAnswer, float]] = OrderedDict()
        self._queries: dict[Key, _Query] = {}
        self._by_id: dict[int, _Query] = {}
        self._outbox: list[tuple[bytes, Nameserver]] = []
        self._sources = {(host, port) for host, port in self.nameservers}

    # inputs

    def cached(self, qname: str, qtype: QType, now: float) -> DnsAnswer | None:
        key = (normalize_name(qname), qtype)
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit[1] <= now:
            del self._cache[key]
            return None
        return hit[0]

    def lookup(self, qname: str, qtype: QType, now: float, done: AnswerCallback) -> None:
        """Call ``done`` exactly once with the answer: at once from the cache, else later."""
        self.now = max(self.now, now)
        key = (normalize_name(qname), qtype)
        hit = self.cached(key[0], qtype, self.now)
        if hit is not None:
            self.stats.cache_hits += 1
            self._call(done, hit, key)
            return
        query = self._queries.get(key)
        if query is not None:
            if len(query.waiters) >= self.max_waiters:
                self._call(done, DnsAnswer(AnswerStatus.OVERLOADED), key)
            else:
                query.waiters.append(done)
            return
        if len(self._queries) >= self.max_outstanding:
            self._call(done, DnsAnswer(AnswerStatus.OVERLOADED), key)
            return
        qid = self._ids.randrange(0x10000)
        while qid in self._by_id:
            qid = self._ids.randrange(0x10000)
        query = _Query(key, qid, encode_query(qid, key[0], qtype), [done])
        self._queries[key] = query
        self._by_id[qid] = query
        self._send(query)

    def receive_datagram(self, data: bytes, addr: Nameserver, now: float) -> None:
        self.now = max(self.now, now)
        try:
            response = decode_response(data)
        except ValueError as exc:
            self.stats.responses_ignored += 1
            log.debug("event=dns_bad_response source=%s error=%s", addr, str(exc).replace(" ", "_"))
            return
        query = self._by_id.get(response.qid)
        if query is None or (addr[0], addr[1]) not in self._sources or query.key != (response.qname, response.qtype):
            self.stats.responses_ignored += 1
            return
        if response.records:  # a truncated answer's records are used as they are (no TCP retry)
            ttl = min(MAX_TTL, max(MIN_TTL, response.ttl or 0.0))
            self._finish(query, DnsAnswer(AnswerStatus.OK, response.records, ttl))
        elif response.rcode in (RCODE_NOERROR, RCODE_NXDOMAIN) and not response.truncated:
            status = AnswerStatus.NXDOMAIN if response.rcode == RCODE_NXDOMAIN else AnswerStatus.NODATA
            ttl = self.negative_ttl if response.negative_ttl is None else response.negative_ttl
            self._finish(query, DnsAnswer(status, (), min(self.negative_ttl, max(MIN_TTL, ttl))))
        elif query.tries < self.max_tries:
            self._send(query)  # SERVFAIL, REFUSED...: the next nameserver may do better
        else:
            self._finish(query, DnsAnswer(AnswerStatus.SERVFAIL))

    def handle_timer(self, now: float) -> None:
        self.now = max(self.now, now)
        for query in [q for q in self._queries.values() if q.deadline <= now]:
            if self._queries.get(query.key) is not query:
                continue  # finished by a callback of an earlier one (close())
            if query.tries < self.max_tries:
                self._send(query)
            else:
                self.stats.timeouts += 1
                log.info("event=dns_timeout qname=%s qtype=%s", query.key[0], query.key[1].name)
                self._finish(query, DnsAnswer(AnswerStatus.TIMEOUT))

    def close(self) -> None:
        """Answer every waiter with CLOSED; nothing is sent after this."""
        for query in list(self._queries.values()):
            if self._queries.get(query.key) is query:
                self._finish(query, DnsAnswer(AnswerStatus.CLOSED))
        self._outbox.clear()

    # outputs

    def datagrams_to_send(self) -> list[tuple[bytes, Nameserver]]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        return min((q.deadline for q in self._queries.values()), default=None)

    # internals

    def _send(self, query: _Query) -> None:
        server = self.nameservers[query.tries % len(self.nameservers)]
        query.tries += 1
        query.deadline = self.now + self.timeout
        self._outbox.append((query.packet, server))
        self.stats.queries_sent += 1

    def _finish(self, query: _Query, answer: DnsAnswer) -> None:
        del self._queries[query.key]
        del self._by_id[query.qid]
        if answer.status is AnswerStatus.OK or answer.status in NEGATIVE:
            self._store(query.key, answer)
        for done in query.waiters:
            self._call(done, answer, query.key)

    def _store(self, key: Key, answer: DnsAnswer) -> None:
        self._cache.pop(key, None)
        if len(self._cache) >= self.max_entries:
            for stale in [k for k, (_, expires) in self._cache.items() if expires <= self.now]:
                del self._cache[stale]
            while len(self._cache) >= self.max_entries:
                self._cache.popitem(last=False)  # the oldest stored
        self._cache[key] = (answer, self.now + answer.ttl)

    def _call(self, done: AnswerCallback, answer: DnsAnswer, key: Key) -> None:
        try:
            done(answer)
        except Exception:
            self.stats.callback_errors += 1
            log.exception("event=dns_callback_failed qname=%s qtype=%s", key[0], key[1].name)


# --- RFC 3263 on top of it -------------------------------------------------------------------


def order_srv(records: Sequence[Srv], rng: random_module.Random) -> list[Srv]:
    """RFC 2782 "Usage rules": by priority, then by weighted random selection within one.

    The running-sum selection of RFC 2782 with the random number drawn from 1..sum rather than
    0..sum: drawn from 0 it gives the first record one extra share (weights 1 and 3 would split
    40/60, not 25/75).  So a record of weight 0 is only taken once the weighted ones are used up,
    and records of weight 0 among themselves come in a uniformly random order (no weighting).
    """
    ordered: list[Srv] = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        while group:
            total = sum(r.weight for r in group)
            if total == 0:
                ordered.append(group.pop(rng.randrange(len(group))))
                continue
            pick = rng.randint(1, total)
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= pick:
                    ordered.append(group.pop(index))
                    break
    return ordered


def _failure(answers: Iterable[DnsAnswer]) -> LocateFailure:
    """The reason to report when no answer of a stage gave a usable record."""
    statuses = {a.status for a in answers}
    for status, reason in (
        (AnswerStatus.CLOSED, LocateFailure.CLOSED),
        (AnswerStatus.OVERLOADED, LocateFailure.OVERLOADED),
        (AnswerStatus.TIMEOUT, LocateFailure.TIMEOUT),
        (AnswerStatus.SERVFAIL, LocateFailure.SERVFAIL),
    ):
        if status in statuses:
            return reason
    if statuses == {AnswerStatus.NXDOMAIN}:
        return LocateFailure.NXDOMAIN
    return LocateFailure.NO_RECORDS


# statuses after which a location stops rather than falling back to the next RFC 3263 step
# (a dead nameserver would otherwise cost one more timeout per step)
_ABORT = frozenset({AnswerStatus.TIMEOUT, AnswerStatus.OVERLOADED, AnswerStatus.CLOSED})


@dataclass(slots=True)
class _Location:
    host: str
    secure: bool
    callback: LocateCallback
    called: bool = field(default=False)


class Locator:
    """RFC 3263 4.1 and 4.2 over a :class:`DnsClient` (sans-IO; its lookups carry ``client.now``)."""

    def __init__(
        self,
        client: DnsClient,
        *,
        random: random_module.Random | None = None,
        transports: Sequence[str] = DEFAULT_TRANSPORTS,
        families: Sequence[QType] = (QType.A, QType.AAAA),
    ) -> None:
        unknown = set(transports) - KNOWN_TRANSPORTS
        if unknown:
            raise ValueError(f"transports: unknown {sorted(unknown)}")
        self.client = client
        self.random = random or random_module.Random()
        self.transports = tuple(transports)
        self.families = tuple(families)
        self.callback_errors = 0

    def locate(
        self,
        host: str,
        port: int | None,
        transport: str | None,
        secure: bool,
        callback: LocateCallback,
        now: float,
    ) -> None:
        """Call ``callback`` exactly once with the ordered targets or a LocateError; maybe at once.

        ``transport`` is the URI's transport parameter (None when absent), ``secure`` true for a
        SIPS URI.
        """
        self.client.now = max(self.client.now, now)
        name = normalize_name(host.strip("[]"))
        loc = _Location(name, secure, callback)
        chosen = transport.lower() if transport else None
        if chosen == "tcp" and secure:
            chosen = "tls"  # RFC 3261 26.2.2: sips over TCP is TLS
        if chosen is not None and chosen not in KNOWN_TRANSPORTS:
            self._fail(loc, LocateFailure.UNSUPPORTED_TRANSPORT)
            return
        if is_ip_literal(name):
            # RFC 3263 4.1/4.2: a numeric address needs no DNS; UDP for sip, TLS over TCP for sips
            chosen = chosen or ("tls" if secure else "udp")
            self._deliver(loc, [Target(chosen, name, port or default_port(chosen))])
            return
        if port is not None:
            # RFC 3263 4.2: "a port is present in the URI": A/AAAA only
            chosen = chosen or ("tls" if secure else "udp")
            self._addresses(loc, [(chosen, name, port)])
            return
        if chosen is not None:
            # RFC 3263 4.2: an explicit transport: SRV for it alone
            if chosen in SRV_PREFIXES:
                self._srv(loc, [(chosen, f"{SRV_PREFIXES[chosen]}.{name}")], chosen)
            else:
                self._addresses(loc, [(chosen, name, default_port(chosen))])
            return
        self.client.lookup(name, QType.NAPTR, self.client.now, partial(self._naptr_done, loc))

    def locate_uri(self, uri: SipURI, callback: LocateCallback, now: float) -> None:
        """The same for a parsed URI: ``maddr`` wins over the host (RFC 3263 4)."""
        host = uri.param("maddr") or uri.host
        self.locate(host, uri.port, uri.param("transport") or None, uri.scheme == "sips", callback, now)

    # steps

    def _naptr_done(self, loc: _Location, answer: DnsAnswer) -> None:
        if answer.status in _ABORT:
            self._fail(loc, _failure([answer]))
            return
        chosen: list[tuple[str, str]] = []
        records = sorted((r for r in answer.records if isinstance(r, Naptr)), key=lambda r: (r.order, r.preference))
        for record in records:
            # RFC 3263 4.1: terminal "s" records of services the client supports; a SIPS URI
            # only over a secure transport
            transport = NAPTR_SERVICES.get(record.service)
            if record.flags != "s" or transport is None or transport not in self.transports:
                continue
            if loc.secure and transport not in SECURE_TRANSPORTS:
                continue
            if record.replacement:
                chosen.append((transport, record.replacement))
        if chosen:
            # RFC 3263 4.1: "If an attempt should fail ... the next SHOULD be tried": every
            # applicable record's targets, in NAPTR order
            self._srv(loc, chosen, chosen[0][0])
            return
        # RFC 3263 4.1: no (usable) NAPTR records: SRV queries for the supported transports
        probes = [
            (t, f"{SRV_PREFIXES[t]}.{loc.host}")
            for t in self.transports
            if t in SRV_PREFIXES and (not loc.secure or t in SECURE_TRANSPORTS)
        ]
        self._srv(loc, probes, "tls" if loc.secure else "udp")

    def _srv(self, loc: _Location, queries: list[tuple[str, str]], fallback: str) -> None:
        keys = [(name, QType.SRV) for _, name in queries]
        self._gather(keys, partial(self._srv_done, loc, queries, fallback))

    def _srv_done(
        self, loc: _Location, queries: list[tuple[str, str]], fallback: str, answers: dict[Key, DnsAnswer]
    ) -> None:
        entries: list[tuple[str, str, int]] = []
        found = False
        for transport, name in queries:
            records = [r for r in answers[(name, QType.SRV)].records if isinstance(r, Srv)]
            found = found or bool(records)
            # RFC 2782: a target of "." means the service is decidedly not available there
            entries.extend((transport, r.target, r.port) for r in order_srv(records, self.random) if r.target)
        if entries:
            self._addresses(loc, entries)
        elif found:
            self._fail(loc, LocateFailure.NO_RECORDS)
        elif any(a.status in _ABORT for a in answers.values()):
            self._fail(loc, _failure(answers.values()))
        else:
            # RFC 3263 4.2: no SRV records: A/AAAA of the name, the transport's default port
            self._addresses(loc, [(fallback, loc.host, default_port(fallback))])

    def _addresses(self, loc: _Location, entries: list[tuple[str, str, int]]) -> None:
        # an SRV target written as an address (not allowed by RFC 2782, seen in the wild) is used as is
        keys = [(name, family) for _, name, _ in entries if not is_ip_literal(name) for family in self.families]
        self._gather(keys, partial(self._addresses_done, loc, entries))

    def _addresses_done(
        self, loc: _Location, entries: list[tuple[str, str, int]], answers: dict[Key, DnsAnswer]
    ) -> None:
        targets: dict[Target, None] = {}  # ordered and without repeats
        for transport, name, port in entries:
            if is_ip_literal(name):
                targets.setdefault(Target(transport, name, port))
                continue
            for family in self.families:
                for ip in answers[(name, family)].records:
                    if isinstance(ip, str):
                        targets.setdefault(Target(transport, ip, port))
        if targets:
            self._deliver(loc, list(targets))
        else:
            self._fail(loc, _failure(answers.values()))

    # plumbing

    def _gather(self, keys: list[Key], then: Callable[[dict[Key, DnsAnswer]], None]) -> None:
        """Look every key up (in parallel), then call ``then`` once with all the answers."""
        wanted = list(dict.fromkeys(keys))
        answers: dict[Key, DnsAnswer] = {}
        if not wanted:
            then(answers)
            return

        def one(key: Key, answer: DnsAnswer) -> None:
            answers[key] = answer
            if len(answers) == len(wanted):
                then(answers)

        for key in wanted:
            self.client.lookup(key[0], key[1], self.client.now, partial(one, key))

    def _fail(self, loc: _Location, reason: LocateFailure) -> None:
        # debug: this runs per request towards a broken name (the DNS events are logged once)
        log.debug("event=locate_failed host=%s reason=%s", loc.host, reason.value)
        self._finish(loc, LocateError(loc.host, reason))

    def _deliver(self, loc: _Location, targets: list[Target]) -> None:
        self._finish(loc, targets)

    def _finish(self, loc: _Location, result: list[Target] | LocateError) -> None:
        if loc.called:  # cannot happen by construction; guards "exactly once"
            return
        loc.called = True
        try:
            loc.callback(result)
        except Exception:
            self.callback_errors += 1
            log.exception("event=locate_callback_failed host=%s", loc.host)


# --- asyncio glue ----------------------------------------------------------------------------


def read_resolv_conf(path: str | Path = "/etc/resolv.conf") -> list[Nameserver]:
    """The ``nameserver`` lines of resolv.conf (port 53); 127.0.0.1 when there are none (glibc)."""
    servers: list[Nameserver] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            servers.append((words[1], DNS_PORT))
    return servers or [("127.0.0.1", DNS_PORT)]


class ServerLocator:
    """RFC 3263 server location for the event loop: :meth:`locate` never blocks.

    The loop is the running one at the first call; sockets are opened on the first query.
    """

    def __init__(
        self,
        nameservers: Sequence[Nameserver] | None = None,
        *,
        timeout: float = 1.0,
        attempts: int = 2,
        negative_ttl: float = 30.0,
        max_entries: int = 10_000,
        random: random_module.Random | None = None,
        transports: Sequence[str] = DEFAULT_TRANSPORTS,
        families: Sequence[QType] = (QType.A, QType.AAAA),
        resolv_conf: str | Path = "/etc/resolv.conf",
    ) -> None:
        self.client = DnsClient(
            nameservers if nameservers is not None else read_resolv_conf(resolv_conf),
            timeout=timeout,
            attempts=attempts,
            negative_ttl=negative_ttl,
            max_entries=max_entries,
        )
        self.locator = Locator(self.client, random=random, transports=transports, families=families)
        self.after: Callable[[], None] | None = None  # called after each batch of callbacks
        self.send_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: dict[int, socket.socket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False

    def locate(
        self, host: str, port: int | None, transport: str | None, secure: bool, callback: LocateCallback
    ) -> None:
        """See :meth:`Locator.locate`; the callback may run before this returns (cached answers)."""
        loop = self._running_loop()
        if self._closed:
            callback(LocateError(host, LocateFailure.CLOSED))
            return
        self.locator.locate(host, port, transport, secure, callback, loop.time())
        self._flush()

    def locate_uri(self, uri: SipURI, callback: LocateCallback) -> None:
        host = uri.param("maddr") or uri.host
        self.locate(host, uri.port, uri.param("transport") or None, uri.scheme == "sips", callback)

    def close(self) -> None:
        """Stop: waiting callbacks get LocateError(CLOSED), sockets and the timer go."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in self._sockets.values():
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        self.client.close()

    # internals

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _socket(self, family: int) -> socket.socket:
        sock = self._sockets.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            self._running_loop().add_reader(sock.fileno(), self._readable, sock)
            self._sockets[family] = sock
        return sock

    def _readable(self, sock: socket.socket) -> None:
        now = self._running_loop().time()
        for _ in range(64):  # a bounded batch, then back to the loop
            try:
                data, addr = sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. an ICMP error queued on the socket: the timer retries
                break
            self.client.receive_datagram(data, (str(addr[0]), int(addr[1])), now)
        self._flush()
        if self.after is not None:
            self.after()

    def _fire(self) -> None:
        # call_at may run a little early (within the loop's clock resolution): the deadline is due
        now = max(self._running_loop().time(), self._timer_at or 0.0)
        self._timer = None
        self._timer_at = None
        self.client.handle_timer(now)
        self._flush()
        if self.after is not None:
            self.after()

    def _flush(self) -> None:
        if self._closed:
            return
        for packet, (host, port) in self.client.datagrams_to_send():
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                self._socket(family).sendto(packet, (host, port))
            except OSError as exc:  # the timer retries (or gives up) as for a lost datagram
                self.send_errors += 1
                log.info("event=dns_send_failed nameserver=%s error=%s", host, str(exc).replace(" ", "_"))
        deadline = self.client.get_timer()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self._running_loop().call_at(deadline, self._fire)
