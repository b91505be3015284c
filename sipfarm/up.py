"""``sipfarm up``: a whole local farm in the foreground (what ``make run`` starts).

Starts a private redis-server (unless ``--redis``/``$REDIS_URL``), provisions the demo accounts,
starts the farm's processes (``--relays`` media relays, then the nodes and the balancer), waits
until each answers (an ng ping for a relay, OPTIONS for the others), prints how to point a softphone at it
and one line ``READY {json}`` for scripts, then waits for Ctrl-C / SIGTERM and stops all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sipfarm import build

DEMO_USERS = (("alice", "alice-secret"), ("bob", "bob-secret"))
#: the media ports the relays share, split evenly between them
MEDIA_PORTS = (30000, 39999)


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]
    sip: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)
    log: Path | None = None

    def describe(self) -> dict[str, object]:
        return {"role": self.role, "pid": self.process.pid, "sip": self.sip, **self.extra}


def sip_ping(host: str, port: int, timeout: float = 0.5) -> int | None:
    """Send OPTIONS over UDP; the status code of the answer, or None."""
    branch = "z9hG4bK" + secrets.token_hex(8)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(timeout)
        local_port = sock.getsockname()[1]
        msg = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{local_port};branch={branch};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@{host}>;tag={secrets.token_hex(4)}\r\n"
            f"To: <sip:{host}:{port}>\r\nCall-ID: {secrets.token_hex(8)}@probe\r\n"
            f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        try:
            sock.sendto(msg, (host, port))
            data = sock.recv(65535)
        except OSError:
            return None
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def ng_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Send an ng ``ping`` (rtpengine's control protocol) over UDP; True on ``pong``."""
    from media.bencode import BencodeError, decode, encode  # noqa: PLC0415

    cookie = secrets.token_hex(6).encode()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(cookie + b" " + encode({"command": "ping"}), (host, port))
            data = sock.recv(65535)
        except OSError:
            return False
    head, _, body = data.partition(b" ")
    try:
        reply = decode(body)
    except BencodeError:
        return False
    return head == cookie and isinstance(reply, dict) and reply.get(b"result") == b"pong"


def log_tail(path: Path | None, lines: int = 15) -> str:
    """The last ``lines`` lines of a child's log, indented, for an error message ('' if none)."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = text.rstrip().splitlines()[-lines:]
    return "".join(f"\n    {line}" for line in tail)


def busy_ports(host: str, udp_tcp: list[int], tcp_only: list[int], udp_only: Sequence[int] = ()) -> list[str]:
    """Which of the farm's ports are taken on ``host`` (``udp:5060``, ``tcp:9100``...)."""
    taken: list[str] = []
    checks = [(p, socket.SOCK_DGRAM) for p in [*udp_tcp, *udp_only]] + [
        (p, socket.SOCK_STREAM) for p in udp_tcp + tcp_only
    ]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port, kind in checks:
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                taken.append(f"{'udp' if kind == socket.SOCK_DGRAM else 'tcp'}:{port}")
    return taken


def wait_ng(host: str, port: int, timeout: float, child: Child) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(
                f"relay {child.extra.get('id', '')} exited with status {child.process.returncode}; "
                f"its log ({child.log}):{log_tail(child.log)}"
            )
        if ng_ping(host, port, 0.3):
            return
    raise RuntimeError(f"relay did not answer an ng ping on {host}:{port} within {timeout:.0f} s")


def wait_sip(host: str, port: int, timeout: float, child: Child) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(
                f"{child.role} {child.extra.get('id', '')} exited with status {child.process.returncode}; "
                f"its log ({child.log}):{log_tail(child.log)}"
            )
        if sip_ping(host, port, 0.3) is not None:
            return
    raise RuntimeError(f"{child.role} did not answer OPTIONS on {host}:{port} within {timeout:.0f} s")


async def provision(redis_url: str, domain: str) -> None:
    from sipfarm.store import AccountExists, AccountStore, create_redis  # noqa: PLC0415

    redis = create_redis(redis_url)
    try:
        store = AccountStore(redis)
        for user, password in DEMO_USERS:
            with contextlib.suppress(AccountExists):
                await store.add(user, domain, password)
    finally:
        await redis.aclose()


