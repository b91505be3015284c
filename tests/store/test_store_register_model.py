"""register.lua against a plain-Python statement of RFC 3261 10.3 steps 6-8 (Hypothesis)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipfarm.store import ContactUpdate, LocationStore, RegisterOutcome, create_redis

MAX_CONTACTS = 2
_aors = itertools.count()


@dataclass(frozen=True)
class Request:
    contacts: tuple[tuple[str, int], ...]  # (contact, expires)
    remove_all: bool
    call_id: str
    cseq: int
    advance: float  # seconds since the previous request


requests = st.builds(
    Request,
    contacts=st.lists(
        st.tuples(st.sampled_from(["sip:1", "sip:2", "sip:3"]), st.sampled_from([0, 30, 300])), max_size=3
    ).map(tuple),
    remove_all=st.booleans(),
    call_id=st.sampled_from(["A", "B"]),
    cseq=st.integers(1, 4),
    advance=st.sampled_from([0.0, 10.0, 40.0]),
)

Model = dict[str, tuple[str, int, float]]  # contact -> (call_id, cseq, expires_at)


def model_register(bindings: Model, req: Request, now: float) -> tuple[RegisterOutcome, Model]:
    live = {c: b for c, b in bindings.items() if b[2] > now}

    def stale(c: str) -> bool:
        return c in live and live[c][0] == req.call_id and req.cseq <= live[c][1]

    if req.remove_all:
        if any(stale(c) for c in live):
            return RegisterOutcome.OUT_OF_ORDER, live
        return RegisterOutcome.OK, {}
    new = dict(live)
    added = False
    for contact, expires in req.contacts:
        if stale(contact):
            return RegisterOutcome.OUT_OF_ORDER, live
        if expires == 0:
            new.pop(contact, None)
        else:
            added |= contact not in live
            new[contact] = (req.call_id, req.cseq, now + expires)
    if added and len(new) > MAX_CONTACTS:
        return RegisterOutcome.TOO_MANY_CONTACTS, live
    return RegisterOutcome.OK, new


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(requests, min_size=1, max_size=8))
def test_register_script_follows_rfc3261_10_3(redis_url: str, reqs: list[Request]) -> None:
    aor = f"model{next(_aors)}@x"

    async def run() -> None:
        redis = create_redis(redis_url)
        store = LocationStore(redis)
        model: Model = {}
        now = 1000.0
        try:
            for req in reqs:
                now += req.advance
                result = await store.apply_register(
                    aor,
                    [] if req.remove_all else [ContactUpdate(c, e) for c, e in req.contacts],
                    remove_all=req.remove_all,
                    call_id=req.call_id,
                    cseq=req.cseq,
                    now=now,
                    max_contacts=MAX_CONTACTS,
                )
                outcome, model = model_register(model, req, now)
                assert result.outcome is outcome
                got = {b.contact: (b.call_id, b.cseq, b.expires_at) for b in result.bindings}
                assert got == model
                looked_up = {
                    b.contact: (b.call_id, b.cseq, b.expires_at) for b in await store.lookup(aor, now)
                }
                assert looked_up == model
        finally:
            await redis.aclose()

    asyncio.run(run())
