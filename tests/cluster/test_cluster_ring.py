"""HashRing: even spread, minimal movement, failover order, determinism."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from sipfarm.cluster import HashRing, ring_hash

KEYS = [f"{i}-a84b4c76e66710@pc33.atlanta.example.com".encode() for i in range(10_000)]
MEMBERS = ["node-1", "node-2", "node-3"]


def owners(ring: HashRing) -> list[str]:
    return [ring.lookup(k) for k in KEYS]


@pytest.mark.parametrize("vnodes", [64, 128, 160])
def test_distribution_is_roughly_even(vnodes: int) -> None:
    counts = Counter(owners(HashRing(MEMBERS, vnodes)))
    fair = len(KEYS) / len(MEMBERS)
    assert set(counts) == set(MEMBERS)
    for member, n in counts.items():
        assert abs(n - fair) / fair <= 0.25, (member, counts)


def test_sequential_keys_spread_too() -> None:
    ring = HashRing(MEMBERS)
    counts = Counter(ring.lookup(f"user{i}@example.com".encode()) for i in range(10_000))
    assert all(abs(n - 10_000 / 3) / (10_000 / 3) <= 0.25 for n in counts.values()), counts


def test_removing_a_member_moves_only_its_keys() -> None:
    ring = HashRing(MEMBERS)
    before = owners(ring)
    after = owners(ring.without_member("node-2"))
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(b == "node-2" for b, _ in moved)  # nobody else's keys move
    assert len(moved) == before.count("node-2")
    assert 0.25 <= len(moved) / len(KEYS) <= 0.42  # ~1/3


def test_adding_a_member_moves_about_one_nth_to_it() -> None:
    ring = HashRing(MEMBERS)
    before = owners(ring)
    after = owners(ring.with_member("node-4"))
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == "node-4" for _, a in moved)  # keys move only to the newcomer
    assert 0.18 <= len(moved) / len(KEYS) <= 0.32  # ~1/4


def test_lookup_n_is_failover_order() -> None:
    ring = HashRing(MEMBERS)
    for key in KEYS[:500]:
        order = ring.lookup_n(key, 3)
        assert order[0] == ring.lookup(key)
        assert sorted(order) == sorted(MEMBERS)
        assert ring.lookup_n(key, 2) == order[:2]
        assert ring.lookup_n(key, 10) == order
        # when the owner leaves, its keys go to their second choice
        assert ring.without_member(order[0]).lookup(key) == order[1]
    assert ring.lookup_n(KEYS[0], 0) == []


def test_same_members_same_ring_in_every_process() -> None:
    a = HashRing(["node-3", "node-1", "node-2", "node-1"])
    b = HashRing(iter(MEMBERS))
    assert owners(a) == owners(b)
    assert a.members == tuple(MEMBERS) and len(a) == 3 and "node-2" in a


def test_pinned_hash_values() -> None:
    # Balancers of different versions in one farm must agree: a change of the hash or of the
    # point naming would remap every key (every dialog's node) during a rolling upgrade.
    assert ring_hash(b"") == 16476032584258269876
    ring = HashRing(MEMBERS)
    keys = (b"", b"call-1", b"alice@example.com", b"bob", b"carol")
    assert [ring.lookup(k) for k in keys] == ["node-2", "node-2", "node-2", "node-1", "node-2"]
    assert ring.lookup_n(b"call-1", 3) == ["node-2", "node-1", "node-3"]


def test_weights_scale_share() -> None:
    ring = HashRing(MEMBERS, weights={"node-1": 2.0})
    counts = Counter(owners(ring))
    assert counts["node-1"] > 1.5 * counts["node-2"]
    assert ring.weight("node-1") == 2.0
    assert ring.without_member("node-3").weight("node-1") == 2.0  # kept across rebuilds
    assert "node-3" not in HashRing(MEMBERS, weights={"node-3": 0.0}).lookup_n(KEYS[0], 3)


def test_empty_ring_and_bad_arguments() -> None:
    ring = HashRing([])
    assert not ring and len(ring) == 0
    with pytest.raises(LookupError):
        ring.lookup(b"x")
    assert ring.lookup_n(b"x", 2) == []
    with pytest.raises(ValueError):
        HashRing(MEMBERS, vnodes=0)
    with pytest.raises(ValueError):
        HashRing(MEMBERS, weights={"node-1": -1.0})


def test_lookup_is_fast() -> None:
    ring = HashRing([f"node-{i}" for i in range(20)])
    # CPU time, not wall time: the claim is the cost of a lookup, and a loaded machine that
    # deschedules this process for a while must not count against it
    t0 = time.process_time()
    for k in KEYS:
        ring.lookup(k)
    per_key = (time.process_time() - t0) / len(KEYS)
    assert per_key < 20e-6  # generous for slow CI; ~1 us here
