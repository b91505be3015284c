"""DestinationPolicy: the farm's own listeners, loopback and internal networks are refused as
request destinations taken from a message, unless the operator allows them."""

from __future__ import annotations

import pytest

from sipfarm.sip.address import Address
from sipfarm.transport.destinations import DestinationPolicy, parse_destination


def udp(host: str, port: int = 5060) -> Address:
    return Address("udp", host, port)


def test_defaults_refuse_loopback_and_odd_addresses_and_permit_the_internet() -> None:
    policy = DestinationPolicy()
    for host in ("127.0.0.1", "127.5.6.7", "::1", "[::1]", "::ffff:127.0.0.1", "0.0.0.0", "::",
                 "224.0.0.1", "ff02::1", "255.255.255.255", "localhost", "redis.internal",
                 "169.254.169.254", "fe80::1", "64:ff9b::7f00:1", "[64:ff9b::127.0.0.1]"):  # fmt: skip
        assert not policy.permits(udp(host)), host
    for host in ("203.0.113.7", "2001:db8::7", "[2001:db8::7]", "10.1.2.3", "64:ff9b::cb00:7107"):
        assert policy.permits(Address("tcp", host, 6379)), host


def test_operator_internal_networks_and_allow_list() -> None:
    policy = DestinationPolicy(allow=["10.9.0.0/16", "10.1.0.5:5060"], deny=["10.0.0.0/8", "127.0.0.0/8"])
    assert not policy.permits(udp("10.1.0.4"))
    assert policy.permits(udp("10.1.0.5"))  # exactly allowed host:port
    assert not policy.permits(udp("10.1.0.5", 6379))  # not that port
    assert policy.permits(udp("10.9.3.3", 6379))  # allowed network inside a denied one
    assert not policy.permits(udp("127.0.0.1"))


def test_own_listeners_are_refused_even_inside_an_allowed_network() -> None:
    own = [Address("udp", "127.0.0.1", 5060), Address("tcp", "0.0.0.0", 5080), ("2001:db8::1", 5060)]
    policy = DestinationPolicy(allow=["127.0.0.0/8", "2001:db8::/32"], own=own)
    assert not policy.permits(udp("127.0.0.1", 5060))
    assert policy.permits(udp("127.0.0.1", 5062))  # a loopback peer the tests allow
    assert not policy.permits(Address("tcp", "127.0.0.2", 5080))  # wildcard listener
    assert not policy.permits(Address("tcp", "2001:db8::1", 5080))  # another own host, wildcard port
    assert not policy.permits(udp("[2001:db8::1]"))
    assert policy.permits(udp("2001:db8::2"))
    # only an exact allow entry overrides "own" (the operator knows it is another process)
    assert DestinationPolicy(allow=["127.0.0.1:5060"], own=own).permits(udp("127.0.0.1", 5060))
    policy = DestinationPolicy(allow=["127.0.0.0/8"])
    policy.add_own([Address("udp", "127.0.0.1", 7000)])
    assert not policy.permits(udp("127.0.0.1", 7000))


def test_the_farms_services_are_refused_by_address_only() -> None:
    """A node refuses its Redis and its relays' ng ports as destinations (red team, 2026-12-03:
    an in-dialog request's Request-URI reached Redis where loopback was allowed), by exact
    address: the host is no listener of its own, so its other ports stay other peers'."""
    policy = DestinationPolicy(allow=["127.0.0.0/8", "10.0.0.0/8"], own=[Address("udp", "0.0.0.0", 5060)])
    policy.refuse([("127.0.0.1", 6379), ("10.0.0.5", 2223), ("redis.example", 6379)])
    for host, port in (("127.0.0.1", 6379), ("10.0.0.5", 2223)):
        assert not policy.permits(Address("tcp", host, port)) and not policy.permits(udp(host, port))
    assert policy.permits(udp("10.0.0.5", 5060))  # a peer on Redis's host, on the node's wildcard port
    assert policy.permits(udp("127.0.0.1", 6380))


def test_redis_endpoints_of_every_url_form() -> None:
    from sipfarm.node.main import redis_endpoints  # noqa: PLC0415

    assert redis_endpoints("redis://:pw@127.0.0.1:7000/0") == [("127.0.0.1", 7000)]
    assert redis_endpoints("redis://10.0.0.9") == [("10.0.0.9", 6379)]
    cluster = "redis+cluster://127.0.0.1:7001,127.0.0.1:7002"
    assert redis_endpoints(cluster) == [("127.0.0.1", 7001), ("127.0.0.1", 7002)]
    assert redis_endpoints("redis+sentinel://127.0.0.1:26379/mymaster") == [("127.0.0.1", 26379)]
    assert redis_endpoints("nonsense://x") == []


@pytest.mark.parametrize("entry", ["nonsense", "10.0.0.0/33", "1.2.3.4:", "1.2.3.4:99999", "[::1:5060", "name:5060"])
def test_bad_entries_are_refused_with_the_entry_named(entry: str) -> None:
    with pytest.raises(ValueError, match="bad destination"):
        parse_destination(entry)


def test_deny_takes_networks_only() -> None:
    with pytest.raises(ValueError, match="networks"):
        DestinationPolicy(deny=["10.0.0.1:5060"])


def test_link_local_is_refused_unless_allowed() -> None:
    """Red team, 2026-12-02: 169.254.169.254 (a cloud's metadata service) was a permitted
    destination by default; an operator who means it says so."""
    assert not DestinationPolicy().permits(Address("tcp", "169.254.169.254", 80))
    assert DestinationPolicy(allow=["169.254.10.0/24"]).permits(udp("169.254.10.5"))
