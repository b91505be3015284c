"""The router table in the proxy, in memory: forward to a gateway, an alias forking to users,
the unknown-user rule (forward to voicemail, redirect, reject), all behind authentication
(an outsider gets the same 407 for every address, existing or not)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.routing.router import Router
from sipfarm.routing.table import RoutingError, RoutingTable
from sipfarm.store.accounts import Account
from sipfarm.transport.rfc3263 import Target

GATEWAY = "10.9.0.1"
VOICEMAIL = "10.9.0.2"


def farm(routing: dict[str, object]) -> MemFarm:
    table = RoutingTable.from_dict(routing)
    mf = MemFarm(node_kwargs={"router": Router(frozenset({DOMAIN}), table)})
    mf.destinations.allow([f"{GATEWAY}:5060", f"{VOICEMAIL}:5060"])
    return mf


def phones(mf: MemFarm, *names: str) -> list[Phone]:
    out = []
    for n, name in enumerate(names):
        phone = mf.phone(name, f"10.0.0.{n + 1}")
        assert phone.register().status == 200  # type: ignore[union-attr]
        phone.inbox.clear()
        out.append(phone)
    return out


def endpoint(mf: MemFarm, host: str) -> Phone:
    """A gateway or voicemail server: a UA at ``host`` that answers what reaches it."""
    return mf.phone("gw", host)


EXAMPLE = {
    "rules": [
        {"name": "us-gateway", "user_prefix": "+1555", "action": "forward", "uri": f"sip:{GATEWAY}:5060"},
        {
            "name": "sales",
            "domain": DOMAIN,
            "user": "sales",
            "action": "alias",
            "targets": [f"sip:alice@{DOMAIN}", f"sip:bob@{DOMAIN}"],
        },
    ],
    "unknown": {"action": "forward", "uri": f"sip:vm@{VOICEMAIL}:5060"},
}


def test_a_number_goes_to_the_gateway_with_its_user_after_authentication() -> None:
    mf = farm(EXAMPLE)
    (carol,) = phones(mf, "carol")
    gateway = endpoint(mf, GATEWAY)
    invite = carol.request("INVITE", f"sip:+15551234@{DOMAIN}")
    carol.send(invite)
    assert carol.last() is not None and carol.last().status == 407  # type: ignore[union-attr]
    assert not gateway.ringing
    carol.authenticated(carol.request("INVITE", f"sip:+15551234@{DOMAIN}"))
    assert gateway.ringing
    reached = gateway.ringing[-1].request
    assert reached.uri == f"sip:+15551234@{GATEWAY}:5060".encode()
    assert reached.get("p-asserted-identity") == f"<sip:carol@{DOMAIN}>".encode()
    gateway.answer_call(200)
    assert 200 in carol.finals()


def test_an_alias_rings_every_phone_of_its_users() -> None:
    mf = farm(EXAMPLE)
    alice, bob, carol = phones(mf, "alice", "bob", "carol")
    carol.authenticated(carol.request("INVITE", f"sip:sales@{DOMAIN}"))
    assert alice.ringing and bob.ringing
    bob.answer_call(200)
    assert 200 in carol.finals()
    assert alice.requests(b"CANCEL")  # the other branch is cancelled (RFC 3261 16.7)


def test_an_unknown_user_reaches_voicemail_but_only_after_authentication() -> None:
    mf = farm(EXAMPLE)
    (carol,) = phones(mf, "carol")
    voicemail = endpoint(mf, VOICEMAIL)
    # an outsider sees the same challenge for an unknown user as for alice
    for callee in ("nobody", "alice"):
        carol.send(carol.request("INVITE", f"sip:{callee}@{DOMAIN}"))
        assert carol.last().status == 407  # type: ignore[union-attr]
    assert not voicemail.ringing
    carol.authenticated(carol.request("INVITE", f"sip:nobody@{DOMAIN}"))
    assert voicemail.ringing
    assert voicemail.ringing[-1].request.uri == f"sip:vm@{VOICEMAIL}:5060".encode()
    assert b"nobody@" in (voicemail.ringing[-1].request.get("to") or b"")  # who was called


def test_unknown_users_can_be_redirected_or_rejected_with_604() -> None:
    mf = farm({"unknown": {"action": "redirect", "uri": "sip:operator@farm.test"}})
    (carol,) = phones(mf, "carol")
    answer = carol.authenticated(carol.request("INVITE", f"sip:nobody@{DOMAIN}"))
    assert answer is not None and answer.status == 302
    assert answer.get("contact") == b"<sip:operator@farm.test>"
    mf = farm({"unknown": {"action": "reject", "status": 604}})
    (carol,) = phones(mf, "carol")
    answer = carol.authenticated(carol.request("INVITE", f"sip:nobody@{DOMAIN}"))
    assert answer is not None and answer.status == 604


def test_an_operator_can_have_unknown_users_told_apart_with_404() -> None:
    """``status = 404``: "no such user" for a missing account, 480 for one not registered
    (the default answers 480 to both); a GRUU of a missing account gets the same 404."""
    mf = farm({"unknown": {"action": "reject", "status": 404}})
    (carol,) = phones(mf, "carol")
    for uri, status in (
        (f"sip:nobody@{DOMAIN}", 404),
        (f"sip:nobody@{DOMAIN};gr=urn:uuid:1", 404),
        (f"sip:bob@{DOMAIN}", 480),
    ):
        answer = carol.authenticated(carol.request("INVITE", uri))
        assert answer is not None and answer.status == status, uri


def test_a_gruu_of_a_missing_account_is_not_sent_to_the_catch_all() -> None:
    mf = farm(EXAMPLE)  # unknown users forwarded to voicemail
    (carol,) = phones(mf, "carol")
    answer = carol.authenticated(carol.request("INVITE", f"sip:nobody@{DOMAIN};gr=urn:uuid:1"))
    assert answer is not None and answer.status == 404


def test_a_reject_rule_and_the_default_for_other_domains() -> None:
    mf = farm({"rules": [{"user_prefix": "900", "action": "reject", "status": 403, "reason": "Premium"}]})
    (carol,) = phones(mf, "carol")
    answer = carol.authenticated(carol.request("INVITE", f"sip:900123@{DOMAIN}"))
    assert answer is not None and (answer.status, answer.reason) == (403, b"Premium")
    carol.send(carol.request("INVITE", "sip:bob@elsewhere.test"))
    assert carol.last().status == 403  # type: ignore[union-attr]


def test_a_gateway_the_destination_policy_refuses_is_not_called() -> None:
    table = RoutingTable.from_dict({"rules": [{"user_prefix": "+1", "action": "forward", "uri": "sip:127.0.0.1:5999"}]})
    mf = MemFarm(node_kwargs={"router": Router(frozenset({DOMAIN}), table)})
    (carol,) = phones(mf, "carol")
    answer = carol.authenticated(carol.request("INVITE", f"sip:+1234@{DOMAIN}"))
    assert answer is not None and answer.status == 500
    assert not mf.stray_to("127.0.0.1", 5999)


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"rules": [{"action": "forward", "uri": "sip:gw"}]}, "matches everything"),
        ({"rules": [{"user": "x", "action": "forward"}]}, "uri: a SIP URI is required"),
        ({"rules": [{"user": "x", "action": "fly"}]}, "action must be one of"),
        ({"rules": [{"user_regex": "(", "action": "reject"}]}, "user_regex"),
        ({"rules": [{"user": "x", "action": "alias", "targets": []}]}, "targets"),
        ({"rules": [{"user": "x", "action": "forward", "uri": "tel:+1"}]}, "not a sip"),
        ({"unknown": {"action": "reject", "status": 403}}, "status 404"),
        ({"unknown": {"action": "alias"}}, "reject, forward or redirect"),
        ({"rulez": []}, "unknown setting"),
    ],
)
def test_a_bad_table_is_refused_with_a_clear_message(routing: dict[str, object], message: str) -> None:
    with pytest.raises(RoutingError, match=message):
        RoutingTable.from_dict(routing)


def test_a_trusted_gateway_calls_users_without_digest_but_not_onwards() -> None:
    mf = farm({**EXAMPLE, "trusted": [f"{GATEWAY}/32"]})
    (alice,) = phones(mf, "alice")
    gateway = endpoint(mf, GATEWAY)
    untrusted = endpoint(mf, "10.9.0.9")
    for caller, rings in ((untrusted, False), (gateway, True)):
        caller.send(caller.request("INVITE", f"sip:alice@{DOMAIN}", from_="<sip:+4930123@gw.example>"))
        assert bool(alice.ringing) is rings
        if not rings:
            assert caller.last().status == 407  # type: ignore[union-attr]
    # no transit: a trusted gateway's call to another gateway number still needs a user's digest
    gateway.send(gateway.request("INVITE", f"sip:+15559999@{DOMAIN}", from_="<sip:+4930123@gw.example>"))
    assert gateway.last().status == 407  # type: ignore[union-attr]


class Located:
    """A stand-in for the RFC 3263 locator: the name's targets, in order."""

    def __init__(self, targets: list[tuple[str, int]]) -> None:
        self.targets = targets
        self.asked: list[str] = []

    def locate_uri(self, uri: object, callback: Any) -> None:
        self.asked.append(str(uri))
        callback([Target("udp", host, port) for host, port in self.targets])


