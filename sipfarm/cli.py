"""The ``sipfarm`` command: processes (node, balancer, relay, up) and administration.

Keep the command line stable: operators and scripts rely on it (see README).
Errors an operator can fix are printed as one clear line on stderr with exit status 1/2.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Sequence

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _redis_url(args: argparse.Namespace) -> str:
    return str(args.redis or os.environ.get("REDIS_URL") or DEFAULT_REDIS)


def _split_aor(aor: str) -> tuple[str, str]:
    user, at, domain = aor.removeprefix("sip:").partition("@")
    if not at or not user or not domain:
        raise SystemExit(f"sipfarm: expected USER@DOMAIN, got {aor!r}")
    return user, domain


def _password(args: argparse.Namespace) -> str:
    if args.password:
        return str(args.password)
    env = os.environ.get("SIPFARM_PASSWORD")
    if env:
        return env
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    return getpass.getpass("password: ")


#: the shortest password `sipfarm user add|passwd` takes without --weak-password
MIN_PASSWORD_LENGTH = 8


def weak_password(user: str, password: str) -> str | None:
    """Why ``password`` is too weak for ``user``'s account, or None. An account may be guessed
    at online from many addresses at once: the farm bounds that to ``auth_account_lock`` (50)
    failures per ``auth_failure_window`` (5 min), about 14,000 a day, which finds a 4-digit PIN
    within a day, and a user name used as its password at once."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"shorter than {MIN_PASSWORD_LENGTH} characters"
    if password.lower() == user.lower():
        return "the user name"
    return None


def _new_password(args: argparse.Namespace, user: str) -> str | None:
    """The password to set, or None when it is refused as weak (said on stderr)."""
    password = _password(args)
    why = weak_password(user, password)
    if why is not None and not args.weak_password:
        print(
            f"sipfarm: weak password ({why}): an online guesser finds it; --weak-password to set it anyway",
            file=sys.stderr,
        )
        return None
    return password


