"""``sipfarm status``: the member table and the farm's bans as plain text and as JSON. Formatting
only, no I/O: the CLI fetches ``MembershipStore.members()`` (and ``drain_flags``, and
``BanStore.list()``) and passes them here."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .membership import Member, MemberState, Role

if TYPE_CHECKING:
    from sipfarm.protect.bans import BanEntry

__all__ = ["format_age", "render_json", "render_table", "status_rows"]

_COLUMNS = ("ID", "ROLE", "ADDRESSES", "STATE", "LOAD", "REGS", "TRANS", "AGE", "HOST", "PID", "VERSION")
_NUMERIC = frozenset({"LOAD", "REGS", "TRANS", "AGE", "PID"})
_ROLE_ORDER = {"balancer": 0, "node": 1, "relay": 2}


def format_age(seconds: float) -> str:
    """``42s``, ``3m07s``, ``5h02m``, ``2d03h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _ordered(members: Sequence[Member]) -> list[Member]:
    return sorted(members, key=lambda m: (_ROLE_ORDER.get(m.role.value, 9), m.id))


def _state(member: Member, drain_flags: Mapping[str, bool] | None) -> str:
    # A flag set since the member's last beat shows as "draining*": requested, not yet seen.
    if drain_flags and drain_flags.get(member.id) and member.state is MemberState.ACTIVE:
        return "draining*"
    return member.state.value


def status_rows(
    members: Sequence[Member], *, now: float, drain_flags: Mapping[str, bool] | None = None
) -> list[dict[str, Any]]:
    """One JSON-ready dict per member, balancers first, then nodes, then relays."""
    return [
        {
            "id": m.id,
            "role": m.role.value,
            "addresses": list(m.addresses),
            "control_address": m.control_address,
            "state": _state(m, drain_flags),
            "load": m.load,
            "registrations": m.registrations,
            "transactions": m.transactions,
            "age": round(max(0.0, now - m.started_at), 3) if m.started_at else None,
            "started_at": m.started_at,
            "host": m.host,
            "pid": m.pid,
            "version": m.version,
            # relays: load is their active sessions; free media ports and packets/s forwarded
            "free_ports": m.free_ports,
            "packet_rate": m.packet_rate,
        }
        for m in _ordered(members)
    ]


def render_json(
    members: Sequence[Member],
    *,
    now: float,
    drain_flags: Mapping[str, bool] | None = None,
    bans: Sequence[BanEntry] = (),
) -> str:
    document = {
        "now": now,
        "members": status_rows(members, now=now, drain_flags=drain_flags),
        "bans": [{"source": b.source, "seconds_left": b.seconds_left, "reason": b.reason} for b in bans],
    }
    return json.dumps(document, indent=2)


#: bans listed by ``sipfarm status`` (all of them: ``sipfarm ban list``)
BANS_SHOWN = 10


def render_table(
    members: Sequence[Member],
    *,
    now: float,
    drain_flags: Mapping[str, bool] | None = None,
    bans: Sequence[BanEntry] = (),
) -> str:
    """A fixed-width table, one member a line, then a totals line; then, if there are relays,
    a second table of their media figures (sessions, free ports, packets/s); then the farm's
    bans (how many, and the first few with time left and reason)."""
    if not members:
        return "no members (is the farm running, and is this the right Redis?)\n" + "".join(
            line + "\n" for line in _ban_lines(bans)
        )
    rows: list[tuple[str, ...]] = []
    for r in status_rows(members, now=now, drain_flags=drain_flags):
        addresses = ",".join(r["addresses"]) or "-"
        if r["control_address"]:
            addresses += f" ctl={r['control_address']}"
        rows.append(
            (
                r["id"],
                r["role"],
                addresses,
                r["state"],
                f"{r['load']:.1f}",
                str(r["registrations"]),
                str(r["transactions"]),
                "-" if r["age"] is None else format_age(r["age"]),
                r["host"] or "-",
                str(r["pid"] or "-"),
                r["version"] or "-",
            )
        )
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(_COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if name in _NUMERIC else c.ljust(w) for c, w, name in zip(cells, widths, _COLUMNS, strict=True)
        ).rstrip()

    out = [line(_COLUMNS), *(line(row) for row in rows)]
    counts: dict[str, int] = {}
    for m in members:
        counts[m.role.value] = counts.get(m.role.value, 0) + 1
    draining = sum(1 for r in rows if r[3] != MemberState.ACTIVE.value)
    summary = ", ".join(f"{n} {role}{'s' if n != 1 else ''}" for role, n in sorted(counts.items()))
    out.append(
        f"{summary}; {draining} draining; "
        # every node reports the farm-wide count it last read from Redis: the newest, not a sum
        f"{max((m.registrations for m in members), default=0)} registrations in the farm, "
        f"{sum(m.transactions for m in members)} transactions"
    )
    relays = [r for r in status_rows(members, now=now) if r["role"] == Role.RELAY.value]
    if relays:
        out.append("")
        out.extend(_relay_table(relays))
    out.extend(_ban_lines(bans))
    return "\n".join(out) + "\n"


def _ban_lines(bans: Sequence[BanEntry]) -> list[str]:
    if not bans:
        return []
    lines = ["", f"{len(bans)} source{'s' if len(bans) != 1 else ''} banned:"]
    for entry in bans[:BANS_SHOWN]:
        left = "until lifted" if entry.seconds_left is None else f"{format_age(entry.seconds_left)} left"
        lines.append(f"  {entry.source}  {left}  {entry.reason}")
    if len(bans) > BANS_SHOWN:
        lines.append(f"  ... and {len(bans) - BANS_SHOWN} more (sipfarm ban list)")
    return lines


_RELAY_COLUMNS = ("RELAY", "SESSIONS", "FREE_PORTS", "PACKETS/S")


def _relay_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    cells = [
        (
            r["id"],
            f"{r['load']:.0f}",
            "-" if r["free_ports"] is None else str(r["free_ports"]),
            "-" if r["packet_rate"] is None else f"{r['packet_rate']:.0f}",
        )
        for r in rows
    ]
    widths = [max(len(col), *(len(row[i]) for row in cells)) for i, col in enumerate(_RELAY_COLUMNS)]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in (_RELAY_COLUMNS, *cells)
    ]
