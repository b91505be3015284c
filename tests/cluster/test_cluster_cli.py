"""`sipfarm status` and `sipfarm drain` against a running (simulated) farm."""

from __future__ import annotations

import asyncio
import json

import pytest
from cluster_support import OpenMembership, eventually, node, relay

from sipfarm.cli import main
from sipfarm.cluster import Heartbeater, MembershipStore, MemberState
from sipfarm.store.redis_server import free_port


async def test_status_and_drain_from_another_process_view(
    open_membership: OpenMembership, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_membership() as store, Heartbeater(store, lambda: node("node-1"), interval=0.05) as hb:
        await store.heartbeat(relay())
        await eventually(lambda: _has(store, "node-1"), within=5.0)

        assert await asyncio.to_thread(main, ["status", "--redis", redis_url]) == 0
        out = capsys.readouterr().out
        assert "node-1" in out and "relay-1" in out and "1 node, 1 relay; 0 draining" in out

        assert await asyncio.to_thread(main, ["drain", "node-1", "--redis", redis_url]) == 0
        assert capsys.readouterr().out.startswith("node-1: draining (")  # confirmed by its beat
        assert hb.state is MemberState.DRAINING

        assert await asyncio.to_thread(main, ["status", "--json", "--redis", redis_url]) == 0
        rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)["members"]}
        assert rows["node-1"]["state"] == "draining"

        assert await asyncio.to_thread(main, ["drain", "node-1", "--undo", "--redis", redis_url]) == 0
        assert capsys.readouterr().out == "node-1: active again\n"


async def _has(store: MembershipStore, member_id: str) -> bool:
    return any(m.id == member_id for m in await store.members())


def test_status_shows_the_farms_bans(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ban", "add", "192.0.2.7", "--seconds", "300", "--redis", redis_url]) == 0
    capsys.readouterr()
    assert main(["status", "--redis", redis_url]) == 0
    out = capsys.readouterr().out
    assert "1 source banned:" in out and "192.0.2.7" in out and "manual" in out
    assert main(["status", "--json", "--redis", redis_url]) == 0
    assert [b["source"] for b in json.loads(capsys.readouterr().out)["bans"]] == ["192.0.2.7"]


def test_drain_unknown_member_fails_and_leaves_no_flag(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drain", "nobody", "--redis", redis_url]) == 1
    assert "no live member 'nobody'" in capsys.readouterr().err
    assert main(["status", "--redis", redis_url]) == 0
    assert "no members" in capsys.readouterr().out


def test_status_when_redis_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--redis", f"redis://127.0.0.1:{free_port()}/0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sipfarm: cannot read the farm's state from redis://127.0.0.1:")
    assert err.count("\n") == 1
