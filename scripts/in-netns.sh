#!/bin/sh
# Run a command in a new network namespace whose only interface is lo (up), so that softphones
# (pjsip writes the default-route address into SDP) keep all media on 127.0.0.1 and no test
# traffic can leave the machine. Needs root and a working `unshare -n`; otherwise the command
# runs directly and the softphone tests skip themselves.
#
#   scripts/in-netns.sh .venv/bin/pytest -q tests
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

if [ "$(id -u)" -eq 0 ] && command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
        && unshare -n -- sh -c 'ip link set lo up' >/dev/null 2>&1; then
    exec unshare -n -- sh -c 'ip link set lo up && exec "$@"' netns "$@"
fi

echo "in-netns: no loopback-only network namespace (needs root and unshare -n); softphone tests will be skipped" >&2
exec "$@"
