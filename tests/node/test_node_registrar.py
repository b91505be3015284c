"""A real node process with a real redis-server: REGISTER semantics and failures."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time

import redis as sync_redis
from fixtures.farm import DOMAIN, SipClient

from sipfarm.protect.guard import ban_key
from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage
from sipfarm.store import LocationStore, create_redis
from sipfarm.store.location import ADMITTED_REGISTER_SCRIPT


def lookup(redis_url: str, aor: str) -> list[str]:
    async def run() -> list[str]:
        redis = create_redis(redis_url)
        try:
            return [b.contact for b in await LocationStore(redis).lookup(aor, time.time())]
        finally:
            await redis.aclose()

    return asyncio.run(run())


def test_register_with_digest_and_lookup(redis_url, accounts, start_node):
    node = start_node(redis_url)
    client = SipClient()
    try:
        reply = client.register(node.address, "alice", accounts["alice"], expires=120)
        assert reply is not None and reply.status == 200
        contacts = reply.values("contact")
        assert len(contacts) == 1 and b"expires=" in contacts[0]
        assert lookup(redis_url, f"alice@{DOMAIN}") == [f"sip:alice@127.0.0.1:{client.port}"]
    finally:
        client.close()


def test_wrong_password_and_unknown_user_look_the_same(redis_url, accounts, start_node):
    node = start_node(redis_url)
    client = SipClient()
    try:
        wrong = client.register(node.address, "alice", "not-the-password")
        unknown = client.register(node.address, "mallory", "whatever")
        assert wrong is not None and unknown is not None
        assert wrong.status == unknown.status == 401
        assert wrong.reason == unknown.reason
    finally:
        client.close()


def test_too_brief_expiry_gets_423_with_min_expires(redis_url, accounts, start_node):
    node = start_node(redis_url)
    client = SipClient()
    try:
        reply = client.register(node.address, "alice", accounts["alice"], expires=5)
        assert reply is not None and reply.status == 423
        assert reply.get("min-expires") == b"60"
    finally:
        client.close()


def test_unregister_with_star(redis_url, accounts, start_node):
    node = start_node(redis_url)
    client = SipClient()
    try:
        call_id = secrets.token_hex(6)
        assert client.register(node.address, "bob", accounts["bob"], call_id=call_id).status == 200
        reply = client.register(node.address, "bob", accounts["bob"], contact="*", expires=0, call_id=call_id, cseq=10)
        assert reply is not None and reply.status == 200
        assert lookup(redis_url, f"bob@{DOMAIN}") == []
    finally:
        client.close()


def test_binding_seen_by_a_second_node(redis_url, accounts, start_node):
    node1 = start_node(redis_url, "node1")
    node2 = start_node(redis_url, "node2")
    client = SipClient()
    try:
        assert client.register(node1.address, "carol", accounts["carol"]).status == 200
        # a REGISTER with no Contact is a query: node2 answers with the binding node1 stored
        req = client.request("REGISTER", f"sip:{DOMAIN}", from_user="carol", to=f"<sip:carol@{DOMAIN}>")
        client.send(req, node2.address)
        challenge = client.recv_final(call_id=req.call_id)
        assert challenge is not None and challenge.status == 401
    finally:
        client.close()
    assert lookup(redis_url, f"carol@{DOMAIN}")


def test_malformed_request_gets_400_and_node_keeps_serving(redis_url, accounts, start_node):
    node = start_node(redis_url)
    client = SipClient()
    try:
        bad = (
            f"INVITE sip:bob@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{client.port};branch=z9hG4bKx1\r\n"
            f"From: <sip:alice@{DOMAIN}>;tag=1\r\nTo: <sip:bob@{DOMAIN}>\r\nCall-ID: bad1\r\n"
            "CSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        client.send(bad, node.address)
        reply = client.recv_final()
        assert reply is not None and reply.status == 400
        assert b"CSeq" in reply.reason
        client.send(b"\x00\xffgarbage\r\n\r\n", node.address)
        assert client.register(node.address, "alice", accounts["alice"]).status == 200
    finally:
        client.close()


def test_redis_down_gives_503_with_retry_after_then_recovers(redis_server, redis_url, accounts, start_node):
    node = start_node(redis_url)
    client = SipClient()
    try:
        redis_server.stop()
        reply = client.register(node.address, "alice", accounts["alice"])
        assert reply is not None and reply.status == 503
        assert reply.get("retry-after") is not None
        assert node.process.poll() is None
        redis_server.start()
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            asyncio.run(_readd(redis_url, accounts))
            reply = client.register(node.address, "alice", accounts["alice"])
            status = reply.status if reply is not None else None
            if status == 200:
                break
            time.sleep(0.3)
        assert status == 200
    finally:
        client.close()


async def _readd(redis_url: str, accounts: dict[str, str]) -> None:
    from sipfarm.store import AccountExists, AccountStore  # noqa: PLC0415

    redis = create_redis(redis_url)
    try:
        try:
            await AccountStore(redis).add("alice", DOMAIN, accounts["alice"])
        except AccountExists:
            pass
    finally:
        await redis.aclose()


def _authorized_register(
    client: SipClient, node: tuple[str, int], user: str, password: str, contact: str
) -> SipMessage:
    """A REGISTER answering a fresh challenge (sent, answered 200 or not): the request as sent."""
    uri = f"sip:{DOMAIN}"
    headers = (("contact", contact), ("expires", "300"))
    call_id = secrets.token_hex(8)
    req = client.request("REGISTER", uri, from_user=user, to=f"<sip:{user}@{DOMAIN}>", call_id=call_id, headers=headers)
    client.send(req, node)
    challenge = client.recv_final(call_id=call_id, cseq=1)
    assert challenge is not None and challenge.status == 401
    creds = auth.build_credentials(
        auth.parse_challenge(challenge.get_all("www-authenticate")[0]), user, password, "REGISTER", uri, "0a4f113b"
    )
    headers = (*headers, ("authorization", creds.decode()))
    return client.request(
        "REGISTER", uri, from_user=user, to=f"<sip:{user}@{DOMAIN}>", call_id=call_id, cseq=2, headers=headers
    )


def test_one_round_trip_register_refuses_a_replay_and_a_banned_source(redis_url, accounts, start_node, monkeypatch):
    """With alice's account in the node's cache, her REGISTER's ban and nonce checks and its
    write are one script: a replay of it, or her right password from a banned source, is
    refused there and writes nothing."""
    monkeypatch.setenv("SIPFARM_ACCOUNT_CACHE_TTL", "600")  # cached for the whole test
    node = start_node(redis_url)
    client, attacker = SipClient(), SipClient()
    aor = f"alice@{DOMAIN}"
    mine = f"<sip:alice@127.0.0.1:{client.port}>"
    redis = sync_redis.Redis.from_url(redis_url)
    try:
        assert client.register(node.address, "alice", accounts["alice"]).status == 200  # caches the account
        sha = hashlib.sha1(ADMITTED_REGISTER_SCRIPT.encode()).hexdigest()
        redis.script_flush()
        request = _authorized_register(client, node.address, "alice", accounts["alice"], mine)
        client.send(request, node.address)
        assert client.recv_final(call_id=request.call_id, cseq=2).status == 200  # type: ignore[union-attr]
        assert redis.script_exists(sha) == [True]  # the one-script path took it
        # the same request again (new branch, another Contact) from elsewhere: a replay
        replay = request.copy()
        replay.set("contact", "<sip:alice@127.0.0.1:9>")
        replay.replace_first_value("via", f"SIP/2.0/UDP 127.0.0.1:{attacker.port};branch=z9hG4bKreplay1;rport".encode())
        attacker.send(replay, node.address)
        refused = attacker.recv_final()
        assert refused is not None and refused.status == 401
        assert auth.parse_challenge(refused.get_all("www-authenticate")[0]).stale
        assert lookup(redis_url, aor) == [f"sip:alice@127.0.0.1:{client.port}"]
        # banned farm-wide (by another node, or `sipfarm ban add`): this node has not heard of it
        request = _authorized_register(client, node.address, "alice", accounts["alice"], "<sip:alice@127.0.0.1:9>")
        redis.set(ban_key("127.0.0.1"), "manual", px=60_000)
        client.send(request, node.address)
        banned = client.recv_final(call_id=request.call_id, cseq=2)
        assert banned is not None and banned.status == 403
        assert lookup(redis_url, aor) == [f"sip:alice@127.0.0.1:{client.port}"]
    finally:
        redis.delete(ban_key("127.0.0.1"))
        redis.close()
        client.close()
        attacker.close()
