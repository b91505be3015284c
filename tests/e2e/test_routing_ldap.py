"""A node with the shared LDAP directory ([ldap] in its config file), against a real slapd:
bob, who is only in the directory (a plaintext password there), registers with digest and is
called by alice, a farm account in Redis; with slapd stopped, bob's account is still served
from the directory cache in Redis (a stale answer), and a user never seen gets 503 at once
(with Retry-After), never a hang."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.farm import NodeProcess, SipClient, add_accounts
from fixtures.media_phones import phone_sdp, send_invite
from fixtures.slapd import ATTRIBUTES, BASE, BIND_DN, BIND_PASSWORD, running_slapd
from fixtures.startup import START_TIMEOUT_S

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def test_a_directory_user_registers_and_is_called_and_survives_ldap_down(
    redis_url: str, start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    add_accounts(redis_url, {"alice": "alice-secret"})  # only alice in Redis
    with running_slapd(tmp_path / "slapd") as slapd:
        config = tmp_path / "farm.toml"
        attributes = ", ".join(f'{k} = "{v}"' for k, v in ATTRIBUTES.items())
        config.write_text(
            "[ldap]\n"
            f'url = "{slapd.url}"\nbind_dn = "{BIND_DN}"\nbind_password = "{BIND_PASSWORD}"\n'
            f'base = "{BASE}"\nfilter = "(uid={{user}})"\ntimeout = 0.5\nlocal_ttl = 0\n'
            f"attributes = {{ {attributes} }}\n"
        )
        node = start_node(redis_url, extra=["--config", str(config)])
        bob, alice = SipClient("127.0.0.3"), SipClient("127.0.0.2")
        try:
            reply = bob.register(node.address, "bob", "bobpw")  # HA1 from the directory's password
            assert reply is not None and reply.status == 200, node.log()[-3000:]
            wrong = SipClient("127.0.0.5")
            try:
                reply = wrong.register(node.address, "bob", "not-bobpw")
                assert reply is not None and reply.status in (401, 403), reply
            finally:
                wrong.close()
            send_invite(alice, node.address, phone_sdp("127.0.0.2", 40000), secrets.token_hex(8))
            deadline = time.monotonic() + 5
            rang = False
            while not rang and time.monotonic() < deadline:
                msg = bob.recv(0.5)
                rang = msg is not None and msg.is_request and msg.method == b"INVITE"
            assert rang, node.log()[-3000:]
            slapd.stop()  # the directory goes down
            reply = bob.register(node.address, "bob", "bobpw")  # the cached entry, stale: served
            assert reply is not None and reply.status == 200, node.log()[-3000:]
            stranger = SipClient("127.0.0.6")
            try:
                started = time.monotonic()
                reply = stranger.register(node.address, "dave", "davepw")
                assert reply is not None and reply.status == 503, reply
                assert reply.get("retry-after") is not None
                # the directory's 0.5 s timeout, not a hang (loose for a loaded CI machine)
                assert time.monotonic() - started < 5.0
            finally:
                stranger.close()
        finally:
            bob.close()
            alice.close()
