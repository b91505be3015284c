"""Sans-IO tests of a node's ``accept_from`` (:mod:`sipfarm.node.accept`) and its settings:
keywords and networks, balancers from membership records, peers from the routing table."""

from __future__ import annotations

import ipaddress

import pytest

from sipfarm.cluster.membership import Member, Role
from sipfarm.config import BalancerConfig, ConfigError, NodeConfig, flag_list, load
from sipfarm.node.accept import AcceptFrom, balancer_networks, peer_networks
from sipfarm.routing.table import RoutingTable
from sipfarm.sip.address import Address

REQUEST = b"OPTIONS sip:n SIP/2.0\r\n\r\n"
RESPONSE = b"SIP/2.0 200 OK\r\n\r\n"


def udp(host: str) -> Address:
    return Address("udp", host, 5060)


def balancer(lb_id: str, *addresses: str, internal: str | None = None) -> Member:
    return Member(lb_id, Role.BALANCER, tuple(addresses), internal_address=internal)


def nets(*texts: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in texts]


def test_open_by_default():
    accept = AcceptFrom([])
    assert accept.open
    assert accept.screen(REQUEST, udp("203.0.113.9")) and accept.allow_source("203.0.113.9")
    assert accept.stats == {}


def test_balancers_only_nobody_until_one_is_known():
    accept = AcceptFrom(["balancers"])
    assert not accept.open and accept.accepted == []
    assert not accept.screen(REQUEST, udp("10.0.0.5"))  # no balancer yet: nobody, not anyone
    assert accept.screen(RESPONSE, udp("10.0.0.5"))  # responses go on to the transactions
    assert accept.set_balancers([balancer("lb1", "udp:10.0.0.5:5060", "tcp:10.0.0.5:5060")])
    assert accept.screen(REQUEST, udp("10.0.0.5")) and accept.allow_source("10.0.0.5")
    assert not accept.screen(REQUEST, udp("10.0.0.6"))
    assert not accept.set_balancers([balancer("lb1", "udp:10.0.0.5:5060")])  # same hosts: no change
    assert accept.set_balancers([])  # gone
    assert not accept.screen(REQUEST, udp("10.0.0.5"))
    assert accept.stats == {"unknown_source": 3}


def test_networks_and_keywords_combine():
    accept = AcceptFrom(["10.1.0.0/16", "balancers", "2001:db8::/32"])
    accept.set_balancers([balancer("lb1", "udp:192.0.2.1:5060")])
    for host in ("10.1.2.3", "192.0.2.1", "2001:db8::7"):
        assert accept.screen(REQUEST, udp(host)), host
    assert not accept.screen(REQUEST, udp("10.2.0.1"))


def test_balancer_networks_take_the_internal_address_and_skip_wildcards_and_names():
    members = [
        balancer("lb1", "udp:203.0.113.10:5060", internal="udp:10.0.0.5:5080"),  # advertise + internal
        balancer("lb2", "udp:0.0.0.0:5060", "ws:lb.example:8080", "udp:[2001:db8::5]:5060"),
        balancer("lb3", "garbage"),
    ]
    assert balancer_networks(members) == nets("203.0.113.10/32", "10.0.0.5/32", "2001:db8::5/128")
    # the record carries it (and only when set: other members' records are unchanged)
    assert Member.from_json(members[0].to_json()) == members[0]
    assert "internal_address" not in members[1].to_json()


def test_peers_from_the_routing_table():
    table = RoutingTable.from_dict(
        {
            "trusted": ["198.51.100.0/24"],
            "rules": [
                {"user_prefix": "+1", "action": "forward", "uri": "sip:192.0.2.10:5070"},
                {"user_prefix": "+2", "action": "forward", "uri": "sip:gw.example"},  # by DNS: not listed
                {"user": "sales", "action": "alias", "targets": ["sip:alice@farm.test", "sip:x@192.0.2.11"]},
                {"user": "away", "action": "redirect", "uri": "sip:192.0.2.99"},  # the caller goes there
            ],
            "unknown": {"action": "forward", "uri": "sip:vm@[2001:db8::9]:5060"},
        }
    )
    expected = nets("198.51.100.0/24", "192.0.2.10/32", "192.0.2.11/32", "2001:db8::9/128")
    assert peer_networks(table) == expected
    accept = AcceptFrom(["peers"])
    assert accept.set_peers(table)
    assert accept.screen(REQUEST, udp("198.51.100.77")) and accept.screen(REQUEST, udp("192.0.2.10"))
    assert not accept.screen(REQUEST, udp("192.0.2.99"))
    assert not accept.set_peers(table)
    assert not AcceptFrom(["balancers"]).set_peers(table)  # peers not asked for: ignored


