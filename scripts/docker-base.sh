#!/usr/bin/env bash
# Build the base image every sipfarm image starts FROM, from Debian's own packages: no registry
# image is pulled (`FROM debian:...` needs a registry; Debian's archive is enough).
#
#   scripts/docker-base.sh [--force]      -> image sipfarm-base:<suite> (default: this host's release)
#
# debootstrap (--variant=minbase) installs the release into a directory, which is imported as a
# one-layer image (`tar -c . | docker import -`). Apt inside it uses the same archive as this
# host (its apt sources are copied in), so images built on it install Debian packages as the host
# does. Needs root, debootstrap and a running Docker engine. SUITE and DEBIAN_MIRROR override the
# release and the archive; BASE_IMAGE the image name.
set -euo pipefail

SUITE=${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")}
BASE_IMAGE=${BASE_IMAGE:-sipfarm-base:$SUITE}
DOCKER=${DOCKER:-docker}

if [ "${1:-}" != "--force" ] && $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "docker-base: $BASE_IMAGE exists (--force rebuilds it)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "docker-base: debootstrap missing: apt-get install debootstrap" >&2; exit 1; }

# The host's Debian archive: the first URI of its deb822 or one-line sources (not -security).
host_sources=()
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [ -s "$f" ] && host_sources+=("$f")
done
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ] && [ ${#host_sources[@]} -gt 0 ]; then
    mirror=$(grep -h -o -E '^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)[a-z]+://[^[:space:]]+' "${host_sources[@]}" \
        | grep -o -E '[a-z]+://[^[:space:]]+' | grep -v -- '-security' | head -n1 || true)
fi
[ -n "$mirror" ] || { echo "docker-base: no Debian archive found in the host's apt sources: set DEBIAN_MIRROR" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/var/tmp}/sipfarm-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
start=$(date +%s)
echo "docker-base: debootstrap --variant=minbase $SUITE from $mirror"
debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; echo "docker-base: debootstrap failed" >&2; exit 1; }

# Apt as in the host when the sources are the same release; else debootstrap's own line stays.
if [ ${#host_sources[@]} -gt 0 ] && [ "$SUITE" = "$(. /etc/os-release && echo "$VERSION_CODENAME")" ] \
        && [ -z "${DEBIAN_MIRROR:-}" ]; then
    rm -f "$root/etc/apt/sources.list"
    for f in "${host_sources[@]}"; do cp "$f" "$root$f"; done
fi
# What Debian's official images set: no services started by package scripts, no caches kept,
# no recommends (each image names what it needs).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cat >"$root/etc/apt/apt.conf.d/90sipfarm-image" <<'CONF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
CONF
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/*

tar --numeric-owner -C "$root" -cf - . \
    | $DOCKER import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
        --message "debootstrap --variant=minbase $SUITE" - "$BASE_IMAGE" >/dev/null
echo "docker-base: $BASE_IMAGE built in $(($(date +%s) - start)) s ($($DOCKER image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
