"""A node validates a request before acting on it (RFC 3261 16.3 step 1, 8.2): in memory.

A request whose From, To, Via, Contact or Request-URI the full grammar rejects is answered 400
whatever it asks for and whoever sends it: not a 401/407 challenge, a 403 for a foreign domain
or a 200 to an OPTIONS, and nothing is relayed. These are the defects of the RFC 4475 invalid
messages (3.1.2) that the parser's quick pass leaves to :func:`validate_request`; the farm-level
torture test (``tests/e2e/test_torture.py``) sends the RFC's own messages.
"""

from __future__ import annotations

import pytest
from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.sip.message import SipMessage

# (what is broken, header to replace or "request-uri", malformed value); RFC 4475 sections
DEFECTS = [
    ("from-display-name", "from", "Bell, Alexander <sip:a.g.bell@example.com>;tag=43"),  # 3.1.2.15
    ("to-spaces-in-brackets", "to", "< sip:bob@farm.test >"),  # 3.1.2.14
    ("to-unterminated-quote", "to", '"Mr. J. User <sip:bob@farm.test>'),  # 3.1.2.6
    ("contact-reserved-unbracketed", "contact", "sip:user@10.6.6.6?Route=%3Csip:10.9.9.9%3E"),  # 3.1.2.13
    ("via-empty-params", "via", "SIP/2.0/UDP 10.6.6.6:5060;;,;,,"),  # 3.1.2.1
    ("request-uri-headers", "request-uri", "sip:bob@farm.test?Route=%3Csip:10.9.9.9%3E"),  # 3.1.2.11
]

METHODS = ["REGISTER", "INVITE", "OPTIONS", "MESSAGE"]


@pytest.fixture
def farm() -> MemFarm:
    return MemFarm(nodes=1)


def broken(phone: Phone, method: str, header: str, value: str) -> bytes:
    """A request from ``phone`` with one header (or the Request-URI) replaced by ``value``."""
    uri = f"sip:{DOMAIN}" if method == "REGISTER" else f"sip:bob@{DOMAIN}"
    msg: SipMessage = phone.request(method, uri, to=f"<sip:{phone.user}@{DOMAIN}>" if method == "REGISTER" else None)
    raw = msg.to_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if header == "request-uri":
        lines[0] = f"{method} {value} SIP/2.0".encode()
    elif header == "via":
        lines.insert(2, f"Via: {value}".encode())  # a second Via, below the phone's own
    else:
        lines = [ln for ln in lines if not ln.lower().startswith(header.encode() + b":")]
        lines.insert(1, f"{header}: {value}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("defect", "header", "value"), DEFECTS, ids=[d[0] for d in DEFECTS])
@pytest.mark.parametrize("who", ["outsider", "user"])
def test_malformed_request_gets_400_before_any_policy(
    farm: MemFarm, who: str, defect: str, header: str, value: str, method: str
) -> None:
    if who == "user":
        phone = farm.phone("alice", "10.0.0.1")
        assert phone.register().status == 200  # type: ignore[union-attr]
        phone.inbox.clear()
    else:
        phone = farm.phone("mallory", "10.6.6.6")
    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.inbox.clear()
    phone.send(broken(phone, method, header, value))
    assert phone.finals() == [400], (defect, [m.to_bytes()[:120] for m in phone.inbox])
    assert not bob.inbox, "relayed to bob"
    assert not farm.stray, farm.stray


@pytest.mark.parametrize(
    ("method", "uri", "header"),
    [
        ("INVITE", f"sip:bob@{DOMAIN}", "proxy-require"),  # any request a proxy forwards (16.3 step 4)
        ("REGISTER", f"sip:{DOMAIN}", "require"),  # the node is the registrar: the UAS (8.2.2.3)
        ("OPTIONS", f"sip:{DOMAIN}", "require"),  # to the node itself
    ],
)
def test_an_option_tag_the_node_does_not_understand_gets_420_with_unsupported(
    farm: MemFarm, method: str, uri: str, header: str
) -> None:
    """RFC 3261 8.2.2.3 and 16.3 step 4: 420 Bad Extension naming the option-tags not
    understood in Unsupported (they were ignored: the request went on, red team 2026-12-03);
    the ones a node understands (path, outbound, gruu...) pass."""
    phone = farm.phone("alice", "10.0.0.1")
    msg = phone.request(method, uri)
    msg.set(header, b"x-unknown, Path, sec-agree")
    phone.send(msg)
    answer = phone.inbox[-1]
    assert answer.status == 420, answer
    assert answer.get("unsupported") == b"x-unknown, sec-agree"
    phone.inbox.clear()
    ok = phone.request(method, uri)
    ok.set(header, b"path, outbound")
    phone.send(ok)
    assert phone.inbox and phone.inbox[-1].status != 420
