"""`sipfarm status` rendering."""

from __future__ import annotations

import json

from cluster_support import node, relay

from sipfarm.cluster import Member, MemberState, Role, render_json, render_table
from sipfarm.cluster.status import BANS_SHOWN, format_age
from sipfarm.protect.bans import BanEntry

NOW = 1_700_000_000.0


def farm() -> list[Member]:
    return [
        relay(),
        node("node-2", 5072, started_at=NOW - 3725, registrations=12, transactions=3, load=4.25),
        node("node-1", 5071, started_at=NOW - 42, state=MemberState.DRAINING),
        Member("lb-1", Role.BALANCER, ("udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"), started_at=NOW - 90000),
    ]


def test_table_lists_every_member_with_its_figures() -> None:
    text = render_table(farm(), now=NOW)
    lines = text.splitlines()
    assert lines[0].split() == [
        "ID", "ROLE", "ADDRESSES", "STATE", "LOAD", "REGS", "TRANS", "AGE", "HOST", "PID", "VERSION",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:5]] == ["lb-1", "node-1", "node-2", "relay-1"]
    node2 = lines[3].split()
    assert node2[:8] == ["node-2", "node", "udp:127.0.0.1:5072", "active", "4.2", "12", "3", "1h02m"]
    assert "draining" in lines[2] and "42s" in lines[2]
    assert "udp:127.0.0.1:5060,tcp:127.0.0.1:5060" in lines[1] and "1d01h" in lines[1]
    assert "ctl=udp:127.0.0.1:2223" in lines[4]
    assert lines[5] == "1 balancer, 2 nodes, 1 relay; 1 draining; 12 registrations in the farm, 3 transactions"
    assert len({len(line) for line in lines[:5]}) >= 1  # columns aligned (no crash on widths)


def test_requested_drain_not_yet_seen_is_marked() -> None:
    text = render_table(farm(), now=NOW, drain_flags={"node-2": True})
    assert "draining*" in next(line for line in text.splitlines() if line.startswith("node-2"))


def test_json_form() -> None:
    data = json.loads(render_json(farm(), now=NOW))
    assert data["now"] == NOW
    rows = {r["id"]: r for r in data["members"]}
    assert rows["node-2"]["age"] == 3725
    assert rows["node-2"]["addresses"] == ["udp:127.0.0.1:5072"]
    assert rows["node-1"]["state"] == "draining"
    assert rows["relay-1"]["control_address"] == "udp:127.0.0.1:2223"
    assert rows["relay-1"]["age"] is None  # unknown start time


def test_empty_farm() -> None:
    assert "no members" in render_table([], now=NOW)
    assert json.loads(render_json([], now=NOW))["members"] == []


def test_format_age() -> None:
    assert [format_age(s) for s in (0, 59.9, 60, 3599, 3600, 86399, 86400 * 3 + 7200)] == [
        "0s", "59s", "1m00s", "59m59s", "1h00m", "23h59m", "3d02h",
    ]  # fmt: skip


def test_bans_follow_the_members() -> None:
    bans = [BanEntry(f"203.0.113.{n}", 600.0 - n, "balancer:rate_register") for n in range(12)]
    bans.append(BanEntry("2001:db8::1", None, "manual"))
    text = render_table(farm(), now=NOW, bans=bans)
    lines = text.splitlines()
    start = lines.index("13 sources banned:")
    assert lines[start + 1].split() == ["203.0.113.0", "10m00s", "left", "balancer:rate_register"]
    assert len(lines) - start - 1 == BANS_SHOWN + 1 and lines[-1] == "  ... and 3 more (sipfarm ban list)"
    assert "banned" not in render_table(farm(), now=NOW)  # no bans: no section
    assert "1 source banned:" in render_table([], now=NOW, bans=bans[-1:])  # even with no member
    assert "until lifted" in render_table([], now=NOW, bans=bans[-1:])
    data = json.loads(render_json(farm(), now=NOW, bans=bans))
    assert data["bans"][-1] == {"source": "2001:db8::1", "seconds_left": None, "reason": "manual"}
    assert len(data["bans"]) == 13
