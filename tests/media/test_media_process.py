"""`sipfarm relay` as a process of the farm: ng over UDP, RTP through it, membership in Redis,
`sipfarm status`, Prometheus metrics, media timeout, and a clean stop on SIGTERM.

The relay runs as `python -m sipfarm relay` on free loopback ports with the test Redis; two
"phones" on 127.0.0.2 and 127.0.0.3 send RTP through it."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fixtures.relay import RANGE, RelayProcess, ng_request, start_relay, stop, udp_free
from fixtures.startup import START_TIMEOUT_S

from media.bencode import decode, encode
from sipfarm.cluster.membership import Member, MembershipStore, Role
from sipfarm.store import create_redis

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


@pytest.fixture
def relay(redis_url: str, tmp_path: Path) -> Iterator[RelayProcess]:
    proc = start_relay(redis_url, tmp_path)
    try:
        yield proc
    finally:
        stop(proc)


def phone_sdp(host: str, port: int) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=rtcp-mux\r\na=sendrecv\r\n"
    ).encode()


def sdp_target(sdp: bytes) -> tuple[str, int]:
    hosts = re.findall(rb"^c=IN IP4 (\S+)", sdp, re.M)  # the last: the media-level one
    port = re.search(rb"^m=audio (\d+)", sdp, re.M)
    assert hosts and port, sdp
    return hosts[-1].decode(), int(port.group(1))


def rtp(seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x1234) + b"\xff" * 160


def phone(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(1.0)
    return sock


def metrics_text(relay: RelayProcess) -> str:
    with urllib.request.urlopen(f"http://{relay.metrics}/metrics", timeout=2) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, as printed) in an exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def status_json(redis_url: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "sipfarm", "status", "--json", "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    members: list[dict[str, Any]] = json.loads(done.stdout)["members"]
    return members


def test_relay_process_carries_a_call_and_reports_it(relay: RelayProcess) -> None:
    alice, bob = phone("127.0.0.2"), phone("127.0.0.3")
    try:
        assert ng_request(relay.ng, {"command": "ping"}) == {b"result": b"pong"}
        offer = ng_request(
            relay.ng,
            {
                "command": "offer",
                "call-id": "call-1@test",
                "from-tag": "alice-tag",
                "sdp": phone_sdp("127.0.0.2", alice.getsockname()[1]),
                "replace": ["origin", "session-connection"],
                "ICE": "remove",
            },
        )
        assert offer[b"result"] == b"ok", offer
        to_bob = sdp_target(offer[b"sdp"])  # where bob sends: the relay
        assert to_bob[0] == "127.0.0.1" and relay.port_min <= to_bob[1] < relay.port_min + RANGE
        answer = ng_request(
            relay.ng,
            {
                "command": "answer",
                "call-id": "call-1@test",
                "from-tag": "alice-tag",
                "to-tag": "bob-tag",
                "sdp": phone_sdp("127.0.0.3", bob.getsockname()[1]),
            },
        )
        assert answer[b"result"] == b"ok", answer
        to_alice = sdp_target(answer[b"sdp"])  # where alice sends

        for seq in range(5):
            alice.sendto(rtp(seq), to_alice)
            data, source = bob.recvfrom(2048)
            assert data == rtp(seq) and source == to_bob  # symmetric: bob hears the relay's port
            bob.sendto(rtp(100 + seq), to_bob)
            data, source = alice.recvfrom(2048)
            assert data == rtp(100 + seq) and source == to_alice

        # the relay is a member of the farm, with its sessions and free ports
        def listed_with_call() -> bool:
            rows = [m for m in status_json(relay.redis_url) if m["id"] == relay.relay_id]
            return bool(rows) and rows[0]["load"] == 1.0

        eventually(listed_with_call)
        (row,) = [m for m in status_json(relay.redis_url) if m["id"] == relay.relay_id]
        assert row["role"] == "relay" and row["state"] == "active"
        assert row["control_address"] == f"udp:127.0.0.1:{relay.ng[1]}"
        free = row["free_ports"]
        assert RANGE - 4 <= free <= RANGE - 2  # a port (or pair, before the answer muxes) per side
        table = subprocess.run(
            [sys.executable, "-m", "sipfarm", "status", "--redis", relay.redis_url],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "SESSIONS" in table and any(
            line.split()[:3] == [relay.relay_id, "1", str(free)] for line in table.splitlines()
        ), table

        def counted() -> bool:
            text = metrics_text(relay)
            return metric(text, "sipfarm_relay_forwarded_packets_total") >= 10

        eventually(counted)
        text = metrics_text(relay)
        assert metric(text, "sipfarm_relay_sessions") == 1
        assert metric(text, "sipfarm_relay_forwarded_bytes_total") >= 10 * 172
        assert metric(text, 'sipfarm_relay_ng_commands_total{command="offer",result="ok"}') == 1
        assert metric(text, 'sipfarm_relay_ng_commands_total{command="ping",result="pong"}') >= 2

        # a stranger's packet after latching is dropped and counted
        with phone("127.0.0.4") as stranger:
            stranger.sendto(rtp(50), to_alice)
        deleted = ng_request(relay.ng, {"command": "delete", "call-id": "call-1@test", "from-tag": "alice-tag"})
        assert deleted[b"result"] == b"ok", deleted
        assert deleted[b"totals"][b"RTP"][b"packets"] == 10
        unknown = ng_request(relay.ng, {"command": "query", "call-id": "call-1@test"})
        assert unknown[b"result"] == b"error"
        assert ng_request(relay.ng, {"command": "frobnicate"})[b"result"] == b"error"

        def freed() -> bool:
            text = metrics_text(relay)
            return metric(text, "sipfarm_relay_sessions") == 0 and metric(text, "sipfarm_relay_free_ports") == RANGE

        eventually(freed)
        text = metrics_text(relay)
        assert metric(text, 'sipfarm_relay_dropped_packets_total{reason="unexpected_source"}') == 1
        assert metric(text, 'sipfarm_relay_ng_commands_total{command="unknown",result="error"}') == 1
    finally:
        alice.close()
        bob.close()

    assert stop(relay) == 0, relay.log()[-2000:]
    assert "relay_stopping" in relay.log()
    assert [m for m in status_json(relay.redis_url) if m["role"] == "relay"] == []  # left at once
    for port in range(relay.port_min, relay.port_min + RANGE):
        assert udp_free(port), port  # every media port closed


def test_media_timeout_frees_a_silent_call(redis_url: str, tmp_path: Path) -> None:
    relay = start_relay(redis_url, tmp_path, "--media-timeout", "1")
    try:
        offer = ng_request(
            relay.ng,
            {"command": "offer", "call-id": "silent@test", "from-tag": "a", "sdp": phone_sdp("127.0.0.2", 40000)},
        )
        assert offer[b"result"] == b"ok", offer

        def expired() -> bool:
            return metric(metrics_text(relay), "sipfarm_relay_expired_sessions_total") == 1

        eventually(expired, within=6)
        assert ng_request(relay.ng, {"command": "list"}) == {b"result": b"ok", b"calls": []}
        eventually(lambda: metric(metrics_text(relay), "sipfarm_relay_free_ports") == RANGE)  # synced each second
        assert "relay_session_expired call_id=silent@test" in relay.log()
    finally:
        assert stop(relay) == 0, relay.log()[-2000:]


def test_advertise_names_another_address_in_the_sdp(redis_url: str, tmp_path: Path) -> None:
    """Behind NAT or in a container the SDPs name the address phones reach, not the bound one."""
    relay = start_relay(redis_url, tmp_path, "--advertise", "127.0.0.77")
    try:
        offer = ng_request(
            relay.ng,
            {"command": "offer", "call-id": "nat@test", "from-tag": "a", "sdp": phone_sdp("127.0.0.2", 40000)},
        )
        host, port = sdp_target(offer[b"sdp"])
        assert host == "127.0.0.77"
        assert relay.port_min <= port < relay.port_min + RANGE
    finally:
        assert stop(relay) == 0, relay.log()[-2000:]


def test_an_sdp_naming_the_relay_itself_gets_nothing_before_latching(relay: RelayProcess) -> None:
    """An offer whose SDP names the relay's own ng socket (or one of its media ports): media
    towards it waits for the phone to send (latch); nothing goes to the relay's own sockets."""
    bob = phone("127.0.0.3")
    try:
        for target in (relay.ng[1], relay.port_min + RANGE - 2):
            call_id = f"self-{target}@test"
            offer = ng_request(
                relay.ng,
                {"command": "offer", "call-id": call_id, "from-tag": "a", "sdp": phone_sdp("127.0.0.1", target)},
            )
            assert offer[b"result"] == b"ok", offer
            to_relay = sdp_target(offer[b"sdp"])
            answer = ng_request(
                relay.ng,
                {
                    "command": "answer",
                    "call-id": call_id,
                    "from-tag": "a",
                    "to-tag": "b",
                    "sdp": phone_sdp("127.0.0.3", bob.getsockname()[1]),
                },
            )
            assert answer[b"result"] == b"ok", answer
            for seq in range(5):
                bob.sendto(rtp(seq), to_relay)

        def dropped() -> bool:
            text = metrics_text(relay)
            return metric(text, 'sipfarm_relay_dropped_packets_total{reason="no_destination"}') == 10

        eventually(dropped)
        assert metric(metrics_text(relay), 'sipfarm_relay_ng_errors_total{kind="dropped"}') == 0
    finally:
        bob.close()


