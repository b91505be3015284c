#!/usr/bin/env bash
# Build an optional mypyc-compiled copy of sipfarm's hot-path modules in build/compiled/.
#
# The source tree is never touched: sipfarm/ and media/ are copied to build/compiled/ (wiped
# first) and the modules in MODULES are compiled there, the extensions landing next to their
# copies, together with the hand-written C extensions in CEXTENSIONS. Use it with PYTHONPATH:
#
#   scripts/build-compiled.sh
#   PYTHONSAFEPATH=1 PYTHONPATH=build/compiled .venv/bin/python -m benchmarks.parse_bench
#   scripts/test-compiled.sh            # the tests against the compiled build
#
# PYTHONSAFEPATH=1 matters from the checkout: `python -c`/`-m` put the cwd first on sys.path, and
# the source tree there would shadow the build (scripts that insert the checkout themselves, like
# `python benchmarks/parse_bench.py`, run the source whatever the environment).
#
# The build goes through a small generated setup script run from build/compiled/, so the
# project's pyproject.toml (whose SPDX license string this setuptools rejects) is never read.
# MYPYC_OPT_LEVEL (default 3) is honoured.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
OUT="$ROOT/build/compiled"
WORK="$ROOT/build/mypyc"  # generated C, object files, setup script

# Compiled modules: each compiles and passes its tests compiled (scripts/test-compiled.sh).
# Left interpreted on purpose:
# - sipfarm/sip/errors.py: its exceptions derive from Exception, and mypyc (2.x) compiles a
#   property read on such a class (`error.reason`, from compiled code) as a vtable call that
#   the exception object's layout does not have: a segfault (error_response). Raised on bad
#   input only, so nothing is lost by leaving it interpreted.
# - media/relay.py, media/ports.py: the relay's signalling (its errors derive from Exception, as
#   above); the per-packet path is media/port.py and media/plane.py, compiled, and the C fast
#   path media/_fastpath.c (CEXTENSIONS) for latched streams.
MODULES=(
    sipfarm/sip/uri.py
    sipfarm/sip/address.py
    sipfarm/sip/headers.py
    sipfarm/sip/via.py
    sipfarm/sip/message.py
    sipfarm/sip/parser.py
    sipfarm/sip/auth.py
    sipfarm/sip/transaction.py
    sipfarm/sip/ids.py
    sipfarm/counters.py
    sipfarm/store/resp.py
    sipfarm/store/resp_cluster.py
    sipfarm/proxy/forking.py
    sipfarm/proxy/pending.py
    sipfarm/proxy/media.py
    sipfarm/proxy/relay_media.py
    sipfarm/proxy/relay_choice.py
    sipfarm/store/media.py
    sipfarm/routing/router.py
    sipfarm/store/location.py
    sipfarm/store/accounts.py
    sipfarm/transport/manager.py
    sipfarm/transport/subject.py
    sipfarm/registrar/bindings.py
    sipfarm/node/core.py
    sipfarm/node/glue.py
    sipfarm/element.py
    sipfarm/proxy/proxy.py
    sipfarm/proxy/nexthop.py
    sipfarm/registrar/registrar.py
    sipfarm/registrar/flows.py
    sipfarm/protect/authenticator.py
    sipfarm/protect/guard.py
    sipfarm/protect/local_bans.py
    sipfarm/protect/redis_guard.py
    sipfarm/transport/destinations.py
    sipfarm/node/farmstate.py
    sipfarm/balancer/core.py
    sipfarm/balancer/nodes.py
    sipfarm/balancer/overload.py
    sipfarm/balancer/frontdoor.py
    sipfarm/balancer/keepalive.py
    sipfarm/cluster/ring.py
    sipfarm/protect/pike.py
    sipfarm/sip/memo.py
    sipfarm/edge.py
    sipfarm/transport/udp.py
    media/rtp.py
    media/port.py
    media/plane.py
)