def test_a_gateway_by_name_fails_over_to_its_next_address_on_503_only() -> None:
    table = RoutingTable.from_dict({"rules": [{"user_prefix": "+1", "action": "forward", "uri": "sip:gw.example"}]})
    locator = Located([(GATEWAY, 5060), (VOICEMAIL, 5060)])
    mf = MemFarm(node_kwargs={"router": Router(frozenset({DOMAIN}), table), "locator": locator})
    mf.destinations.allow([f"{GATEWAY}:5060", f"{VOICEMAIL}:5060"])
    (carol,) = phones(mf, "carol")
    first, second = endpoint(mf, GATEWAY), endpoint(mf, VOICEMAIL)
    carol.authenticated(carol.request("INVITE", f"sip:+15551234@{DOMAIN}"))
    assert locator.asked == ["sip:+15551234@gw.example"]
    assert first.ringing and not second.ringing
    first.answer_call(503)
    assert second.ringing, "the next address of the gateway was not tried"
    second.answer_call(486)
    assert 486 in carol.finals()
    # a gateway that answers anything but 503/408 is the answer: no other address rings
    carol.authenticated(carol.request("INVITE", f"sip:+15550000@{DOMAIN}"))
    first.answer_call(486)
    assert 486 in carol.finals()
    assert len(second.requests(b"INVITE")) == 1