async def _user_command(args: argparse.Namespace) -> int:
    from sipfarm.store import (  # noqa: PLC0415 - keep `sipfarm --help` fast
        AccountExists,
        AccountNotFound,
        AccountStore,
        LocationStore,
        StoreUnavailable,
        create_redis,
    )

    url = _redis_url(args)
    redis = create_redis(url)
    store = AccountStore(redis)
    try:
        if args.user_cmd == "add":
            user, domain = _split_aor(args.aor)
            password = _new_password(args, user)
            if password is None:
                return 2
            try:
                account = await store.add(user, domain, password, max_contacts=args.max_contacts)
            except AccountExists:
                print(f"sipfarm: account {user}@{domain} exists", file=sys.stderr)
                return 1
            print(f"added {account.aor}")
        elif args.user_cmd == "del":
            user, domain = _split_aor(args.aor)
            try:
                await store.delete(user, domain)
            except AccountNotFound:
                print(f"sipfarm: no account {user}@{domain}", file=sys.stderr)
                return 1
            await LocationStore(redis).clear(f"{user}@{domain}")
            print(f"deleted {user}@{domain}")
        elif args.user_cmd == "passwd":
            user, domain = _split_aor(args.aor)
            password = _new_password(args, user)
            if password is None:
                return 2
            try:
                await store.set_password(user, domain, password)
            except AccountNotFound:
                print(f"sipfarm: no account {user}@{domain}", file=sys.stderr)
                return 1
            print(f"password changed for {user}@{domain}")
        elif args.user_cmd == "list":
            accounts = await store.list(args.domain)
            for account in accounts:
                state = "enabled" if account.enabled else "disabled"
                print(f"{account.aor}\t{state}\tmax_contacts={account.max_contacts}")
        return 0
    except StoreUnavailable as exc:
        print(f"sipfarm: Redis at {url} is unavailable: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"sipfarm: {exc}", file=sys.stderr)
        return 2
    finally:
        await redis.aclose()


def _bench(argv: list[str]) -> int:
    """``sipfarm bench [OPTIONS]``: the benchmark harness (benchmarks/), options passed through."""
    import importlib  # noqa: PLC0415

    try:
        bench = importlib.import_module("benchmarks.harness")
    except ImportError as exc:
        print(
            f"sipfarm bench: the benchmark harness is not installed with this copy ({exc}); "
            "run it from a checkout: python -m benchmarks",
            file=sys.stderr,
        )
        return 2
    return int(bench.main(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipfarm", description="A SIP/VoIP farm server.")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run a registrar/proxy node")
    node.add_argument("--config", help="TOML file ([node] section)")
    node.add_argument("--listen", action="append", help="TRANSPORT:HOST:PORT (repeatable), e.g. udp:127.0.0.1:5071")
    node.add_argument("--redis", help="Redis URL (default $REDIS_URL or redis://127.0.0.1:6379/0)")
    node.add_argument("--domain", action="append", dest="domains", help="SIP domain served (repeatable)")
    node.add_argument("--workers", type=int, help="worker processes sharing the port (SO_REUSEPORT)")
    node.add_argument("--metrics", help="HOST:PORT for Prometheus /metrics")
    node.add_argument("--node-id", help="member id in the farm (default: host-pid-RANDOM)")
    node.add_argument("--advertise", help="address to put in Record-Route/Via when listening on 0.0.0.0")
    node.add_argument(
        "--relays",
        help='media relays: "cluster" (the live relays of the membership, by load) or IP:PORT,... (ng)',
    )
    node.add_argument(
        "--accept-from",
        action="append",
        metavar="SOURCE",
        help="take requests only from: balancers, peers, or a network (CIDR); repeatable or "
        "comma-separated (default: anyone)",
    )
    node.add_argument("--group", help="static cluster: the node group this node serves (default: the dynamic pool)")
    node.add_argument("--log-format", choices=("kv", "json"))
    node.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    node.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)

    user = sub.add_parser("user", help="manage accounts")
    user_sub = user.add_subparsers(dest="user_cmd", required=True)
    for name, help_text in (("add", "create an account"), ("passwd", "change a password")):
        p = user_sub.add_parser(name, help=help_text)
        p.add_argument("aor", help="user@domain")
        p.add_argument("--password", help="password (else $SIPFARM_PASSWORD, stdin or prompt)")
        p.add_argument("--redis")
        p.add_argument(
            "--weak-password",
            action="store_true",
            help=f"set it even if shorter than {MIN_PASSWORD_LENGTH} characters or the user name",
        )
        if name == "add":
            p.add_argument("--max-contacts", type=int, default=10)
    p = user_sub.add_parser("del", help="delete an account and its registrations")
    p.add_argument("aor")
    p.add_argument("--redis")
    p = user_sub.add_parser("list", help="list accounts")
    p.add_argument("--domain")
    p.add_argument("--redis")

    up = sub.add_parser("up", help="start a local farm (Redis, balancer, nodes, relay) in the foreground")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--config", help="TOML file: [node], [routing], [balancer], [relay] sections (see examples/)")
    up.add_argument("--relays", type=int, default=1, help="media relays (ng on --ng-port and the next ports)")
    up.add_argument("--ng-port", type=int, default=2223, help="ng control port of the first relay")
    up.add_argument(
        "--ng-host",
        default="127.0.0.1",
        help="address the relays' ng control ports bind (default 127.0.0.1, whatever --host: ng has no "
        "authentication, and the farm's nodes run on this machine)",
    )
    up.add_argument("--sip-port", type=int, default=5060)
    up.add_argument("--redis", help="use this Redis instead of starting a private one")
    up.add_argument(
        "--redis-cluster", action="store_true", help="start a private Redis Cluster (3 masters + 3 replicas) instead"
    )
    up.add_argument("--dir", default=".run", help="working directory for Redis files, logs, certificates")
    up.add_argument("--domain", default="farm.test")
    up.add_argument("--host", default="127.0.0.1", help="address to listen on")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--no-balancer", action="store_true", help="nodes only, first node on --sip-port")
    up.add_argument(
        "--metrics-port", type=int, default=9100, help="Prometheus port of the balancer; nodes use the next ones"
    )

    reload_ = sub.add_parser("reload", help="every node reads its config file's [routing] section again")
    reload_.add_argument("--redis")
    reload_.add_argument("--check", metavar="FILE", help="only check FILE's [routing] section, change nothing")

    status = sub.add_parser("status", help="members of the farm, their load and registrations")
    status.add_argument("--redis")
    status.add_argument("--json", action="store_true")

    drain = sub.add_parser("drain", help="stop new work to a node; its transactions finish")
    drain.add_argument("node_id")
    drain.add_argument("--redis")
    drain.add_argument("--undo", action="store_true", help="make the node active again")

    balancer = sub.add_parser("balancer", help="run the SIP load balancer")
    balancer.add_argument("--config", help="TOML file ([balancer] section)")
    balancer.add_argument("--listen", action="append", help="TRANSPORT:HOST:PORT, transport udp|tcp|tls|ws|wss")
    balancer.add_argument("--internal", help="udp:HOST:PORT facing the nodes (default: the first udp listener)")
    balancer.add_argument("--advertise", help="address clients reach the balancer at (Via/Path/Record-Route)")
    balancer.add_argument("--redis")
    balancer.add_argument("--metrics")
    balancer.add_argument("--balancer-id")
    balancer.add_argument("--workers", type=int, help="processes sharing the listeners (SO_REUSEPORT)")
    balancer.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    balancer.add_argument(
        "--no-shed", action="store_true", default=None, help="never answer 503 for overload ([balancer] shed = false)"
    )
    balancer.add_argument("--shed-target", type=float, help="seconds: a node answering later is queueing (default 0.1)")
    balancer.add_argument(
        "--allow", action="append", metavar="CIDR", help="only these client networks (repeatable, or comma-separated)"
    )
    balancer.add_argument(
        "--deny", action="append", metavar="CIDR", help="drop these client networks (repeatable, or comma-separated)"
    )
    balancer.add_argument("--tls-cert")
    balancer.add_argument("--tls-key")
    balancer.add_argument(
        "--ws-origin",
        action="append",
        help="an Origin allowed to open a WebSocket (repeat; https://*.example.net for subdomains); default any",
    )
    balancer.add_argument("--log-format", choices=("kv", "json"))
    balancer.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    relay = sub.add_parser("relay", help="run an RTP media relay (rtpengine's ng protocol)")
    relay.add_argument("--config", help="TOML file ([relay] section)")
    relay.add_argument("--ng", help="HOST:PORT of the ng control socket, UDP (default 127.0.0.1:2223)")
    relay.add_argument("--media-address", help="IP the media ports bind and the SDPs name (default 127.0.0.1)")
    relay.add_argument("--advertise", help="IP the SDPs name instead of --media-address (NAT, containers)")
    relay.add_argument("--port-min", type=int, help="first media port (default 30000)")
    relay.add_argument("--port-max", type=int, help="last media port (default 39999)")
    relay.add_argument("--media-timeout", type=float, help="seconds of silence that free a call (default 60)")
    relay.add_argument("--max-sessions", type=int, help="calls held at once (default 10000)")
    relay.add_argument(
        "--accept-from",
        action="append",
        metavar="SOURCE",
        help="take ng commands only from: nodes (the membership's) or a network (CIDR); repeatable or "
        "comma-separated (default: nodes,127.0.0.0/8,::1/128)",
    )
    relay.add_argument("--redis", help="Redis URL (default $REDIS_URL or redis://127.0.0.1:6379/0)")
    relay.add_argument("--relay-id", help="member id in the farm (default: relay-host-pid-RANDOM)")
    relay.add_argument("--metrics", help="HOST:PORT for Prometheus /metrics")
    relay.add_argument("--log-format", choices=("kv", "json"))
    relay.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    ban = sub.add_parser("ban", help="farm-wide bans of source addresses (brute-force protection)")
    ban_sub = ban.add_subparsers(dest="ban_cmd", required=True)
    p = ban_sub.add_parser("list", help="current bans, time left and why")
    p.add_argument("--redis")
    p = ban_sub.add_parser("add", help="ban a source address (an IPv6 address: its /64) on every node")
    p.add_argument("ip")
    p.add_argument("--seconds", type=float, default=900.0, help="ban length (default 900; 0: until lifted)")
    p.add_argument("--redis")
    p = ban_sub.add_parser("del", help="lift a ban and forget the source's failures")
    p.add_argument("ip")
    p.add_argument("--redis")

    bench = sub.add_parser("bench", help="benchmark the farm against Kamailio (see benchmarks/README.md)")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _reload(args: argparse.Namespace) -> int:
    """``sipfarm reload``: bump the routing epoch in Redis; every node (each worker) sees it
    within a second and reads its config file again, keeping its table if the file is bad."""
    if args.check:
        from sipfarm.routing.table import RoutingError, load_routing  # noqa: PLC0415

        try:
            table = load_routing(args.check)
        except RoutingError as exc:
            print(f"sipfarm reload: {exc}", file=sys.stderr)
            return 2
        print(f"{args.check}: {len(table.rules)} rules, unknown users: {table.unknown.action.value}")
        return 0
    from redis.exceptions import RedisError  # noqa: PLC0415

    from sipfarm.node.main import ROUTING_EPOCH_KEY  # noqa: PLC0415
    from sipfarm.store.redis_client import create_redis  # noqa: PLC0415

    async def bump() -> int:
        redis = create_redis(args.redis or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
        try:
            return int(await redis.incr(ROUTING_EPOCH_KEY))
        finally:
            await redis.aclose()

    try:
        epoch = asyncio.run(bump())
    except (OSError, RedisError) as exc:
        print(f"sipfarm reload: Redis: {exc}", file=sys.stderr)
        return 1
    print(f"routing epoch {epoch}: every node reads its routing table again within a second")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in ("up", "node", "balancer", "relay"):
        from sipfarm.build import BuildError, reexec_compiled  # noqa: PLC0415

        try:
            reexec_compiled(argv)  # the compiled hot path when it is fresh (SIPFARM_BUILD)
        except BuildError as exc:
            print(f"sipfarm: {exc}", file=sys.stderr)
            return 1
    if args.command == "user":
        return asyncio.run(_user_command(args))
    if args.command == "node":
        from sipfarm.node.main import run_node  # noqa: PLC0415

        return int(run_node(args))
    if args.command == "up":
        from sipfarm.up import run_up  # noqa: PLC0415

        return int(run_up(args))
    if args.command in ("status", "drain"):
        from sipfarm.cluster.cli import run_cluster_command  # noqa: PLC0415

        return int(run_cluster_command(args))
    if args.command == "reload":
        return _reload(args)
    if args.command == "ban":
        from sipfarm.protect.cli import run_ban_command  # noqa: PLC0415

        return int(run_ban_command(args))
    if args.command == "relay":
        from media.main import run_relay  # noqa: PLC0415

        return int(run_relay(args))
    if args.command == "balancer":
        from sipfarm.balancer.main import run_balancer  # noqa: PLC0415

        return int(run_balancer(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