#: ``sipfarm up --config FILE``: every process reads its own section of it ([node] with
#: [routing], [balancer], [relay]); explicit flags of ``up`` still win
CONFIG_FILE: list[str] = []


def entry_certificate(tls_dir: Path, domain: str, host: str) -> tuple[Path, Path]:
    """The balancer's self-signed certificate and key: named for the SIP domain (CN and DNS
    entry, RFC 5922 7.1: a client checks the domain; linphone's mbedTLS reads no IP entry),
    ``localhost`` and the farm's ``host`` address kept for clients that check those."""
    from sipfarm.transport.tls import make_self_signed_cert  # noqa: PLC0415

    return make_self_signed_cert(tls_dir, common_name=domain, dns_names=("localhost",), ip=host)


def spawn(role: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "sipfarm", *argv, *(["--config", CONFIG_FILE[0]] if CONFIG_FILE else [])],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_all(children: list[Child], timeout: float = 5.0) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            child.process.wait(remaining)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def run_up(args: argparse.Namespace) -> int:
    config = getattr(args, "config", None)
    if config:
        from sipfarm.routing.table import RoutingError, load_routing  # noqa: PLC0415

        try:
            load_routing(config)  # a bad file stops here, with the line, before anything starts
        except RoutingError as exc:
            print(f"sipfarm up: {exc}", file=sys.stderr)
            return 2
        CONFIG_FILE[:] = [str(Path(config).resolve())]
    workdir = Path(args.dir).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    host = args.host
    children: list[Child] = []
    redis_proc = None
    redis_cluster = None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node_base = args.sip_port if args.no_balancer else args.sip_port + 10
        farm_ports = [node_base + i for i in range(args.nodes)]
        relays = max(0, args.relays)
        other_ports = [args.metrics_port + i for i in range(args.nodes + 1 + relays)]
        ng_ports = [args.ng_port + i for i in range(relays)]
        if not args.no_balancer:
            farm_ports.append(args.sip_port)
            other_ports += [args.sip_port + 1, args.sip_port + 2]
        # the relays' control ports stay off the farm's (often public) host: ng has no
        # authentication, and every node of this farm reaches them on this machine
        ng_host = getattr(args, "ng_host", "127.0.0.1")
        taken = busy_ports(host, farm_ports, other_ports)
        taken += [t if ng_host == host else f"{t} on {ng_host}" for t in busy_ports(ng_host, [], [], ng_ports)]
        if taken:
            print(
                f"sipfarm: ports already in use on {host}: {', '.join(taken)} (another farm running?); "
                "choose others with --sip-port / --metrics-port / --ng-port",
                file=sys.stderr,
            )
            return 1
        redis_url = args.redis or os.environ.get("REDIS_URL")
        if not redis_url and args.redis_cluster:
            from sipfarm.store.redis_server import RedisClusterProcesses  # noqa: PLC0415

            # 3 masters + 3 replicas on free loopback ports, with a password like the single one
            redis_cluster = RedisClusterProcesses(
                workdir / "redis-cluster",
                password=secrets.token_urlsafe(18),
                avoid=frozenset(farm_ports + other_ports + ng_ports),
            )
            try:
                redis_cluster.start()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"sipfarm: cannot start a Redis Cluster ({exc})", file=sys.stderr)
                return 1
            redis_url = redis_cluster.url
        if not redis_url:
            from sipfarm.store.redis_server import free_port, start_redis  # noqa: PLC0415

            redis_port = free_port()
            while redis_port in farm_ports or redis_port in other_ports or redis_port in ng_ports:
                redis_port = free_port()
            try:
                # a password even on loopback: any local user could otherwise rewrite the farm
                redis_proc = start_redis(workdir / "redis", port=redis_port, password=secrets.token_urlsafe(18))
            except (OSError, RuntimeError) as exc:
                print(
                    f"sipfarm: cannot start redis-server ({exc}); install it (apt-get install "
                    "redis-server) or pass --redis URL",
                    file=sys.stderr,
                )
                return 1
            redis_url = redis_proc.url
        asyncio.run(provision(redis_url, args.domain))
        destinations = loopback_destinations(host)
        if destinations is not None:
            os.environ["SIPFARM_ALLOW_DESTINATIONS"] = destinations

        # relays first: they are in the membership before the nodes take calls
        span = (MEDIA_PORTS[1] - MEDIA_PORTS[0] + 1) // max(1, relays)
        relay_children: list[Child] = []
        for i, ng_port in enumerate(ng_ports):
            port_min = MEDIA_PORTS[0] + i * span
            metrics = f"{host}:{args.metrics_port + args.nodes + 1 + i}"
            argv = [
                "relay",
                "--redis", redis_url,
                "--relay-id", f"relay{i + 1}",
                "--ng", f"{ng_listen(ng_host)}:{ng_port}",
                "--media-address", host,
                "--port-min", str(port_min),
                "--port-max", str(port_min + span - 1),
                "--metrics", metrics,
            ]  # fmt: skip
            log_path = workdir / "logs" / f"relay{i + 1}.log"
            proc = spawn("relay", argv, log_path)
            extra: dict[str, object] = {
                "id": f"relay{i + 1}",
                "ng": f"udp:{ng_listen(ng_host)}:{ng_port}",
                "media_ports": f"{port_min}-{port_min + span - 1}",
                "metrics": metrics,
            }
            relay_children.append(Child("relay", proc, [], extra, log_path))
        children.extend(relay_children)
        for child, ng_port in zip(relay_children, ng_ports, strict=True):
            wait_ng(ng_host, ng_port, 15.0, child)

        accept_from = node_accept_from(host) if not args.no_balancer else ""
        for i in range(args.nodes):
            port = node_base + i
            listen = [f"udp:{host}:{port}", f"tcp:{host}:{port}"]
            argv = [
                "node",
                "--redis",
                redis_url,
                "--domain",
                args.domain,
                "--node-id",
                f"node{i + 1}",
                "--workers",
                str(args.workers),
                "--metrics",
                f"{host}:{args.metrics_port + i + 1}",
            ]
            for spec in listen:
                argv += ["--listen", spec]
            if relay_children:
                argv += ["--relays", "cluster"]  # every call's media through the relays, by load
            if accept_from:
                argv += ["--accept-from", accept_from]
            log_path = workdir / "logs" / f"node{i + 1}.log"
            proc = spawn("node", argv, log_path)
            metrics = f"{host}:{args.metrics_port + i + 1}"
            children.append(Child("node", proc, listen, {"id": f"node{i + 1}", "metrics": metrics}, log_path))
        for child in children:
            if child.sip:
                wait_sip(host, int(child.sip[0].rsplit(":", 1)[1]), 15.0, child)

        entry_port = node_base
        transports = "UDP and TCP"
        if not args.no_balancer:
            tls_dir = workdir / "tls"
            tls_dir.mkdir(exist_ok=True)
            cert, key = entry_certificate(tls_dir, args.domain, host)
            entry_port = args.sip_port
            listen = [
                f"udp:{host}:{entry_port}",
                f"tcp:{host}:{entry_port}",
                f"tls:{host}:{entry_port + 1}",
                f"ws:{host}:{entry_port + 2}",
            ]
            argv = [
                "balancer",
                "--redis",
                redis_url,
                "--balancer-id",
                "lb1",
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--metrics",
                f"{host}:{args.metrics_port}",
            ]
            for spec in listen:
                argv += ["--listen", spec]
            log_path = workdir / "logs" / "balancer.log"
            proc = spawn("balancer", argv, log_path)
            balancer = Child(
                "balancer", proc, listen, {"id": "lb1", "metrics": f"{host}:{args.metrics_port}"}, log_path
            )
            children.insert(0, balancer)
            wait_sip(host, entry_port, 15.0, balancer)
            transports = f"UDP and TCP {entry_port}, TLS {entry_port + 1}, WS {entry_port + 2}"

        role = "registrar/proxy" if args.no_balancer else "balancer"
        print(f"sipfarm is up: SIP domain {args.domain}, {role} at {host}:{entry_port} ({transports})")
        print(f"Build: {build.explanation or build.running_build()} (SIPFARM_BUILD=auto|compiled|interpreted)")
        print("Point a softphone at it:")
        for user, password in DEMO_USERS:
            print(f"  user {user}@{args.domain}  password {password}  registrar/outbound proxy sip:{host}:{entry_port}")
        print(f"  then call sip:bob@{args.domain} from alice. Logs: {workdir / 'logs'}. Ctrl-C stops the farm.")
        print(f"Redis: {redis_url} (for sipfarm status / user / ban --redis)")
        for child in relay_children:
            print(f"Media relay {child.extra['id']}: ng {child.extra['ng']}, media ports {child.extra['media_ports']}")
        processes = [c.describe() for c in children]
        if redis_proc is not None:
            processes.append({"role": "redis", "pid": redis_proc.pid, "sip": [], "url": redis_url})
        if redis_cluster is not None:
            processes += [{"role": "redis", "pid": n.pid, "sip": [], "url": redis_url} for n in redis_cluster.nodes]
        ready = {"redis": redis_url, "domain": args.domain, "build": build.running_build(), "processes": processes}
        print("READY " + json.dumps(ready), flush=True)
        while not stopping:
            for child in children:
                if child.process.poll() is not None:
                    print(
                        f"sipfarm: {child.role} {child.extra.get('id', '')} exited "
                        f"({child.process.returncode}); see its log",
                        file=sys.stderr,
                        flush=True,
                    )
                    children.remove(child)
                    break
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        print(f"sipfarm: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(children)
        if redis_proc is not None:
            redis_proc.stop()
        if redis_cluster is not None:
            redis_cluster.stop()


def ng_listen(host: str) -> str:
    """``host`` as the host part of HOST:PORT (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def node_accept_from(host: str) -> str:
    """The nodes' ``--accept-from`` behind the farm's balancer: the balancers, the routing
    table's peers, and this host's own address (``up`` asks each node for OPTIONS from it
    before the balancer starts; the balancer sends from it too). A farm on a wildcard address
    takes loopback instead (what the balancer and ``up`` send from). Phones talk to the
    balancer, never to the nodes. Empty (nodes open to anyone) when the config file or
    $SIPFARM_ACCEPT_FROM says otherwise: the operator's choice wins."""
    if "SIPFARM_ACCEPT_FROM" in os.environ or _node_setting("accept_from") is not None:
        return ""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            own = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
        except OSError:
            return ""  # the balancer cannot listen there either: up fails on its own terms
    else:
        own = ["127.0.0.0/8", "::1/128"] if address.is_unspecified else [str(address)]
    return ",".join(["balancers", "peers", *own])


def loopback_destinations(host: str) -> str | None:
    """What ``sipfarm up`` sets ``SIPFARM_ALLOW_DESTINATIONS`` to for a farm on ``host``
    (None: nothing). A farm listening on loopback serves phones on this machine only, and those
    sit on loopback: requests may reach them (refused by default, see README "A closed farm").
    The operator's own setting wins: the environment, or the config file's ``[node]`` or
    ``[balancer]`` (which the environment would override)."""
    if not _is_loopback(host) or "SIPFARM_ALLOW_DESTINATIONS" in os.environ:
        return None
    if any(_setting(name, "allow_destinations") is not None for name in ("node", "balancer")):
        return None
    return "127.0.0.0/8,::1/128"


def _node_setting(key: str) -> object | None:
    """A key of the config file's [node] section (None: no file, or not set there)."""
    return _setting("node", key)


def _setting(name: str, key: str) -> object | None:
    """A key of the config file's section ``name`` (None: no file, or not set there)."""
    if not CONFIG_FILE:
        return None
    import tomllib  # noqa: PLC0415

    try:
        with open(CONFIG_FILE[0], "rb") as fh:
            section = tomllib.load(fh).get(name, {})
    except (OSError, tomllib.TOMLDecodeError):
        return None  # the process reports the file's problem itself
    return section.get(key) if isinstance(section, dict) else None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
