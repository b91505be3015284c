"""``sipfarm relay``: wires the relay engine, its ports, the ng control socket, Redis membership
and metrics together.  Process wiring only: the protocol is in :mod:`media.ng`, forwarding in
:mod:`media.relay`.

The relay heartbeats a :class:`~sipfarm.cluster.membership.Member` of role ``relay``: its
``control_address`` is the ng socket (``udp:HOST:PORT``), ``addresses`` the media address (and
the advertised one, when it differs) with the first port of its range, ``port_max`` the last,
``load`` its active sessions (Call-IDs), ``free_ports`` and ``packet_rate`` (packets forwarded
per second over the last second).  It also reads the membership (every role, polled each
heartbeat interval): the nodes' hosts are who may send it ng commands (``accept_from``,
:class:`media.farm.NgAccess`), and every member's addresses, other relays' whole ranges included,
are the farm's, where no SDP may send media (:class:`media.farm.FarmAddresses`).  SIGTERM or
SIGINT stops it: it leaves the membership, stops answering ng, frees every call and closes every
port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import socket
import sys
import time

from sipfarm import __version__
from sipfarm.config import ConfigError, RelayConfig, flag_list, load
from sipfarm.logs import setup_logging
from sipfarm.transport.loop import stop_on_signals, tune_gc

__all__ = ["run_relay", "serve"]

log = logging.getLogger("sipfarm.media")

SYNC_INTERVAL = 1.0  # seconds between metrics/figures updates


def _flags(args: argparse.Namespace) -> dict[str, object]:
    return {
        "ng": args.ng,
        "media_address": args.media_address,
        "advertise": getattr(args, "advertise", None),
        "port_min": args.port_min,
        "port_max": args.port_max,
        "media_timeout": args.media_timeout,
        "max_sessions": args.max_sessions,
        "accept_from": flag_list(getattr(args, "accept_from", None)),
        "redis": args.redis or os.environ.get("REDIS_URL"),
        "relay_id": args.relay_id,
        "metrics": args.metrics,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }


def run_relay(args: argparse.Namespace) -> int:
    try:
        cfg = load(RelayConfig, args.config, _flags(args), section="relay")
    except ConfigError as exc:
        print(f"sipfarm relay: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    if not cfg.relay_id:
        from sipfarm.cluster.membership import default_member_id  # noqa: PLC0415

        cfg.relay_id = default_member_id("relay-")
    from sipfarm.transport.loop import install_uvloop  # noqa: PLC0415

    install_uvloop()
    _raise_descriptor_limit()
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        log.error("event=relay_failed error=%s", str(exc).replace(" ", "_"))
        print(f"sipfarm relay: {exc}", file=sys.stderr)
        return 1
    return 0


def _raise_descriptor_limit() -> None:
    """Take the hard limit of open files: a latched RTP port holds two sockets (media.plane), so
    a call holds up to six descriptors, and the default soft limit (often 1,024) is far below
    what ``max_sessions`` calls need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a kernel cap (nr_open) below the hard limit: keep the soft one
            log.warning("event=relay_nofile_limit soft=%d hard=%d", soft, hard)


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(cfg: RelayConfig, *, ready: asyncio.Event | None = None) -> None:
    from media.farm import FarmAddresses, NgAccess, PortRange, node_networks  # noqa: PLC0415
    from media.ng import NgController, NgServer  # noqa: PLC0415
    from media.ports import PortAllocator  # noqa: PLC0415
    from media.relay import CallStats, RelayEngine, RelayServer, policy_predicate  # noqa: PLC0415
    from sipfarm.cluster.heartbeat import start_heartbeat  # noqa: PLC0415
    from sipfarm.cluster.membership import Member, MembershipStore, Role  # noqa: PLC0415
    from sipfarm.cluster.watcher import MemberWatcher  # noqa: PLC0415
    from sipfarm.metrics import RelayMetrics, serve_metrics  # noqa: PLC0415
    from sipfarm.store.redis_client import create_redis  # noqa: PLC0415
    from sipfarm.transport.destinations import DestinationPolicy  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    metrics = RelayMetrics()
    policy = DestinationPolicy(allow=cfg.allow_destinations, deny=cfg.internal_networks)
    # an SDP naming an address of the farm is never sent to before latching: the relay's own
    # ports (a loop), another relay's (two relays bouncing one packet for ever), a node's or a
    # balancer's SIP listener; the relay's own now, the others' from the membership below
    media_hosts = dict.fromkeys([cfg.media_address, cfg.advertise or cfg.media_address])
    farm = FarmAddresses(PortRange(host, cfg.port_min, cfg.port_max) for host in media_hosts)
    engine = RelayEngine(
        PortAllocator(cfg.port_min, cfg.port_max),
        sdp_allowed=policy_predicate(policy, farm.farm_address),
        media_timeout=cfg.media_timeout,
        max_sessions=cfg.max_sessions,
        max_ports_per_owner=cfg.max_ports_per_owner,
        latch_from=cfg.latch_from,
        farm_address=farm.farm_address,
    )
    server = RelayServer(
        engine,
        cfg.media_address,
        receive_buffer=cfg.udp_recv_buffer or None,
        batch_interval=cfg.batch_interval,
        fast_path=cfg.fast_path,
    )
    controller = NgController(server, cfg.advertise or cfg.media_address, engine.clock)

    def expired(stats: CallStats) -> None:
        controller.forget(stats.call_id)
        metrics.expired.inc()
        log.info("event=relay_session_expired call_id=%s", stats.call_id)

    server.on_expired = expired

    redis = create_redis(cfg.redis, client_name=f"sipfarm-{cfg.relay_id}")
    store = MembershipStore(redis)
    access = NgAccess(cfg.accept_from)
    watcher = MemberWatcher(store, None, interval=cfg.heartbeat)
    unplaced: set[str] = set()  # nodes already reported as sending from nowhere known
    seen = -1  # the watcher's generation last applied

    def log_accepted(why: str) -> None:
        accepted = ",".join(str(n) for n in access.accepted) or "nobody_yet"
        log.info("event=relay_accept_from reason=%s accepted=%s", why, accepted)

    def membership_changed(_change: object = None, *, starting: bool = False) -> None:
        """Whatever changed (a node, a relay or a balancer came or went): the farm's
        addresses and the accepted ng sources from the whole snapshot, once per poll."""
        nonlocal seen
        if watcher.generation == seen:
            return
        seen = watcher.generation
        members = watcher.snapshot()
        farm.update(members)
        if access.update(members) and not starting:
            log_accepted("nodes_changed")
        if access.want_nodes:
            for member in members:
                if member.role is Role.NODE and member.id not in unplaced and not node_networks([member]):
                    unplaced.add(member.id)  # a wildcard or a name: its ng commands are refused here
                    log.warning("event=relay_accept_from_node_unknown_address node=%s hint=list_its_network", member.id)

    watcher.add_listener(membership_changed)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(watcher.poll(), 1.0)  # the nodes before the first ng command
    membership_changed(starting=True)
    watcher.start()
    if access.open:
        log.warning("event=relay_ng_open accept_from=anyone hint=set_accept_from_nodes")
    else:
        log_accepted("started")

    ng_host, ng_port = _split_hostport(cfg.ng)
    try:
        ng = await NgServer.listen(controller, ng_host, ng_port, accepts=None if access.open else access.accepts)
    except OSError:  # the ng port is taken: nothing else runs yet
        await watcher.stop()
        await redis.aclose()
        raise
    bound_host, bound_port = ng.address
    farm.add_own([PortRange(bound_host, bound_port, bound_port)])  # ng datagrams made of RTP
    control = f"udp:[{bound_host}]:{bound_port}" if ":" in bound_host else f"udp:{bound_host}:{bound_port}"
    media = [f"udp:[{h}]:{cfg.port_min}" if ":" in h else f"udp:{h}:{cfg.port_min}" for h in media_hosts]
    if cfg.metrics:
        serve_metrics(cfg.metrics, metrics.registry)

    started = time.time()
    figures = {"packet_rate": 0.0}

    def member() -> Member:
        return Member(
            id=cfg.relay_id,
            role=Role.RELAY,
            addresses=tuple(media),
            control_address=control,
            load=float(engine.sessions),
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=started,
            version=__version__,
            free_ports=engine.ports.free_ports,
            packet_rate=round(figures["packet_rate"], 1),
            port_max=cfg.port_max,
        )

    heartbeater = start_heartbeat(store, member, interval=cfg.heartbeat, leader=True)

    synced = server.totals()
    synced_at = loop.time()
    ng_synced: dict[tuple[str, str], int] = {}
    ng_dropped = ng_internal = ng_refused = 0

    def sync() -> None:
        """Copy the relay's and the controller's counters into the metrics (deltas)."""
        nonlocal synced, synced_at, ng_dropped, ng_internal, ng_refused
        totals, now = server.totals(), loop.time()
        if now > synced_at:
            figures["packet_rate"] = (totals.packets - synced.packets) / (now - synced_at)
        metrics.packets.inc(totals.packets - synced.packets)
        metrics.bytes.inc(totals.bytes - synced.bytes)
        metrics.drops("no_destination").inc(totals.drops_no_destination - synced.drops_no_destination)
        metrics.drops("unexpected_source").inc(totals.drops_unexpected_source - synced.drops_unexpected_source)
        metrics.drops("malformed").inc(totals.drops_malformed - synced.drops_malformed)
        synced, synced_at = totals, now
        for key, count in list(controller.commands.items()):
            if count > ng_synced.get(key, 0):
                metrics.ng_commands(*key).inc(count - ng_synced.get(key, 0))
                ng_synced[key] = count
        metrics.ng_errors("dropped").inc(controller.dropped - ng_dropped)
        metrics.ng_errors("internal").inc(controller.internal_errors - ng_internal)
        metrics.ng_errors("refused").inc(ng.refused - ng_refused)
        ng_dropped, ng_internal, ng_refused = controller.dropped, controller.internal_errors, ng.refused
        metrics.sessions.set(engine.sessions)
        metrics.free_ports.set(engine.ports.free_ports)
        metrics.open_ports.set(server.open_ports)

    sync()
    tune_gc()
    stop = stop_on_signals(loop)
    log.info(
        "event=relay_started id=%s ng=%s media=%s ports=%d-%d fast_path=%s",
        cfg.relay_id,
        control,
        cfg.media_address,
        cfg.port_min,
        cfg.port_max,
        "on" if server.fast_path else "off",
    )
    if ready is not None:
        ready.set()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SYNC_INTERVAL)
            sync()
    finally:
        log.info("event=relay_stopping id=%s sessions=%d", cfg.relay_id, engine.sessions)
        if heartbeater is not None:
            await heartbeater.stop()
        await watcher.stop()
        ng.close()
        server.close()  # every call freed, every port closed: they return to the range
        await redis.aclose()
