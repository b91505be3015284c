"""A private OpenLDAP ``slapd`` holding the benchmark's users, for `sipfarm bench --routing`.

The test fixture (tests/fixtures/slapd.py) holds six hand-written users in a 10 MB database
with no index; a benchmark needs thousands, looked up by ``uid`` as fast as slapd can, so this
module writes its own ``slapd.conf``: the ``core``, ``cosine`` and ``inetorgperson`` schemas
plus the same small ``sipfarm`` schema (same OIDs, so one ``[ldap]`` config reads both), an
``mdb`` database with equality indexes on ``uid`` and ``objectClass``, no logging. The users are
loaded offline with ``slapadd -q`` (one LDIF), then ``slapd -d 0`` runs in the foreground on a
free 127.0.0.1 port as a `ManagedProcess` (its log in the work directory, stopped with it).

Each user carries ``sipHA1``: the MD5 HA1 of its password for realm = the farm's domain
(RFC 7616 3.4.2), so the directory never holds a plaintext password and the node does no
hashing per lookup.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from benchmarks.kamailio import User
from benchmarks.process import ManagedProcess, free_port

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMA_DIR = Path("/etc/ldap/schema")
START_TIMEOUT = 15.0

BASE = "dc=example,dc=com"
PEOPLE = f"ou=people,{BASE}"
BIND_DN = f"cn=sipfarm,ou=services,{BASE}"
BIND_PASSWORD = "svcpw"
FILTER = "(&(uid={user})(sipDomain={domain}))"
MONITOR_SEARCHES = "cn=Search,cn=Operations,cn=Monitor"
#: `[ldap.attributes]` of the node's config
ATTRIBUTES = {"user": "uid", "ha1": "sipHA1"}

# OIDs under the arc RFC 5612 reserves for documentation, as tests/fixtures/slapd.py.
SIPFARM_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.32473.1.1.1 NAME 'sipDomain'
    EQUALITY caseIgnoreIA5Match SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.32473.1.1.2 NAME 'sipHA1'
    EQUALITY caseIgnoreIA5Match SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.32473.1.2.1 NAME 'sipAccount' SUP top AUXILIARY
    MUST ( uid $ sipDomain )
    MAY ( sipHA1 $ userPassword ) )
"""


class SlapdError(RuntimeError):
    """slapd is not installed, slapadd refused the data, or slapd did not start."""


def available() -> bool:
    return Path(SLAPD).exists() and Path(SLAPADD).exists() and (SCHEMA_DIR / "core.schema").exists()


def ha1_md5(user: str, realm: str, password: str) -> str:
    return hashlib.md5(f"{user}:{realm}:{password}".encode(), usedforsecurity=False).hexdigest()


def directory_ldif(users: Sequence[User], domain: str) -> str:
    """The base, the service account the farm binds as, and one ``sipAccount`` per user."""
    head = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {BIND_DN}\nobjectClass: person\nobjectClass: simpleSecurityObject\ncn: sipfarm\nsn: sipfarm\n"
        f"userPassword: {BIND_PASSWORD}\n",
    ]
    people = (
        f"dn: uid={u.name},{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: sipAccount\ncn: {u.name}\n"
        f"sn: {u.name}\nuid: {u.name}\nsipDomain: {domain}\nsipHA1: {ha1_md5(u.name, domain, u.password)}\n"
        for u in users
    )
    return "\n".join([*head, *people])


def slapd_conf(workdir: Path) -> str:
    schemas = [SCHEMA_DIR / f"{name}.schema" for name in ("core", "cosine", "inetorgperson")]
    includes = "".join(f"include {path}\n" for path in [*schemas, workdir / "sipfarm.schema"])
    return f"""\
{includes}
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload back_monitor
pidfile {workdir / "slapd.pid"}
argsfile {workdir / "slapd.args"}
loglevel 0

database mdb
suffix "{BASE}"
directory {workdir / "db"}
maxsize 1073741824
index objectClass eq
index uid eq
access to attrs=userPassword
    by dn.exact="{BIND_DN}" read
    by anonymous auth
    by * none
access to *
    by dn.exact="{BIND_DN}" read
    by * none

# cn=Monitor: the benchmark reads the count of completed searches (LDAP searches per call)
database monitor
access to dn.subtree="cn=Monitor"
    by dn.exact="{BIND_DN}" read
    by * none
"""


class Slapd:
    """slapd with `users` of `domain`, on a free loopback port; `stop()` ends it."""

    def __init__(self, workdir: Path, users: Sequence[User], domain: str) -> None:
        if not available():
            raise SlapdError(f"{SLAPD} not installed: apt-get install slapd")
        self.workdir = workdir.resolve()
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "db").mkdir(parents=True)
        (self.workdir / "sipfarm.schema").write_text(SIPFARM_SCHEMA)
        conf = self.workdir / "slapd.conf"
        conf.write_text(slapd_conf(self.workdir))
        ldif = self.workdir / "directory.ldif"
        ldif.write_text(directory_ldif(users, domain))
        # -q: no consistency checks while loading (a fresh database from one known file)
        result = subprocess.run(
            [SLAPADD, "-q", "-f", str(conf), "-l", str(ldif)], capture_output=True, timeout=300, check=False
        )
        if result.returncode != 0:
            raise SlapdError(f"slapadd failed: {result.stderr.decode(errors='replace')[-2000:]}")
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.process = ManagedProcess(
            "slapd",
            [SLAPD, "-d", "0", "-f", str(conf), "-h", f"{self.url}/"],
            self.workdir / "slapd.log",
            cwd=self.workdir,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise SlapdError(f"slapd exited with {self.process.proc.returncode}:\n{self.process.log_tail()}")
            with suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return
            time.sleep(0.02)
        self.process.stop()
        raise SlapdError(f"slapd did not listen on {self.url} within {START_TIMEOUT:.0f} s")

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    def searches(self) -> int:
        """Searches slapd has completed so far (cn=Monitor; this one included)."""
        import bonsai  # noqa: PLC0415 - sipfarm's LDAP client, needed only with slapd

        client = bonsai.LDAPClient(self.url)
        client.set_credentials("SIMPLE", user=BIND_DN, password=BIND_PASSWORD)
        with client.connect() as conn:
            [entry] = conn.search(MONITOR_SEARCHES, bonsai.LDAPSearchScope.BASE, attrlist=["monitorOpCompleted"])
            return int(entry["monitorOpCompleted"][0])

    def stop(self) -> None:
        self.process.stop()