class Helper:
    """A stand-in for the external helper: answers from a dict by callee user."""

    def __init__(self, answers: dict[str, dict[str, object]]) -> None:
        self.answers = answers
        self.queries: list[dict[str, str]] = []

    def ask(self, query: dict[str, str], callback: Any) -> None:
        from sipfarm.routing.helpers import HelperAnswer  # noqa: PLC0415

        self.queries.append(query)
        user = query["callee"].partition(":")[2].partition("@")[0]
        callback(HelperAnswer.from_dict(self.answers.get(user, {"action": "local"})))


def test_a_helper_rule_routes_by_the_helpers_answer() -> None:
    table = RoutingTable.from_dict(
        {
            "rules": [{"domain": DOMAIN, "user_prefix": "+", "action": "helper"}],
            "helper": {"program": ["true"], "headers": ["X-Account"]},
        }
    )
    router = Router(frozenset({DOMAIN}), table)
    router.helper = Helper(
        {
            "+1555": {"action": "forward", "uri": f"sip:{GATEWAY}:5060"},
            "+1900": {"action": "reject", "status": 403, "reason": "Barred"},
            "+49": {"action": "alias", "targets": [f"sip:alice@{DOMAIN}"]},
        }
    )
    mf = MemFarm(node_kwargs={"router": router})
    mf.destinations.allow([f"{GATEWAY}:5060"])
    alice, carol = phones(mf, "alice", "carol")
    gateway = endpoint(mf, GATEWAY)
    carol.authenticated(carol.request("INVITE", f"sip:+1555@{DOMAIN}", headers=[("X-Account", "42")]))
    assert gateway.ringing and gateway.ringing[-1].request.uri == f"sip:+1555@{GATEWAY}:5060".encode()
    query = router.helper.queries[-1]  # type: ignore[attr-defined]
    assert (query["method"], query["callee"], query["x-account"]) == ("INVITE", f"sip:+1555@{DOMAIN}", "42")
    answer = carol.authenticated(carol.request("INVITE", f"sip:+1900@{DOMAIN}"))
    assert answer is not None and (answer.status, answer.reason) == (403, b"Barred")
    carol.authenticated(carol.request("INVITE", f"sip:+49@{DOMAIN}"))
    assert alice.ringing


