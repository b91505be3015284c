"""Rank a compiled node's perf profile by the compiled function whose work each sample is.

    perf record -e cpu-clock -F 2000 --call-graph dwarf,16384 -p <node pid> -o perf.data -- sleep 10
    .venv/bin/python -m benchmarks.perf_by_function perf.data                 # by compiled function
    .venv/bin/python -m benchmarks.perf_by_function perf.data --callers slot_tp_init

perf's own self-time report of a mypyc-compiled node names CPython's runtime (``_PyObject_Malloc``,
``_Py_dict_lookup``, ``_PyEval_EvalFrameDefault``...) at 1-5% each, which says nothing about
which code to change.  Here each sample is charged to the innermost compiled function
(``CPyDef_``/``CPyPy_``) on its stack, so the allocations, look-ups and interpreted calls a
compiled function causes count as its own.  ``--callers SYMBOL``: for the samples with SYMBOL on
their stack, the compiled function that called into it (e.g. ``slot_tp_init``: who constructs
objects through an interpreted ``__init__``; ``_PyEval_EvalFrameDefault``: who runs interpreted
code).  Needs ``perf`` (run as root for another user's process).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
from collections.abc import Iterator

_COMPILED = ("CPyDef_", "CPyPy_")


def stacks(data: str) -> Iterator[list[str]]:
    """Each sample's symbols, innermost first."""
    out = subprocess.run(
        ["perf", "script", "-i", data, "-F", "ip,sym", "--no-inline"], capture_output=True, text=True, check=True
    ).stdout
    stack: list[str] = []
    for line in out.splitlines():
        line = line.strip()
        if not line:
            if stack:
                yield stack
            stack = []
            continue
        parts = line.split(None, 1)
        stack.append(parts[1] if len(parts) > 1 else "?")
    if stack:
        yield stack


def by_function(data: str) -> tuple[int, collections.Counter[str]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for stack in stacks(data):
        total += 1
        name = next((s for s in stack if s.startswith(_COMPILED)), "<no compiled frame>: " + stack[0])
        counts[name] += 1
    return total, counts


def callers(data: str, symbol: str) -> tuple[int, collections.Counter[str]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for stack in stacks(data):
        total += 1
        if symbol not in stack:
            continue
        above = stack[stack.index(symbol) + 1 :]
        counts[next((s for s in above if s.startswith("CPyDef_")), "<no compiled caller>")] += 1
    return total, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="perf.data recorded with --call-graph dwarf")
    ap.add_argument("--callers", metavar="SYMBOL", help="rank the compiled callers of SYMBOL instead")
    ap.add_argument("--top", type=int, default=50)
    args = ap.parse_args(argv)
    total, counts = callers(args.data, args.callers) if args.callers else by_function(args.data)
    print(f"samples {total}" + (f", {sum(counts.values())} with {args.callers}" if args.callers else ""))
    for name, n in counts.most_common(args.top):
        print(f"{100 * n / max(total, 1):5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