def test_bad_configuration_is_one_clear_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sipfarm", "relay", "--port-min", "30001", "--port-max", "30002"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "configuration error: port_max" in done.stderr


# -- the farm around the relay: who may drive it, where it never sends -------------------------


async def _heartbeat(redis_url: str, member: Member) -> None:
    """Write ``member`` into the membership for a minute (a stand-in for a process)."""
    redis = create_redis(redis_url)
    try:
        await MembershipStore(redis, ttl=60).heartbeat(member)
    finally:
        await redis.aclose()


async def _leave(redis_url: str, member_id: str) -> None:
    redis = create_redis(redis_url)
    try:
        await MembershipStore(redis).leave(member_id)
    finally:
        await redis.aclose()


def ng_from(source: str, ng: tuple[str, int], message: dict[str, Any], wait: float = 0.6) -> dict[bytes, Any] | None:
    """One ng request sent from ``source`` (a loopback address); its reply, None if none came."""
    cookie = b"c" + str(time.monotonic_ns()).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(wait)
        sock.sendto(cookie + b" " + encode(message), ng)
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return None
    head, _, body = data.partition(b" ")
    assert head == cookie
    reply = decode(body)
    assert isinstance(reply, dict)
    return reply


def test_ng_from_a_source_not_accepted_gets_no_answer_and_is_counted(redis_url: str, tmp_path: Path) -> None:
    relay = start_relay(redis_url, tmp_path, "--accept-from", "127.0.0.1")
    try:
        assert "event=relay_accept_from reason=started accepted=127.0.0.1/32" in relay.log()
        stranger = {"command": "list"}
        assert ng_from("127.0.0.99", relay.ng, stranger) is None
        assert ng_from("127.0.0.99", relay.ng, {"command": "delete", "call-id": "x", "from-tag": "a"}) is None
        assert ng_from("127.0.0.1", relay.ng, stranger) == {b"result": b"ok", b"calls": []}

        def synced() -> bool:  # the metrics are copied once a second
            return metric(metrics_text(relay), 'sipfarm_relay_ng_commands_total{command="list",result="ok"}') == 1

        eventually(synced)
        text = metrics_text(relay)
        assert metric(text, 'sipfarm_relay_ng_errors_total{kind="refused"}') == 2
        assert metric(text, 'sipfarm_relay_ng_commands_total{command="delete",result="error"}') == 0
        log = relay.log()
        assert "event=ng_refused source=127.0.0.99 refused=1" in log
        assert "refused=2" not in log  # rate-limited: one line per 10 s
    finally:
        assert stop(relay) == 0, relay.log()[-2000:]


