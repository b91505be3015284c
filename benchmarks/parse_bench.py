"""Micro-benchmark of the sans-IO SIP parser on one core.

Prints parse+serialize operations per second for a typical ~700-byte INVITE with SDP (as pjsip
sends it), a REGISTER with Authorization, and a "proxy edit" (parse, prepend Via and
Record-Route, decrement Max-Forwards, read branch and tags, serialize).  Target: >= 50,000
parse+serialize/s for the INVITE.

    python benchmarks/parse_bench.py [--seconds 1.0] [--profile invite|register|proxy]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipfarm.sip.headers import via_branch
from sipfarm.sip.parser import parse_message

SDP = (
    b"v=0\r\n"
    b"o=- 3912345678 3912345678 IN IP4 192.0.2.10\r\n"
    b"s=pjmedia\r\n"
    b"t=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0 8 101\r\n"
    b"c=IN IP4 192.0.2.10\r\n"
    b"a=sendrecv\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\n"
)

INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;rport;branch=z9hG4bKPj5b7c1e0a2f8d4c3b9e6a\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: \"Alice\" <sip:alice@example.com>;tag=8f3b2c1d4e5a6b7c\r\n"
    b"To: <sip:bob@example.com>\r\n"
    b"Contact: <sip:alice@192.0.2.10:5060;ob>\r\n"
    b"Call-ID: 5c9e8d7f6a4b3c2d1e0f9a8b7c6d5e4f\r\n"
    b"CSeq: 31337 INVITE\r\n"
    b"Allow: PRACK, INVITE, ACK, BYE, CANCEL, UPDATE, INFO, SUBSCRIBE, NOTIFY, REFER, MESSAGE, OPTIONS\r\n"
    b"Supported: replaces, 100rel, timer\r\n"
    b"User-Agent: PJSUA v2.14\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n"
    b"\r\n" + SDP
)

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;rport;branch=z9hG4bKPjd1e2f3a4b5c6d7e8f9\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@example.com>;tag=a1b2c3d4e5f6\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"Call-ID: 0f1e2d3c4b5a69788796a5b4c3d2e1f0\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b"User-Agent: PJSUA v2.14 Linux-6.1/x86_64/glibc-2.36\r\n"
    b"Contact: <sip:alice@192.0.2.10:5060;ob>;reg-id=1;"
    b"+sip.instance=\"<urn:uuid:00000000-0000-0000-0000-0000d1e2f3a4>\"\r\n"
    b"Expires: 300\r\n"
    b"Allow: PRACK, INVITE, ACK, BYE, CANCEL, UPDATE, INFO, SUBSCRIBE, NOTIFY, REFER, MESSAGE, OPTIONS\r\n"
    b"Authorization: Digest username=\"alice\", realm=\"example.com\", "
    b"nonce=\"5f2b8c9d0e1f2a3b4c5d6e7f8a9b0c1d\", uri=\"sip:example.com\", "
    b"response=\"0123456789abcdef0123456789abcdef\", algorithm=MD5, "
    b"cnonce=\"a1b2c3d4e5f6a7b8\", qop=auth, nc=00000001\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def parse_serialize_invite() -> None:
    parse_message(INVITE).to_bytes()


def parse_serialize_register() -> None:
    parse_message(REGISTER).to_bytes()


def proxy_edit() -> None:
    """What a stateless proxy does to an INVITE before sending it on."""
    msg = parse_message(INVITE)
    branch = via_branch(msg.top_via_value)
    from_tag = msg.from_tag
    to_tag = msg.to_tag
    assert branch is not None and from_tag is not None and to_tag is None
    mf = msg.get("max-forwards")
    msg.set("max-forwards", str(int(mf) - 1 if mf is not None else 70).encode())
    msg.prepend("via", b"SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bK" + branch[7:] + b".0")
    msg.prepend("record-route", b"<sip:198.51.100.1;lr>")
    msg.to_bytes()


CASES: dict[str, tuple[Callable[[], None], int]] = {
    "invite": (parse_serialize_invite, len(INVITE)),
    "register": (parse_serialize_register, len(REGISTER)),
    "proxy": (proxy_edit, len(INVITE)),
}


def rate(func: Callable[[], None], seconds: float) -> float:
    """Best of three runs of ~seconds/3 each, in operations per second."""
    func()  # warm caches
    best = 0.0
    for _ in range(3):
        n = 0
        batch = 500
        start = time.perf_counter()
        deadline = start + seconds / 3
        while True:
            for _ in range(batch):
                func()
            n += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, n / (now - start))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="time per case")
    parser.add_argument("--profile", choices=sorted(CASES), help="cProfile one case instead")
    args = parser.parse_args(argv)
    if args.profile:
        func = CASES[args.profile][0]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20000):
            func()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return 0
    print(f"python {sys.version.split()[0]}, one core")
    for name, (func, size) in CASES.items():
        ops = rate(func, args.seconds)
        print(f"{name:10s} {size:5d} bytes  {ops:10,.0f} ops/s  {1e6 / ops:6.2f} us/op")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
