"""External routing helpers: what a caller of RoutingHelper.ask sees from good and bad helpers.

The helper programs are written by the tests into tmp_path (one script, its behaviour chosen by
its arguments); the HTTP helper is an asyncio server on a free loopback port.  Every helper is
closed at the end of its test, and the tests that start children check they are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipfarm.routing.helpers import (
    MAX_TARGETS,
    Admission,
    AnswerCache,
    BreakerError,
    BreakerInput,
    BreakerState,
    CircuitBreaker,
    HelperAction,
    HelperAnswer,
    HelperAnswerError,
    HelperConfig,
    RoutingHelper,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "route_helper.py"
DEFAULT = {"action": "reject", "status": 503, "reason": "helper down"}
DEFAULT_ANSWER = HelperAnswer.from_dict(DEFAULT)

# One helper program; argv: mode, pid directory, mode argument.  It records its pid on start.
PROGRAM = r"""
import json, os, sys, time
mode, piddir, arg = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "0")
open(os.path.join(piddir, str(os.getpid())), "w").close()
count = 0
for line in sys.stdin:
    query = json.loads(line)
    callee = query.get("callee", "")
    user = callee.partition(":")[2].partition("@")[0]
    count += 1
    if mode == "hang" or (mode == "mixed" and "hang" in user):
        continue
    if mode == "crash" and count > int(arg):
        sys.exit(3)
    if mode == "garbage" or (mode == "mixed" and "bad" in user):
        out = "this is not json"
    elif mode == "long":
        out = json.dumps({"action": "forward", "uri": "sip:" + "x" * 70000 + "@gw.test"})
    else:
        if mode == "slow":
            time.sleep(float(arg))
        out = json.dumps({"action": "forward", "uri": "sip:%s@gw.test;n=%d" % (user, count)})
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
"""


@pytest.fixture
def program(tmp_path: Path):
    """argv for the test helper in ``mode``; the pids it started are files in tmp_path/pids."""
    script = tmp_path / "helper.py"
    script.write_text(PROGRAM)
    piddir = tmp_path / "pids"
    piddir.mkdir()

    def argv(mode: str, arg: str = "0") -> list[str]:
        return [sys.executable, str(script), mode, str(piddir), arg]

    argv.piddir = piddir  # type: ignore[attr-defined]
    return argv


def pids(piddir: Path) -> list[int]:
    return sorted(int(p.name) for p in piddir.iterdir())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.asynccontextmanager
async def running(**config: object) -> AsyncIterator[RoutingHelper]:
    config.setdefault("default", DEFAULT)
    helper = RoutingHelper(HelperConfig.from_dict(config))
    helper.start()
    try:
        yield helper
    finally:
        await helper.aclose()


#: the order answers arrive in, across all Asked (``Asked.seq``)
_ANSWER_ORDER = itertools.count()


class Asked:
    """One ask(): the answer, how long it took, whether it came inside ask(), how many calls,
    and ``seq``: its place among all the answers of the test (which came first, whatever the
    wall-clock time a loaded machine adds)."""

    def __init__(self, helper: RoutingHelper, query: dict[str, str]) -> None:
        self.loop = asyncio.get_running_loop()
        self.calls: list[HelperAnswer] = []
        self.future: asyncio.Future[HelperAnswer] = self.loop.create_future()
        self.started = self.loop.time()
        self.elapsed = -1.0
        self.seq = -1
        helper.ask(query, self._callback)
        self.synchronous = bool(self.calls)

    def _callback(self, answer: HelperAnswer) -> None:
        self.calls.append(answer)
        if not self.future.done():
            self.elapsed = self.loop.time() - self.started
            self.seq = next(_ANSWER_ORDER)
            self.future.set_result(answer)

    async def answer(self, within: float = 5.0) -> HelperAnswer:
        return await asyncio.wait_for(asyncio.shield(self.future), within)


async def ask(helper: RoutingHelper, callee: str, **extra: str) -> Asked:
    asked = Asked(helper, {"method": "INVITE", "callee": callee, "caller": "sip:alice@farm.test", **extra})
    await asked.answer()
    return asked


async def eventually(condition, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# --- answers and configuration -------------------------------------------------------------


def test_each_action_parses():
    assert HelperAnswer.from_json(b'{"action": "local"}\n').action is HelperAction.LOCAL
    fwd = HelperAnswer.from_json('{"action": "forward", "uri": "sip:+15551234@127.0.0.1:15090"}')
    assert (fwd.action, fwd.uri) == ("forward", "sip:+15551234@127.0.0.1:15090")
    alias = HelperAnswer.from_dict({"action": "alias", "targets": ["sip:a@farm.test", "sips:b@farm.test"]})
    assert alias.targets == ("sip:a@farm.test", "sips:b@farm.test")
    redirect = HelperAnswer.from_dict({"action": "redirect", "uri": "sip:bob@elsewhere.test"})
    assert (redirect.status, redirect.uri) == (302, "sip:bob@elsewhere.test")
    reject = HelperAnswer.from_dict({"action": "reject", "status": 403, "reason": "Barred"})
    assert (reject.status, reject.reason) == (403, "Barred")
    assert HelperAnswer.from_dict(reject.to_dict()) == reject


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "",
        "[]",
        '"local"',
        "{}",
        '{"action": 1}',
        '{"action": "route"}',
        '{"action": "forward"}',
        '{"action": "forward", "uri": ""}',
        '{"action": "forward", "uri": "tel:+15551234"}',
        '{"action": "forward", "uri": "http://gw.test/"}',
        '{"action": "forward", "uri": "sip:a b@gw.test"}',
        '{"action": "forward", "uri": "sip:%s@gw.test"}' % ("x" * 600),
        '{"action": "forward", "uri": ["sip:gw.test"]}',
        '{"action": "local", "uri": "sip:gw.test"}',
        '{"action": "local", "ttl": 5}',
        '{"action": "reject"}',
        '{"action": "reject", "status": 200}',
        '{"action": "reject", "status": 700}',
        '{"action": "reject", "status": 302}',
        '{"action": "reject", "status": "403"}',
        '{"action": "reject", "status": true}',
        '{"action": "reject", "status": 403.0}',
        '{"action": "reject", "status": 403, "reason": "a\\r\\nVia: x"}',
        '{"action": "reject", "status": 403, "reason": "%s"}' % ("r" * 513),
        '{"action": "redirect", "uri": "sip:b@x.test", "status": 404}',
        '{"action": "alias", "targets": []}',
        '{"action": "alias", "targets": "sip:a@farm.test"}',
        '{"action": "alias", "targets": ["sip:a@farm.test", "mailto:b@farm.test"]}',
        json.dumps({"action": "alias", "targets": [f"sip:u{i}@farm.test" for i in range(MAX_TARGETS + 1)]}),
    ],
)
def test_garbage_answers_are_refused(text: str):
    with pytest.raises(HelperAnswerError):
        HelperAnswer.from_json(text)


def test_config_from_dict():
    config = HelperConfig.from_dict({"program": ["python3", "x.py"], "pool": 3, "cache_key": ["callee"]})
    assert (config.program, config.pool, config.cache_key, config.timeout) == (("python3", "x.py"), 3, ("callee",), 0.5)
    assert (config.cache_ttl, config.cache_size, config.failures, config.open_seconds) == (30.0, 10_000, 5, 10.0)
    assert config.default.action is HelperAction.LOCAL
    http = HelperConfig.from_dict({"url": "http://127.0.0.1:8080/route", "timeout": 1, "default": DEFAULT})
    assert http.default == DEFAULT_ANSWER


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({}, "'program' and 'url'"),
        ({"program": ["x"], "url": "http://h/"}, "'program' and 'url'"),
        ({"program": "x.py"}, "'program'"),
        ({"program": ["x", ""]}, "'program'"),
        ({"url": "https://h/route"}, "'url'"),
        ({"url": "http:///route"}, "'url'"),
        ({"url": "http://h:99999/"}, "'url'"),
        ({"program": ["x"], "pool": 0}, "'pool'"),
        ({"program": ["x"], "pool": True}, "'pool'"),
        ({"program": ["x"], "timeout": -1}, "'timeout'"),
        ({"program": ["x"], "timeout": float("nan")}, "'timeout'"),
        ({"program": ["x"], "cache_key": []}, "'cache_key'"),
        ({"program": ["x"], "cache_key": "callee"}, "'cache_key'"),
        ({"program": ["x"], "failures": 0}, "'failures'"),
        ({"program": ["x"], "default": {"action": "bogus"}}, "'default'"),
        ({"program": ["x"], "timout": 1}, "'timout'"),
    ],
)
def test_bad_config_names_the_key(config: dict[str, object], names: str):
    with pytest.raises(ValueError, match=names):
        HelperConfig.from_dict(config)


def test_cache_expires_and_is_bounded():
    cache = AnswerCache(ttl=30.0, size=2)
    local = HelperAnswer(HelperAction.LOCAL)
    cache.put("a", local, now=0.0)
    cache.put("b", local, now=1.0)
    assert cache.get("a", now=29.9) is local  # a is now the most recently used
    cache.put("c", local, now=2.0)  # b goes
    assert (cache.get("b", now=3.0), cache.get("a", now=3.0), len(cache)) == (None, local, 2)
    assert cache.get("a", now=30.0) is None  # expired


def test_breaker_opens_half_opens_and_closes():
    breaker = CircuitBreaker(failures=3, open_seconds=10.0)
    for _ in range(2):
        breaker.record(False, False, now=0.0)
    breaker.record(True, False, now=0.0)  # an answer resets the count
    for _ in range(3):
        assert breaker.admit(now=1.0) is Admission.ASK
        breaker.record(False, False, now=1.0)
    assert (breaker.state, breaker.opened) == (BreakerState.OPEN, 1)
    assert breaker.admit(now=10.9) is Admission.REFUSE
    assert breaker.admit(now=11.0) is Admission.TRIAL
    assert breaker.admit(now=11.0) is Admission.REFUSE  # one trial at a time
    breaker.record(True, False, now=11.1)  # a straggler from before the trip does not decide
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(False, True, now=11.2)  # the trial failed: open again
    assert (breaker.state, breaker.opened, breaker.admit(now=21.1)) == (BreakerState.OPEN, 2, Admission.REFUSE)
    assert breaker.admit(now=21.2) is Admission.TRIAL
    breaker.record(True, True, now=21.3)
    assert (breaker.state, breaker.consecutive) == (BreakerState.CLOSED, 0)


@pytest.mark.parametrize("state", list(BreakerState))
@pytest.mark.parametrize("event", list(BreakerInput))
def test_breaker_refuses_pairs_outside_its_table(state: BreakerState, event: BreakerInput):
    breaker = CircuitBreaker(failures=1, open_seconds=1.0)
    breaker.state = state
    try:
        after = breaker._step(event)
    except BreakerError:
        assert breaker.state is state
    else:
        assert after in BreakerState


# --- program helpers -----------------------------------------------------------------------


async def test_example_helper_routes_concurrent_queries(program):
    async with running(program=[sys.executable, str(EXAMPLE)], pool=2, timeout=5) as helper:
        callees = [f"sip:+1555000{i}@farm.test" for i in range(10)] + [f"sip:user{i}@farm.test" for i in range(10)]
        callees.append("sip:+19001234@farm.test")
        asked = [Asked(helper, {"callee": c, "caller": "sip:alice@farm.test"}) for c in callees]
        assert not any(a.synchronous for a in asked)  # a helper's answer never comes inside ask()
        answers = [await a.answer() for a in asked]
        for callee, answer in zip(callees[:10], answers[:10], strict=True):
            user = callee[4:].partition("@")[0]
            assert answer == HelperAnswer(HelperAction.FORWARD, uri=f"sip:{user}@127.0.0.1:15090")
        assert all(a.action is HelperAction.LOCAL for a in answers[10:20])
        assert (answers[20].action, answers[20].status) == (HelperAction.REJECT, 403)
        assert (helper.asked, helper.answered, helper.failures, helper.timeouts) == (21, 21, 0, 0)
        assert all(len(a.calls) == 1 for a in asked)


async def test_hanging_helper_gets_the_default_within_the_timeout_and_is_restarted(program):
    async with running(program=program("hang"), pool=1, timeout=0.3) as helper:
        await eventually(lambda: len(pids(program.piddir)) == 1)
        first = pids(program.piddir)[0]
        asked = await ask(helper, "sip:bob@farm.test")
        assert asked.calls == [DEFAULT_ANSWER]
        # at the timeout, not before; not never (ask() gives up at 5 s); room for a loaded machine
        assert 0.29 <= asked.elapsed < 3.0
        assert (helper.timeouts, helper.failures, helper.defaults) == (1, 0, 1)
        # the child that left its query unanswered is killed and a new one started
        await eventually(lambda: len(pids(program.piddir)) == 2 and not alive(first))
    assert not any(alive(pid) for pid in pids(program.piddir))


async def test_crashed_helper_gives_the_default_at_once_and_is_restarted(program):
    async with running(program=program("crash", "2"), pool=1, timeout=10, cache_ttl=0) as helper:
        for n in (1, 2):
            assert (await ask(helper, f"sip:u{n}@farm.test")).calls[0].uri == f"sip:u{n}@gw.test;n={n}"
        crashed = await ask(helper, "sip:u3@farm.test")
        assert crashed.calls == [DEFAULT_ANSWER]
        assert crashed.elapsed < 5.0  # the exit, not the 10 s timeout
        assert (helper.failures, helper.timeouts, helper.last_failure) == (1, 0, "crash")
        again = await ask(helper, "sip:u4@farm.test")  # a new child answers
        assert again.calls[0].uri == "sip:u4@gw.test;n=1"
        assert len(pids(program.piddir)) == 2
    assert not any(alive(pid) for pid in pids(program.piddir))


async def test_garbage_gets_the_default_and_the_child_keeps_running(program):
    async with running(program=program("garbage"), pool=1, timeout=10) as helper:
        for n in range(2):
            asked = await ask(helper, f"sip:u{n}@farm.test")
            assert asked.calls == [DEFAULT_ANSWER] and asked.elapsed < 5.0  # not the 10 s timeout
        assert (helper.failures, helper.last_failure, helper.asked) == (2, "garbage", 2)
        assert len(pids(program.piddir)) == 1  # one line per query still holds: no restart


async def test_overlong_line_gets_the_default_and_restarts_the_child(program):
    async with running(program=program("long"), pool=1, timeout=10) as helper:
        asked = await ask(helper, "sip:u@farm.test")
        assert asked.calls == [DEFAULT_ANSWER] and asked.elapsed < 5.0  # not the 10 s timeout
        assert helper.last_failure == "too_long"
        await eventually(lambda: len(pids(program.piddir)) == 2)


async def test_circuit_opens_after_k_failures_and_closes_after_t(program):
    async with running(program=program("mixed"), pool=1, timeout=3, failures=3, open_seconds=0.5) as helper:
        assert (await ask(helper, "sip:good@farm.test")).calls[0].action is HelperAction.FORWARD
        for n in range(3):
            await ask(helper, f"sip:bad{n}@farm.test")
        assert (helper.state, helper.circuit_open_count, helper.asked) == (BreakerState.OPEN, 1, 4)
        refused = Asked(helper, {"callee": "sip:good2@farm.test"})
        assert refused.synchronous and refused.calls == [DEFAULT_ANSWER]  # at once, inside ask()
        assert (helper.asked, helper.refused) == (4, 1)
        await asyncio.sleep(0.6)
        trial = Asked(helper, {"callee": "sip:bad-trial@farm.test"})
        assert not trial.synchronous and helper.state is BreakerState.HALF_OPEN
        during = Asked(helper, {"callee": "sip:good3@farm.test"})  # the trial is out: default at once
        assert during.synchronous and during.calls == [DEFAULT_ANSWER]
        assert await trial.answer() == DEFAULT_ANSWER
        assert (helper.state, helper.circuit_open_count) == (BreakerState.OPEN, 2)  # failed trial
        await asyncio.sleep(0.6)
        closing = await ask(helper, "sip:good4@farm.test")
        assert closing.calls[0].uri.startswith("sip:good4@gw.test")
        assert helper.state is BreakerState.CLOSED
        assert (await ask(helper, "sip:good5@farm.test")).calls[0].action is HelperAction.FORWARD


async def test_timeouts_open_the_circuit_too(program):
    async with running(program=program("hang"), pool=2, timeout=0.2, failures=2, open_seconds=5) as helper:
        first = [Asked(helper, {"callee": f"sip:u{n}@farm.test"}) for n in range(2)]
        for asked in first:
            assert await asked.answer() == DEFAULT_ANSWER
        assert (helper.timeouts, helper.state) == (2, BreakerState.OPEN)
        assert Asked(helper, {"callee": "sip:u9@farm.test"}).synchronous


async def test_cache_hit_avoids_a_second_ask(program):
    async with running(program=program("mixed"), pool=1, timeout=3, cache_key=["callee"], cache_ttl=0.5) as helper:
        first = await ask(helper, "sip:bob@farm.test", caller="sip:alice@farm.test")
        assert first.calls[0].uri == "sip:bob@gw.test;n=1"
        hit = Asked(helper, {"callee": "sip:bob@farm.test", "caller": "sip:carol@farm.test"})
        assert hit.synchronous and hit.calls == first.calls  # same callee: cached, caller ignored
        assert (helper.asked, helper.cache_hits) == (1, 1)
        other = await ask(helper, "sip:dave@farm.test")
        assert (other.calls[0].uri, helper.asked) == ("sip:dave@gw.test;n=2", 2)
        for _ in range(2):  # the default given after a failure is not cached
            assert (await ask(helper, "sip:bad@farm.test")).calls == [DEFAULT_ANSWER]
        assert (helper.asked, helper.cache_hits) == (4, 1)
        await asyncio.sleep(0.6)  # past the TTL: asked again
        assert (await ask(helper, "sip:bob@farm.test")).calls[0].uri == "sip:bob@gw.test;n=5"


async def test_same_key_in_flight_is_asked_once(program):
    async with running(program=program("slow", "0.3"), pool=2, timeout=3, cache_key=["callee"]) as helper:
        asked = [Asked(helper, {"callee": "sip:bob@farm.test"}) for _ in range(3)]
        answers = [await a.answer() for a in asked]
        assert answers[0] == answers[1] == answers[2] and answers[0].uri == "sip:bob@gw.test;n=1"
        assert (helper.asked, helper.coalesced) == (1, 2)


async def test_full_queue_answers_the_default_at_once(program):
    async with running(program=program("slow", "0.4"), pool=1, queue=1, timeout=4, cache_ttl=0) as helper:
        await eventually(lambda: len(pids(program.piddir)) == 1)
        asked = [Asked(helper, {"callee": f"sip:u{n}@farm.test"}) for n in range(3)]
        assert not any(a.synchronous for a in asked)
        assert await asked[2].answer() == DEFAULT_ANSWER
        assert helper.overloaded == 1
        assert (await asked[0].answer()).uri == "sip:u0@gw.test;n=1"
        assert (await asked[1].answer()).uri == "sip:u1@gw.test;n=2"
        # at once: before the slow helper answered the query ahead of it (an order, not a time)
        assert asked[2].seq < asked[0].seq < asked[1].seq
        assert helper.state is BreakerState.CLOSED


async def test_close_answers_outstanding_queries_and_kills_children(program):
    helper = RoutingHelper(HelperConfig.from_dict({"program": program("hang"), "pool": 2, "timeout": 5}))
    helper.start()
    await eventually(lambda: len(pids(program.piddir)) == 2)
    asked = Asked(helper, {"callee": "sip:bob@farm.test"})
    await asyncio.sleep(0.1)
    await helper.aclose()
    assert asked.calls == [HelperAnswer(HelperAction.LOCAL)]  # the default default: a local user
    assert not any(alive(pid) for pid in pids(program.piddir))
    late = Asked(helper, {"callee": "sip:bob@farm.test"})
    assert not late.synchronous and await late.answer() == HelperAnswer(HelperAction.LOCAL)


async def test_missing_program_gives_the_default(tmp_path: Path):
    async with running(program=[str(tmp_path / "no-such-helper")], timeout=0.2) as helper:
        asked = await ask(helper, "sip:bob@farm.test")
        assert asked.calls == [DEFAULT_ANSWER] and helper.timeouts == 1


async def test_callback_errors_do_not_reach_the_caller(program):
    async with running(program=program("good"), timeout=3, cache_key=["callee"]) as helper:
        await ask(helper, "sip:bob@farm.test")

        def explode(answer: HelperAnswer) -> None:
            raise RuntimeError("caller bug")

        helper.ask({"callee": "sip:bob@farm.test"}, explode)  # a cache hit: called inside ask()
        assert helper.callback_errors == 1


async def test_bad_query_gets_the_default_without_asking(program):
    async with running(program=program("good"), timeout=3, failures=1) as helper:
        asked = Asked(helper, {"callee": ["sip:bob@farm.test"]})  # type: ignore[dict-item]
        assert not asked.synchronous and await asked.answer() == DEFAULT_ANSWER
        assert (helper.asked, helper.failures, helper.state) == (0, 0, BreakerState.CLOSED)


# --- HTTP helper ---------------------------------------------------------------------------


class HttpHelper:
    """A keep-alive HTTP/1.1 routing service; the callee's user picks its behaviour."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[dict[str, str]] = []
        self.handlers: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                assert lines[0] == "POST /route?v=1 HTTP/1.1"
                fields = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
                query = json.loads(await reader.readexactly(int(fields["content-length"])))
                self.requests.append(query)
                user = query["callee"].partition(":")[2].partition("@")[0]
                status, body, extra = 200, json.dumps({"action": "forward", "uri": f"sip:{user}@gw.test"}), ""
                if user == "hang":
                    await asyncio.sleep(30)
                elif user == "err":
                    status = 500
                elif user == "bad":
                    body = "<html>"
                elif user == "close":
                    extra = "Connection: close\r\n"
                if user == "chunked":
                    data = body.encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, data[:5], len(data) - 5, data[5:])
                    )
                else:
                    writer.write(
                        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}"
                        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
                    )
                await writer.drain()
                if extra:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly (asyncio logs a cancelled handler)
            pass
        finally:
            writer.close()
            self.handlers.discard(task)


