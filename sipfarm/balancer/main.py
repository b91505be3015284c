"""``sipfarm balancer``: listeners, the forwarding core, membership watching and probes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sipfarm import __version__
from sipfarm.config import BalancerConfig, ConfigError, flag_list, load
from sipfarm.logs import setup_logging
from sipfarm.sip.address import Address
from sipfarm.transport.loop import stop_on_signals, tune_gc

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from sipfarm.balancer.frontdoor import FrontDoor, FrontDoorPolicy
    from sipfarm.balancer.keepalive import FlowGone
    from sipfarm.balancer.overload import OverloadPolicy
    from sipfarm.transport.config import TransportConfig

log = logging.getLogger("sipfarm.balancer")

SHED_LOG_INTERVAL = 5.0  # seconds between warnings while shedding
FLOW_SECRET_KEY = "sipfarm:flow-secret"  # noqa: S105 - a Redis key name


def run_balancer(args: argparse.Namespace) -> int:
    flags = {
        "listen": args.listen,
        "redis": args.redis or os.environ.get("REDIS_URL"),
        "metrics": args.metrics,
        "internal": getattr(args, "internal", None),
        "advertise": getattr(args, "advertise", None),
        "balancer_id": getattr(args, "balancer_id", None),
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
        "log_level": getattr(args, "log_level", None),
        "log_format": getattr(args, "log_format", None),
        "workers": getattr(args, "workers", None),
        "ws_origins": getattr(args, "ws_origin", None),
        "shed": False if getattr(args, "no_shed", None) else None,
        "shed_target": getattr(args, "shed_target", None),
        "allow": flag_list(getattr(args, "allow", None)),
        "deny": flag_list(getattr(args, "deny", None)),
    }
    try:
        cfg = load(BalancerConfig, args.config, flags, section="balancer")
    except ConfigError as exc:
        print(f"sipfarm balancer: configuration error: {exc}", file=sys.stderr)
        return 2
    from sipfarm.routing.table import RoutingError  # noqa: PLC0415

    try:
        cfg.exempt = exempt_networks(cfg.exempt, args.config)
    except RoutingError as exc:
        print(f"sipfarm balancer: routing table error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    if not cfg.balancer_id:
        from sipfarm.cluster.membership import default_member_id  # noqa: PLC0415

        cfg.balancer_id = default_member_id("lb-")
    worker_index = getattr(args, "worker_index", None)
    if cfg.workers > 1 and worker_index is None:
        from sipfarm.workers import supervise  # noqa: PLC0415

        argv = [
            sys.executable,
            "-m",
            "sipfarm",
            "balancer",
            "--redis",
            cfg.redis,
            "--balancer-id",
            cfg.balancer_id,
            "--log-level",
            cfg.log_level,
            "--log-format",
            cfg.log_format,
        ]
        if cfg.shed is False:
            argv.append("--no-shed")
        argv += ["--shed-target", str(cfg.shed_target)]
        for flag, value in (
            ("--config", args.config),
            ("--internal", cfg.internal),
            ("--advertise", cfg.advertise),
            ("--tls-cert", cfg.tls_cert),
            ("--tls-key", cfg.tls_key),
        ):
            if value:
                argv += [flag, value]
        for spec in cfg.listen:
            argv += ["--listen", spec]
        for origin in getattr(args, "ws_origin", None) or ():
            argv += ["--ws-origin", origin]
        for key in ("allow", "deny"):  # the file's lists too: flags win over it, so pass them all
            if getattr(cfg, key):
                argv += [f"--{key}", ",".join(getattr(cfg, key))]
        return supervise(argv, cfg.workers, cfg.metrics)
    if worker_index is not None:
        from sipfarm.workers import die_with_supervisor  # noqa: PLC0415

        die_with_supervisor()
    from sipfarm.transport.loop import install_uvloop  # noqa: PLC0415

    install_uvloop()
    try:
        asyncio.run(serve(cfg, worker_index=worker_index))
    except OSError as exc:
        print(f"sipfarm balancer: {exc}", file=sys.stderr)
        return 1
    return 0


async def _flow_secret(redis_url: str) -> bytes:
    from sipfarm.store.errors import StoreError  # noqa: PLC0415
    from sipfarm.store.resp_cluster import open_pipe  # noqa: PLC0415

    pipe = open_pipe(redis_url)
    try:
        for _ in range(20):
            try:
                if not pipe.connected:
                    await pipe.connect()
                await pipe.execute("SET", FLOW_SECRET_KEY, secrets.token_hex(32), "NX")
                value = await pipe.execute("GET", FLOW_SECRET_KEY)
                if value:
                    return bytes(value)
            except (StoreError, OSError):
                await asyncio.sleep(0.25)
    finally:
        await pipe.close()
    log.warning("event=flow_secret_local reason=redis_unavailable")
    return secrets.token_bytes(32)


async def serve(cfg: BalancerConfig, *, worker_index: int | None = None, ready: asyncio.Event | None = None) -> None:
    from sipfarm.balancer.core import BalancerCore  # noqa: PLC0415
    from sipfarm.balancer.frontdoor import ClientScreen, FrontDoor  # noqa: PLC0415
    from sipfarm.balancer.groups import parse_rules  # noqa: PLC0415
    from sipfarm.balancer.keepalive import RegisteredFlows  # noqa: PLC0415
    from sipfarm.balancer.nodes import NodeEvent, NodeSet  # noqa: PLC0415
    from sipfarm.balancer.overload import AdmissionControl  # noqa: PLC0415
    from sipfarm.cluster.heartbeat import start_heartbeat  # noqa: PLC0415
    from sipfarm.cluster.membership import Member, MembershipStore, Role  # noqa: PLC0415
    from sipfarm.cluster.watcher import MemberWatcher  # noqa: PLC0415
    from sipfarm.edge import FlowTokens  # noqa: PLC0415
    from sipfarm.metrics import BalancerMetrics, serve_metrics, sync_counters  # noqa: PLC0415
    from sipfarm.protect.netlist import NetList, Verdict  # noqa: PLC0415
    from sipfarm.store.errors import StoreError  # noqa: PLC0415
    from sipfarm.store.location import LocationStore  # noqa: PLC0415
    from sipfarm.store.redis_client import create_redis  # noqa: PLC0415
    from sipfarm.transport.destinations import DestinationPolicy  # noqa: PLC0415
    from sipfarm.transport.manager import TransportManager  # noqa: PLC0415
    from sipfarm.transport.tls import server_context  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    multi = worker_index is not None
    metrics = BalancerMetrics()
    if cfg.metrics and not multi:
        serve_metrics(cfg.metrics, metrics.registry)
    secret = cfg.flow_secret.encode() if cfg.flow_secret else await _flow_secret(cfg.redis)
    nodes = NodeSet(down_after=cfg.down_after, probe_interval=cfg.probe_interval)
    holder: list[BalancerCore] = []

    def on_message(msg: object, source: Address, local: Address) -> None:
        if holder:  # a message in the moment between binding and the core's creation is dropped
            holder[0].on_message(msg, source, local)  # type: ignore[arg-type]

    transports = TransportManager(on_message, config=transport_config(cfg))
    transports.limit_exempt = source_matcher(cfg.exempt)
    front = FrontDoor(front_door_policy(cfg)) if cfg.protect else None
    acl = NetList(cfg.allow, cfg.deny) if cfg.allow or cfg.deny else None
    refused: dict[str, int] = {}  # sources refused by the allow/deny lists, by verdict
    admit: Callable[[Address], bool] | None = None
    if acl is not None:
        verdict = acl.verdict
        allowed = Verdict.ALLOWED

        def admit_source(source: Address) -> bool:
            # every client's message, before the front door: one dict look-up (cached)
            found = verdict(source.host)
            if found is allowed:
                return True
            refused[found.value] = refused.get(found.value, 0) + 1
            return False

        admit = admit_source

        def allow_source(host: str) -> bool:
            # a connection as it is accepted, a keep-alive (the nodes talk UDP, never these)
            found = verdict(host)
            if found is allowed:
                return True
            refused[found.value] = refused.get(found.value, 0) + 1
            return False

        transports.allow_source = allow_source
    if front is not None:
        # a banned source's connections are closed at accept, before a TLS handshake or a
        # WebSocket upgrade costs anything (a banned scanner did 7,476 TLS handshakes in 8 s,
        # 64% of a core: red team, 2026-12-03); exempt sources are never banned
        by_lists = transports.allow_source
        banned = front.banned
        clock = time.monotonic

        def allow_unbanned(host: str) -> bool:
            if banned(host, clock()):
                front.count("refused_banned_connection")
                return False
            return by_lists is None or by_lists(host)

        transports.allow_source = allow_unbanned
    # RFC 5626: this worker's registered flows (each worker its own: a UDP client's 4-tuple
    # and a connection stay with one worker, and a REGISTER's 200 comes back to it)
    registrations = RegisteredFlows(interval=cfg.keepalive_interval, failures=cfg.keepalive_failures)
    transports.on_keepalive = registrations.heard  # STUN and CRLF never reach the core
    # RFC 5626 8: STUN keepalives come over registered flows; anything else would make the
    # balancer answer whatever address a datagram claims (a reflector)
    transports.stun_allowed = registrations.flows.__contains__
    ssl_ctx = server_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    from sipfarm.balancer.origins import OriginPolicy  # noqa: PLC0415

    origins = OriginPolicy(cfg.ws_origins, require=cfg.ws_require_origin)
    public: dict[str, Address] = {}
    ws_servers: list[Any] = []
    for spec in cfg.listen:
        addr = Address.parse(spec)
        if addr.transport in ("ws", "wss"):
            from sipfarm.balancer.websocket import listen_websocket  # noqa: PLC0415

            bound, ws_server = await listen_websocket(
                transports, addr, ssl_ctx if addr.transport == "wss" else None, reuse_port=multi, origins=origins
            )
            ws_servers.append(ws_server)
        else:
            bound = await transports.listen(addr, ssl=ssl_ctx if addr.transport == "tls" else None, reuse_port=multi)
        public.setdefault(bound.transport, bound)
    if multi:
        # each worker faces the nodes on a private UDP port: Via, Path and Record-Route name it,
        # so responses and requests for this worker's client connections come back to it
        host = Address.parse(cfg.internal).host if cfg.internal else public["udp"].host
        internal = await transports.listen(f"udp:{host}:0")
    elif cfg.internal:
        internal = Address.parse(cfg.internal)
        if internal not in transports.addresses:
            internal = await transports.listen(internal)
    else:
        internal = public["udp"]
    aliases = frozenset((a.host, a.port) for a in transports.addresses) | frozenset(
        (a.host, a.port) for a in public.values()
    )
    if cfg.advertise:
        # listening on a wildcard (or behind NAT): Via, Path and Record-Route name this address
        public = {t: Address(t, cfg.advertise, a.port) for t, a in public.items()}
        aliases |= frozenset((cfg.advertise, a.port) for a in public.values())
    destinations = DestinationPolicy(allow=cfg.allow_destinations, deny=cfg.internal_networks, own=transports.addresses)
    core = BalancerCore(
        nodes,
        FlowTokens(secret),
        public=public,
        internal=internal,
        send=transports.send_request,
        # an element never opens a connection to send a response: the request's flow or nothing
        send_response=transports.send_on_flow,
        retry_after=cfg.retry_after,
        aliases=aliases,
        destinations=destinations,
        hop_secret=secret,  # farm-wide: any worker or balancer routes a response
        registrations=registrations,
        hold=transports.hold_flow,
        hold_max=cfg.flow_hold_max,
        groups=parse_rules(cfg.groups),  # validated with the configuration
        front=front,
        admission=AdmissionControl(overload_policy(cfg)) if cfg.shed else None,
        shed_retry_after=(cfg.shed_retry_after_min, cfg.shed_retry_after_max),
        stamp_via=True,  # clients' requests only: the transports do not (transport_config)
    )
    holder.append(core)
    if cfg.internal:
        # a socket facing the nodes alone: a node's address means the farm only there (a
        # datagram claiming one on a public socket is forged: dropped, counted)
        nodes.facing = internal
    if front is not None or admit is not None or nodes.facing is not None:
        # before parsing (hot path): nodes pass; a client is checked against the allow/deny
        # lists, the bans and its rate budget (see sipfarm.balancer.frontdoor)
        transports.screen = ClientScreen(front, nodes, time.monotonic, admit=admit, forged=core.stats.drop)
    if front is not None:
        # a source whose connections keep being closed for abuse is banned (FrontDoor.abused)
        transports.on_abuse = lambda host: front.abused(host, time.monotonic())
    transports.on_message = core.on_message  # from now on straight to the core (no closure)
    transports.fast_response = core.response_fast_path()  # the common response from its bytes (C)
    transports.fast_request = core.request_fast_path()  # the common in-dialog request, the same way
    admission = core.admission

    def on_probe(branch: bytes) -> None:
        entry = nodes.find_probe(branch)
        if entry is not None:
            sent = entry.probe_sent
            nodes.probe_answered(entry, loop.time())
            if sent is not None:
                metrics.probe_rtt.observe(loop.time() - sent)

    core.probe_listener = on_probe

    redis = create_redis(cfg.redis, client_name=f"sipfarm-{cfg.balancer_id}")
    store = MembershipStore(redis)
    watcher = MemberWatcher(store, Role.NODE)

    dropped_reported = 0

    def report_transitions() -> None:
        """One line per change of a node's state in this worker's view (never per message:
        membership polls and probes make them), and its counter."""
        nonlocal dropped_reported
        transitions = nodes.take_transitions()
        if not transitions:
            return
        usable = nodes.usable_count  # after these changes
        for t in transitions:
            metrics.node_transitions(t.event.value).inc()
            log.log(
                logging.WARNING if t.event is NodeEvent.DOWN else logging.INFO,  # shown at --log-level warning
                "event=node_%s node=%s address=%s group=%s reason=%s usable=%d worker=%s",
                t.event.value,
                t.node,
                t.address,
                t.group or "-",
                t.reason,
                usable,
                worker_index,
            )
        if nodes.transitions_dropped > dropped_reported:
            log.warning("event=node_transitions_dropped count=%d", nodes.transitions_dropped - dropped_reported)
            dropped_reported = nodes.transitions_dropped

    def refresh(_change: object = None) -> None:
        members = watcher.snapshot()
        nodes.update_members(members)
        report_transitions()
        if admission is not None:
            for m in members:
                admission.heartbeat(m.id, m.load)  # transactions in flight (shed_node_load)
            admission.forget({m.id for m in members})

    watcher.add_listener(refresh)
    watcher.start()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(watcher.poll(), 1.0)
    refresh()
    started = time.time()

    def member() -> Member:
        return Member(
            id=cfg.balancer_id,
            role=Role.BALANCER,
            addresses=tuple(str(a) for a in public.values()),
            load=float(nodes.usable_count),
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=started,
            version=__version__,
            internal_address=str(internal),  # where requests to the nodes come from
        )

    heartbeater = start_heartbeat(store, member, interval=cfg.heartbeat, leader=not multi or worker_index == 0)

    def probe_tick() -> None:
        now = loop.time()
        for entry in nodes.due_probes(now):
            nodes.probe_sent(entry, now, core.probe(entry))
        report_transitions()  # the probes' verdicts since the last tick (answers come between)

    location = LocationStore(redis)
    removals: set[asyncio.Task[None]] = set()

    async def unregister(gone: FlowGone) -> None:
        """A UDP phone stopped answering OPTIONS: remove its bindings made over this flow
        (their Path names the flow's token; a newer REGISTER from elsewhere stays)."""
        token = core.flow_token(gone.flow)
        removed = 0
        try:
            for binding in await location.lookup(gone.aor, time.time()):
                if binding.contact in gone.contacts and any(token in p for p in binding.path):
                    removed += await location.remove(gone.aor, binding.contact)
        except StoreError as exc:
            log.warning("event=keepalive_unregister_failed aor=%s error=%s", gone.aor, str(exc).replace(" ", "_"))
            return
        log.info("event=keepalive_flow_expired flow=%s aor=%s removed=%d", gone.flow, gone.aor, removed)

    def keepalive_tick() -> None:
        for gone in core.keepalive_tick(time.monotonic()):
            task = loop.create_task(unregister(gone))
            removals.add(task)
            task.add_done_callback(removals.discard)

    ban_sync = loop.create_task(sync_bans(front, redis, cfg.ban_refresh)) if front is not None else None
    sync_protect = sync_counters(lambda: {**(front.stats if front is not None else {}), **refused}, metrics.protect)
    sync = sync_counters(lambda: {**core.stats.flat(), **transports.stats.flat()}, metrics.events)
    sync_keepalives = sync_counters(registrations.stats.flat, metrics.keepalives)
    sync_refused = sync_counters(lambda: dict(transports.stats.refused), metrics.connections_refused)
    sync_groups = sync_counters(lambda: dict(core.stats.group_unavailable), metrics.group_unavailable)
    sync_shed = sync_counters(lambda: dict(core.stats.shed), metrics.shed)
    sync_overload = sync_counters(admission.stats.flat if admission is not None else dict, metrics.overload)
    shed_logged = (0, -math.inf)  # shed count and time of the last warning
    pinned_groups = sorted(core.groups.groups) if core.groups is not None else []
    tune_gc()
    stop = stop_on_signals(loop)
    log.info(
        "event=balancer_started id=%s listen=%s internal=%s group_rules=%d allow=%s deny=%s",
        cfg.balancer_id,
        ",".join(str(a) for a in public.values()),
        internal,
        len(cfg.groups),
        ",".join(cfg.allow) or "any",
        ",".join(cfg.deny) or "none",
    )
    if ready is not None:
        ready.set()
    ticks = 0
    try:
        while not stop.is_set():
            probe_tick()
            keepalive_tick()
            if admission is not None:
                admission.expire(time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.probe_interval / 2)
            ticks += 1
            if ticks % 4 == 0:
                sync()
                sync_keepalives()
                sync_refused()
                metrics.connections_open.set(transports.open_connections)
                metrics.keepalive_flows.set(len(registrations.flows))
                metrics.nodes_usable.set(nodes.usable_count)
                metrics.nodes_known.set(len(nodes.nodes))
                sync_groups()
                sync_protect()
                if admission is not None:
                    sync_shed()
                    sync_overload()
                    metrics.nodes_overloaded.set(admission.overloaded_count())
                    shed_now, now = sum(core.stats.shed.values()), time.monotonic()
                    if shed_now > shed_logged[0] and now - shed_logged[1] >= SHED_LOG_INTERVAL:
                        # one line per interval while shedding: how many, and each node's
                        # limit/pending (the counters have the rest)
                        log.warning(
                            "event=shedding shed=%d since_s=%.1f nodes=%s",
                            shed_now - shed_logged[0],
                            min(now - shed_logged[1], 1e9),
                            ",".join(f"{n}:{int(v.limit)}/{len(v.pending)}" for n, v in admission.nodes.items()),
                        )
                        shed_logged = (shed_now, now)
                if front is not None:
                    metrics.bans_known.set(front.bans_known)
                for group in pinned_groups:
                    metrics.group_nodes_usable(group).set(nodes.usable_in(group))
    finally:
        if heartbeater is not None:
            await heartbeater.stop()
        await watcher.stop()
        if ban_sync is not None:
            ban_sync.cancel()
            # bounded: a cancellation swallowed inside the Redis client must not hang the
            # shutdown (see MemberWatcher.stop)
            done, _ = await asyncio.wait({ban_sync}, timeout=2.0)
            if not done:
                log.warning("event=ban_sync_stop_timeout")
            elif not ban_sync.cancelled() and ban_sync.exception() is not None:
                log.error("event=ban_sync_task_failed error=%r", ban_sync.exception())
        for task in removals:
            task.cancel()
        for server in ws_servers:
            close = getattr(server, "close", None)
            if close is not None:
                close()
        await transports.close()
        await redis.aclose()


def transport_config(cfg: BalancerConfig) -> TransportConfig:
    """The client-facing transports' limits from the ``[balancer]`` settings."""
    from sipfarm.transport.config import TransportConfig  # noqa: PLC0415

    return TransportConfig(
        udp_recv_buffer=cfg.udp_recv_buffer,
        udp_batchio=cfg.udp_batchio,
        udp_batch_interval=cfg.udp_batch_interval,
        idle_timeout=cfg.stream_idle_timeout,
        max_connections=cfg.max_connections,
        max_connections_per_source=cfg.max_connections_per_source or None,
        tls_handshake_timeout=cfg.handshake_timeout,
        ws_open_timeout=cfg.handshake_timeout,
        first_message_timeout=cfg.first_message_timeout,
        message_timeout=cfg.message_timeout,
        # the core stamps received/rport on clients' requests (BalancerCore stamp_via): a
        # node's requests need none, answers to them find their way by our branch
        stamp_via=False,
    )


def exempt_networks(exempt: list[str], config_path: str | None) -> list[str]:
    """``exempt`` and the farm's own peers from the config file's ``[routing]`` section (its
    trusted gateways and trunks and the IP literals it forwards to, read at start): one gateway
    carries many callers' calls, so a per-source budget made it one caller (banned for
    ``ban_time`` past 50 INVITEs a second over TCP, its calls cut off with it)."""
    if not config_path:
        return list(exempt)
    from sipfarm.routing.peers import peer_networks  # noqa: PLC0415
    from sipfarm.routing.table import load_routing  # noqa: PLC0415

    out = list(exempt)
    for net in peer_networks(load_routing(config_path)):
        if str(net) not in out:
            out.append(str(net))
    return out


def source_matcher(networks: list[str]) -> Callable[[str], bool]:
    """Whether an IP address string is in one of ``networks`` (validated CIDR strings)."""
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]

    def matches(host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in nets)

    return matches


