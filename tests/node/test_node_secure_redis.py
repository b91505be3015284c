"""The farm on a Redis that wants a password, and on one that speaks only TLS (``rediss://``).

Every client of the farm reads the same URL: the node's pipelined client (``RedisPipe``, the hot
path), redis-py (membership, bans, the CLI) and the balancer's. A real ``redis-server`` with
``requirepass`` and another with only a TLS port (self-signed certificate, named in the URL as
``ssl_ca_certs``) carry a REGISTER through a balancer and a node.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.farm import USERS, SipClient, add_accounts, wait_nodes_usable
from hiredis import ReplyError

from sipfarm.config import ConfigError, NodeConfig
from sipfarm.store import create_redis
from sipfarm.store.errors import StoreUnavailable
from sipfarm.store.redis_server import RedisProcess
from sipfarm.store.resp import RedisPipe, parse_redis_url

PASSWORD = "s3cret/with:odd@chars"


@pytest.fixture(params=["password", "tls-and-password"])
def secure_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisProcess]:
    tls_dir = tmp_path / "tls" if request.param == "tls-and-password" else None
    proc = RedisProcess(tmp_path / "redis", password=PASSWORD, tls_dir=tls_dir)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def _pipe_roundtrip(url: str) -> object:
    pipe = RedisPipe(url, command_timeout=2.0, connect_timeout=2.0)
    await pipe.connect()
    try:
        await pipe.execute("SET", "k", "v")
        return await pipe.execute("GET", "k")
    finally:
        await pipe.close()


async def _redis_py_ping(url: str) -> object:
    redis = create_redis(url)
    try:
        return await redis.ping()
    finally:
        await redis.aclose()


def test_both_clients_work_with_the_right_url_only(secure_redis: RedisProcess) -> None:
    url = secure_redis.url
    assert asyncio.run(_pipe_roundtrip(url)) == b"v"
    assert asyncio.run(_redis_py_ping(url)) is True
    wrong = url.replace("s3cret", "wrong", 1)
    with pytest.raises(ReplyError):  # AUTH refused: every command answers NOAUTH/WRONGPASS
        asyncio.run(_pipe_roundtrip(wrong))
    if secure_redis.tls_dir is not None:  # plain RESP to a TLS-only port: no answer, bounded
        plain = url.replace("rediss://", "redis://", 1).partition("?")[0]
        with pytest.raises((StoreUnavailable, ReplyError, TimeoutError)):
            asyncio.run(asyncio.wait_for(_pipe_roundtrip(plain), 5))


def test_register_through_a_balancer_and_a_node_on_a_secure_redis(
    secure_redis: RedisProcess, start_node, start_balancer
) -> None:
    url = secure_redis.url
    add_accounts(url, USERS)
    start_node(url)
    lb = start_balancer(url)
    wait_nodes_usable(lb, 1)
    phone = SipClient()
    try:
        reply = phone.register(lb.address, "alice", USERS["alice"])
        assert reply is not None and reply.status == 200, lb.log()[-2000:]
    finally:
        phone.close()


def test_url_forms() -> None:
    assert parse_redis_url("redis://10.0.0.1:7000/3")[:5] == ("10.0.0.1", 7000, 3, None, None)
    assert parse_redis_url("redis://app:p%40ss@h/0")[3:] == ("app", "p@ss", None)
    tls = parse_redis_url("rediss://h:6380/0?ssl_cert_reqs=none")[5]
    assert tls is not None and tls.verify_mode == ssl.CERT_NONE and not tls.check_hostname
    tls = parse_redis_url("rediss://h:6380")[5]
    assert tls is not None and tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname
    for bad in ("http://h:1/0", "rediss://h/0?ssl_cert_reqs=maybe"):
        with pytest.raises(ValueError, match="Redis URL"):
            parse_redis_url(bad)


def test_a_bad_redis_url_is_a_configuration_error(tmp_path: Path) -> None:
    missing_ca = f"rediss://h:1/0?ssl_ca_certs={tmp_path}/none.pem"
    for bad in ("http://h:1/0", "redis://h:port/0", "redis://h:1/x", missing_ca):
        with pytest.raises(ConfigError, match=r"redis: .*Redis URL"):
            NodeConfig(redis=bad).validate()
