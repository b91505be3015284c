#!/usr/bin/env bash
# Installs the Debian packages sipfarm needs when one of their commands is missing.
# Usage: system-deps.sh PKG... -- PROBE-COMMAND...
set -euo pipefail
pkgs=(); probes=(); seen_sep=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen_sep=1; continue; fi
  if [ $seen_sep -eq 0 ]; then pkgs+=("$a"); else probes+=("$a"); fi
done
missing=()
for p in "${probes[@]}"; do
  if [ "${p#/}" != "$p" ]; then [ -e "$p" ] || missing+=("$p"); continue; fi  # a file (headers)
  command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "sipfarm: missing commands: ${missing[*]}; installing: ${pkgs[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "sipfarm: apt-get is not available. Install these yourself, then run make again:" >&2
  echo "  redis-server, SIPp (sip-tester), kamailio (+ redis modules), openssl, iproute2, util-linux (unshare)," >&2
  echo "  baresip (baresip-core), twinkle (twinkle-console), linphonec (linphone-cli), chromium, rtpengine (rtpengine-daemon), slapd + ldap-utils + libldap-dev + libsasl2-dev, Node.js with npm" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "sipfarm: not root and no sudo: run as root: apt-get install -y ${pkgs[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
# Debian starts these as system services on install; sipfarm runs its own on private ports.
for svc in redis-server kamailio rtpengine-daemon slapd; do
  $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
echo "sipfarm: system packages installed"