# Hand-written C extensions (CPython C API, no dependency but a C compiler): "module.name=path.c".
# Built by the same setup script, into the same tree.  The source tree never has their .so:
# the code importing one falls back (ImportError) to a pure-Python path, which the interpreted
# test stage checks, while scripts/test-compiled.sh tests the extension.
CEXTENSIONS=(
    sipfarm.transport._batchio=sipfarm/transport/_batchio.c
    media._fastpath=media/_fastpath.c
    sipfarm.sip._fastparse=sipfarm/sip/_fastparse.c
    sipfarm.store._resppack=sipfarm/store/_resppack.c
)

test -x "$PY" || { echo "build-compiled: $PY missing (run make setup)" >&2; exit 1; }

if [ "${1:-}" = "--if-stale" ]; then
    # Nothing to do when the build is newer than every source it was made from.
    stale=$(cd "$ROOT" && find sipfarm media scripts/build-compiled.sh -newer "$OUT/.stamp" \
        \( -name '*.py' -o -name '*.sh' -o -name '*.lua' -o -name '*.c' -o -name '*.h' \) -print -quit 2>/dev/null || echo missing)
    if [ -f "$OUT/.stamp" ] && [ -z "$stale" ]; then
        echo "build-compiled: $OUT is up to date"
        exit 0
    fi
fi

start=$(date +%s)
rm -rf "$OUT" "$WORK"
mkdir -p "$OUT" "$WORK"
# A copy of the packages only: no pyproject.toml, no tests, no caches.
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.so' -cf - sipfarm media | tar -C "$OUT" -xf -

cat >"$WORK/setup.py" <<EOF
import os
import sys

from setuptools import Extension, setup
from mypyc.build import mypycify

# setup.py [setuptools args] -- mypyc paths... -- module.name=path.c...
marker = sys.argv.index("--")
rest = sys.argv[marker + 1 :]
del sys.argv[marker:]
paths = rest[: rest.index("--")] if "--" in rest else rest
cexts = rest[rest.index("--") + 1 :] if "--" in rest else []
extensions = [
    Extension(
        name,
        [source],
        extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
    )
    for name, source in (spec.split("=", 1) for spec in cexts)
]
setup(
    name="sipfarm_compiled",
    ext_modules=mypycify(
        paths,
        opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
        debug_level="1",
        multi_file=True,  # one C file per module: builds faster than one huge file at -O3
        target_dir="$WORK/c",
    )
    + extensions,
)
EOF

cd "$OUT"
"$PY" "$WORK/setup.py" -q build_ext --inplace --build-temp "$WORK/temp" -- "${MODULES[@]}" -- "${CEXTENSIONS[@]}"

# Every listed module must now resolve to an extension under build/compiled/.
for m in "${MODULES[@]}"; do
    so=("$OUT/${m%.py}".*.so)
    test -f "${so[0]}" || { echo "build-compiled: no extension built for $m" >&2; exit 1; }
done
for spec in "${CEXTENSIONS[@]}"; do
    so=("$OUT/${spec#*=}")
    so=("${so[0]%.c}".*.so)
    test -f "${so[0]}" || { echo "build-compiled: no extension built for ${spec%%=*}" >&2; exit 1; }
done
(cd / && PYTHONPATH="$OUT" "$PY" -c '
import importlib, os, sys
for path in sys.argv[1:]:
    mod = importlib.import_module(path.rsplit(".", 1)[0].replace("/", "."))
    assert mod.__file__ and mod.__file__.endswith(".so") and mod.__file__.startswith(os.environ["PYTHONPATH"]), mod.__file__
' "${MODULES[@]}" "${CEXTENSIONS[@]#*=}")
touch "$OUT/.stamp"

echo "build-compiled: compiled into $OUT in $(($(date +%s) - start)) s:"
printf '  %s\n' "${MODULES[@]}" "${CEXTENSIONS[@]%%=*}"
