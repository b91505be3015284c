"""The loopback-only network namespace the softphone tests run in.

pjsip writes the default-route interface address into SDP whatever address SIP is bound to (PEERS.md),
so real softphones only keep their RTP on 127.0.0.1 where ``lo`` is the only interface. As root,

    unshare -n -- sh -c 'ip link set lo up && exec "$@"' netns <command...>

runs a command in a fresh namespace with just ``lo`` (brought up). ``netns_command`` builds that
argument list. Interfaces are listed with ``if_nameindex`` (netlink, per-process namespace), not
``/sys/class/net``, which shows the namespace sysfs was mounted in.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

NETNS_PREFIX = ("unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "netns")
PROBE_TIMEOUT_S = 10.0

SKIP_REASON = (
    "softphone tests need a loopback-only network namespace (pjsip puts the eth0 address in SDP); "
    "run pytest as root inside: unshare -n -- sh -c 'ip link set lo up && exec \"$@\"' netns "
    ".venv/bin/pytest ..."
)


def interfaces() -> list[str]:
    """Names of the network interfaces of this process's namespace."""
    return [name for _, name in socket.if_nameindex()]


def in_loopback_netns() -> bool:
    """True when ``lo`` is the only interface and it is usable (127.0.0.1 can be bound)."""
    if [name for name in interfaces() if name != "lo"]:
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.connect(("127.0.0.1", 9))  # needs lo up and a route; sends nothing
    except OSError:
        return False
    return True


def can_make_netns() -> bool:
    """True when we are root and ``unshare -n`` actually gives a loopback-only namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        probe = subprocess.run([*NETNS_PREFIX, "ip", "-o", "link"], capture_output=True,
                               timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    links = [line for line in probe.stdout.decode(errors="replace").splitlines() if line.strip()]
    return probe.returncode == 0 and len(links) == 1 and ": lo:" in links[0]


def netns_command(argv: list[str]) -> list[str]:
    """``argv`` wrapped to run in a new loopback-only namespace (root only)."""
    return [*NETNS_PREFIX, *argv]


def skip_reason() -> str | None:
    """Why softphone tests cannot run here, or None when they can."""
    if not in_loopback_netns():
        return SKIP_REASON
    return None
