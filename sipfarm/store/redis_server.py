"""Run a throw-away ``redis-server`` on a loopback port (tests, benchmarks, ``sipfarm up``).

No persistence (``--save '' --appendonly no``): the farm's Redis holds registrations that
UAs refresh anyway. Readiness is a raw ``PING`` over a socket so this module needs no client.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from sipfarm import ports

REDIS_SERVER = "redis-server"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` (see :mod:`sipfarm.ports`)."""
    return ports.free_port(host, udp=False, tcp=True)


def ping(
    host: str, port: int, timeout: float = 0.2, *, password: str | None = None, tls: ssl.SSLContext | None = None
) -> bool:
    """True if a Redis on ``host:port`` answers ``PING`` with ``+PONG`` (after ``AUTH`` when
    given a password; over TLS when given a context)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            s = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            if password:
                s.sendall(_command("AUTH", password))
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _command(*args: str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisProcess:
    """One ``redis-server`` child process bound to ``host:port``, data files in ``workdir``.

    ``stop()`` then ``start()`` restarts it on the same port with an empty dataset, which is
    what "Redis died and came back" looks like to the farm.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: str = REDIS_SERVER,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        """``password``: ``requirepass`` (the URL carries it). ``tls_dir``: serve TLS only, with a
        self-signed certificate written there (the URL is ``rediss://`` naming it as the CA)."""
        self.workdir = Path(workdir)
        self.password = password
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None
        self._tls_files: tuple[Path, Path] | None = None
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.executable = executable
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls_dir is None:
            return f"redis://{auth}{self.host}:{self.port}/0"
        cert = self.tls_dir / "cert.pem"
        return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={quote(str(cert), safe='/')}"

    def _client_tls(self) -> ssl.SSLContext | None:
        if self.tls_dir is None:
            return None
        return ssl.create_default_context(cafile=str(self.tls_dir / "cert.pem"))

    @property
    def logfile(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        exe = shutil.which(self.executable) or self.executable
        return [
            exe,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.logfile),
            "--daemonize", "no",
            "--protected-mode", "yes",
            *(["--requirepass", self.password] if self.password else []),
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip

    def _tls_args(self) -> list[str]:
        if self.tls_dir is None:
            return []
        cert, key = self.tls_files()
        return [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        ]  # fmt: skip

    def tls_files(self) -> tuple[Path, Path]:
        """(certificate, key) in ``tls_dir``, made once: servers sharing a ``tls_dir`` (a master,
        its replicas and sentinels speaking TLS to each other) share one certificate."""
        assert self.tls_dir is not None
        if self._tls_files is None:
            cert, key = self.tls_dir / "cert.pem", self.tls_dir / "key.pem"
            if not (cert.exists() and key.exists()):
                from sipfarm.transport.tls import make_self_signed_cert  # noqa: PLC0415

                self.tls_dir.mkdir(parents=True, exist_ok=True)
                cert, key = make_self_signed_cert(self.tls_dir, ip=self.host)
            self._tls_files = (Path(cert), Path(key))
        return self._tls_files

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and return once it answers ``PING``; raise ``RuntimeError`` if not."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise RuntimeError(f"redis-server exited at start on port {self.port}: {err}{self._log_tail()}")
            if ping(self.host, self.port, password=self.password, tls=self._client_tls()):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout}s{self._log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: the server dies at once, without a word to its clients or replicas."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n" + "\n".join(self.logfile.read_text(errors="replace").splitlines()[-10:])
        return ""

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_redis(
    workdir: Path | str, port: int | None = None, attempts: int = 3, *, password: str | None = None
) -> RedisProcess:
    """Start a ``redis-server`` on a free loopback port (or ``port``) and return it running.

    With no ``port``, a start that fails (someone took the port in between) is retried on a
    fresh one up to ``attempts`` times.
    """
    last: RuntimeError | None = None
    for _ in range(attempts if port is None else 1):
        proc = RedisProcess(Path(workdir), port=port, password=password)
        try:
            proc.start()
        except RuntimeError as e:
            last = e
            continue
        return proc
    assert last is not None
    raise last


def query(host: str, port: int, *args: str, timeout: float = 2.0, password: str | None = None) -> bytes:
    """One command over a raw socket; the reply's payload (a bulk string's bytes, a simple
    string's or an integer's text, an error's text prefixed ``-``). Enough for ``CLUSTER INFO``
    and friends."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        if password:
            s.sendall(_command("AUTH", password))
        s.sendall(_command(*args))
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            body = data[5:] if password and data.startswith(b"+OK\r\n") else data
            if body[:1] in (b"+", b"-", b":") and body.endswith(b"\r\n"):
                return body[:-2] if body[:1] == b"-" else body[1:-2]
            if body[:1] == b"$":
                head, _, rest = body.partition(b"\r\n")
                size = int(head[1:])
                if size < 0:
                    return b""
                if len(rest) >= size + 2:
                    return rest[:size]
        raise OSError(f"incomplete reply from {host}:{port} to {args[0]}")


class RedisClusterProcesses:
    """A throw-away Redis Cluster on loopback: ``masters`` masters with ``replicas`` replicas each
    (``redis-server --cluster-enabled yes`` per node, ``redis-cli --cluster create``), ready once
    every node says ``cluster_state:ok``. ``cluster-node-timeout`` is short (``node_timeout_ms``)
    so a killed master's replica is promoted within about a second or two."""

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        host: str = "127.0.0.1",
        node_timeout_ms: int = 1000,
        password: str | None = None,
        avoid: frozenset[int] = frozenset(),
    ) -> None:
        """``avoid``: ports not to take (those the caller is about to bind)."""
        self.workdir = Path(workdir)
        self.host = host
        self.avoid = avoid
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.nodes: list[RedisProcess] = []

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        seeds = ",".join(f"{self.host}:{n.port}" for n in self.nodes[: self.masters])
        return f"redis+cluster://{auth}{seeds}"

    def _free_port(self) -> int:
        taken = self.avoid | {n.port for n in self.nodes}
        for _ in range(100):
            port = free_port(self.host)
            if port not in taken:
                return port
        raise RuntimeError("no free port for a Redis Cluster node")

    def _node(self, port: int | None) -> RedisProcess:
        port = port if port is not None else self._free_port()
        # the cluster bus port named too (not port + 10000, which may be taken or ephemeral)
        bus = self._free_port()
        return RedisProcess(
            self.workdir / f"node-{port}",
            port=port,
            host=self.host,
            password=self.password,
            extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-port", str(bus),
                "--cluster-require-full-coverage", "no",
                "--repl-diskless-sync-delay", "0",
                *(("--masterauth", self.password) if self.password else ()),
            ),
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, create the cluster, wait for ``cluster_state:ok`` on all of them."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                for attempt in range(3):  # a port taken between its pick and the bind: new ones
                    node = self._node(None)
                    try:
                        node.start()
                        break
                    except RuntimeError:
                        if attempt == 2:
                            raise
                self.nodes.append(node)
            cli = shutil.which("redis-cli") or "redis-cli"
            create = [
                cli, "--cluster", "create", *(f"{self.host}:{n.port}" for n in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
                *(("-a", self.password, "--no-auth-warning") if self.password else ()),
            ]  # fmt: skip
            done = subprocess.run(create, capture_output=True, timeout=timeout, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout!r} {done.stderr!r}")
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout: float = 30.0, *, replicated: bool = True) -> None:
        """Return once every running node reports ``cluster_state:ok`` and knows every slot (and,
        when ``replicated``, every master has its replicas in sync)."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._ok(n, self.replicas if replicated else 0) for n in self.nodes if n.running):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def _ok(self, node: RedisProcess, replicas_wanted: int) -> bool:
        """Cluster state ok, every slot assigned, and a master's replicas in sync (a WAIT would
        otherwise block until their first full sync)."""
        try:
            info = query(self.host, node.port, "CLUSTER", "INFO", password=self.password)
            replication = query(self.host, node.port, "INFO", "replication", password=self.password).decode()
        except OSError:
            return False
        if b"cluster_state:ok" not in info or b"cluster_slots_assigned:16384" not in info:
            return False
        if "role:master" in replication:
            replicas = [line for line in replication.splitlines() if line.startswith("slave")]
            return len(replicas) >= replicas_wanted and all("state=online" in line for line in replicas)
        return "master_link_status:up" in replication

    def roles(self) -> dict[int, str]:
        """Port -> ``master`` or ``slave`` for every running node, as that node sees itself."""
        out: dict[int, str] = {}
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(OSError):
                info = query(self.host, node.port, "INFO", "replication", password=self.password)
                for line in info.decode().splitlines():
                    if line.startswith("role:"):
                        out[node.port] = line[5:].strip()
        return out

    def master_of(self, key: bytes) -> RedisProcess:
        """The running node that serves ``key``'s slot as master."""
        alive = next(n for n in self.nodes if n.running)
        slot = int(query(self.host, alive.port, "CLUSTER", "KEYSLOT", key.decode(), password=self.password))
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(OSError):
                slots = query(self.host, node.port, "CLUSTER", "NODES", password=self.password).decode()
                for line in slots.splitlines():
                    fields = line.split()
                    if "myself" in fields[2] and "master" in fields[2]:
                        for piece in fields[8:]:
                            first, _, last = piece.partition("-")
                            if first.isdigit() and int(first) <= slot <= int(last or first):
                                return node
        raise LookupError(f"no running master serves slot {slot}")

    def kill(self, node: RedisProcess) -> None:
        """SIGKILL one node (a crash: nothing flushed, no goodbye to the cluster)."""
        proc = node._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcesses:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SentinelProcess(RedisProcess):
    """One ``redis-server --sentinel`` monitoring ``service`` whose master is on ``master``.

    Sentinel rewrites its config file as it learns the set (replicas, other sentinels, a new
    master after a failover), so each one gets its own file in ``workdir``. The timings are a
    test's: down after ``down_after_ms`` without an answer, at most one failover per
    ``failover_timeout_ms``.
    """

    def __init__(
        self,
        workdir: Path,
        master: tuple[str, int],
        *,
        service: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        auth_pass: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: str = REDIS_SERVER,
        tls_dir: Path | None = None,
    ) -> None:
        """``tls_dir``: TLS only, to clients and to the servers and other sentinels (share the
        servers' ``tls_dir``, so one certificate)."""
        super().__init__(workdir, port=port, host=host, executable=executable, tls_dir=tls_dir)
        self.master = master
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.auth_pass = auth_pass

    @property
    def conf(self) -> Path:
        return self.workdir / f"sentinel-{self.port}.conf"

    @property
    def logfile(self) -> Path:
        return self.workdir / f"sentinel-{self.port}.log"

    def command(self) -> list[str]:
        name = self.service
        listen = [f"port {self.port}"]
        if self.tls_dir is not None:
            cert, key = self.tls_files()
            listen = [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {cert}",
                f"tls-key-file {key}",
                f"tls-ca-cert-file {cert}",
                "tls-auth-clients no",
                "tls-replication yes",  # to the servers and the other sentinels
            ]
        lines = [
            *listen,
            f"bind {self.host}",
            f"dir {self.workdir}",
            f"logfile {self.logfile}",
            "daemonize no",
            f"sentinel monitor {name} {self.master[0]} {self.master[1]} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.auth_pass:
            lines.append(f"sentinel auth-pass {name} {self.auth_pass}")
        if not self.conf.exists():  # a restart keeps what the sentinel learnt
            self.conf.write_text("\n".join(lines) + "\n")
        exe = shutil.which(self.executable) or self.executable
        return [exe, str(self.conf), "--sentinel"]
