"""``sipfarm node``: wires transports, the node core, Redis, metrics and the heartbeat together.

With ``--workers N`` (N > 1) this process becomes a supervisor: it starts N worker processes
that share the SIP ports with SO_REUSEPORT (like Kamailio's children), serves their aggregated
metrics, and restarts a worker that dies.  Each worker also binds a private UDP port that it
puts in its Via, so responses come back to the worker holding the transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING

from sipfarm import __version__
from sipfarm.config import ConfigError, NodeConfig, flag_list, load
from sipfarm.logs import setup_logging
from sipfarm.sip.address import Address
from sipfarm.transport.loop import stop_on_signals, tune_gc

if TYPE_CHECKING:
    from sipfarm.cluster.membership import Member
    from sipfarm.proxy.relay_choice import RelayLoad
    from sipfarm.routing.ldap_directory import LdapConfig

log = logging.getLogger("sipfarm.node")

NONCE_SECRET_KEY = "sipfarm:nonce-secret"  # noqa: S105 - a Redis key name
FLOW_SECRET_KEY = "sipfarm:flow-secret"  # noqa: S105 - shared with the balancers


def _flags(args: argparse.Namespace) -> dict[str, object]:
    return {
        "listen": args.listen,
        "redis": args.redis or os.environ.get("REDIS_URL"),
        "domains": args.domains,
        "workers": args.workers,
        "metrics": args.metrics,
        "node_id": args.node_id,
        "advertise": args.advertise,
        "relays": getattr(args, "relays", None),
        "group": getattr(args, "group", None),
        "accept_from": flag_list(getattr(args, "accept_from", None)),
        "log_format": args.log_format,
        "log_level": args.log_level,
    }


def run_node(args: argparse.Namespace) -> int:
    try:
        cfg = load(NodeConfig, args.config, _flags(args), section="node")
    except ConfigError as exc:
        print(f"sipfarm node: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.config:
        from sipfarm.routing.table import RoutingError, load_routing  # noqa: PLC0415

        try:
            load_routing(args.config)  # checked before anything starts; read again in serve()
            ldap_section(args.config)
        except (RoutingError, ValueError) as exc:
            print(f"sipfarm node: routing table error: {exc}", file=sys.stderr)
            return 2
    setup_logging(cfg.log_level, cfg.log_format)
    if not cfg.node_id:
        from sipfarm.cluster.membership import default_member_id  # noqa: PLC0415

        cfg.node_id = default_member_id()
    worker_index = getattr(args, "worker_index", None)
    if cfg.workers > 1 and worker_index is None:
        return supervise_workers(cfg, args)
    if worker_index is not None:
        from sipfarm.workers import die_with_supervisor  # noqa: PLC0415

        die_with_supervisor()
    from sipfarm.transport.loop import install_uvloop  # noqa: PLC0415

    install_uvloop()
    try:
        asyncio.run(serve(cfg, worker_index=worker_index, config_path=args.config))
    except OSError as exc:
        log.error("event=node_failed error=%s", str(exc).replace(" ", "_"))
        print(f"sipfarm node: {exc}", file=sys.stderr)
        return 1
    return 0


def _no_flow(_source: Address) -> bool:
    return False


async def _shared_secret(pipe: object, fallback: bytes, key: str = NONCE_SECRET_KEY) -> bytes:
    """A farm-wide secret: created once in Redis (SET NX), read by every process."""
    from sipfarm.store.resp import RedisPipe  # noqa: PLC0415

    assert isinstance(pipe, RedisPipe)
    candidate = secrets.token_hex(32)
    await pipe.execute("SET", key, candidate, "NX")
    value = await pipe.execute("GET", key)
    return bytes(value) if value else fallback


async def serve(
    cfg: NodeConfig,
    *,
    worker_index: int | None = None,
    ready: asyncio.Event | None = None,
    config_path: str | None = None,
) -> None:
    from sipfarm.cluster.heartbeat import start_heartbeat  # noqa: PLC0415
    from sipfarm.cluster.membership import Member, MembershipStore, Role  # noqa: PLC0415
    from sipfarm.metrics import NodeMetrics, serve_metrics, sync_counters  # noqa: PLC0415
    from sipfarm.node.accept import AcceptFrom, balancer_networks  # noqa: PLC0415
    from sipfarm.node.core import NodeCore, NodeIdentity  # noqa: PLC0415
    from sipfarm.node.farmstate import FarmState  # noqa: PLC0415
    from sipfarm.node.glue import NodeGlue  # noqa: PLC0415
    from sipfarm.protect import GuardPolicy, RedisGuard  # noqa: PLC0415
    from sipfarm.registrar.bindings import ExpiresPolicy  # noqa: PLC0415
    from sipfarm.sip.auth import NonceFactory  # noqa: PLC0415
    from sipfarm.sip.transaction import TimerConfig  # noqa: PLC0415
    from sipfarm.store.errors import StoreError  # noqa: PLC0415
    from sipfarm.store.redis_client import create_redis  # noqa: PLC0415
    from sipfarm.store.resp import is_cluster_url  # noqa: PLC0415
    from sipfarm.store.resp_cluster import open_pipe  # noqa: PLC0415
    from sipfarm.transport.config import TransportConfig  # noqa: PLC0415
    from sipfarm.transport.destinations import DestinationPolicy  # noqa: PLC0415
    from sipfarm.transport.manager import TransportManager  # noqa: PLC0415
    from sipfarm.transport.resolver import Resolver  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    metrics = NodeMetrics(multiprocess=worker_index is not None)
    if cfg.metrics and worker_index is None:
        serve_metrics(cfg.metrics, metrics.registry)
    pipe = open_pipe(cfg.redis)
    cluster = is_cluster_url(cfg.redis)
    pipe.require_replicas(cfg.replicas_ack, max(1, round(cfg.replicas_ack_timeout * 1000)))
    await pipe.start()
    state = FarmState(
        pipe, account_cache_ttl=cfg.account_cache_ttl, observe=metrics.redis_seconds.observe, cluster=cluster
    )
    secret = cfg.nonce_secret.encode() if cfg.nonce_secret else secrets.token_bytes(32)
    # the farm-wide secrets before anything is served: a nonce minted with a local secret and
    # then checked with the farm's would make the first clients' credentials stale (401 again)
    farm_secrets: tuple[bytes, bytes] | None = None
    with contextlib.suppress(StoreError, OSError, asyncio.TimeoutError):
        nonce_secret = secret if cfg.nonce_secret else await asyncio.wait_for(_shared_secret(pipe, secret), 2.0)
        flow_secret = await asyncio.wait_for(_shared_secret(pipe, secret, FLOW_SECRET_KEY), 2.0)
        farm_secrets = (nonce_secret, flow_secret)
        secret = nonce_secret
    nonces = NonceFactory(secret, cfg.nonce_lifetime)

    multi = worker_index is not None
    glue_holder: list[NodeGlue] = []

    def on_message(msg: object, source: Address, local: Address) -> None:
        if glue_holder:  # a message in the moment between binding and the core's creation is dropped
            glue_holder[0].on_message(msg, source, local)  # type: ignore[arg-type]

    def on_send_failure(dest: Address) -> None:
        glue_holder[0].on_send_failure(dest)  # every transaction whose remote is dest

    transports = TransportManager(
        on_message,
        on_send_failure=on_send_failure,
        config=TransportConfig(
            udp_recv_buffer=cfg.udp_recv_buffer,
            udp_batchio=cfg.udp_batchio,
            udp_batch_interval=cfg.udp_batch_interval,
        ),
    )
    # STUN keep-alives are answered only on the UDP flows phones registered over straight to
    # this node (the registrar's DirectFlows, set once the core exists): none before
    transports.stun_allowed = _no_flow
    # [node] accept_from: before anything listens, so no request slips in unscreened
    accept = AcceptFrom(cfg.accept_from)
    if accept.open:
        log.info("event=node_open accept_from=anyone hint=behind_balancers_set_accept_from_balancers,peers")
    else:
        transports.screen = accept.screen
        transports.allow_source = accept.allow_source
    bound: list[Address] = [await transports.listen(spec, reuse_port=multi) for spec in cfg.listen]
    addresses: dict[str, tuple[str, int]] = {}
    for addr in bound:
        host = cfg.advertise or addr.host
        addresses.setdefault(addr.transport, (host, addr.port))
    aliases = {(a.host, a.port) for a in bound} | {(h, p) for h, p in addresses.values()}
    # Record-Route and Path name the port every worker shares: a dialog outlives its worker
    route_addresses = dict(addresses)
    private: Address | None = None
    if multi and "udp" in addresses:
        # a worker's Via names a private port of its own, so responses come back to the worker
        # holding the transaction
        udp_host = next(a.host for a in bound if a.transport == "udp")
        private = await transports.listen(f"udp:{udp_host}:0")
        addresses["udp"] = (cfg.advertise or udp_host, private.port)
        aliases.add((private.host, private.port))
    identity = NodeIdentity(
        node_id=cfg.node_id,
        domains=frozenset(d.lower() for d in cfg.domains),
        addresses=addresses,
        aliases=frozenset(aliases),
        route_addresses=route_addresses,
    )
    destinations = DestinationPolicy(allow=cfg.allow_destinations, deny=cfg.internal_networks, own=transports.addresses)
    # the farm's own services are never a destination a message names, even where loopback or
    # an internal network is allowed (red team, 2026-12-03: an in-dialog request's Request-URI
    # reached Redis; a password stops its commands, not the traffic)
    destinations.refuse(redis_endpoints(cfg.redis))
    guard = RedisGuard(
        pipe,
        GuardPolicy(
            max_failures=cfg.auth_max_failures,
            window=cfg.auth_failure_window,
            ban_time=cfg.auth_ban_time,
            account_lock=cfg.auth_account_lock,
            max_failures_working=cfg.auth_max_failures_working,
            working_time=cfg.auth_working_time,
        ),
        clock=loop.time,
    )
    resolver = Resolver()
    media = None
    ng_client = None
    relay_table = None
    if cfg.relays:
        from sipfarm.proxy.ng_client import NgClient  # noqa: PLC0415
        from sipfarm.proxy.relay_choice import RelayTable  # noqa: PLC0415
        from sipfarm.proxy.relay_media import RelayMedia  # noqa: PLC0415

        ng_client = NgClient(timeout=cfg.relay_timeout)
        if cfg.relays == ["cluster"]:
            relay_table = RelayTable()  # filled from the membership below
        else:
            # canonical IPs (validated by the config): replies are matched against them
            relay_table = RelayTable(
                [
                    (str(ipaddress.ip_address(h.strip("[]"))), int(p))
                    for h, _, p in (r.rpartition(":") for r in cfg.relays)
                ]
            )
            destinations.refuse(relay_table.addresses)  # their ng ports: never a SIP destination
        media = RelayMedia(
            ng_client,
            relay_table,
            loop.time,
            on_failure=cfg.media_failure,
            calls=state,
            count=lambda outcome: metrics.media(outcome).inc(),
        )
    from sipfarm.routing.router import Router  # noqa: PLC0415
    from sipfarm.routing.table import load_routing  # noqa: PLC0415

    # the router table of the config file's [routing] section (checked in run_node); re-read on
    # SIGHUP and when `sipfarm reload` bumps ROUTING_EPOCH_KEY in Redis
    router = Router(identity.domains, load_routing(config_path) if config_path else None)
    accept.set_peers(router.table)
    from sipfarm.transport.rfc3263 import ServerLocator  # noqa: PLC0415

    # gateways by name: RFC 3263 (NAPTR, SRV, A/AAAA) with failover to the next target
    locator = ServerLocator(list(router.table.nameservers) or None)
    routing_helper = None
    if router.table.helper is not None:
        from sipfarm.routing.helpers import HelperConfig, RoutingHelper  # noqa: PLC0415

        # the external helper of `action = "helper"` rules: a program pool or an HTTP service
        routing_helper = RoutingHelper(HelperConfig.from_dict(router.table.helper))
        routing_helper.start()
        router.helper = routing_helper
    directory = None
    directory_state = None
    ldap = ldap_section(config_path) if config_path else None
    if ldap is not None:
        from sipfarm.routing.directory import DirectoryAliases, DirectoryState  # noqa: PLC0415
        from sipfarm.routing.ldap_directory import LdapDirectory, RedisDirectoryCache  # noqa: PLC0415

        # [ldap]: accounts not in Redis and aliases from a shared directory, cached in Redis
        directory = LdapDirectory(ldap, RedisDirectoryCache(create_redis(cfg.redis)))
        directory_state = DirectoryState(state, directory)
        router.aliases = DirectoryAliases(directory)
    core = NodeCore(
        identity,
        directory_state or state,
        nonces,
        metrics=metrics,
        resolver=resolver,
        clock=loop.time,
        timers=TimerConfig(t1=cfg.t1, t2=cfg.t2, t4=cfg.t4, trying=cfg.trying_delay),
        max_transactions=cfg.max_transactions,
        max_transaction_bytes=cfg.max_transaction_bytes,
        max_pending_invites=cfg.max_pending_invites,
        max_pending_invite_bytes=cfg.max_pending_invite_bytes,
        policy=ExpiresPolicy(cfg.min_expires, cfg.max_expires, cfg.default_expires),
        auth_requests=cfg.auth_invite,
        digest_algorithms=tuple(cfg.digest_algorithms),
        flow_timer_udp=cfg.flow_timer_udp,
        flow_timer_stream=cfg.flow_timer_stream,
        guard=guard,
        destinations=destinations,
        media=media,
        router=router,
        locator=locator,
    )
    if farm_secrets is not None:
        core.use_farm_secret(farm_secrets[1])  # before any message can reach the core
    direct_flows = core.registrar.direct_flows
    transports.stun_allowed = lambda source: direct_flows.allows(source, time.time())
    glue = NodeGlue(core, transports.send, loop)
    ng_endpoint = None
    if ng_client is not None:
        from sipfarm.node.glue import NgEndpoint  # noqa: PLC0415

        ng_endpoint = await NgEndpoint.open(ng_client, loop, glue.drain)
    if private is not None:
        glue.request_socket = private
    glue_holder.append(glue)
    # from now on the transport calls the glue straight (no interpreted frame per message)
    transports.on_message = glue.on_message
    pipe.after_replies = glue.drain  # Redis answers are inputs too: drain after each batch
    resolver.after = glue.drain
    locator.after = glue.drain
    router.after = glue.drain
    if directory_state is not None:
        directory_state.after = glue.drain
        from sipfarm.routing.directory import DirectoryAliases  # noqa: PLC0415

        assert isinstance(router.aliases, DirectoryAliases)
        router.aliases.after = glue.drain

    async def fetch_secrets() -> None:
        # farm-wide: nonces any node verifies (unless configured), flow tokens and seals any
        # node or balancer reads
        while True:
            try:
                if not cfg.nonce_secret:
                    core.nonces = NonceFactory(await _shared_secret(pipe, secret), cfg.nonce_lifetime)
                core.use_farm_secret(await _shared_secret(pipe, secret, FLOW_SECRET_KEY))
                return
            except (StoreError, OSError):
                await asyncio.sleep(0.5)

    secret_tasks: list[asyncio.Task[None]] = []  # a reference, so the task is not collected
    if farm_secrets is None:  # Redis not there at start: local secrets until it answers
        secret_tasks.append(loop.create_task(fetch_secrets()))

    sync_transport = sync_counters(transports.stats.flat, metrics.transport_events)
    sync_dropped = sync_counters(lambda: accept.stats, metrics.dropped)
    sync_redis = sync_counters(pipe.stats, metrics.redis_events)
    sync_transactions = sync_counters(core.layer.stats.as_dict, metrics.transaction_events)
    # unexpected exceptions: in parsing (the transport's) and in handlers of Redis replies
    internal: dict[str, int] = {"seen": 0}

    def sync_internal() -> None:
        seen = transports.stats.internal_errors + pipe.callback_failures
        if seen > internal["seen"]:
            metrics.internal_errors.inc(seen - internal["seen"])
            internal["seen"] = seen

    registrations = {"bindings": 0, "aors": 0}

    def count_registrations() -> None:
        def got(reply: object) -> None:
            if isinstance(reply, list) and len(reply) == 4:
                registrations["aors"] = int(reply[2])
                registrations["bindings"] = int(reply[3])

        # the location index (see sipfarm.store.location): prune what expired, then count, in
        # every piece (one on one Redis, each shard on a Cluster)
        from sipfarm.store.location import index_pieces  # noqa: PLC0415

        now = time.time()
        pieces = index_pieces(cluster)

        def pruned_aors(_: object) -> None:
            return None

        totals = [0, 0, 0]  # aors, bindings, replies in

        def collect(which: int, reply: object) -> None:
            if isinstance(reply, int):
                totals[which] += reply
            totals[2] += 1
            if totals[2] == 2 * len(pieces):
                got([0, 0, totals[0], totals[1]])

        for aor_index, binding_index in pieces:
            pipe.call(pruned_aors, "ZREMRANGEBYSCORE", aor_index, "-inf", now)
            pipe.call(pruned_aors, "ZREMRANGEBYSCORE", binding_index, "-inf", now)
            pipe.call(partial(collect, 0), "ZCARD", aor_index)
            pipe.call(partial(collect, 1), "ZCARD", binding_index)

    membership_redis = create_redis(cfg.redis, client_name=f"sipfarm-node-{cfg.node_id}")
    membership = MembershipStore(membership_redis)
    started_at = time.time()
    sip_addresses = tuple(str(a) for a in bound)

    def member() -> Member:
        return Member(
            id=cfg.node_id,
            role=Role.NODE,
            addresses=sip_addresses,
            load=float(len(core.layer)),
            registrations=registrations["bindings"],
            transactions=len(core.layer),
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=started_at,
            version=__version__,
            group=cfg.group or None,
        )

    heartbeater = start_heartbeat(membership, member, interval=cfg.heartbeat, leader=not multi or worker_index == 0)
    relay_watcher = None
    if relay_table is not None and cfg.relays == ["cluster"]:
        from sipfarm.cluster.watcher import MemberWatcher  # noqa: PLC0415

        relay_watcher = MemberWatcher(membership, Role.RELAY, interval=0.5)
        table = relay_table

        def relays_changed(_change: object = None) -> None:
            loads = relay_loads(relay_watcher.active() if relay_watcher is not None else ())
            table.update(loads)
            destinations.refuse(load.address for load in loads)  # their ng ports, as above

        relay_watcher.add_listener(relays_changed)
        relay_watcher.start()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay_watcher.poll(), 1.0)  # the relays before the first call
        relays_changed()

    def log_accepted(why: str) -> None:
        log.info(
            "event=accept_from reason=%s accepted=%s",
            why,
            ",".join(str(n) for n in accept.accepted) or "nobody_yet",
        )

    balancer_watcher = None
    if accept.want_balancers:
        from sipfarm.cluster.watcher import MemberWatcher  # noqa: PLC0415

        # the balancers as they come and go: a new one is accepted within a poll of its first
        # heartbeat, one gone (its record expired) no more
        balancer_watcher = MemberWatcher(membership, Role.BALANCER, interval=min(0.25, cfg.heartbeat))
        watched = balancer_watcher

        unplaced: set[str] = set()  # balancers already reported as sending from nowhere known

        def balancers_changed(_change: object = None, *, starting: bool = False) -> None:
            members = watched.snapshot()
            if accept.set_balancers(members) and not starting:
                log_accepted("balancers_changed")
            for lb in members:
                if lb.id not in unplaced and not balancer_networks([lb]):
                    unplaced.add(lb.id)  # a wildcard or a name: its requests are refused here
                    log.warning("event=accept_from_balancer_unknown_address balancer=%s hint=set_its_internal", lb.id)

        balancer_watcher.add_listener(balancers_changed)
        balancer_watcher.start()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(balancer_watcher.poll(), 1.0)  # the balancers before serving
        balancers_changed(starting=True)  # logged with the rest just below
    if not accept.open:
        log_accepted("started")

    def reload_routing(why: str) -> None:
        if not config_path:
            return
        error = router.reload(config_path)
        if error is None:
            log.info("event=routing_reloaded reason=%s rules=%d", why, len(router.table.rules))
            if accept.set_peers(router.table):
                log_accepted("peers_reloaded")
        else:
            log.error("event=routing_reload_refused reason=%s error=%s", why, error.replace(" ", "_"))

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reload_routing, "sighup")
    # the epoch's value at the last read (None: never bumped), read before serving: a bump
    # from then on is a reload (the table was read from the file just before)
    epoch: list[object] = [await pipe.execute("GET", ROUTING_EPOCH_KEY) if config_path else None]

    def routing_epoch(value: object) -> None:
        if isinstance(value, Exception):
            return
        if value != epoch[0]:
            reload_routing("sipfarm_reload")
        epoch[0] = value

    tune_gc()
    stop = stop_on_signals(loop)
    log.info(
        "event=node_started node_id=%s listen=%s worker=%s", cfg.node_id, ",".join(str(a) for a in bound), worker_index
    )
    if ready is not None:
        ready.set()
    tick = 0
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            tick += 1
            if config_path:
                pipe.call(routing_epoch, "GET", ROUTING_EPOCH_KEY)
            sync_transport()
            sync_dropped()
            sync_redis()
            sync_transactions()
            sync_internal()
            metrics.flush()  # a worker's per-message counters into the multiprocess files
            metrics.transactions.set(len(core.layer))
            metrics.transaction_bytes.set(core.layer.retained_bytes)
            if tick % 5 == 1 and (not multi or worker_index == 0):
                count_registrations()
                metrics.registrations.set(registrations["bindings"])
                metrics.registered_aors.set(registrations["aors"])
    finally:
        log.info("event=node_stopping node_id=%s", cfg.node_id)
        sync_transactions()
        metrics.flush()
        if heartbeater is not None:
            await heartbeater.stop()
        if relay_watcher is not None:
            await relay_watcher.stop()
        if balancer_watcher is not None:
            await balancer_watcher.stop()
        glue.close()
        locator.close()
        if routing_helper is not None:
            await routing_helper.aclose()
        if directory is not None:
            await directory.aclose()
        if ng_endpoint is not None:
            ng_endpoint.close()
        await transports.close()
        await pipe.close()
        await membership_redis.aclose()


#: bumped by `sipfarm reload`: every node reads its config file's [routing] section again
ROUTING_EPOCH_KEY = "sipfarm:routing:epoch"


def ldap_section(path: str) -> LdapConfig | None:
    """The config file's [ldap] section (the shared directory), checked; None when absent."""
    import tomllib  # noqa: PLC0415

    with open(path, "rb") as f:
        data = tomllib.load(f)
    section = data.get("ldap")
    if section is None:
        return None
    from sipfarm.routing.ldap_directory import LdapConfig  # noqa: PLC0415

    if not isinstance(section, dict):
        raise ValueError("ldap: expected a table")
    return LdapConfig.from_dict(section)