def overload_policy(cfg: BalancerConfig) -> OverloadPolicy:
    from sipfarm.balancer.overload import OverloadPolicy  # noqa: PLC0415

    return OverloadPolicy(
        target=cfg.shed_target,
        initial_limit=cfg.shed_limit,
        min_limit=cfg.shed_min_limit,
        max_limit=cfg.shed_max_limit,
        late_after=cfg.shed_late,
        node_load=cfg.shed_node_load,
    )


def front_door_policy(cfg: BalancerConfig) -> FrontDoorPolicy:
    from sipfarm.balancer.frontdoor import FrontDoorPolicy  # noqa: PLC0415
    from sipfarm.protect.pike import RateBudgets  # noqa: PLC0415

    budgets = RateBudgets(
        register=cfg.rate_register,
        invite=cfg.rate_invite,
        other=cfg.rate_other,
        suspect=cfg.rate_suspect,
        window=cfg.rate_window,
    )
    return FrontDoorPolicy(
        budgets=budgets,
        ban_time=cfg.ban_time,
        ban_after=cfg.rate_ban_after,
        scanner_agents=tuple(cfg.scanner_agents),
        exempt=tuple(cfg.exempt),
        domains=tuple(cfg.domains),
    )


#: seconds between two full reads of the farm's bans (between them, only the ban log's changes)
BAN_FULL_READ = 30.0
#: milliseconds the ban log is read back before the last read began (writers' clocks differ)
BAN_LOG_OVERLAP_MS = 5_000.0