async def test_http_helper():
    server = HttpHelper()
    await server.start()
    url = f"http://127.0.0.1:{server.port}/route?v=1"
    try:
        async with running(url=url, pool=2, timeout=0.4, cache_ttl=0) as helper:
            for n in range(5):
                asked = await ask(helper, f"sip:u{n}@farm.test")
                assert asked.calls == [HelperAnswer(HelperAction.FORWARD, uri=f"sip:u{n}@gw.test")]
                assert not asked.synchronous
            assert server.connections == 1  # kept alive
            assert server.requests[0] == {
                "method": "INVITE",
                "callee": "sip:u0@farm.test",
                "caller": "sip:alice@farm.test",
            }
            assert (await ask(helper, "sip:chunked@farm.test")).calls[0].uri == "sip:chunked@gw.test"
            for bad in ("err", "bad"):
                assert (await ask(helper, f"sip:{bad}@farm.test")).calls == [DEFAULT_ANSWER]
            assert helper.failures == 2
            hung = await ask(helper, "sip:hang@farm.test")
            # at the timeout, not before, and not after the server's 30 s (room for a loaded machine)
            assert hung.calls == [DEFAULT_ANSWER] and 0.39 <= hung.elapsed < 3.0 and helper.timeouts == 1
            assert (await ask(helper, "sip:close@farm.test")).calls[0].uri == "sip:close@gw.test"
            before = server.connections
            assert (await ask(helper, "sip:after@farm.test")).calls[0].uri == "sip:after@gw.test"
            assert server.connections == before + 1  # the server closed the last one: a new one
            await server.stop()
            down = await ask(helper, "sip:down@farm.test")
            assert down.calls == [DEFAULT_ANSWER]
            assert (helper.last_failure, helper.timeouts) == ("http", 1)  # refused, not timed out
    finally:
        if server.server is not None and server.server.is_serving():
            await server.stop()


async def test_http_helper_concurrent_queries_use_the_pool():
    server = HttpHelper()
    await server.start()
    try:
        async with running(url=f"http://127.0.0.1:{server.port}/route?v=1", pool=3, timeout=2) as helper:
            asked = [Asked(helper, {"callee": f"sip:u{n}@farm.test"}) for n in range(12)]
            answers = [await a.answer() for a in asked]
            assert [a.uri for a in answers] == [f"sip:u{n}@gw.test" for n in range(12)]
            assert server.connections <= 3
    finally:
        await server.stop()