def redis_endpoints(url: str) -> list[tuple[str, int]]:
    """The Redis addresses a farm URL names (a server, a cluster's seeds, the sentinels), for
    the destination policy; [] for one it cannot read (the store reports that itself)."""
    from sipfarm.store.resp import is_cluster_url, parse_cluster_url, parse_redis_url  # noqa: PLC0415
    from sipfarm.store.sentinel import is_sentinel_url, parse_sentinel_url  # noqa: PLC0415

    try:
        if is_cluster_url(url):
            return list(parse_cluster_url(url)[0])
        if is_sentinel_url(url):
            return list(parse_sentinel_url(url).sentinels)
        host, port, *_ = parse_redis_url(url)
        return [(host, port)]
    except ValueError:
        return []


def relay_loads(members: Iterable[Member]) -> list[RelayLoad]:
    """The relays of the membership a node may send new calls to: active, with an ng address."""
    from sipfarm.cluster.membership import MemberState, parse_address  # noqa: PLC0415
    from sipfarm.proxy.relay_choice import RelayLoad  # noqa: PLC0415

    out: list[RelayLoad] = []
    for member in members:
        if member.state is not MemberState.ACTIVE or not member.control_address:
            continue
        try:
            _transport, host, port = parse_address(member.control_address)
            host = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            continue
        out.append(RelayLoad((host, port), member.load, member.free_ports))
    return out


def supervise_workers(cfg: NodeConfig, args: argparse.Namespace) -> int:
    """Run ``cfg.workers`` worker processes on the same ports; serve their summed metrics."""
    from sipfarm.workers import supervise  # noqa: PLC0415

    argv = [
        sys.executable,
        "-m",
        "sipfarm",
        "node",
        "--redis",
        cfg.redis,
        "--node-id",
        cfg.node_id,
        "--log-level",
        cfg.log_level,
        "--log-format",
        cfg.log_format,
    ]
    if args.config:
        argv += ["--config", args.config]
    if cfg.advertise:
        argv += ["--advertise", cfg.advertise]
    if cfg.group:
        argv += ["--group", cfg.group]
    if cfg.accept_from:
        argv += ["--accept-from", ",".join(cfg.accept_from)]
    for spec in cfg.listen:
        argv += ["--listen", spec]
    for domain in cfg.domains:
        argv += ["--domain", domain]
    return supervise(argv, cfg.workers, cfg.metrics)
