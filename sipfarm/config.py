"""Typed configuration: one dataclass per process, from TOML, then environment, then flags.

``load(NodeConfig, path, flags)`` reads ``[node]`` (the section is the process role) from a TOML
file, then ``SIPFARM_<KEY>`` environment variables, then explicit command-line values, and
validates every field's type and range.  A bad value raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sipfarm.sip.address import Address

#: the words [node] accept_from takes besides networks
ACCEPT_KEYWORDS = ("balancers", "peers")
#: the words [relay] accept_from takes besides networks
RELAY_ACCEPT_KEYWORDS = ("nodes",)
# [node]/[balancer] udp_batch_interval (s): see NodeConfig; chosen by measurement
# (benchmarks/README.md, "The balancer's cost per call" and "Reading a busy balancer socket
# once per millisecond")
UDP_BATCH_INTERVAL = 0.0
# [node] trying_delay (s): see NodeConfig (benchmarks/README.md, "A 100 Trying only when the
# callee is slow: measured, no gain")
TRYING_DELAY = 0.0
BALANCER_UDP_BATCH_INTERVAL = 0.001


class ConfigError(ValueError):
    """A configuration value that is missing, of the wrong type or out of range."""


@dataclass(slots=True)
class NodeConfig:
    """A registrar/proxy node (``sipfarm node``)."""

    listen: list[str] = field(default_factory=lambda: ["udp:127.0.0.1:5071"])
    # The farm's shared state (the same URL forms for the balancer and the relay):
    # redis[s]://[[USER]:PASSWORD@]HOST:PORT/DB, redis[s]+sentinel://...HOST:PORT[,...]/SERVICE,
    # or redis[s]+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...] (a Redis Cluster: any
    # seed nodes; README "Redis: one server or a Redis Cluster")
    redis: str = "redis://127.0.0.1:6379/0"
    domains: list[str] = field(default_factory=lambda: ["farm.test"])
    workers: int = 1
    metrics: str = ""  # HOST:PORT of the Prometheus endpoint, empty = none
    node_id: str = ""  # default: host-pid-RANDOM (cluster.membership.default_member_id)
    # Static cluster: the node group this node announces (balancers pin the accounts of their
    # [balancer] groups rules to it); empty: the dynamic pool, any account.
    group: str = ""
    # Address written into Record-Route and Via when the listen address is a wildcard.
    advertise: str = ""
    max_transactions: int = 200_000
    # the message bytes live transactions may hold (requests, retransmitted responses): past it
    # new requests get 503 (a 64 KB request held for Timer J/H costs 64 KB; the count alone
    # would let 200,000 of them take 12.8 GB)
    max_transaction_bytes: int = 256 * 2**20
    # an authenticated account's calls in progress (INVITEs not answered yet) on this node may
    # hold at most max_pending_invite_bytes of the transaction memory above and be at most
    # max_pending_invites: past either, 403 (one account's never-answered calls would otherwise
    # fill that memory for every caller; the count bounds a stolen account's calls at once).
    # 0: no bound
    max_pending_invites: int = 1000
    max_pending_invite_bytes: int = 16 * 2**20
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    # 0 (the default): an INVITE is answered 100 Trying at once, as Kamailio's tm does. > 0:
    # only when no other answer (the callee's 180, a final) has gone back this long after it
    # arrived, or at once when the caller retransmits (RFC 3261 17.2.1: not needed when one
    # comes within 200 ms): most calls ring within a few ms, so one datagram less per call
    # for the node and the balancer (measured: no CPU gain on loopback, benchmarks/README.md).
    # At most 0.2; keep it under the balancers' shed_target (0.1), which a node's first
    # answer to an INVITE is measured against.
    trying_delay: float = TRYING_DELAY
    nonce_lifetime: float = 300.0
    nonce_secret: str = ""  # empty: a farm-wide secret kept in Redis
    min_expires: int = 60
    max_expires: int = 7200
    default_expires: int = 3600
    # Offered (one challenge each, in this order) and the only ones accepted. MD5 alone by
    # default: it is the one challenge every client reads (baresip fails on a second
    # WWW-Authenticate; JsSIP and SIP.js keep only the last one and know only MD5; SIPp reads
    # the first). ["SHA-256", "MD5"] turns on RFC 8760 for phones that pick the strongest.
    digest_algorithms: list[str] = field(default_factory=lambda: ["MD5"])
    # Brute force (farm-wide, in Redis): this many failed authentications from one source
    # address within auth_failure_window seconds ban that source for auth_ban_time seconds.
    auth_max_failures: int = 10
    auth_failure_window: float = 300.0
    auth_ban_time: float = 900.0
    # Failures against an account that authenticated from the same source within
    # auth_working_time seconds (its phone works: an office behind one NAT address) ban the
    # source at auth_max_failures_working instead: one phone with a stale password retrying
    # every 30 s must not cut off all the others
    auth_max_failures_working: int = 100
    auth_working_time: float = 3600.0
    # Guessing spread over many addresses: past auth_account_lock failures against one account
    # within auth_failure_window, only the hosts its bindings were registered from may still
    # authenticate as it until that window ends (its phones keep working; see protect/guard.py)
    auth_account_lock: int = 50
    # A destination taken from a message (an in-dialog Request-URI or Route, a Contact) may not
    # be the farm itself or one of these networks (loopback and the operator's internal ones)
    # unless listed in allow_destinations (networks or IP:PORT; e.g. ["127.0.0.0/8"] when the
    # phones are on this machine). Flows and farm elements (signed URIs) are always reachable.
    internal_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    allow_destinations: list[str] = field(default_factory=list)
    # Who may send this node requests (flag --accept-from, repeatable or comma-separated): each
    # entry a network (CIDR or an address) or a keyword: "balancers", the live balancers of the
    # membership (the hosts they heartbeat, kept current as they come and go); "peers", the
    # [routing] section's trusted networks and the IP literals of its forward and alias URIs
    # (gateways, trunks; re-read with the table). A request from any other source is dropped
    # unparsed and unanswered (a TCP/TLS connection from it closed at once), counted in
    # sipfarm_node_dropped_total{reason="unknown_source"}. Responses always pass to the
    # transaction layer, which drops those matching no transaction of this node (gateways
    # found by DNS answer from addresses no list names). Empty (the default): anyone.
    accept_from: list[str] = field(default_factory=list)
    auth_invite: bool = True  # challenge INVITE/MESSAGE... from unauthenticated sources (407)
    # seconds an account read from Redis is reused by this node (a password change or deletion
    # elsewhere takes this long to be seen); a REGISTER whose account is cached costs one Redis
    # round trip instead of two (its digest is verified before Redis is asked anything)
    account_cache_ttl: float = 2.0
    # SO_RCVBUF of UDP sockets: the kernel's ~200 KB default overflows under bursts long before
    # the CPU is busy (Kamailio and SIPp ask for 4 MB too); capped by net.core.rmem_max
    udp_recv_buffer: int = 4 * 1024 * 1024
    # UDP sockets read with recvmmsg and written with sendmmsg, many datagrams a system call
    # (sipfarm/transport/_batchio.c, built with the compiled build; without it, or false:
    # asyncio's datagram transport, one system call a datagram). udp_batch_interval > 0 reads
    # a busy socket (a wake-up found 2 or more datagrams waiting) once per that many seconds
    # while it stays busy, so more datagrams share a wake-up, each waiting up to that long;
    # a lightly loaded one on every wake-up, as 0 does. Same keys in [balancer], where the
    # default is 1 ms (benchmarks/README.md, "Reading a busy balancer socket once per
    # millisecond").
    udp_batchio: bool = True
    udp_batch_interval: float = UDP_BATCH_INTERVAL
    # RFC 5626 5.4 Flow-Timer sent to outbound registrations: the keepalive interval (s) of a
    # UDP flow (under a NAT's UDP binding life and the balancer's 30 s keepalive_interval) and
    # of a TCP/TLS/WS one (RFC 5626's 95-120 s, under the 300 s idle timeout of connections)
    flow_timer_udp: int = 25
    flow_timer_stream: int = 110
    heartbeat: float = 0.5
    log_level: str = "info"
    log_format: str = "kv"  # kv | json
    # RTP relays (rtpengine's ng protocol). ["cluster"]: the live `sipfarm relay` processes of
    # the membership, a new call to the least loaded (what `sipfarm up` configures); or a list
    # of IP:PORT (rtpengine, relays outside the membership): a call starts on the relay a hash
    # of its Call-ID picks. Empty: media goes straight between the phones. A new call tries the
    # next relay when it gets no ng answer within relay_timeout seconds (not the relay's own
    # media_timeout, its RTP silence limit); when none answers, media_failure: "503" answers
    # the caller 503, "forward" lets the call through with its media end to end. The relay of
    # each call is recorded in Redis, so any node handles its re-INVITE, BYE or failure.
    relays: list[str] = field(default_factory=list)
    relay_timeout: float = 1.0
    media_failure: str = "503"
    # Redis replication is asynchronous: a master that dies loses the writes its replicas had
    # not yet received. replicas_ack = N answers a REGISTER 200 only once N replicas have its
    # write (one Redis WAIT behind each batch of REGISTERs, at most replicas_ack_timeout
    # seconds; fewer replicas in time answer 503, the UA registers again), so a failover loses
    # no acknowledged registration. 0 (the default): no WAIT, the window of loss is replication's
    # lag (usually under a millisecond). Same meaning on one Redis with replicas (Sentinel).
    replicas_ack: int = 0
    replicas_ack_timeout: float = 0.1

    def validate(self) -> None:
        _check_range("udp_batch_interval", self.udp_batch_interval, 0, 0.02)
        _check_range("replicas_ack", self.replicas_ack, 0, 16)
        _check_range("replicas_ack_timeout", self.replicas_ack_timeout, 0.001, 10)
        for spec in self.listen:
            _check_address("listen", spec)
        if "cluster" in self.relays and self.relays != ["cluster"]:
            raise ConfigError('relays: "cluster" stands alone (the membership\'s relays), not in a list of addresses')
        for relay in self.relays:
            if relay == "cluster":
                continue
            _check_hostport("relays", relay)
            try:
                # an IP: a name would be resolved on the loop at every send, and replies are
                # taken only from the address asked
                ipaddress.ip_address(relay.rpartition(":")[0].strip("[]"))
            except ValueError:
                raise ConfigError(f"relays: expected an IP address and port, got {relay!r}") from None
        _check_range("relay_timeout", self.relay_timeout, 0.05, 30)
        _check_choice("media_failure", self.media_failure, ("503", "forward"))
        if self.group:
            _check_group_name("group", self.group)
        if not self.domains:
            raise ConfigError("domains: at least one domain is required")
        _check_range("workers", self.workers, 1, 64)
        _check_range("max_transactions", self.max_transactions, 10, 10_000_000)
        _check_range("max_transaction_bytes", self.max_transaction_bytes, 2**20, 2**40)
        _check_range("max_pending_invites", self.max_pending_invites, 0, 1_000_000)
        _check_range("max_pending_invite_bytes", self.max_pending_invite_bytes, 0, self.max_transaction_bytes)
        _check_range("t1", self.t1, 0.001, 60)
        _check_range("trying_delay", self.trying_delay, 0, 0.2)
        _check_range("min_expires", self.min_expires, 1, 86_400)
        if not self.min_expires <= self.default_expires <= self.max_expires:
            raise ConfigError("default_expires: must lie between min_expires and max_expires")
        if self.metrics:
            _check_hostport("metrics", self.metrics)
        _check_redis_url(self.redis)
        if not self.digest_algorithms:
            raise ConfigError("digest_algorithms: at least one algorithm is required")
        for algorithm in self.digest_algorithms:
            _check_choice("digest_algorithms", algorithm, ("MD5", "SHA-256", "MD5-sess", "SHA-256-sess"))
        _check_destinations(self.internal_networks, self.allow_destinations)
        for entry in self.accept_from:
            if entry not in ACCEPT_KEYWORDS:
                try:
                    _check_networks("accept_from", [entry])
                except ConfigError:
                    raise ConfigError(
                        f"accept_from: {entry!r} is neither {' nor '.join(ACCEPT_KEYWORDS)} nor a network (CIDR)"
                    ) from None
        _check_range("auth_max_failures", self.auth_max_failures, 1, 1_000_000)
        _check_range("auth_failure_window", self.auth_failure_window, 1, 86_400)
        _check_range("auth_ban_time", self.auth_ban_time, 1, 30 * 86_400)
        _check_range("auth_account_lock", self.auth_account_lock, 1, 1_000_000)
        _check_range("auth_max_failures_working", self.auth_max_failures_working, 1, 1_000_000)
        _check_range("auth_working_time", self.auth_working_time, 1, 30 * 86_400)
        _check_range("flow_timer_udp", self.flow_timer_udp, 1, 3600)
        _check_range("flow_timer_stream", self.flow_timer_stream, 1, 3600)
        _check_choice("log_format", self.log_format, ("kv", "json"))
        _check_choice("log_level", self.log_level, ("debug", "info", "warning", "error"))


def flag_list(values: list[str] | None) -> list[str] | None:
    """A repeatable flag whose values may also be comma-separated (``--deny a,b --deny c``);
    None when not given (the file's or the default list stays)."""
    if values is None:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _check_address(key: str, spec: str) -> None:
    try:
        addr = Address.parse(spec)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if addr.transport not in ("udp", "tcp", "tls", "ws", "wss"):
        raise ConfigError(f"{key}: unknown transport {addr.transport!r} in {spec!r}")
    _check_range(key, addr.port, 0, 65535)


def _check_destinations(internal_networks: list[str], allow_destinations: list[str]) -> None:
    from sipfarm.transport.destinations import parse_destination  # noqa: PLC0415 - config stays light

    for key, entries in (("internal_networks", internal_networks), ("allow_destinations", allow_destinations)):
        for entry in entries:
            try:
                parsed = parse_destination(entry)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            if key == "internal_networks" and isinstance(parsed, tuple):
                raise ConfigError(f"internal_networks: {entry!r} is not a network")


def _check_networks(key: str, entries: list[str]) -> None:
    from sipfarm.protect.netlist import parse_network  # noqa: PLC0415 - config stays light

    for entry in entries:
        try:
            parse_network(entry)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def _check_group_name(key: str, value: str) -> None:
    from sipfarm.balancer.groups import valid_group_name  # noqa: PLC0415 - config stays light

    if not valid_group_name(value):
        raise ConfigError(f"{key}: {value!r} is not a group name (letters, digits, '_', '-', '.'; at most 64)")


def _check_redis_url(url: str) -> None:
    from sipfarm.store.resp import is_cluster_url, parse_cluster_url, parse_redis_url  # noqa: PLC0415
    from sipfarm.store.sentinel import is_sentinel_url, parse_sentinel_url  # noqa: PLC0415

    if is_sentinel_url(url):
        # redis[s]+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]
        #   [?sentinel_password=PW&ssl_ca_certs=PATH]: the master of SERVICE as the sentinels
        #   name it at each (re)connect; every process follows a failover
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            raise ConfigError(
                f"redis: {exc}; expected redis[s]+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
            ) from None
        return
    try:
        if is_cluster_url(url):
            parse_cluster_url(url)
        else:
            parse_redis_url(url)
    except ValueError as exc:
        raise ConfigError(
            f"redis: {exc}; expected redis[s]://[[USER]:PASSWORD@]HOST:PORT/DB[?ssl_ca_certs=PATH] or "
            f"redis[s]+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...], got {url!r}"
        ) from None


def _check_hostport(key: str, value: str) -> None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}: {value} is outside {low}..{high}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