def test_a_helper_rule_needs_a_helper_section() -> None:
    with pytest.raises(RoutingError, match=r"no \[routing.helper\]"):
        RoutingTable.from_dict({"rules": [{"user_prefix": "+", "action": "helper"}]})
    with pytest.raises(RoutingError, match=r"routing\.helper"):
        RoutingTable.from_dict({"rules": [], "helper": {"program": "not-a-list"}})


class Directory:
    """A stand-in for the LDAP directory: accounts and aliases from dicts."""

    def __init__(self, accounts: dict[str, str], aliases: dict[str, tuple[str, ...]]) -> None:
        from sipfarm.store.accounts import ha1_md5, ha1_sha256  # noqa: PLC0415

        self.accounts = {
            user: Account(user, DOMAIN, ha1_md5(user, DOMAIN, pw), ha1_sha256(user, DOMAIN, pw), True, 10, 0.0)
            for user, pw in accounts.items()
        }
        self.alias_table = aliases

    def get_account(self, user: str, domain: str, callback: Any) -> None:
        callback(self.accounts.get(user))

    def aliases(self, user: str, domain: str, callback: Any) -> None:
        callback(self.alias_table.get(user, ()))


def test_directory_accounts_and_aliases() -> None:
    from sipfarm.routing.directory import DirectoryAliases, DirectoryState  # noqa: PLC0415

    mf = MemFarm(users={"alice": "alice-pw"})
    directory = Directory({"dave": "dave-pw"}, {"sales": (f"sip:alice@{DOMAIN}", f"sip:dave@{DOMAIN}")})
    core = mf.nodes[0]
    state = DirectoryState(mf.state, directory)
    core.proxy.state = core.registrar.store = core.auth.accounts = state  # type: ignore[assignment]
    core.proxy.router.aliases = DirectoryAliases(directory)
    alice = mf.phone("alice", "10.0.0.1")
    dave = mf.phone("dave", "10.0.0.4")  # only in the directory
    for phone in (alice, dave):
        assert phone.register().status == 200  # type: ignore[union-attr]
    dave.authenticated(dave.request("INVITE", f"sip:alice@{DOMAIN}", from_user="dave"))
    assert alice.ringing
    alice.authenticated(alice.request("INVITE", f"sip:sales@{DOMAIN}"))
    assert dave.ringing  # the directory's alias forks to its users


def test_a_trunk_that_challenges_is_answered_with_the_farms_account_once() -> None:
    from sipfarm.sip import auth  # noqa: PLC0415
    from sipfarm.sip.message import make_response  # noqa: PLC0415

    mf = farm(
        {
            "rules": [
                {
                    "user_prefix": "+1",
                    "action": "forward",
                    "uri": f"sip:{GATEWAY}:5060",
                    "username": "farm-account",
                    "password": "trunk-secret",
                }
            ]
        }
    )
    (carol,) = phones(mf, "carol")
    trunk = endpoint(mf, GATEWAY)
    carol.authenticated(carol.request("INVITE", f"sip:+15551234@{DOMAIN}"))
    first = trunk.ringing.pop()
    demand = (("proxy-authenticate", b'Digest realm="trunk.example", nonce="n0nce", qop="auth", algorithm=MD5'),)
    trunk.send(make_response(first.request, 407, to_tag=b"trunk", headers=demand), first.source)
    assert 407 not in carol.finals()  # the trunk's challenge is the farm's business
    assert trunk.ringing, "the INVITE was not sent again with credentials"
    second = trunk.ringing.pop()
    value = second.request.get("proxy-authorization")
    assert value is not None and b'username="farm-account"' in value
    creds = auth.parse_credentials(value)
    ha1 = auth.ha1("MD5", "farm-account", "trunk.example", "trunk-secret")
    ha2 = hashlib.md5(f"INVITE:{creds.uri}".encode(), usedforsecurity=False).hexdigest()
    expected = f"{ha1}:{creds.nonce}:{creds.nc}:{creds.cnonce}:{creds.qop}:{ha2}"
    assert creds.response == hashlib.md5(expected.encode(), usedforsecurity=False).hexdigest()  # RFC 2617 3.2.2
    assert (creds.realm, creds.nonce, creds.uri) == ("trunk.example", "n0nce", f"sip:+15551234@{GATEWAY}:5060")
    # a second challenge is the answer (the account was refused): forwarded, no loop
    trunk.send(make_response(second.request, 407, to_tag=b"trunk", headers=demand), second.source)
    assert 407 in carol.finals()
    assert not trunk.ringing
