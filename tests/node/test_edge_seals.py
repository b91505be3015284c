"""Flow-token seals (sipfarm.edge): a dialog's seal is remembered for its ACK and BYE, bounded."""

from __future__ import annotations

import hashlib
import hmac

from sipfarm.edge import DIALOG_SEALS_LIMIT, FlowTokens
from sipfarm.sip.memo import MAX_CACHED_KEY

SECRET = b"edge-seal-secret-0123456789abcdef"


def _computed(host: str, port: int, call_id: bytes) -> str:
    key = hmac.digest(SECRET, b"sipfarm uri seal", "sha256")[:32]
    return hashlib.blake2b(b"%s:%d|%s" % (host.encode(), port, call_id), key=key, digest_size=10).hexdigest()


def test_a_remembered_dialog_seal_is_the_computed_one_and_checks_the_same() -> None:
    tokens = FlowTokens(SECRET)
    first = tokens.seal("10.0.0.1", 5060, b"call-1")
    assert first == _computed("10.0.0.1", 5060, b"call-1")
    assert tokens.seal("10.0.0.1", 5060, b"call-1") == first  # from memory
    assert tokens.seal_matches(first.upper(), "10.0.0.1", 5060, b"call-1")
    assert not tokens.seal_matches(first, "10.0.0.1", 5060, b"call-2")  # another dialog
    assert not tokens.seal_matches(first, "10.0.0.1", 5061, b"call-1")
    assert tokens.seal("10.0.0.1", 5060) != first  # an element seal is not a dialog's


def test_dialog_seals_stay_bounded_whatever_call_ids_arrive() -> None:
    tokens = FlowTokens(SECRET)
    for i in range(3 * DIALOG_SEALS_LIMIT):
        call_id = b"flood-%d" % i
        assert tokens.seal("10.0.0.1", 5060, call_id) == _computed("10.0.0.1", 5060, call_id)
    assert len(tokens._dialog_seals) <= DIALOG_SEALS_LIMIT


def test_a_long_call_id_or_host_is_sealed_but_not_remembered() -> None:
    tokens = FlowTokens(SECRET)
    long_id = b"x" * (MAX_CACHED_KEY + 1)
    assert tokens.seal("10.0.0.1", 5060, long_id) == _computed("10.0.0.1", 5060, long_id)
    long_host = "h" * (MAX_CACHED_KEY + 1)
    assert tokens.seal(long_host, 5060, b"c") == _computed(long_host, 5060, b"c")
    assert tokens.seal(long_host, 5060) == _computed(long_host, 5060, b"")
    assert tokens._dialog_seals == {}
    assert tokens._seals == {}
