"""RFC 3263 server location against a real DNS server on loopback (tests/fixtures/dns_server.py),
plus the sans-IO DNS client driven by hand with an injected clock."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import dnslib  # type: ignore[import-untyped]
from fixtures.dns_server import ZoneServer, dns_server, silent_ns  # noqa: F401  (fixtures)
from hypothesis import given, settings
from hypothesis import strategies as st

from sipfarm.sip.uri import SipURI, parse_uri
from sipfarm.transport.rfc3263 import (
    AnswerStatus,
    DnsAnswer,
    DnsClient,
    LocateError,
    LocateFailure,
    Naptr,
    QType,
    ServerLocator,
    Srv,
    Target,
    decode_response,
    order_srv,
)

Result = list[Target] | LocateError

GATEWAY_ZONE: dict[str, list[tuple[Any, ...]]] = {
    # NAPTR: UDP first (order 10), TCP next; an ENUM-style record the locator must skip
    "gw.test": [
        ("NAPTR", (20, 50, "s", "SIP+D2T", "", "_sip._tcp.gw.test")),
        ("NAPTR", (10, 50, "s", "SIP+D2U", "", "_sip._udp.gw.test")),
        ("NAPTR", (5, 50, "u", "E2U+sip", "!^.*$!sip:info@gw.test!", "")),
        ("NAPTR", (30, 50, "s", "SIPS+D2T", "", "_sips._tcp.gw.test")),
    ],
    "_sip._udp.gw.test": [("SRV", (20, 0, 5080, "b.gw.test")), ("SRV", (10, 0, 5070, "a.gw.test"))],
    "_sip._tcp.gw.test": [("SRV", (10, 0, 5090, "c.gw.test"))],
    "_sips._tcp.gw.test": [("SRV", (10, 0, 5091, "c.gw.test"))],
    "a.gw.test": [("A", "127.0.0.1")],
    "b.gw.test": [("A", "127.0.0.2"), ("AAAA", "::1")],
    "c.gw.test": [("A", "127.0.0.3")],
    # no NAPTR: SRV probing; the lower priority value comes first whatever the zone's order
    "srv.test": [("A", "127.0.0.99")],
    "_sip._udp.srv.test": [("SRV", (2, 0, 5072, "two.srv.test")), ("SRV", (1, 0, 5071, "one.srv.test"))],
    "_sip._tcp.srv.test": [("SRV", (1, 0, 5073, "127.0.1.3"))],  # an address as target (seen in the wild)
    "one.srv.test": [("A", "127.0.1.1")],
    "two.srv.test": [("A", "127.0.1.2")],
    # neither NAPTR nor SRV: A at the default port
    "plain.test": [("A", "127.0.2.1")],
    "alias.test": [("CNAME", "plain.test")],
}


async def locate(locator: ServerLocator, host: str, port: int | None = None, **kw: Any) -> Result:
    future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
    calls: list[Result] = []

    def done(result: Result) -> None:
        calls.append(result)
        future.set_result(result)  # a second call would raise InvalidStateError

    locator.locate(host, port, kw.get("transport"), kw.get("secure", False), done)
    result = await future
    assert len(calls) == 1
    return result


def make_locator(server: ZoneServer, **kw: Any) -> ServerLocator:
    kw.setdefault("timeout", 0.5)
    return ServerLocator([server.address], **kw)


def test_naptr_srv_a_chain(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    dns_server.zone.update(GATEWAY_ZONE)

    async def main() -> None:
        locator = make_locator(dns_server)
        try:
            targets = await locate(locator, "gw.test")
            assert targets == [
                Target("udp", "127.0.0.1", 5070),
                Target("udp", "127.0.0.2", 5080),
                Target("udp", "::1", 5080),
                Target("tcp", "127.0.0.3", 5090),
                Target("tls", "127.0.0.3", 5091),
            ]
            assert dns_server.count("gw.test", "NAPTR") == 1
            assert dns_server.count("_sip._udp.gw.test", "SRV") == 1
            assert dns_server.count("_sip._tcp.gw.test", "SRV") == 1
            assert dns_server.count("gw.test", "SRV") == 0  # no probing once NAPTR answered
            assert dns_server.count("b.gw.test", "A") == 1
            # a SIPS URI only takes the secure NAPTR services (RFC 3263 4.1)
            assert await locate(locator, "GW.test.", secure=True) == [Target("tls", "127.0.0.3", 5091)]
            assert dns_server.count("gw.test", "NAPTR") == 1  # cached, names compare case-blind
        finally:
            locator.close()

    arun(main())


def test_srv_priorities_without_naptr(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    dns_server.zone.update(GATEWAY_ZONE)

    async def main() -> None:
        locator = make_locator(dns_server)
        try:
            assert await locate(locator, "srv.test") == [
                Target("udp", "127.0.1.1", 5071),
                Target("udp", "127.0.1.2", 5072),
                Target("tcp", "127.0.1.3", 5073),
            ]
            # RFC 3263 4.1: no NAPTR, an SRV query per supported transport
            for name in ("_sip._udp.srv.test", "_sip._tcp.srv.test", "_sips._tcp.srv.test"):
                assert dns_server.count(name, "SRV") == 1
            assert dns_server.count("srv.test", "A") == 0  # SRV found: the name's own A is unused
            # no NAPTR and no SRV: the name's A record at the transport's default port (4.2)
            assert await locate(locator, "plain.test") == [Target("udp", "127.0.2.1", 5060)]
            assert await locate(locator, "alias.test", secure=True) == [Target("tls", "127.0.2.1", 5061)]
        finally:
            locator.close()

    arun(main())


def test_explicit_port_and_transport(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    dns_server.zone.update(GATEWAY_ZONE)

    async def main() -> None:
        locator = make_locator(dns_server)
        try:
            # RFC 3263 4.2: a port in the URI: A/AAAA only, no NAPTR, no SRV
            result = await locate(locator, "gw.test", 5099)  # has NAPTR records but no A
            assert isinstance(result, LocateError)
            assert result.reason is LocateFailure.NO_RECORDS
            assert await locate(locator, "a.gw.test", 5099) == [Target("udp", "127.0.0.1", 5099)]
            assert dns_server.count("a.gw.test", "NAPTR") == 0
            assert dns_server.count("a.gw.test", "SRV") == 0
            assert await locate(locator, "a.gw.test", 5099, transport="TCP") == [Target("tcp", "127.0.0.1", 5099)]
            # an explicit transport: the SRV of that transport alone
            assert await locate(locator, "gw.test", transport="tcp") == [Target("tcp", "127.0.0.3", 5090)]
            assert dns_server.count("gw.test", "NAPTR") == 0
            assert dns_server.count("_sip._udp.gw.test", "SRV") == 0
            # sips + transport=tcp is TLS (_sips._tcp)
            assert await locate(locator, "gw.test", transport="tcp", secure=True) == [Target("tls", "127.0.0.3", 5091)]
            uri = parse_uri("sip:gw.test;transport=tcp")
            assert isinstance(uri, SipURI)
            got: list[Result] = []
            locator.locate_uri(uri, got.append)  # everything cached: answered at once
            assert got == [[Target("tcp", "127.0.0.3", 5090)]]
            result = await locate(locator, "gw.test", transport="sctp")
            assert isinstance(result, LocateError)
            assert result.reason is LocateFailure.UNSUPPORTED_TRANSPORT
        finally:
            locator.close()

    arun(main())


def test_srv_weights_follow_rfc2782_with_a_seeded_random(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    dns_server.zone.update(
        {
            "_sip._udp.w.test": [("SRV", (10, 1, 5060, "light.w.test")), ("SRV", (10, 3, 5060, "heavy.w.test"))],
            "light.w.test": [("A", "127.0.3.1")],
            "heavy.w.test": [("A", "127.0.3.3")],
        }
    )

    async def firsts(seed: int, rounds: int) -> list[str]:
        locator = make_locator(dns_server, random=random.Random(seed))
        try:
            out = []
            for _ in range(rounds):
                targets = await locate(locator, "w.test", transport="udp")
                assert isinstance(targets, list)
                assert len(targets) == 2  # both always listed, for failover
                out.append(targets[0].ip)
            return out
        finally:
            locator.close()

    async def main() -> None:
        first = await firsts(7, 400)
        share = Counter(first)["127.0.3.3"] / len(first)
        assert 0.65 < share < 0.85, share  # weight 3 of 4
        assert await firsts(7, 400) == first  # deterministic under the same seed
        assert dns_server.count("_sip._udp.w.test", "SRV") == 2  # one query per locator: cached

    arun(main())


def test_order_srv_rules() -> None:
    records = [Srv(20, 0, 1, "c"), Srv(10, 0, 1, "zero"), Srv(10, 5, 1, "a"), Srv(10, 5, 1, "b")]

    class Lowest(random.Random):
        def randint(self, a: int, b: int) -> int:
            return a

        def randrange(self, *args: Any, **kwargs: Any) -> int:
            return 0

    # priority first; within one a weight-0 record only once the weighted ones are taken
    assert [r.target for r in order_srv(records, Lowest())] == ["a", "b", "zero", "c"]
    assert [r.target for r in order_srv(records, random.Random(1))][-1] == "c"
    assert order_srv([], random.Random(1)) == []


def test_ip_literals_need_no_dns(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    async def main() -> None:
        locator = make_locator(dns_server)
        got: list[Result] = []
        try:
            locator.locate("192.0.2.1", None, None, False, got.append)
            locator.locate("[2001:db8::1]", 5070, "tcp", False, got.append)
            locator.locate("192.0.2.1", None, None, True, got.append)
            assert got == [  # answered before locate returned
                [Target("udp", "192.0.2.1", 5060)],
                [Target("tcp", "2001:db8::1", 5070)],
                [Target("tls", "192.0.2.1", 5061)],
            ]
            await asyncio.sleep(0.05)
            assert dns_server.total == 0
        finally:
            locator.close()

    arun(main())


def test_nxdomain_is_an_error_and_negatively_cached(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    async def main() -> None:
        locator = make_locator(dns_server)
        try:
            result = await locate(locator, "nowhere.test")
            assert isinstance(result, LocateError)
            assert result.reason is LocateFailure.NXDOMAIN
            assert result.host == "nowhere.test"
            asked = dns_server.total
            assert asked == 6  # NAPTR, 3 SRV probes, A and AAAA
            again = await locate(locator, "nowhere.test")
            assert isinstance(again, LocateError)
            assert again.reason is LocateFailure.NXDOMAIN
            assert dns_server.total == asked  # nothing asked again within the negative TTL
            result = await locate(locator, "nowhere.test", 5060)
            assert isinstance(result, LocateError)
            assert dns_server.total == asked
        finally:
            locator.close()

    arun(main())


def test_negative_answers_expire(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    dns_server.negative_ttl = 1  # the SOA MINIMUM, RFC 2308

    async def main() -> None:
        locator = make_locator(dns_server)
        try:
            result = await locate(locator, "late.test", 5060)
            assert isinstance(result, LocateError)
            dns_server.zone["late.test"] = [("A", "127.0.4.1")]
            result = await locate(locator, "late.test", 5060)
            assert isinstance(result, LocateError)  # still the cached NXDOMAIN
            await asyncio.sleep(1.1)
            assert await locate(locator, "late.test", 5060) == [Target("udp", "127.0.4.1", 5060)]
        finally:
            locator.close()

    arun(main())


def test_dead_nameserver_times_out_without_hanging(arun: Any, silent_ns: tuple[str, int]) -> None:  # noqa: F811
    async def main() -> None:
        locator = ServerLocator([silent_ns], timeout=0.2, attempts=2)
        try:
            start = time.monotonic()
            result = await locate(locator, "gw.test")
            elapsed = time.monotonic() - start
            assert isinstance(result, LocateError)
            assert result.reason is LocateFailure.TIMEOUT
            assert 0.35 < elapsed < 1.5, elapsed  # 2 tries of 0.2 s, and no further step
            assert locator.client.stats.queries_sent == 2
            # a timeout is not cached: the next location asks again
            result = await locate(locator, "gw.test")
            assert isinstance(result, LocateError)
            assert locator.client.stats.queries_sent == 4
        finally:
            locator.close()

    arun(main())


def test_second_nameserver_answers_when_the_first_is_dead(
    arun: Any,
    dns_server: ZoneServer,  # noqa: F811
    silent_ns: tuple[str, int],  # noqa: F811
) -> None:
    dns_server.zone.update(GATEWAY_ZONE)

    async def main() -> None:
        locator = ServerLocator([silent_ns, dns_server.address], timeout=0.2, attempts=1)
        try:
            assert await locate(locator, "plain.test", 5060) == [Target("udp", "127.0.2.1", 5060)]
        finally:
            locator.close()

    arun(main())


def test_ttl_expiry_asks_again(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    # a TTL of 0 is held for the 1 s minimum; after it the name is asked again
    dns_server.zone["short.test"] = [("A", "127.0.5.1", 0)]

    async def main() -> None:
        locator = make_locator(dns_server)
        try:
            assert await locate(locator, "short.test", 5060) == [Target("udp", "127.0.5.1", 5060)]
            dns_server.zone["short.test"] = [("A", "127.0.5.2", 0)]
            assert await locate(locator, "short.test", 5060) == [Target("udp", "127.0.5.1", 5060)]
            assert dns_server.count("short.test", "A") == 1
            await asyncio.sleep(1.1)
            assert await locate(locator, "short.test", 5060) == [Target("udp", "127.0.5.2", 5060)]
            assert dns_server.count("short.test", "A") == 2
        finally:
            locator.close()

    arun(main())


def test_concurrent_waiters_share_one_query(arun: Any, dns_server: ZoneServer) -> None:  # noqa: F811
    dns_server.zone.update(GATEWAY_ZONE)

    async def main() -> None:
        locator = make_locator(dns_server)
        try:
            results = await asyncio.gather(*(locate(locator, "gw.test") for _ in range(50)))
            assert all(r == results[0] for r in results)
            assert isinstance(results[0], list)
            assert len(results[0]) == 5
            assert dns_server.count("gw.test", "NAPTR") == 1
            assert dns_server.count("_sip._udp.gw.test", "SRV") == 1
            assert dns_server.count("a.gw.test", "A") == 1
        finally:
            locator.close()

    arun(main())


def test_close_answers_pending_locations(arun: Any, silent_ns: tuple[str, int]) -> None:  # noqa: F811
    async def main() -> None:
        locator = ServerLocator([silent_ns], timeout=5.0)
        got: list[Result] = []
        locator.locate("gw.test", None, None, False, got.append)
        locator.locate("gw.test", 5060, None, False, got.append)
        assert got == []
        locator.close()
        assert len(got) == 2
        assert all(isinstance(r, LocateError) and r.reason is LocateFailure.CLOSED for r in got)
        locator.locate("gw.test", None, None, False, got.append)
        assert len(got) == 3

    arun(main())


# --- the sans-IO client with an injected clock --------------------------------------------------

NS1 = ("192.0.2.53", 53)
NS2 = ("198.51.100.53", 53)


def reply_to(packet: bytes, *records: Any, rcode: int = 0) -> bytes:
    reply = dnslib.DNSRecord.parse(packet).reply()
    reply.header.rcode = rcode
    for rr in records:
        reply.add_answer(rr)
    return bytes(reply.pack())


def test_client_retries_on_the_next_nameserver_and_caches() -> None:
    client = DnsClient([NS1, NS2], timeout=1.0, attempts=1)
    answers: list[DnsAnswer] = []
    client.lookup("gw.test", QType.A, 100.0, answers.append)
    [(packet, server)] = client.datagrams_to_send()
    assert server == NS1
    assert client.get_timer() == 101.0
    client.handle_timer(101.0)
    [(again, server)] = client.datagrams_to_send()
    assert server == NS2
    assert again == packet
    # a response from an address that is not a nameserver, or garbage, changes nothing
    rr = dnslib.RR("gw.test", dnslib.QTYPE.A, ttl=7200, rdata=dnslib.A("127.0.0.1"))
    client.receive_datagram(reply_to(packet, rr), ("203.0.113.9", 53), 101.5)
    client.receive_datagram(b"\x00", NS2, 101.5)
    assert answers == []
    assert client.stats.responses_ignored == 2
    client.receive_datagram(reply_to(packet, rr), NS2, 101.5)
    assert answers == [DnsAnswer(AnswerStatus.OK, ("127.0.0.1",), 3600.0)]  # TTL capped at 1 h
    assert client.get_timer() is None
    client.lookup("GW.test.", QType.A, 3000.0, answers.append)
    assert len(answers) == 2  # from the cache, at once
    assert client.datagrams_to_send() == []
    client.lookup("gw.test", QType.A, 101.5 + 3600.0, answers.append)
    assert len(answers) == 2
    assert len(client.datagrams_to_send()) == 1  # expired: asked again


def test_client_servfail_tries_the_next_server_then_fails() -> None:
    client = DnsClient([NS1, NS2], timeout=1.0, attempts=1)
    answers: list[DnsAnswer] = []
    client.lookup("gw.test", QType.SRV, 0.0, answers.append)
    [(packet, _)] = client.datagrams_to_send()
    client.receive_datagram(reply_to(packet, rcode=2), NS1, 0.1)
    [(_, server)] = client.datagrams_to_send()
    assert server == NS2
    client.receive_datagram(reply_to(packet, rcode=2), NS2, 0.2)
    assert answers == [DnsAnswer(AnswerStatus.SERVFAIL)]
    client.lookup("gw.test", QType.SRV, 0.3, answers.append)
    assert len(client.datagrams_to_send()) == 1  # a failure is not cached


def test_client_cache_is_bounded() -> None:
    client = DnsClient([NS1], max_entries=2)
    for n in range(3):
        client.lookup(f"h{n}.test", QType.A, 0.0, lambda answer: None)
        [(packet, _)] = client.datagrams_to_send()
        rr = dnslib.RR(f"h{n}.test", dnslib.QTYPE.A, ttl=60, rdata=dnslib.A("127.0.0.1"))
        client.receive_datagram(reply_to(packet, rr), NS1, 0.0)
    assert client.cached("h0.test", QType.A, 1.0) is None  # the oldest went
    assert client.cached("h2.test", QType.A, 1.0) is not None
    assert client.cached("h2.test", QType.A, 61.0) is None


def test_client_truncated_answers() -> None:
    client = DnsClient([NS1, NS2], attempts=1)
    answers: list[DnsAnswer] = []
    client.lookup("big.test", QType.SRV, 0.0, answers.append)
    [(packet, _)] = client.datagrams_to_send()
    empty = dnslib.DNSRecord.parse(packet).reply()
    empty.header.tc = 1
    client.receive_datagram(bytes(empty.pack()), NS1, 0.1)
    assert answers == []  # an empty truncated answer is a failure of that server (no TCP retry)
    [(_, server)] = client.datagrams_to_send()
    assert server == NS2
    partial = dnslib.DNSRecord.parse(packet).reply()
    partial.header.tc = 1
    partial.add_answer(dnslib.RR("big.test", dnslib.QTYPE.SRV, ttl=60, rdata=dnslib.SRV(1, 1, 5060, "a.big.test")))
    client.receive_datagram(bytes(partial.pack()), NS2, 0.2)
    assert answers == [DnsAnswer(AnswerStatus.OK, (Srv(1, 1, 5060, "a.big.test"),), 60.0)]


def test_client_calls_every_waiter_once_even_if_one_raises() -> None:
    client = DnsClient([NS1])
    seen: list[DnsAnswer] = []

    def broken(answer: DnsAnswer) -> None:
        raise RuntimeError("callback bug")

    client.lookup("gw.test", QType.A, 0.0, broken)
    client.lookup("gw.test", QType.A, 0.0, seen.append)
    [(packet, _)] = client.datagrams_to_send()  # one query for both waiters
    rr = dnslib.RR("gw.test", dnslib.QTYPE.A, ttl=60, rdata=dnslib.A("127.0.0.1"))
    client.receive_datagram(reply_to(packet, rr), NS1, 0.1)
    assert seen == [DnsAnswer(AnswerStatus.OK, ("127.0.0.1",), 60.0)]
    assert client.stats.callback_errors == 1


def _sample_reply() -> bytes:
    query = dnslib.DNSRecord(dnslib.DNSHeader(id=77, rd=1), q=dnslib.DNSQuestion("gw.test", dnslib.QTYPE.NAPTR))
    reply = query.reply()
    naptr = dnslib.NAPTR(10, 50, b"s", b"SIP+D2U", b"", "_sip._udp.gw.test")
    reply.add_answer(dnslib.RR("gw.test", dnslib.QTYPE.NAPTR, ttl=60, rdata=naptr))
    soa = dnslib.SOA("ns.test", "h.test", (1, 2, 3, 4, 5))
    reply.add_auth(dnslib.RR("test", dnslib.QTYPE.SOA, ttl=60, rdata=soa))
    return bytes(reply.pack())


def test_decode_response_truncations_are_parsed_or_value_error() -> None:
    data = _sample_reply()
    assert decode_response(data).records == (Naptr(10, 50, "s", "SIP+D2U", "_sip._udp.gw.test"),)
    for end in range(len(data)):
        try:
            decode_response(data[:end])
        except ValueError:
            pass


@given(st.binary(max_size=300), st.integers(0, 200), st.integers(0, 255))
@settings(max_examples=300, deadline=None)
def test_client_survives_any_datagram(junk: bytes, at: int, byte: int) -> None:
    client = DnsClient([NS1])
    answers: list[DnsAnswer] = []
    client.lookup("gw.test", QType.NAPTR, 0.0, answers.append)
    client.datagrams_to_send()
    for data in (junk, _mutate(_sample_reply(), at, byte)):
        try:
            decode_response(data)
        except ValueError:
            pass
        client.receive_datagram(data, NS1, 0.1)  # never raises
    assert len(answers) <= 1


def _mutate(data: bytes, at: int, byte: int) -> bytes:
    at %= len(data)
    return data[:at] + bytes([byte]) + data[at + 1 :]
