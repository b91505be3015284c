"""Sans-IO tests of the allow/deny network lists (:mod:`sipfarm.protect.netlist`), with
Hypothesis checking the verdicts against a plain reading of the rules."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipfarm.protect.netlist import NetList, Verdict, parse_network


def test_no_lists_allow_everyone():
    acl = NetList()
    assert not acl.active
    assert acl.verdict("198.51.100.7") is Verdict.ALLOWED
    assert acl.verdict("2001:db8::1") is Verdict.ALLOWED


def test_deny_wins_over_allow():
    acl = NetList(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.6.6.0/24", "2001:db8:bad::/48"])
    assert acl.active
    assert acl.verdict("10.1.2.3") is Verdict.ALLOWED
    assert acl.verdict("10.6.6.9") is Verdict.DENIED
    assert acl.verdict("192.0.2.1") is Verdict.NOT_ALLOWED
    assert acl.verdict("2001:db8::5") is Verdict.ALLOWED
    assert acl.verdict("2001:db8:bad::5") is Verdict.DENIED
    assert acl.verdict("2001:db9::5") is Verdict.NOT_ALLOWED


def test_deny_only_lets_the_rest_in():
    acl = NetList(deny=["127.0.0.2", "::1"])
    assert acl.verdict("127.0.0.2") is Verdict.DENIED
    assert acl.verdict("127.0.0.3") is Verdict.ALLOWED
    assert acl.verdict("::1") is Verdict.DENIED
    assert acl.verdict("[::1]") is Verdict.DENIED


def test_ipv4_mapped_source_matches_its_ipv4_network():
    acl = NetList(allow=["192.0.2.0/24"])
    assert acl.verdict("::ffff:192.0.2.9") is Verdict.ALLOWED
    assert acl.verdict("::ffff:198.51.100.9") is Verdict.NOT_ALLOWED


def test_not_an_address_matches_nothing():
    assert NetList(allow=["0.0.0.0/0"]).verdict("farm.test") is Verdict.NOT_ALLOWED
    assert NetList(deny=["0.0.0.0/0"]).verdict("farm.test") is Verdict.ALLOWED


def test_replace_forgets_the_cached_verdicts():
    acl = NetList(allow=["127.0.0.1"])
    assert acl.verdict("127.0.0.2") is Verdict.NOT_ALLOWED
    acl.replace(allow=["127.0.0.1", "127.0.0.2"])
    assert acl.verdict("127.0.0.2") is Verdict.ALLOWED
    with pytest.raises(ValueError, match="not an IP network"):
        acl.replace(allow=["balancers"])
    assert acl.verdict("127.0.0.2") is Verdict.ALLOWED  # a bad list changes nothing


def test_cache_is_bounded():
    acl = NetList(deny=["10.0.0.0/8"], cache_limit=100)
    for i in range(1000):
        assert acl.verdict(f"10.0.{i // 256}.{i % 256}") is Verdict.DENIED
        assert len(acl._cache) <= 100


def test_parse_network():
    assert parse_network("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_network("[2001:db8::1]") == ipaddress.ip_network("2001:db8::1/128")
    for bad in ("", "10.0.0.0/33", "balancers", "10.0.0.0/8,10.1.0.0/16"):
        with pytest.raises(ValueError, match="not an IP network"):
            parse_network(bad)


v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
v4_nets = st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False), v4, st.integers(0, 32))
v6_nets = st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False), v6, st.integers(0, 128))
nets = st.lists(st.one_of(v4_nets, v6_nets), max_size=6)


@given(allow=nets, deny=nets, sources=st.lists(st.one_of(v4, v6), min_size=1, max_size=8))
def test_verdict_follows_the_rules(allow, deny, sources):
    # sources near the networks' edges too: their first and last addresses
    edges = [n.network_address for n in [*allow, *deny]] + [n.broadcast_address for n in [*allow, *deny]]
    acl = NetList(allow=allow, deny=deny)
    for source in [*sources, *edges]:
        # an IPv4-mapped IPv6 source (::ffff:a.b.c.d, as a dual-stack socket reports an IPv4
        # client) is judged as the IPv4 address it is, by IPv4 networks only
        plain = source.ipv4_mapped if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped else source
        if any(plain in n for n in deny):
            expected = Verdict.DENIED
        elif allow and not any(plain in n for n in allow):
            expected = Verdict.NOT_ALLOWED
        else:
            expected = Verdict.ALLOWED
        assert acl.verdict(str(source)) is expected
        assert acl.verdict(str(source)) is expected  # cached: the same answer


@given(allow=st.lists(v4_nets, max_size=4), deny=st.lists(v4_nets, max_size=4), source=v4)
def test_mapped_and_plain_ipv4_agree(allow, deny, source):
    acl = NetList(allow=allow, deny=deny)
    assert acl.verdict(f"::ffff:{source}") is acl.verdict(str(source))