def test_the_nodes_of_the_membership_may_drive_the_relay(redis_url: str, tmp_path: Path) -> None:
    """``accept_from = nodes``: a node's host (as it heartbeats it) is accepted while it is a
    member, and refused again once it leaves; another host never."""
    relay = start_relay(redis_url, tmp_path, "--accept-from", "nodes,127.0.0.1")
    node = Member("node-far", Role.NODE, ("udp:127.0.0.98:5070", "tcp:127.0.0.98:5070"))
    try:
        assert ng_from("127.0.0.98", relay.ng, {"command": "ping"}) is None
        asyncio.run(_heartbeat(redis_url, node))
        eventually(lambda: ng_from("127.0.0.98", relay.ng, {"command": "ping"}, 0.3) == {b"result": b"pong"})
        assert "event=relay_accept_from reason=nodes_changed accepted=127.0.0.1/32,127.0.0.98/32" in relay.log()
        assert ng_from("127.0.0.97", relay.ng, {"command": "ping"}) is None
        asyncio.run(_leave(redis_url, node.id))
        eventually(lambda: ng_from("127.0.0.98", relay.ng, {"command": "ping"}, 0.3) is None)
    finally:
        assert stop(relay) == 0, relay.log()[-2000:]


def test_an_sdp_inside_another_relays_range_is_not_sent_to(redis_url: str, tmp_path: Path) -> None:
    """Another relay's media range (its membership record: first port, port_max) is the farm's:
    an SDP naming any port of it gets nothing before latching (two relays pointed at each other
    would bounce packets for ever); the port just past its range is a phone's like any other."""
    relay = start_relay(redis_url, tmp_path)
    bob, past_range = phone("127.0.0.3"), phone("127.0.0.6")
    edge = past_range.getsockname()[1]
    far = Member("relay-far", Role.RELAY, (f"udp:127.0.0.6:{edge - 10}",), control_address="udp:127.0.0.6:2223")
    try:
        asyncio.run(_heartbeat(redis_url, replace(far, port_max=edge - 1)))
        eventually(lambda: "member=relay-far" in relay.log())  # the relay's membership poll saw it
        targets = {}
        for call_id, port in (("inside@test", edge - 5), ("past@test", edge)):
            offer = ng_request(
                relay.ng,
                {"command": "offer", "call-id": call_id, "from-tag": "a", "sdp": phone_sdp("127.0.0.6", port)},
            )
            assert offer[b"result"] == b"ok", offer
            targets[call_id] = sdp_target(offer[b"sdp"])
            answer = ng_request(
                relay.ng,
                {
                    "command": "answer",
                    "call-id": call_id,
                    "from-tag": "a",
                    "to-tag": "b",
                    "sdp": phone_sdp("127.0.0.3", bob.getsockname()[1]),
                },
            )
            assert answer[b"result"] == b"ok", answer
        for seq in range(5):
            bob.sendto(rtp(seq), targets["inside@test"])
        for seq in range(3):
            bob.sendto(rtp(seq), targets["past@test"])
            data, _ = past_range.recvfrom(2048)
            assert data == rtp(seq)

        def dropped() -> bool:
            return metric(metrics_text(relay), 'sipfarm_relay_dropped_packets_total{reason="no_destination"}') == 5

        eventually(dropped)
        past_range.settimeout(0.3)
        with pytest.raises(TimeoutError):
            past_range.recvfrom(2048)  # nothing of the call whose SDP named the far relay
    finally:
        bob.close()
        past_range.close()
        assert stop(relay) == 0, relay.log()[-2000:]
