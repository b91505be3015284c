"""Digest authentication: RFC examples, round trips, nonce lifecycle, and parser properties."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipfarm.sip import auth
from sipfarm.sip.auth import (
    AuthHeaderError,
    AuthOutcome,
    Challenge,
    Credentials,
    NonceFactory,
    NonceStatus,
    UnsupportedSchemeError,
    build_challenges,
    build_credentials,
    digest_response,
    ha1,
    parse_challenge,
    parse_credentials,
    verify,
)

SECRET = b"0123456789abcdef-cluster-secret"
REALM = "sip.example.com"
NOW = 1_700_000_000.0
URI = "sip:registrar.example.com"


def account(user: str, realm: str, password: str) -> dict[str, str]:
    return {alg: ha1(alg, user, realm, password) for alg in ("MD5", "SHA-256")}


def fixed_random(n: int) -> bytes:
    return bytes(range(n))


# --- RFC test vectors -------------------------------------------------------------------------


def test_rfc2617_section_3_5_example() -> None:
    secret = ha1("MD5", "Mufasa", "testrealm@host.com", "Circle Of Life")
    response = digest_response(
        "MD5",
        secret,
        "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        "GET",
        "/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


RFC7616_HEADER = (
    b'Digest username="Mufasa",\r\n'
    b'       realm="http-auth@example.org",\r\n'
    b'       uri="/dir/index.html",\r\n'
    b"       algorithm=SHA-256,\r\n"
    b'       nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",\r\n'
    b"       nc=00000001,\r\n"
    b'       cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",\r\n'
    b"       qop=auth,\r\n"
    b'       response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",\r\n'
    b'       opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
)


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_section_3_9_1_examples(algorithm: str, expected: str) -> None:
    secret = ha1(algorithm, "Mufasa", "http-auth@example.org", "Circle of Life")
    response = digest_response(
        algorithm,
        secret,
        "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        "GET",
        "/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )
    assert response == expected


def test_rfc7616_folded_authorization_parses() -> None:
    creds = parse_credentials(RFC7616_HEADER)
    assert creds.username == "Mufasa"
    assert creds.realm == "http-auth@example.org"
    assert creds.algorithm == "SHA-256"
    assert (creds.qop, creds.nc) == ("auth", "00000001")
    assert creds.opaque == "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
    recomputed = digest_response(
        "SHA-256",
        ha1("SHA-256", "Mufasa", "http-auth@example.org", "Circle of Life"),
        creds.nonce,
        "GET",
        creds.uri,
        qop=creds.qop,
        nc=creds.nc,
        cnonce=creds.cnonce,
    )
    assert recomputed == creds.response


# --- parsing ----------------------------------------------------------------------------------


def test_parse_challenge_is_case_and_whitespace_tolerant() -> None:
    challenge = parse_challenge(
        b'  dIgEsT   REALM = "a\\"b\\\\c" ,,\tNonce="n1",\r\n ALGORITHM=sha-256, qop="auth, auth-int",'
        b" stale=TRUE, opaque=tok"
    )
    assert challenge.realm == 'a"b\\c'
    assert challenge.nonce == "n1"
    assert challenge.algorithm == "sha-256"
    assert challenge.supported_algorithm == "SHA-256"
    assert challenge.qop == ("auth", "auth-int")
    assert challenge.stale is True
    assert challenge.opaque == "tok"


def test_parse_challenge_defaults_to_md5() -> None:
    challenge = parse_challenge(b'Digest realm="r", nonce="n"')
    assert (challenge.algorithm, challenge.qop, challenge.stale) == ("MD5", (), False)


@pytest.mark.parametrize(
    ("value", "defect"),
    [
        (b"", "authentication scheme"),
        (b"Digest", "whitespace after 'Digest'"),
        (b"Digest ", "no Digest parameters"),
        (b'Digest realm="r", nonce="n', "unterminated quoted-string"),
        (b'Digest realm="r" nonce="n"', "expected ','"),
        (b'Digest realm="r", realm="s", nonce="n"', "duplicate parameter 'realm'"),
        (b'Digest realm "r"', "expected '='"),
        (b'Digest realm=, nonce="n"', "value of parameter 'realm'"),
        (b'Digest nonce="n"', "missing 'realm'"),
        (b'Digest realm="r", nonce="n", stale=maybe', "must be true or false"),
        (b'Digest realm="r\x01", nonce="n"', "control character"),
        (b'Digest realm="r",\r\nnonce="n"', "line break not followed by whitespace"),
        (b'Digest realm="\xff", nonce="n"', "not UTF-8"),
    ],
)
def test_malformed_challenges_name_the_defect(value: bytes, defect: str) -> None:
    with pytest.raises(AuthHeaderError, match=defect) as info:
        parse_challenge(value)
    assert info.value.status == 400


def test_unknown_scheme_is_distinguishable() -> None:
    # RFC 4475 3.3.7 (regaut01): a registrar re-challenges rather than answering 400.
    with pytest.raises(UnsupportedSchemeError) as info:
        parse_credentials(b"NoOneKnowsThisScheme opaque-data=here")
    assert isinstance(info.value, AuthHeaderError)
    assert info.value.status == 401


@pytest.mark.parametrize(
    ("value", "defect"),
    [
        (b'Digest username="u", realm="r", nonce="n", response="00"', "missing 'uri'"),
        (b'Digest username="u", realm="r", nonce="n", uri="x"', "missing 'response'"),
        (b'Digest username="u", realm="r", nonce="n", uri="x", response="0", qop=auth', "'nc' and 'cnonce'"),
        (
            b'Digest username="u", realm="r", nonce="n", uri="x", response="0", qop=auth, nc=1, cnonce="c"',
            "8 hex digits",
        ),
        (
            b'Digest username="u", username*=UTF-8\'\'u, realm="r", nonce="n", uri="x", response="0"',
            "both 'username' and 'username\\*'",
        ),
    ],
)
def test_malformed_credentials_name_the_defect(value: bytes, defect: str) -> None:
    with pytest.raises(AuthHeaderError, match=defect):
        parse_credentials(value)


def test_username_star_is_decoded() -> None:
    creds = parse_credentials(
        b'Digest username*=UTF-8\'\'J%C3%A4s%C3%B8n%20Doe, realm="r", nonce="n", uri="x", response="0"'
    )
    assert creds.username == "J\u00e4s\u00f8n Doe"


# --- build/verify round trips -----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5", "SHA-256-sess", "MD5-sess"])
def test_round_trip_ok(algorithm: str) -> None:
    nonces = NonceFactory(SECRET, lifetime=300)
    [value] = build_challenges(REALM, nonces.issue(NOW, REALM), algorithms=(algorithm,), opaque="op")
    challenge = parse_challenge(value)
    header = build_credentials(challenge, "alice", "s3cret", b"REGISTER", URI, cnonce="abc", nc=7)
    creds = parse_credentials(header)
    assert (creds.uri, creds.opaque, creds.nc) == (URI, "op", "00000007")
    result = verify(creds, b"REGISTER", account("alice", REALM, "s3cret"), nonces, NOW + 10, REALM)
    assert result.outcome is AuthOutcome.OK
    assert result.ok
    assert result.nc == 7


def test_challenges_prefer_sha256() -> None:
    values = build_challenges(REALM, "n", stale=True)
    assert [parse_challenge(v).algorithm for v in values] == ["SHA-256", "MD5"]
    assert all(parse_challenge(v).stale and parse_challenge(v).qop == ("auth",) for v in values)


def credentials_for(
    nonces: NonceFactory, password: str = "s3cret", issued: float = NOW, algorithm: str = "SHA-256"
) -> Credentials:
    [value] = build_challenges(REALM, nonces.issue(issued, REALM), algorithms=(algorithm,))
    return parse_credentials(
        build_credentials(parse_challenge(value), "alice", password, "INVITE", URI, "cn")
    )


def test_wrong_password_fails() -> None:
    nonces = NonceFactory(SECRET, lifetime=300)
    result = verify(
        credentials_for(nonces, "guess"), "INVITE", account("alice", REALM, "s3cret"), nonces, NOW, REALM
    )
    assert result.outcome is AuthOutcome.FAIL


def test_unknown_user_is_indistinguishable_from_wrong_password() -> None:
    nonces = NonceFactory(SECRET, lifetime=300)
    creds = credentials_for(nonces, "guess")
    wrong = verify(creds, "INVITE", account("alice", REALM, "s3cret"), nonces, NOW, REALM)
    unknown = verify(creds, "INVITE", None, nonces, NOW, REALM)
    assert unknown == wrong
    assert unknown.outcome is AuthOutcome.FAIL


def test_unknown_user_fails_even_with_the_dummy_secret_guessed() -> None:
    # A response computed against whatever HA1 the dummy is must still fail for a missing account.
    nonces = NonceFactory(SECRET, lifetime=300)
    creds = credentials_for(nonces)
    forged = digest_response(
        "SHA-256",
        auth._DUMMY_HA1["SHA-256"],
        creds.nonce,
        "INVITE",
        creds.uri,
        qop="auth",
        nc=creds.nc,
        cnonce=creds.cnonce,
    )
    assert (
        auth.verify(creds.replace(response=forged), "INVITE", None, nonces, NOW, REALM).outcome
        is AuthOutcome.FAIL
    )


def test_expired_nonce_with_right_password_is_stale() -> None:
    nonces = NonceFactory(SECRET, lifetime=300)
    creds = credentials_for(nonces, issued=NOW - 301)
    result = verify(creds, "INVITE", account("alice", REALM, "s3cret"), nonces, NOW, REALM)
    assert result.outcome is AuthOutcome.STALE


def test_expired_nonce_with_wrong_password_fails() -> None:
    nonces = NonceFactory(SECRET, lifetime=300)
    creds = credentials_for(nonces, "guess", issued=NOW - 301)
    assert (
        verify(creds, "INVITE", account("alice", REALM, "s3cret"), nonces, NOW, REALM).outcome
        is AuthOutcome.FAIL
    )


def test_nonce_from_another_secret_fails() -> None:
    ours = NonceFactory(SECRET, lifetime=300)
    theirs = NonceFactory(b"another-secret-of-16+bytes", lifetime=300)
    creds = credentials_for(theirs)
    assert ours.check(creds.nonce, NOW, REALM) is NonceStatus.INVALID
    assert (
        verify(creds, "INVITE", account("alice", REALM, "s3cret"), ours, NOW, REALM).outcome
        is AuthOutcome.FAIL
    )


def test_nonce_issued_by_node_a_verifies_on_node_b() -> None:
    node_a = NonceFactory(SECRET, lifetime=300)
    node_b = NonceFactory(SECRET, lifetime=300)
    creds = credentials_for(node_a)
    assert verify(creds, "INVITE", account("alice", REALM, "s3cret"), node_b, NOW + 5, REALM).ok


def test_wrong_method_or_realm_fails() -> None:
    nonces = NonceFactory(SECRET, lifetime=300)
    creds = credentials_for(nonces)
    ha1s = account("alice", REALM, "s3cret")
    assert verify(creds, "BYE", ha1s, nonces, NOW, REALM).outcome is AuthOutcome.FAIL
    assert verify(creds, "INVITE", ha1s, nonces, NOW, "other.example.com").outcome is AuthOutcome.FAIL


def test_auth_int_and_unsupported_algorithms_fail() -> None:
    nonces = NonceFactory(SECRET, lifetime=300)
    base = credentials_for(nonces)
    ha1s = account("alice", REALM, "s3cret")
    auth_int = base.replace(qop="auth-int")
    assert verify(auth_int, "INVITE", ha1s, nonces, NOW, REALM).outcome is AuthOutcome.FAIL
    sha512 = base.replace(algorithm="SHA-512-256")
    assert verify(sha512, "INVITE", ha1s, nonces, NOW, REALM).outcome is AuthOutcome.FAIL


def test_rfc2069_only_when_allowed() -> None:
    nonces = NonceFactory(SECRET, lifetime=300)
    challenge = Challenge(realm=REALM, nonce=nonces.issue(NOW, REALM))  # no qop offered
    creds = parse_credentials(build_credentials(challenge, "alice", "s3cret", "INVITE", URI, "cn"))
    assert creds.qop is None
    ha1s = account("alice", REALM, "s3cret")
    assert verify(creds, "INVITE", ha1s, nonces, NOW, REALM).outcome is AuthOutcome.FAIL
    assert verify(creds, "INVITE", ha1s, nonces, NOW, REALM, allow_rfc2069=True).ok


def test_client_refuses_auth_int_only_challenge() -> None:
    challenge = parse_challenge(b'Digest realm="r", nonce="n", qop="auth-int"')
    with pytest.raises(ValueError, match="no supported qop"):
        build_credentials(challenge, "u", "p", "INVITE", URI, "cn")


# --- nonces -----------------------------------------------------------------------------------


def test_nonce_lifecycle() -> None:
    nonces = NonceFactory(SECRET, lifetime=60, random=fixed_random)
    nonce = nonces.issue(NOW, REALM)
    assert len(nonce) == 43
    assert nonces.check(nonce, NOW, REALM) is NonceStatus.VALID
    assert nonces.check(nonce, NOW + 60, REALM) is NonceStatus.VALID
    assert nonces.check(nonce, NOW + 61, REALM) is NonceStatus.STALE
    assert nonces.check(nonce, NOW, "other-realm") is NonceStatus.INVALID
    assert nonces.check(nonce, NOW - 3600, REALM) is NonceStatus.INVALID  # from the far future


def test_a_nonce_issued_to_a_client_is_good_from_its_address_only() -> None:
    nonces = NonceFactory(SECRET, lifetime=60)
    nonce = nonces.issue(NOW, REALM, "192.0.2.10")
    assert nonces.check(nonce, NOW, REALM, "192.0.2.10") is NonceStatus.VALID
    assert nonces.check(nonce, NOW + 61, REALM, "192.0.2.10") is NonceStatus.STALE
    for other in ("192.0.2.11", "", "2001:db8::10", "192.0.2.1"):
        assert nonces.check(nonce, NOW, REALM, other) is NonceStatus.INVALID
    # nor can the realm and the address be traded against each other
    assert nonces.check(nonces.issue(NOW, "a", "b"), NOW, "b", "a") is NonceStatus.INVALID
    assert nonces.check(nonces.issue(NOW, "ab", "c"), NOW, "a", "bc") is NonceStatus.INVALID


def test_nonce_rotation_accepts_old_secret() -> None:
    old = NonceFactory(SECRET, lifetime=60)
    rotated = NonceFactory(b"the-new-cluster-secret", lifetime=60, old_secrets=[SECRET])
    assert rotated.check(old.issue(NOW, REALM), NOW, REALM) is NonceStatus.VALID


@pytest.mark.parametrize("garbage", ["", "x" * 43, "!" * 43, "\u00e9" * 43, "AAAA", "A" * 44])
def test_garbled_nonces_are_invalid(garbage: str) -> None:
    assert NonceFactory(SECRET, lifetime=60).check(garbage, NOW, REALM) is NonceStatus.INVALID


def test_every_tampered_nonce_character_is_invalid() -> None:
    nonces = NonceFactory(SECRET, lifetime=60)
    nonce = nonces.issue(NOW, REALM)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, original in enumerate(nonce):
        for replacement in alphabet:
            if replacement != original:
                tampered = nonce[:i] + replacement + nonce[i + 1 :]
                assert nonces.check(tampered, NOW, REALM) is NonceStatus.INVALID, (i, replacement)


# --- properties -------------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_parse_credentials_raises_only_auth_header_error(data: bytes) -> None:
    for prefix in (b"", b"Digest ", b'Digest username="u", '):
        try:
            parse_credentials(prefix + data)
        except AuthHeaderError:
            pass
        try:
            parse_challenge(prefix + data)
        except AuthHeaderError:
            pass


_printable_param = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
    max_size=40,
)


@given(user=_printable_param, realm=_printable_param, uri=_printable_param, opaque=_printable_param)
def test_build_then_parse_round_trips(user: str, realm: str, uri: str, opaque: str) -> None:
    challenge = Challenge(realm=realm, nonce="n-0", qop=("auth",), opaque=opaque)
    creds = parse_credentials(build_credentials(challenge, user, "pw", "REGISTER", uri, cnonce='c"\\'))
    assert (creds.username, creds.realm, creds.uri, creds.opaque) == (user, realm, uri, opaque)
    assert creds.cnonce == 'c"\\'
    assert creds.response == digest_response(
        "MD5", ha1("MD5", user, realm, "pw"), "n-0", "REGISTER", uri, qop="auth", nc="00000001", cnonce='c"\\'
    )


@given(realm=_printable_param, nonce=_printable_param, opaque=_printable_param)
def test_build_challenges_then_parse_round_trips(realm: str, nonce: str, opaque: str) -> None:
    for value in build_challenges(realm, nonce, opaque=opaque):
        challenge = parse_challenge(value)
        assert (challenge.realm, challenge.nonce, challenge.opaque) == (realm, nonce, opaque)


@given(
    realm=_printable_param,
    algorithms=st.lists(st.sampled_from(["MD5", "SHA-256", "md5-sess", "SHA-256-sess"]), min_size=1, max_size=3),
    stale=st.booleans(),
)
def test_challenge_templates_are_build_challenges_cut_around_the_nonce(
    realm: str, algorithms: list[str], stale: bool
) -> None:
    nonce = NonceFactory(b"k" * 32, 300.0).issue(NOW, "r")  # base64url, as a node's nonces
    templates = auth.challenge_templates(realm, algorithms, stale=stale)
    expected = build_challenges(realm, nonce, algorithms, stale=stale)
    assert [before + nonce.encode() + after for before, after in templates] == expected


# --- the hand-written traffic vectors carry working Digest values -----------------------------

VECTORS = Path(__file__).parent / "vectors"


def header_values(message: bytes, name: bytes) -> list[bytes]:
    head = message.partition(b"\r\n\r\n")[0]
    prefix = name.lower() + b":"
    return [line[len(prefix) :].strip() for line in head.split(b"\r\n") if line.lower().startswith(prefix)]


def test_typical_register_vectors_authenticate() -> None:
    nonces = NonceFactory(b"sipfarm-test-vector-secret", lifetime=300)
    challenges = [
        parse_challenge(v)
        for v in header_values(
            (VECTORS / "typical" / "unauthorized_401.sip").read_bytes(), b"WWW-Authenticate"
        )
    ]
    assert [c.algorithm for c in challenges] == ["SHA-256", "MD5"]
    [value] = header_values((VECTORS / "typical" / "register_pjsip_auth.sip").read_bytes(), b"Authorization")
    creds = parse_credentials(value)
    assert creds.nonce == challenges[0].nonce
    ha1s = account("alice", "sip.example.com", "alice-secret")
    assert verify(creds, b"REGISTER", ha1s, nonces, 1_700_000_010.0, "sip.example.com").ok
    assert (
        verify(creds, b"REGISTER", ha1s, nonces, 1_700_000_301.0, "sip.example.com").outcome
        is AuthOutcome.STALE
    )


def test_rfc4475_regaut01_authorization_is_an_unknown_scheme() -> None:
    [value] = header_values((VECTORS / "rfc4475" / "regaut01.sip").read_bytes(), b"Authorization")
    with pytest.raises(UnsupportedSchemeError):
        parse_credentials(value)


@pytest.mark.parametrize(
    ("digest_uri", "request_uri", "same"),
    [
        ("sip:bob@farm.test", b"sip:bob@farm.test", True),
        ("sip:bob@farm.test", b"sip:bob@farm.test;user=phone", True),  # parameters aside
        ("sip:bob@10.0.0.1:5060", b"sip:bob@farm.test", True),  # another way of writing the host
        ("sip:127.0.0.1:5060", b"sip:farm.test", True),  # SIPp: the server's address for any request
        ("sip:127.0.0.1:5060", b"sip:bob@farm.test", True),  # no user: names no other callee
        ("sip:b%6Fb@farm.test", b"sip:bob@farm.test", True),  # escapes resolved
        ("sip:bob@farm.test", b"sip:1900premium@farm.test", False),
        ("sip:alice@farm.test", b"sip:farm.test", True),  # a REGISTER's Request-URI routes to no user
        ("sips:bob@farm.test", b"sip:bob@farm.test", True),  # the scheme is the transport's business
        ("tel:+15551234", b"tel:+15551234", True),
        ("tel:+15551234", b"tel:+15559999", False),
        ("not a uri", b"sip:bob@farm.test", False),
    ],
)
def test_same_resource(digest_uri: str, request_uri: bytes, same: bool) -> None:
    assert auth.same_resource(digest_uri, request_uri) is same
