"""``sipfarm ban list|add|del`` against a real redis-server; the nodes' guard sees the result."""

from __future__ import annotations

import asyncio

import pytest
from protect_support import admit, failed, pipes

from sipfarm.cli import main
from sipfarm.protect import Admission, FailureOutcome, GuardPolicy, RedisGuard
from sipfarm.store.redis_server import free_port


def _admitted(url: str, source: str, nonce_use: str) -> Admission:
    async def run() -> Admission:
        async with pipes(url) as (pipe,):
            answer = await admit(RedisGuard(pipe), source, nonce_use)
            assert isinstance(answer, Admission)
            return answer

    return asyncio.run(run())


def test_an_operator_bans_lists_and_lifts(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ban", "add", "192.0.2.7", "--seconds", "60", "--redis", redis_url]) == 0
    assert main(["ban", "add", "[2001:DB8::0:1]", "--seconds", "0", "--redis", redis_url]) == 0
    assert _admitted(redis_url, "192.0.2.7", "n:1").banned
    assert _admitted(redis_url, "2001:db8::1", "n:2").banned  # an IPv6 address bans its /64
    assert _admitted(redis_url, "2001:db8::77:1", "n:4").banned
    assert not _admitted(redis_url, "2001:db8:0:1::1", "n:5").banned  # the next /64
    capsys.readouterr()
    assert main(["ban", "list", "--redis", redis_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("192.0.2.7\t6") and lines[0].endswith("s left\tmanual")
    assert lines[1] == "2001:db8::/64\tuntil lifted\tmanual"

    assert main(["ban", "del", "192.0.2.7", "--redis", redis_url]) == 0
    assert not _admitted(redis_url, "192.0.2.7", "n:3").banned
    assert main(["ban", "del", "192.0.2.7", "--redis", redis_url]) == 1
    assert "not banned" in capsys.readouterr().err


def test_a_lifted_ban_forgets_the_failures(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def ban_by_failures() -> list[FailureOutcome]:
        async with pipes(redis_url) as (pipe,):
            guard = RedisGuard(pipe, GuardPolicy(max_failures=2))
            outcomes = [await failed(guard, "192.0.2.9", "a@b") for _ in range(3)]
            assert all(isinstance(o, FailureOutcome) for o in outcomes)
            return outcomes  # type: ignore[return-value]

    assert [o.banned for o in asyncio.run(ban_by_failures())] == [False, True, False]
    assert main(["ban", "list", "--redis", redis_url]) == 0
    assert "192.0.2.9\t900s left\t2 failures" in capsys.readouterr().out
    assert main(["ban", "del", "192.0.2.9", "--redis", redis_url]) == 0
    outcomes = asyncio.run(ban_by_failures())
    assert [o.source_failures for o in outcomes] == [1, 2, 1]


def test_bad_input_and_no_redis_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ban", "add", "farm.test"]) == 2
    assert capsys.readouterr().err == "sipfarm: not an IP address or an IPv6 /64: 'farm.test'\n"
    assert main(["ban", "add", "10.0.0.0/8"]) == 2
    assert capsys.readouterr().err == "sipfarm: not an IP address or an IPv6 /64: '10.0.0.0/8'\n"
    assert main(["ban", "add", "192.0.2.1", "--seconds", "-1"]) == 2
    assert capsys.readouterr().err == "sipfarm: --seconds must be 0 (until lifted) or more\n"
    assert main(["ban", "list", "--redis", f"redis://127.0.0.1:{free_port()}/0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sipfarm: cannot reach the farm's bans in redis://127.0.0.1:")
    assert err.count("\n") == 1


def test_an_ipv6_ban_is_added_and_lifted_by_any_address_of_its_64(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ban", "add", "2001:db8:5:6::/64", "--redis", redis_url]) == 0
    assert _admitted(redis_url, "2001:db8:5:6:a:b:c:d", "p:1").banned
    assert main(["ban", "del", "2001:db8:5:6::99", "--redis", redis_url]) == 0
    assert not _admitted(redis_url, "2001:db8:5:6:a:b:c:d", "p:2").banned
    capsys.readouterr()
    assert main(["ban", "list", "--redis", redis_url]) == 0
    assert "2001:db8:5:6" not in capsys.readouterr().out
