"""The temporary GRUU codec (RFC 5627 3.1.2) and GRUU Request-URIs, without a node.

A temporary GRUU decodes to what it was made of under the same farm secret and domain, and to
nothing else: altered, truncated, made up, under another secret or moved to another domain, it
raises GruuError (the proxy then answers as for a user that does not exist).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipfarm.registrar.gruu import (
    TEMP_PREFIX,
    GruuError,
    GruuTarget,
    TempGruus,
    call_id_digest,
    instance_key,
    public_gruu,
    read_gruu,
)
from sipfarm.sip.uri import SipURI, parse_uri
from sipfarm.store.location import Binding

SECRET = b"registrar-gruu-test-secret-0123456789"
UUID = "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
DOMAIN = "farm.test"
CODEC = TempGruus(SECRET)
_USER_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()"


def binding(instance: str | None, call_id: str = "reg-1", *, reg_id: int | None = None, updated: float = 0) -> Binding:
    return Binding("sip:b@10.0.0.2", 9e9, 1.0, call_id, 1, instance, reg_id, (), "", "", "n1", updated)


def test_round_trip_of_a_uuid_instance() -> None:
    user_part = CODEC.encode("bob", DOMAIN, f"<{UUID}>", "reg-1", 7)
    assert user_part.startswith(TEMP_PREFIX)
    assert set(user_part[len(TEMP_PREFIX) :]) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert len(user_part) < 70  # compact: a UUID instance packs into 16 bytes
    target = CODEC.decode(user_part, DOMAIN)
    assert (target.user, target.domain, target.instance) == ("bob", DOMAIN, f"<{UUID}>")
    assert target.call_id_digest == call_id_digest("reg-1")


def test_round_trip_of_any_other_instance() -> None:
    target = CODEC.decode(CODEC.encode("b\u00f6b", DOMAIN, "<urn:ietf:rfc:3261:x>", "c", 1), DOMAIN)
    assert (target.user, target.instance) == ("b\u00f6b", "<urn:ietf:rfc:3261:x>")


def test_an_upper_case_uuid_packs_and_compares_as_lower_case() -> None:
    target = CODEC.decode(CODEC.encode("bob", DOMAIN, f"<{UUID.upper()}>", "c", 1), DOMAIN)
    assert instance_key(target.instance) == UUID


def test_each_serial_gives_another_temporary_gruu_naming_the_same_device() -> None:
    first, second = (CODEC.encode("bob", DOMAIN, f"<{UUID}>", "reg-1", n) for n in (1, 2))
    assert first != second
    assert CODEC.decode(first, DOMAIN) == CODEC.decode(second, DOMAIN)


def test_the_decoder_ignores_case() -> None:
    user_part = CODEC.encode("bob", DOMAIN, f"<{UUID}>", "reg-1", 1)
    assert CODEC.decode(user_part.upper().replace("TGRUU.", "tgruu."), DOMAIN).user == "bob"


def test_every_altered_character_is_detected() -> None:
    user_part = CODEC.encode("bob", DOMAIN, f"<{UUID}>", "reg-1", 1)
    for i in range(len(TEMP_PREFIX), len(user_part)):
        for c in "a7bq":
            if user_part[i] != c:
                with pytest.raises(GruuError):
                    CODEC.decode(user_part[:i] + c + user_part[i + 1 :], DOMAIN)


def test_truncated_or_extended_is_detected() -> None:
    user_part = CODEC.encode("bob", DOMAIN, f"<{UUID}>", "reg-1", 1)
    for end in range(len(TEMP_PREFIX), len(user_part)):
        with pytest.raises(GruuError):
            CODEC.decode(user_part[:end], DOMAIN)
    with pytest.raises(GruuError):
        CODEC.decode(user_part + "aa", DOMAIN)


def test_another_secret_or_domain_does_not_decode() -> None:
    user_part = CODEC.encode("bob", DOMAIN, f"<{UUID}>", "reg-1", 1)
    with pytest.raises(GruuError):
        TempGruus(b"another-secret-of-the-same-size-xxxxx").decode(user_part, DOMAIN)
    with pytest.raises(GruuError):
        CODEC.decode(user_part, "other.test")


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        TempGruus(b"short")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_random_strings_never_decode(text: str) -> None:
    for candidate in (text, TEMP_PREFIX + text):
        with pytest.raises(GruuError):
            CODEC.decode(candidate, DOMAIN)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=80))
def test_random_base32_never_decodes(raw: bytes) -> None:
    import base64  # noqa: PLC0415

    text = base64.b32encode(raw).decode().rstrip("=").lower()
    with pytest.raises(GruuError):
        CODEC.decode(TEMP_PREFIX + text, DOMAIN)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=_USER_CHARS, min_size=1, max_size=40),
    st.one_of(st.uuids().map(lambda u: f"<urn:uuid:{u}>"), st.text(min_size=1, max_size=60)),
    st.text(min_size=1, max_size=60),
    st.integers(min_value=0, max_value=2**40),
)
def test_round_trip_property(user: str, instance: str, call_id: str, serial: int) -> None:
    target = CODEC.decode(CODEC.encode(user, DOMAIN, instance, call_id, serial), DOMAIN)
    assert target.user == user
    assert instance_key(target.instance) == instance_key(instance)
    assert target.call_id_digest == call_id_digest(call_id)


# -- Request-URIs --------------------------------------------------------------------------------


def _sip(text: str) -> SipURI:
    uri = parse_uri(text)
    assert isinstance(uri, SipURI)
    return uri


def test_a_public_gruu_is_the_aor_with_the_instance_in_gr() -> None:
    pub = public_gruu("bob", DOMAIN, f"<{UUID}>")
    assert pub == f"sip:bob@{DOMAIN};gr={UUID}"
    target = read_gruu(_sip(pub), CODEC)
    assert target == GruuTarget("bob", DOMAIN, f"<{UUID}>")


def test_a_temporary_gruu_uri_reads_back() -> None:
    uri = CODEC.uri("bob", DOMAIN, f"<{UUID}>", "reg-1", 3)
    target = read_gruu(_sip(uri), CODEC)
    assert target is not None
    assert (target.aor, target.instance) == (f"bob@{DOMAIN}", f"<{UUID}>")


def test_a_uri_without_gr_is_no_gruu() -> None:
    assert read_gruu(_sip(f"sip:bob@{DOMAIN};grid=1"), CODEC) is None


def test_a_forged_temporary_gruu_uri_raises() -> None:
    with pytest.raises(GruuError):
        read_gruu(_sip(f"sip:bob@{DOMAIN};gr"), CODEC)


def test_select_keeps_the_instances_newest_binding_only() -> None:
    other = binding("<urn:uuid:00000000-0000-0000-0000-000000000000>")
    newest = binding(f"<{UUID}>", reg_id=2, updated=5)
    older = binding(f"<{UUID}>", reg_id=1, updated=1)
    target = GruuTarget("bob", DOMAIN, f"<{UUID.upper()}>")
    assert target.select([other, newest, older]) == [newest]


def test_select_of_a_temporary_gruu_needs_the_registrations_call_id() -> None:
    target = GruuTarget("bob", DOMAIN, f"<{UUID}>", call_id_digest("reg-1"))
    assert target.select([binding(f"<{UUID}>", "reg-1")]) != []
    assert target.select([binding(f"<{UUID}>", "rebooted")]) == []
    assert target.select([binding(None)]) == []