async def sync_bans(front: FrontDoor, redis: Redis, refresh: float) -> None:
    """The front door's bans and the farm's, in the background (never on the forwarding path):
    bans started here are written to Redis within 0.1 s, under the keys the nodes' guard and
    ``sipfarm ban`` use; every ``refresh`` seconds the changes since the last read (the ban log,
    :data:`~sipfarm.protect.guard.BAN_LOG`) are read into the local copy, so bans started by
    other balancers or nodes (or lifted) apply here within that time, and every
    :data:`BAN_FULL_READ` seconds (or after a failed read) the whole index replaces it: a
    refresh costs the changes, not every ban (an attacker banned from 100,000 addresses made
    each refresh read 100,000 keys twice)."""
    from sipfarm.protect.bans import BALANCER_REASON, BanStore  # noqa: PLC0415
    from sipfarm.protect.guard import BAN_LOG_KEEP  # noqa: PLC0415
    from sipfarm.store.errors import StoreError  # noqa: PLC0415

    store = BanStore(redis)
    step = min(0.1, refresh)
    last_read = -math.inf
    last_full = -math.inf
    last_ok = -math.inf
    log_since: float | None = None  # wall ms the next log read starts from (None: read in full)
    while True:
        for ban in front.take_new_bans():
            value = BALANCER_REASON + ban.reason.encode()
            try:
                await store.add(ban.source, ban.seconds if ban.seconds > 0 else None, value)
            except StoreError as exc:  # Redis down: the local ban still holds
                front.count("ban_write_failed")
                log.warning("event=ban_write_failed source=%s error=%s", ban.source, str(exc).replace(" ", "_"))
            else:
                log.info("event=source_banned source=%s reason=%s seconds=%g", ban.source, ban.reason, ban.seconds)
        now = time.monotonic()
        if now - last_read >= refresh:
            last_read = now
            if now - last_ok > BAN_LOG_KEEP / 2 or now - last_full >= BAN_FULL_READ:
                log_since = None  # the log may have been trimmed past what was read last
            try:
                if log_since is None:
                    remote, wall = await asyncio.wait_for(store.current(), max(1.0, refresh * 2))
                    front.replace_bans(remote, time.monotonic(), now)
                    last_full = now
                else:
                    changed, wall = await asyncio.wait_for(store.changes(log_since), max(1.0, refresh * 2))
                    front.update_bans(changed, time.monotonic(), now)
            except (StoreError, TimeoutError) as exc:  # keep the last copy until Redis answers
                front.count("ban_read_failed")
                log.debug("event=ban_read_failed error=%s", str(exc).replace(" ", "_"))
            else:
                last_ok = now
                log_since = wall - BAN_LOG_OVERLAP_MS
        await asyncio.sleep(step)