def test_settings():
    cfg = load(NodeConfig, None, {"accept_from": flag_list(["balancers,peers", "10.0.0.0/8"])}, environ={})
    assert cfg.accept_from == ["balancers", "peers", "10.0.0.0/8"]
    env = load(NodeConfig, None, None, environ={"SIPFARM_ACCEPT_FROM": "balancers, 192.0.2.0/24"})
    assert env.accept_from == ["balancers", "192.0.2.0/24"]
    with pytest.raises(ConfigError, match="accept_from: 'balancer' is neither balancers nor peers"):
        load(NodeConfig, None, {"accept_from": ["balancer"]}, environ={})
    lb = load(BalancerConfig, None, {"deny": flag_list(["10.0.0.0/8,192.0.2.1"]), "allow": None}, environ={})
    assert lb.deny == ["10.0.0.0/8", "192.0.2.1"] and lb.allow == []
    for key in ("allow", "deny"):
        with pytest.raises(ConfigError, match=f"{key}: '10.0.0.0/33' is not an IP network"):
            load(BalancerConfig, None, {key: ["10.0.0.0/33"]}, environ={})


def test_what_sipfarm_up_gives_its_nodes(monkeypatch, tmp_path):
    from sipfarm import up  # noqa: PLC0415

    monkeypatch.delenv("SIPFARM_ACCEPT_FROM", raising=False)
    monkeypatch.setattr(up, "CONFIG_FILE", [])
    assert up.node_accept_from("127.0.0.1") == "balancers,peers,127.0.0.1"
    assert up.node_accept_from("0.0.0.0") == "balancers,peers,127.0.0.0/8,::1/128"
    assert "127.0.0.1" in up.node_accept_from("localhost").split(",")  # and ::1 where it resolves so
    # the operator's own setting wins: the config file's [node] or the environment
    config = tmp_path / "farm.toml"
    config.write_text('[node]\naccept_from = ["10.0.0.0/8"]\n')
    monkeypatch.setattr(up, "CONFIG_FILE", [str(config)])
    assert up.node_accept_from("127.0.0.1") == ""
    monkeypatch.setattr(up, "CONFIG_FILE", [])
    monkeypatch.setenv("SIPFARM_ACCEPT_FROM", "")
    assert up.node_accept_from("127.0.0.1") == ""


def test_sipfarm_up_leaves_a_configured_allow_destinations_alone(monkeypatch, tmp_path):
    """On loopback, up lets requests reach loopback phones, unless the operator says otherwise
    in the environment or the config file (the environment would silently override the file)."""
    from sipfarm import up  # noqa: PLC0415

    monkeypatch.delenv("SIPFARM_ALLOW_DESTINATIONS", raising=False)
    monkeypatch.setattr(up, "CONFIG_FILE", [])
    assert up.loopback_destinations("127.0.0.1") == "127.0.0.0/8,::1/128"
    assert up.loopback_destinations("192.0.2.10") is None
    for section in ("node", "balancer"):
        config = tmp_path / f"{section}.toml"
        config.write_text(f"[{section}]\nallow_destinations = []\n")
        monkeypatch.setattr(up, "CONFIG_FILE", [str(config)])
        assert up.loopback_destinations("127.0.0.1") is None
    monkeypatch.setattr(up, "CONFIG_FILE", [])
    monkeypatch.setenv("SIPFARM_ALLOW_DESTINATIONS", "")
    assert up.loopback_destinations("127.0.0.1") is None
