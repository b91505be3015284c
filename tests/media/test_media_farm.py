"""The farm as a relay knows it from the membership (media/farm.py), no I/O: the addresses no
relay may send media to (two relays pointed at each other would loop for ever), and who may
send the relay ng commands (``[relay] accept_from``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.farm import FarmAddresses, NgAccess, PortRange, member_ranges, node_networks
from sipfarm.cluster.membership import Member, MemberState, Role
from sipfarm.config import ConfigError, RelayConfig, flag_list, load


def relay(member_id: str, *addresses: str, port_max: int | None = None, ng: str | None = None) -> Member:
    return Member(member_id, Role.RELAY, addresses, control_address=ng, port_max=port_max)


def node(member_id: str, *addresses: str, state: MemberState = MemberState.ACTIVE) -> Member:
    return Member(member_id, Role.NODE, addresses, state=state)


OWN = (PortRange("192.0.2.1", 30000, 39999), PortRange("192.0.2.1", 2223, 2223))


def test_the_relays_own_range_and_ng_socket_are_the_farms() -> None:
    farm = FarmAddresses(OWN)
    assert farm.farm_address("192.0.2.1", 30000) and farm.farm_address("192.0.2.1", 39999)
    assert farm.farm_address("192.0.2.1", 35001)
    assert farm.farm_address("192.0.2.1", 2223)
    assert not farm.farm_address("192.0.2.1", 29999) and not farm.farm_address("192.0.2.1", 40000)
    assert not farm.farm_address("192.0.2.2", 30000)  # a phone's port that happens to be the same
    assert farm.farm_address("::ffff:192.0.2.1", 30002)  # IPv4-mapped: judged as the IPv4 address
    assert not farm.farm_address("relay.example.com", 30000)  # a name: never a destination anyway


def test_another_relays_whole_range_on_each_of_its_hosts() -> None:
    farm = FarmAddresses(OWN)
    other = relay("relay2", "udp:10.0.0.2:40000", "udp:198.51.100.2:40000", port_max=40999, ng="udp:10.0.0.2:2223")
    assert farm.update([other])
    for host in ("10.0.0.2", "198.51.100.2"):  # bound and advertised
        assert farm.farm_address(host, 40000) and farm.farm_address(host, 40500) and farm.farm_address(host, 40999)
        assert not farm.farm_address(host, 41000) and not farm.farm_address(host, 39999)
    assert farm.farm_address("10.0.0.2", 2223)
    assert farm.farm_address("192.0.2.1", 30000)  # its own stay
    assert not farm.update([other])  # nothing new
    assert farm.update([])  # gone: its addresses are anyone's again, the relay's own stay
    assert not farm.farm_address("10.0.0.2", 40500)
    assert farm.farm_address("192.0.2.1", 30000)


def test_own_ranges_added_once_bound_outlive_membership_updates() -> None:
    farm = FarmAddresses([PortRange("192.0.2.1", 30000, 30009)])
    farm.update([node("node1", "udp:10.0.0.21:5070")])
    farm.add_own([PortRange("192.0.2.1", 2223, 2223)])  # the ng socket, once bound
    assert farm.farm_address("192.0.2.1", 2223) and farm.farm_address("10.0.0.21", 5070)
    farm.update([])
    assert farm.farm_address("192.0.2.1", 2223) and farm.farm_address("192.0.2.1", 30009)
    assert not farm.farm_address("10.0.0.21", 5070)


def test_a_relay_of_an_earlier_version_is_known_by_its_first_port() -> None:
    old = relay("relay-old", "udp:10.0.0.3:30000")  # no port_max in its record
    assert member_ranges(old) == [PortRange("10.0.0.3", 30000, 30000)]
    bogus = relay("relay-bogus", "udp:10.0.0.4:30000", port_max=10)  # below its first port
    assert member_ranges(bogus) == [PortRange("10.0.0.4", 30000, 30000)]


def test_nodes_and_balancers_sip_listeners_are_the_farms() -> None:
    farm = FarmAddresses()
    lb = Member(
        "lb1", Role.BALANCER, ("udp:203.0.113.5:5060", "tcp:203.0.113.5:5060"), internal_address="udp:10.0.0.5:5060"
    )
    farm.update([node("node1", "udp:10.0.0.21:5070", state=MemberState.DRAINING), lb])
    assert farm.farm_address("10.0.0.21", 5070)  # draining: its calls go on
    assert farm.farm_address("203.0.113.5", 5060) and farm.farm_address("10.0.0.5", 5060)
    assert not farm.farm_address("10.0.0.21", 5071)  # a node's port only, not a range
    assert not farm.farm_address("10.0.0.5", 5061)


def test_a_wildcard_listener_covers_loopback_and_the_farms_hosts() -> None:
    farm = FarmAddresses([PortRange("0.0.0.0", 30000, 30099), PortRange("192.0.2.1", 2223, 2223)])
    assert farm.farm_address("127.0.0.1", 30050) and farm.farm_address("127.9.9.9", 30000)
    assert farm.farm_address("0.0.0.0", 30000)
    assert farm.farm_address("192.0.2.1", 30001)  # a host the relay is known to have
    assert not farm.farm_address("198.51.100.7", 30001)  # a phone elsewhere
    assert not farm.farm_address("127.0.0.1", 30100)


@given(
    ranges=st.lists(
        st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2", "::1"]), st.integers(1, 200), st.integers(0, 50)),
        max_size=8,
    ),
    host=st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1"]),
    port=st.integers(1, 260),
)
def test_farm_address_is_membership_of_any_range(ranges: list[tuple[str, int, int]], host: str, port: int) -> None:
    farm = FarmAddresses(PortRange(h, low, low + width) for h, low, width in ranges)
    plain = any(h == host and low <= port <= low + width for h, low, width in ranges)
    assert farm.farm_address(host, port) is plain


def test_ng_access_default_takes_loopback_and_the_nodes_of_the_membership() -> None:
    access = NgAccess(RelayConfig().accept_from)
    assert access.accepts("127.0.0.1") and access.accepts("::1")
    assert not access.accepts("10.0.0.21")
    assert access.update([node("node1", "udp:10.0.0.21:5070", "tcp:10.0.0.21:5070"), relay("r", "udp:10.0.0.31:30000")])
    assert access.accepts("10.0.0.21")
    assert not access.accepts("10.0.0.31")  # a relay sends no ng
    assert not access.accepts("10.0.0.22")
    assert not access.update([node("node1", "udp:10.0.0.21:5070")])  # the same host
    assert access.update([])  # the node left
    assert not access.accepts("10.0.0.21")


def test_ng_access_of_networks_only_nodes_only_and_anyone() -> None:
    nets = NgAccess(["10.1.0.0/16"])
    nets.update([node("node1", "udp:10.0.0.21:5070")])  # not asked for: ignored
    assert nets.accepts("10.1.2.3") and not nets.accepts("10.0.0.21") and not nets.accepts("127.0.0.1")
    nodes = NgAccess(["nodes"])
    assert not nodes.accepts("127.0.0.1")  # no node yet: nobody, not anyone
    anyone = NgAccess([])
    assert anyone.open and anyone.accepts("203.0.113.9")


def test_a_node_on_a_wildcard_address_names_no_host() -> None:
    assert node_networks([node("n", "udp:0.0.0.0:5070"), node("m", "udp:node.example:5070")]) == []
    assert [str(n) for n in node_networks([node("n", "udp:[2001:db8::21]:5070")])] == ["2001:db8::21/128"]


def test_relay_accept_from_settings() -> None:
    assert RelayConfig().accept_from == ["nodes", "127.0.0.0/8", "::1/128"]
    cfg = load(RelayConfig, None, {"accept_from": flag_list(["nodes,10.0.0.0/8", "192.0.2.7"])}, environ={})
    assert cfg.accept_from == ["nodes", "10.0.0.0/8", "192.0.2.7"]
    env = load(RelayConfig, None, None, environ={"SIPFARM_ACCEPT_FROM": "127.0.0.1"})
    assert env.accept_from == ["127.0.0.1"]
    with pytest.raises(ConfigError, match="accept_from: 'balancers' is neither nodes nor a network"):
        load(RelayConfig, None, {"accept_from": ["balancers"]}, environ={})
