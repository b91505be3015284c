#!/usr/bin/env bash
# The hand-written C extensions (CEXTENSIONS of scripts/build-compiled.sh) under AddressSanitizer
# and UndefinedBehaviorSanitizer: each built with -fsanitize=address,undefined into a copy of the
# source tree (build/asan/, pure-Python modules around them, so that a fault points at the C),
# then the tests that feed them the most varied input, and the parser fuzzer, with ASan preloaded
# into the interpreter and every process the tests start.  Any out-of-bounds read or write, use
# after free, signed overflow or misaligned access aborts the process with a report: the run fails.
#
#   scripts/asan-check.sh                 # ~2 min: the C-facing tests at Hypothesis scale 4, 60 s of fuzzing
#   SCALE=10 FUZZ_S=300 scripts/asan-check.sh
#
# Not part of `make test` (its time budget); `make asan-check`.  Run it after touching a .c file.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
OUT="$ROOT/build/asan"
SCALE=${SCALE:-4}
FUZZ_S=${FUZZ_S:-60}
cd "$ROOT"
test -x "$PY" || { echo "asan-check: $PY missing (run make setup)" >&2; exit 1; }

CC=${CC:-gcc}
LIBASAN=$("$CC" -print-file-name=libasan.so)
test -f "$LIBASAN" || { echo "asan-check: $CC has no libasan.so" >&2; exit 1; }

# the same list as the compiled build's
mapfile -t CEXTENSIONS < <(sed -n '/^CEXTENSIONS=(/,/^)/p' scripts/build-compiled.sh | grep '=' | grep -v '^CEXTENSIONS' | tr -d ' ')
test "${#CEXTENSIONS[@]}" -gt 0 || { echo "asan-check: no CEXTENSIONS in scripts/build-compiled.sh" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT"
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.so' --exclude='node_modules' -cf - sipfarm media tests | tar -C "$OUT" -xf -
INCLUDE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
for spec in "${CEXTENSIONS[@]}"; do
    source=${spec#*=}
    "$CC" -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
        -Wall -Werror=implicit-function-declaration -shared -fPIC -I"$INCLUDE" \
        "$ROOT/$source" -o "$OUT/${source%.c}$SUFFIX"
    echo "asan-check: built ${spec%%=*}"
done

# reports to files (pytest captures stderr, and an aborted run never prints it): shown on failure
report() {
    local rc=$?
    if compgen -G "$OUT/report.*" > /dev/null; then
        cat "$OUT"/report.* >&2
        echo "asan-check: sanitizer report(s) above ($OUT/report.*)" >&2
        rc=1
    fi
    exit "$rc"
}
trap report EXIT
export LD_PRELOAD="$LIBASAN"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$OUT/report"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$OUT/report"
export PYTHONPATH="$OUT"
export SIPFARM_PROPERTY_SCALE="$SCALE"
cd "$OUT"
# the extensions must be the ones imported (a stale wheel or the source tree would hide them)
"$PY" -c '
import importlib, os, sys
for name in sys.argv[1:]:
    mod = importlib.import_module(name)
    assert mod.__file__.startswith(os.environ["PYTHONPATH"]) and mod.__file__.endswith(".so"), mod.__file__
' "${CEXTENSIONS[@]%%=*}"
"$PY" -m pytest -q -p no:cacheprovider \
    tests/sip/test_fastparse.py tests/sip/test_rfc4475.py tests/sip/test_parser.py tests/sip/test_properties.py \
    tests/balancer/test_response_fast_path.py tests/balancer/test_request_fast_path.py tests/store/test_resppack.py \
    tests/media/test_media_fastpath.py tests/media/test_media_plane.py tests/media/test_media_relay.py
"$PY" -m pytest -q -p no:cacheprovider tests/transport/test_transport_udp_batched.py
"$PY" tests/sip/fuzz_parser.py --seconds "$FUZZ_S" --engine random
echo "asan-check: no sanitizer report"