T = TypeVar("T")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str) and typing.get_origin(item) is dict:
            try:  # a list of tables from the environment: JSON
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a JSON list of objects, got {value!r}") from None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if origin is dict:
        # a table (or not) as written: the owner's validate() names the bad entry and key
        return dict(value) if isinstance(value, dict) else value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(key, value, args[0])
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {kind!r}")


def load(
    cls: type[T],
    path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    *,
    section: str | None = None,
    environ: dict[str, str] | None = None,
) -> T:
    """Build ``cls`` from TOML ``path`` (section = role), ``SIPFARM_*`` env and ``flags``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        if section:
            data = data.get(section, {})
        for key, value in data.items():
            if key not in names:
                raise ConfigError(f"{key}: unknown setting in {path}")
            values[key] = value
    env = os.environ if environ is None else environ
    for name in names:
        env_value = env.get("SIPFARM_" + name.upper())
        if env_value is not None:
            values[name] = env_value
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in names:
            raise ConfigError(f"{key}: unknown setting")
        values[key] = value
    coerced = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    obj = cls(**coerced)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


@dataclass(slots=True)
class BalancerConfig:
    """The SIP load balancer (``sipfarm balancer``)."""

    # Client-facing listeners: udp, tcp, tls (needs tls_cert/tls_key), ws, wss.
    listen: list[str] = field(default_factory=lambda: ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"])
    # UDP address facing the nodes; empty: the first udp listener.
    internal: str = ""
    # Host written into Via/Path/Record-Route for clients when listening on 0.0.0.0 or behind NAT.
    advertise: str = ""
    redis: str = "redis://127.0.0.1:6379/0"
    metrics: str = ""
    balancer_id: str = ""  # default: lb-host-pid-RANDOM
    tls_cert: str = ""
    tls_key: str = ""
    flow_secret: str = ""  # empty: a farm-wide secret kept in Redis (balancers share tokens)
    workers: int = 1  # processes sharing the listeners (SO_REUSEPORT), each with a private internal port
    udp_recv_buffer: int = 4 * 1024 * 1024  # SO_RCVBUF of UDP sockets (see NodeConfig)
    udp_batchio: bool = True  # recvmmsg/sendmmsg (see NodeConfig)
    udp_batch_interval: float = BALANCER_UDP_BATCH_INTERVAL  # (see NodeConfig)
    probe_interval: float = 0.25
    down_after: int = 2
    retry_after: int = 5
    heartbeat: float = 0.5
    log_level: str = "info"
    log_format: str = "kv"
    # A Request-URI the balancer forwards to (a node's request with no flow token) may not name
    # the farm itself, these networks (loopback and the operator's internal ones) ...
    internal_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # ... unless listed here (networks or IP:PORT), e.g. ["127.0.0.0/8"] for peers on loopback.
    allow_destinations: list[str] = field(default_factory=list)
    # NAT and flows (RFC 5626). A TCP/TLS connection with no traffic for stream_idle_timeout
    # seconds is closed, unless a phone registered over it: then it is held open until its
    # registration expires (at most flow_hold_max seconds, plus a margin).
    stream_idle_timeout: float = 300.0
    flow_hold_max: float = 7200.0
    # A registered UDP phone silent for keepalive_interval seconds gets an OPTIONS from this
    # balancer; after keepalive_failures unanswered in a row its bindings are removed.
    # keepalive_interval = 0 sends none.
    keepalive_interval: float = 30.0
    keepalive_failures: int = 3
    # Static cluster: rules pinning accounts to the nodes of a group ([node] group), tried in
    # order, the first match wins; no match: any node (ungrouped ones first). A list of tables:
    # {domain = "a.test", group = "A"}, {domain = "b.test", user_prefix = "+1", group = "B"},
    # {domain = "c.test", user_regex = "9[0-9]{3}", group = "C"} (the regex matches the whole
    # user part). In SIPFARM_GROUPS: the same as JSON.
    groups: list[dict[str, str]] = field(default_factory=list)
    # Front-end protection (sipfarm/balancer/frontdoor.py). A client source sending more than
    # rate_register REGISTERs, rate_invite INVITEs or rate_other other requests per rate_window
    # seconds (0: that class unlimited) has its excess dropped, and if it keeps over budget for
    # rate_ban_after seconds (a flood; phones behind one NAT reconnecting at once are a burst of
    # a second or two) it is banned; a source using a User-Agent containing one of scanner_agents
    # (case-insensitive), or sending more than rate_suspect out-of-dialog requests per window
    # for a domain not in domains (empty: no domain check), is banned farm-wide (in Redis, as
    # `sipfarm ban list` shows) for ban_time seconds and dropped unanswered. Bans from Redis are
    # re-read every ban_refresh seconds. Sources in exempt networks are never limited nor
    # dropped: loopback by default (local tools, tests and benchmarks), and always the farm's
    # gateways and trunks of the file's [routing] section (trusted, forward targets); protect =
    # false: off.
    protect: bool = True
    rate_register: int = 20
    rate_invite: int = 50
    rate_other: int = 100
    rate_suspect: int = 5
    rate_window: float = 1.0
    rate_ban_after: float = 3.0
    ban_time: float = 600.0
    ban_refresh: float = 0.5
    scanner_agents: list[str] = field(
        default_factory=lambda: [
            "friendly-scanner", "sipvicious", "sipcli", "VaxSIPUserAgent", "sip-scan", "sipsak", "iWar",
            "sundayddr", "pplsip", "smap",
        ]
    )  # fmt: skip
    exempt: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    domains: list[str] = field(default_factory=list)
    # Connection limits (TCP, TLS, WS and WSS together; each worker process counts its own).
    # At most max_connections open, and max_connections_per_source from one IP address or IPv6 /64 (0: no
    # per-source limit; sources in exempt are not limited): over either, a new connection is
    # closed at accept, before its TLS handshake, and a WebSocket upgrade is answered 503.
    # A connection a phone registered over does not count (up to 16 x the per-source limit):
    # an office of phones behind one NAT address connects, each registered phone's connection
    # having proved an account. A TLS handshake must finish
    # within handshake_timeout seconds, and so must a WebSocket's HTTP upgrade (wss: each);
    # a connection must then start its first SIP message within first_message_timeout seconds
    # (CRLFCRLF keep-alives do not count; a WebSocket has no such timeout), and
    # every message must be complete message_timeout seconds after its first byte (a slow,
    # drip-feeding sender is closed). Counted in sipfarm_balancer_connections_refused_total.
    max_connections: int = 10_000
    max_connections_per_source: int = 64
    handshake_timeout: float = 5.0
    first_message_timeout: float = 10.0
    message_timeout: float = 10.0
    # WebSocket Origin (RFC 6455 10.2). Browsers always send the page's origin: a ws/wss
    # listener facing the Internet should list its web phones' origins, e.g.
    # ["https://phone.example.com", "https://*.example.net"] (*. matches any subdomain);
    # any other origin is answered 403. Empty: any origin. Requests without Origin (SIP over
    # WebSocket clients outside browsers) are served unless ws_require_origin = true.
    ws_origins: list[str] = field(default_factory=list)
    ws_require_origin: bool = False
    # Overload shedding (sipfarm/balancer/overload.py). Each node may hold a limit of new
    # INVITEs/REGISTERs it has not answered yet; the limit adapts so that its first answers
    # (100 Trying, 401, 200) come within shed_target seconds (it starts at shed_limit, stays
    # within shed_min_limit..shed_max_limit). A new INVITE or REGISTER whose node is at its
    # limit goes to another node that is not; when every node is, the balancer answers 503
    # with a Retry-After drawn from shed_retry_after_min..shed_retry_after_max seconds.
    # In-dialog requests, ACK, CANCEL, BYE and OPTIONS are never shed. A request unanswered
    # after shed_late seconds counts as late (cuts the limit). shed_node_load > 0 also treats
    # a node as overloaded while its heartbeat reports more transactions in flight than that.
    # shed = false: never shed (the CLI's --no-shed).
    shed: bool = True
    shed_target: float = 0.1
    shed_limit: int = 200
    shed_min_limit: int = 4
    shed_max_limit: int = 2000
    shed_late: float = 2.0
    shed_node_load: float = 0.0
    shed_retry_after_min: int = 1
    shed_retry_after_max: int = 5
    # Allow and deny lists of the public side (networks in CIDR or single addresses, IPv4 and
    # IPv6; flags --allow/--deny, repeatable or comma-separated): a client source in a deny
    # network is dropped before parsing, unanswered; when allow is not empty, so is a source
    # outside it. Deny wins over allow. A refused source's TCP, TLS or WebSocket connection is
    # closed as it is accepted (before any handshake; not counted in the connection limits),
    # its STUN keep-alive ignored. The farm's nodes always pass; exempt plays no part (it only
    # spares rate limits and connection limits). Applies whether
    # protect is on or not; counted in sipfarm_balancer_protect_total{reason="denied"} and
    # {reason="not_allowed"}.
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.listen:
            raise ConfigError("listen: at least one listener is required")
        _check_range("udp_batch_interval", self.udp_batch_interval, 0, 0.02)
        _check_range("max_connections", self.max_connections, 1, 10_000_000)
        _check_range("max_connections_per_source", self.max_connections_per_source, 0, 10_000_000)
        _check_range("handshake_timeout", self.handshake_timeout, 0.05, 600)
        _check_range("first_message_timeout", self.first_message_timeout, 0.05, 3600)
        _check_range("message_timeout", self.message_timeout, 0.05, 3600)
        from sipfarm.balancer.origins import OriginPolicy  # noqa: PLC0415 - config stays light

        try:
            OriginPolicy(self.ws_origins)
        except ValueError as exc:
            raise ConfigError(f"ws_origins: {exc}") from None
        _check_range("shed_target", self.shed_target, 0.005, 30)
        _check_range("shed_min_limit", self.shed_min_limit, 1, 1_000_000)
        _check_range("shed_max_limit", self.shed_max_limit, self.shed_min_limit, 1_000_000)
        _check_range("shed_limit", self.shed_limit, self.shed_min_limit, self.shed_max_limit)
        _check_range("shed_late", self.shed_late, self.shed_target, 64)
        _check_range("shed_node_load", self.shed_node_load, 0, 1e9)
        _check_range("shed_retry_after_min", self.shed_retry_after_min, 0, 3600)
        _check_range("shed_retry_after_max", self.shed_retry_after_max, self.shed_retry_after_min, 3600)
        _check_destinations(self.internal_networks, self.allow_destinations)
        for key in ("rate_register", "rate_invite", "rate_other", "rate_suspect"):
            _check_range(key, getattr(self, key), 0, 10_000_000)
        _check_range("rate_window", self.rate_window, 0.01, 3600)
        _check_range("rate_ban_after", self.rate_ban_after, 0, 3600)
        _check_range("ban_time", self.ban_time, 0, 30 * 86_400)
        _check_range("ban_refresh", self.ban_refresh, 0.05, 60)
        for net in self.exempt:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"exempt: {net!r} is not a network") from None
        _check_networks("allow", self.allow)
        _check_networks("deny", self.deny)
        for spec in self.listen:
            _check_address("listen", spec)
        if self.internal:
            _check_address("internal", self.internal)
            if not self.internal.startswith("udp:"):
                raise ConfigError("internal: must be a udp:HOST:PORT address")
        elif not any(s.startswith("udp:") for s in self.listen):
            raise ConfigError("internal: required when there is no udp listener")
        if any(s.startswith(("tls:", "wss:")) for s in self.listen) and not (self.tls_cert and self.tls_key):
            raise ConfigError("tls_cert: tls/wss listeners need tls_cert and tls_key")
        _check_range("probe_interval", self.probe_interval, 0.05, 10)
        _check_range("workers", self.workers, 1, 64)
        _check_range("down_after", self.down_after, 1, 100)
        _check_range("stream_idle_timeout", self.stream_idle_timeout, 0.1, 86_400)
        _check_range("flow_hold_max", self.flow_hold_max, 0, 7 * 86_400)
        if self.keepalive_interval != 0:
            _check_range("keepalive_interval", self.keepalive_interval, 0.1, 3600)
        _check_range("keepalive_failures", self.keepalive_failures, 1, 100)
        from sipfarm.balancer.groups import parse_rules  # noqa: PLC0415 - config stays light

        try:
            parse_rules(self.groups)
        except ValueError as exc:
            raise ConfigError(f"groups: {exc}") from None
        if self.metrics:
            _check_hostport("metrics", self.metrics)
        _check_redis_url(self.redis)
        _check_choice("log_format", self.log_format, ("kv", "json"))
        _check_choice("log_level", self.log_level, ("debug", "info", "warning", "error"))


@dataclass(slots=True)
class RelayConfig:
    """An RTP media relay (``sipfarm relay``), driven over rtpengine's ng protocol."""

    ng: str = "127.0.0.1:2223"  # HOST:PORT of the ng control socket (UDP)
    # Who may send ng commands (flag --accept-from, repeatable or comma-separated): each entry
    # a network (CIDR or an address) or "nodes", the hosts the farm's live nodes heartbeat
    # (their SIP addresses; kept current as they come and go). ng has no authentication: whoever
    # reaches the control socket can list calls, read phones' addresses, delete any call's
    # media. A command from any other source is dropped unanswered, counted in
    # sipfarm_relay_ng_errors_total{kind="refused"}. Empty: anyone. A node that sends from
    # another address than it heartbeats (another interface), or a Kamailio outside the
    # membership, needs its network listed.
    accept_from: list[str] = field(default_factory=lambda: ["nodes", "127.0.0.0/8", "::1/128"])
    # IP the relay binds its media ports on and writes into the SDPs it anchors
    media_address: str = "127.0.0.1"
    # IP written into the SDPs instead, when phones reach the relay at another address (a
    # public IP mapped to media_address by NAT or a container's published ports)
    advertise: str = ""
    port_min: int = 30000
    port_max: int = 39999
    media_timeout: float = 60.0  # seconds of silence after which a call is freed
    max_sessions: int = 10_000
    # Ports one owner's calls may hold at once (the caller's account, or its address when the
    # call was not authenticated, as sipfarm's nodes send it in ng "owner"): 100 two-party
    # audio calls. One account's ringing calls filled the whole range and every other caller
    # got 503 (red teams, 2026-12-02). A PBX trunk account running more calls needs more;
    # 0: no limit.
    max_ports_per_owner: int = 400
    redis: str = "redis://127.0.0.1:6379/0"
    relay_id: str = ""  # default: relay-host-pid-RANDOM
    metrics: str = ""
    heartbeat: float = 0.5
    udp_recv_buffer: int = 1024 * 1024  # SO_RCVBUF of each media port
    # Seconds between reads of the media ports while packets keep coming (the first packet
    # after a quiet spell is forwarded at once): one wakeup per interval for all streams instead
    # of one per few packets; a packet may wait this long (+ ~1 ms timer granularity) in its
    # socket. 0 reads on every wakeup (least latency, most CPU per packet with many streams).
    batch_interval: float = 0.001
    # Forward latched streams' common case (RTP of the counted source, in sequence) in the C
    # fast path (media/_fastpath.c, built with the compiled build; without it this does nothing):
    # the same counters and statistics, no Python per packet. false: every packet in Python.
    fast_path: bool = True
    # Before a phone's port has latched, the relay sends to the address in its SDP only if
    # these rules permit it (as the node's destination policy): not the internal networks
    # unless listed in allow_destinations, e.g. ["127.0.0.0/8"] for phones on this machine.
    internal_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    allow_destinations: list[str] = field(default_factory=list)
    # Whom a port latches onto: "signalled", only a source whose IP the signalling named (the
    # party's SDP address, or the SIP source the controller sends as ng received-from, as
    # sipfarm's nodes and Kamailio do); "any", the first sender from anywhere (rtpengine's
    # default: a stranger spraying the port range can take a call's media, RTP bleed).
    latch_from: str = "signalled"
    log_level: str = "info"
    log_format: str = "kv"

    def validate(self) -> None:
        _check_hostport("ng", self.ng)
        for entry in self.accept_from:
            if entry not in RELAY_ACCEPT_KEYWORDS:
                try:
                    _check_networks("accept_from", [entry])
                except ConfigError:
                    raise ConfigError(
                        f"accept_from: {entry!r} is neither {' nor '.join(RELAY_ACCEPT_KEYWORDS)} nor a network "
                        "(CIDR); SIPFARM_ACCEPT_FROM is read by nodes and relays alike: give the relay its own "
                        "with --accept-from or [relay] accept_from"
                    ) from None
        import ipaddress  # noqa: PLC0415 - config stays light

        try:
            ipaddress.ip_address(self.media_address)
        except ValueError:
            raise ConfigError(f"media_address: expected an IP address, got {self.media_address!r}") from None
        if self.advertise:
            try:
                ipaddress.ip_address(self.advertise)
            except ValueError:
                raise ConfigError(f"advertise: expected an IP address, got {self.advertise!r}") from None
        _check_range("port_min", self.port_min, 1024, 65535)
        _check_range("port_max", self.port_max, 1024, 65535)
        if self.port_min + (self.port_min & 1) + 1 > self.port_max:  # RTP even, RTCP odd (RFC 3550 11)
            raise ConfigError(f"port_max: the range {self.port_min}-{self.port_max} holds no even/odd port pair")
        _check_range("media_timeout", self.media_timeout, 1, 86_400)
        _check_range("max_sessions", self.max_sessions, 1, 10_000_000)
        _check_range("max_ports_per_owner", self.max_ports_per_owner, 0, 1_000_000)
        _check_range("heartbeat", self.heartbeat, 0.05, 10)
        _check_range("batch_interval", self.batch_interval, 0, 0.02)
        _check_destinations(self.internal_networks, self.allow_destinations)
        _check_choice("latch_from", self.latch_from, ("signalled", "any"))
        if self.metrics:
            _check_hostport("metrics", self.metrics)
        _check_redis_url(self.redis)
        _check_choice("log_format", self.log_format, ("kv", "json"))
        _check_choice("log_level", self.log_level, ("debug", "info", "warning", "error"))
