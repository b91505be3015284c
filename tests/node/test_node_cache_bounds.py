"""The node's caches keyed by names off the wire (next-hop hosts, routing-helper queries)
hold short values only: a long one is answered right, and not remembered."""

from __future__ import annotations

from sipfarm.proxy.relay_media import MAX_WEBRTC_TAGS, _Call, _mark_webrtc
from sipfarm.routing.helpers import AnswerCache, HelperAction, HelperAnswer
from sipfarm.transport.resolver import MAX_NAME, Resolver

LONG = 1536  # over memo.MAX_CACHED_KEY (512), under the parser's bounds (headers.MAX_VIA_PARM 2 KB)


def test_a_host_name_longer_than_dns_allows_is_unresolvable_at_once_and_not_cached():
    looked_up: list[str] = []

    async def lookup(host: str) -> list[tuple[int, int, int, str, tuple[object, ...]]]:
        looked_up.append(host)
        return []

    resolver = Resolver(lookup=lookup)
    answers: list[str | None] = []
    for i in range(300):
        host = f"h{i}." + "a" * LONG
        assert resolver.cached(host) == ""
        resolver.resolve(host, answers.append)  # answered at once: no loop, no task
    assert answers == [None] * 300
    assert looked_up == [] and len(resolver._cache) == 0 and len(resolver._waiting) == 0
    assert resolver.cached("a" * MAX_NAME) is None  # a name DNS allows is looked up as before


def test_helper_answers_for_long_queries_are_not_kept():
    cache = AnswerCache(ttl=60.0, size=100)
    answer = HelperAnswer(HelperAction.LOCAL)
    for i in range(300):
        cache.put((f"u{i}" + "x" * LONG, "farm.test"), answer, 0.0)
    assert len(cache) == 0
    cache.put(("alice", "farm.test"), answer, 0.0)
    assert cache.get(("alice", "farm.test"), 1.0) == answer


def test_a_call_notes_a_bounded_number_of_browser_tags_in_bounded_bytes():
    call = _Call(None)
    for i in range(1000):
        _mark_webrtc(call, b"%d-" % i + b"t" * LONG)
    assert len(call.webrtc) == MAX_WEBRTC_TAGS
    assert all(len(tag) <= 17 for tag in call.webrtc)
