#!/usr/bin/env bash
# Run the tests against the mypyc-compiled build in build/compiled/ (scripts/build-compiled.sh),
# building it first when missing or older than any source file.
#
#   scripts/test-compiled.sh                    # tests/sip node balancer store transport
#   scripts/test-compiled.sh tests/sip -x       # other pytest arguments
#
# SIPFARM_TEST_COMPILED makes tests/conftest.py put build/compiled first on sys.path, export it
# in PYTHONPATH and make it the cwd, so that the `python -m sipfarm` processes the tests start
# run compiled code too (`-m` puts the cwd first on sys.path: from the checkout, the source tree
# would shadow the build).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
OUT="$ROOT/build/compiled"
cd "$ROOT"

bash scripts/build-compiled.sh --if-stale

# The compiled modules must be the ones imported, with the environment the children get.
(cd "$OUT" && PYTHONPATH="$OUT" "$PY" -c '
import os, sys
import sipfarm.sip.parser as p
ok = p.__file__ is not None and p.__file__.startswith(sys.argv[1] + os.sep) and p.__file__.endswith(".so")
sys.exit(0 if ok else f"test-compiled: sipfarm.sip.parser imported from {p.__file__}")
' "$OUT")
echo "test-compiled: sipfarm.sip.parser is compiled ($OUT)"

if [ "$#" -eq 0 ]; then
    # store before transport: both have a conftest.py that the transport tests import by name
    set -- tests/sip tests/node tests/balancer tests/store tests/transport tests/protect
fi
# Absolute test paths: the suite's conftest moves into build/compiled/, and pytest-xdist's
# workers start there and read the arguments from there.
args=()
for arg in "$@"; do
    case "$arg" in
        -* | /*) args+=("$arg") ;;
        *) if [ -e "$ROOT/${arg%%::*}" ]; then args+=("$ROOT/$arg"); else args+=("$arg"); fi ;;
    esac
done
set -- "${args[@]}"
rc=0
SIPFARM_TEST_COMPILED=1 bash scripts/in-netns.sh .venv/bin/pytest -q --durations=25 -m 'not slow' "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test-compiled: pytest ran no test: failing" >&2
    exit 1
fi
exit "$rc"
