"""The node's per-call cost in process: parse, transaction layer, proxy, timers, in memory.

    PYTHONSAFEPATH=1 PYTHONPATH=build/compiled .venv/bin/python benchmarks/node_call_bench.py
    .venv/bin/python benchmarks/node_call_bench.py                  # the source tree, interpreted
    ... --calls 3000 --rounds 3 --breakdown                        # per kind of message too
    ... --memory                      # objects and bytes a call holds for its 32 s instead
    ... --ramp                        # the cyclic GC's time while the table fills instead

Runs SIPp's call (INVITE, 407, ACK; INVITE with credentials, 100, 180, 200; ACK; BYE, 200)
between phones of the in-memory test tier (``tests/node/memfarm.py``) through one
:class:`~sipfarm.node.core.NodeCore` whose store is a dict, with a fake clock advanced by
1/``--rate`` s per call, so the transaction timers fire in the proportion they do at that rate
(each call's transactions end 5 and 32 s later) and the transaction table holds 33 s of calls.
Only the node's own work is timed (``time.process_time``): what the transport does with a
datagram (parse, Via stamping, ``NodeCore.on_message``, the drain) and what its timer does
(``next_deadline``, ``handle_timer``, the drain); the phones' work is not.  The cyclic GC is
tuned as in a node process.  Prints the best round's microseconds of node CPU per call: a
change measured without the kernel, uvloop and Redis, which a loaded VM makes noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "node"))

from memfarm import DOMAIN, MemFarm

import sipfarm.sip.transaction
from sipfarm.transport.loop import tune_gc


class _Timed:
    """The node's work, summed, and per kind of input (``INVITE``, ``180 INVITE``, timers...)."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = 0.0
        self.by_kind: dict[str, list[float]] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.seconds += seconds
        entry = self.by_kind.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds

    def wrap(self, deliver: Callable[[bytes, object], None]) -> Callable[[bytes, object], None]:
        def timed(data: bytes, source: object) -> None:
            if not self.on:
                deliver(data, source)
                return
            t0 = time.process_time()
            deliver(data, source)
            spent = time.process_time() - t0
            first = data[: data.find(b"\r\n")].split(b" ")
            method = data[data.find(b"CSeq: ") :].split(b"\r\n", 1)[0].split(b" ")[-1]
            status = first[1] + b" " if data.startswith(b"SIP/") else b""
            kind = status + method
            if not status:
                # the two INVITEs and the two ACKs of a call apart
                credentials = data.find(b"\r\nProxy-Authorization:") >= 0 or data.find(b"\r\nAuthorization:") >= 0
                kind += b" (credentials)" if credentials else b""
                kind += b" (route)" if data.find(b"\r\nRoute:") >= 0 else b""
            self.add(kind.decode(), spent)

        return timed


def run(
    calls: int,
    rate: float,
    *,
    breakdown: bool = False,
    register: bool = False,
    memory: dict[str, float] | None = None,
    ramp: dict[str, float] | None = None,
) -> float:
    """Node CPU seconds per call, over ``calls`` calls after 33 s of them at ``rate``.

    ``memory``: filled with what the calls in their 32 s window hold (see :func:`held`).
    ``ramp``: the GC tuned from the start, filled with the cyclic GC's time while the table
    fills (the 33 s of warm-up: a node's first 32 s under load, and every benchmark step)."""
    if memory is not None:
        tracemalloc.start()
    gc_timer = _GcTimer()
    callers = [f"user{i}" for i in range(50)]
    farm = MemFarm(users={**{u: f"{u}-pw" for u in callers}, "bob": "bob-pw"})
    timed = _Timed()
    node, addr = farm.nodes[0], farm.node_addresses[0]
    farm.endpoints[(addr.host, addr.port)] = timed.wrap(farm.endpoints[(addr.host, addr.port)])

    def tick() -> None:
        """What the node's loop timer does as the clock moves on by one call."""
        t0 = time.process_time()
        farm.clock.mono += 1.0 / rate
        deadline = node.next_deadline()
        if deadline is not None and deadline <= farm.clock.mono:
            node.handle_timer(farm.clock.mono)
            farm._drain(node, addr)  # the glue's drain, as MemFarm.advance does
        if timed.on:
            timed.add("timers", time.process_time() - t0)

    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.answer = 200
    phones = [farm.phone(u, f"10.0.1.{i + 1}") for i, u in enumerate(callers)]
    for phone in phones:
        assert phone.register().status == 200  # type: ignore[union-attr]
    warm = int(rate * 33)  # the transaction table at its steady size (Timers J, L, M: 32 s)
    if ramp is not None:
        tune_gc()
        gc.callbacks.append(gc_timer.callback)
        ramp_start = time.process_time()
    for n in range(warm + calls):
        if n == warm:
            if ramp is not None:
                gc.callbacks.remove(gc_timer.callback)
                spent = time.process_time() - ramp_start
                ramp.update(
                    ramp_calls=warm,
                    collections=gc_timer.collections,
                    gc_ms=round(gc_timer.seconds * 1e3, 1),
                    gc_us_per_call=round(gc_timer.seconds / warm * 1e6, 1),
                    gc_share_of_process=round(gc_timer.seconds / spent, 3),
                )
            tune_gc()  # as a node process does once started
            timed.on = True
        phone = phones[n % len(phones)]
        phone.inbox.clear()
        phone.sent.clear()  # the phone looks its INVITE up there (to ACK the 407)
        farm.log.clear()
        if register:
            # a phone's refresh: REGISTER, 401, REGISTER with credentials, 200
            answer = phone.register(call_id=f"reg-{phone.user}", cseq=n + 2)
            assert answer is not None and answer.status == 200, answer
            tick()
            continue
        answer = phone.authenticated(phone.request("INVITE", f"sip:bob@{DOMAIN}"))
        assert answer is not None and answer.status == 200, answer
        phone.ack(answer)
        bye = phone.in_dialog("BYE", answer)
        phone.send(bye, phone.first_hop(bye))
        assert phone.last(method=b"BYE") is not None
        bob.inbox.clear()
        tick()
    assert not farm.stray, farm.stray[:1]
    if memory is not None:
        # the table at its steady size (the last 32 s of calls), then every timer run out:
        # the difference is what the live calls hold
        live = len(node.layer)
        full = held()
        farm.clock.mono += 40.0
        node.handle_timer(farm.clock.mono)
        farm._drain(node, addr)
        assert len(node.layer) == 0, len(node.layer)
        empty = held()
        tracemalloc.stop()
        window = rate * 32.0
        memory.update(
            transactions_per_call=round(live / window, 2),
            objects_per_call=round((full[0] - empty[0]) / window, 1),
            bytes_per_call=round((full[1] - empty[1]) / window),
        )
    if breakdown:
        for kind, (count, spent) in sorted(timed.by_kind.items(), key=lambda kv: -kv[1][1]):
            print(f"{kind:28s} {count / calls:5.2f} per call {spent / calls * 1e6:7.1f} us per call", file=sys.stderr)
    return timed.seconds / calls


class _GcTimer:
    """The cyclic GC's collections and their time (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.collections = 0
        self.seconds = 0.0
        self._start = 0.0

    def callback(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.collections += 1
            self.seconds += time.perf_counter() - self._start


def held() -> tuple[int, int]:
    """Objects the cyclic GC tracks (after a full collection) and bytes tracemalloc holds."""
    gc.unfreeze()  # tune_gc froze the warm-up's calls
    gc.collect()
    return len(gc.get_objects()), tracemalloc.get_traced_memory()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0, help="calls per (fake) second")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true", help="per kind of message, first round (stderr)")
    ap.add_argument("--register", action="store_true", help="REGISTER refreshes (with their 401) instead of calls")
    ap.add_argument(
        "--memory",
        action="store_true",
        help="what a call holds while its transactions wait out their 32 s (GC-tracked objects, "
        "tracemalloc bytes) instead of the time",
    )
    ap.add_argument(
        "--ramp",
        action="store_true",
        help="the cyclic GC's time while the transaction table fills (GC tuned from the start)",
    )
    args = ap.parse_args(argv)
    source = sipfarm.sip.transaction.__file__ or ""
    build = "interpreted" if source.endswith(".py") else "compiled"
    if args.memory:
        memory: dict[str, float] = {}
        run(args.calls, args.rate, memory=memory)
        print(json.dumps({"build": build, "rate": args.rate, **memory}), flush=True)
        return 0
    if args.ramp:
        ramp: dict[str, float] = {}
        run(1, args.rate, ramp=ramp)  # the ramp is the warm-up; one call after it
        print(json.dumps({"build": build, "rate": args.rate, **ramp}), flush=True)
        return 0
    results = [
        run(args.calls, args.rate, breakdown=args.breakdown and i == 0, register=args.register)
        for i in range(args.rounds)
    ]
    out = {
        "build": build,
        "kind": "register" if args.register else "call",
        "calls": args.calls,
        "rate": args.rate,
        "us_per_call_best": round(min(results) * 1e6, 1),
        "us_per_call_all": [round(r * 1e6, 1) for r in results],
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
