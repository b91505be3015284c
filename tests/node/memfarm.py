"""The in-memory test tier: nodes, phones and a network that exist only as Python objects.

A :class:`MemFarm` holds one or more :class:`~sipfarm.node.core.NodeCore` (sans-IO) sharing a
:class:`MemoryState` (accounts and bindings, the Redis of this tier) and one
:class:`~sipfarm.protect.MemoryGuard` key space, a fake clock, and a network that carries each
node's output datagrams to the phone or node at that address.  :class:`Phone` is a minimal UA
that registers, calls and answers.  Nothing opens a socket: Timer C's three minutes pass in
microseconds with :meth:`MemFarm.advance`.  Anything sent to an address with no endpoint is
recorded in :attr:`MemFarm.stray` (the "victim" of relay attacks).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sipfarm.edge import FlowTokens
from sipfarm.element import NodeIdentity
from sipfarm.node.core import NodeCore
from sipfarm.protect import ExpiringKeys, GuardPolicy, MemoryGuard
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage, error_response
from sipfarm.sip.parser import parse_message
from sipfarm.sip.transaction import TimerConfig
from sipfarm.sip.via import stamp_received
from sipfarm.store.accounts import Account, ha1_md5, ha1_sha256
from sipfarm.store.errors import StoreError
from sipfarm.store.location import Binding, ContactUpdate, RegisterOutcome, RegisterResult, binding_key

DOMAIN = "farm.test"
SECRET = b"memfarm-secret-0123456789abcdef!"


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall_offset = 1_790_000_000.0

    def now(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.mono + self.wall_offset


class MemoryState:
    """FarmState's interface over dicts: accounts, and RFC 3261 10.3 bindings."""

    def __init__(self) -> None:
        self.accounts: dict[tuple[str, str], Account] = {}
        self.bindings: dict[str, dict[str, Binding]] = {}
        self.fail_with: StoreError | None = None  # make every call fail (Redis down)

    def add_account(self, user: str, password: str, domain: str = DOMAIN, max_contacts: int = 10) -> None:
        self.accounts[(user, domain)] = Account(
            user, domain, ha1_md5(user, domain, password), ha1_sha256(user, domain, password), True, max_contacts, 0.0
        )

    def get_account(self, user: str, domain: str, callback: Callable[[Account | StoreError | None], None]) -> None:
        callback(self.fail_with or self.accounts.get((user, domain)))

    def lookup(self, aor: str, now: float, callback: Callable[[list[Binding] | StoreError], None]) -> None:
        if self.fail_with is not None:
            callback(self.fail_with)
            return
        live = [b for b in self.bindings.get(aor, {}).values() if b.expires_at > now]
        callback(sorted(live, key=lambda b: (-b.q, -b.updated)))

    def register(
        self,
        aor: str,
        contacts: Sequence[ContactUpdate],
        callback: Callable[[RegisterResult | StoreError], None],
        **kw: object,
    ) -> None:
        if self.fail_with is not None:
            callback(self.fail_with)
            return
        now = float(kw["now"])  # type: ignore[arg-type]
        call_id, cseq = str(kw["call_id"]), int(kw["cseq"])  # type: ignore[call-overload]
        current = {k: b for k, b in self.bindings.get(aor, {}).items() if b.expires_at > now}
        if kw.get("remove_all"):
            current = {}
        for c in contacts:
            key = binding_key(c.contact, c.instance, c.reg_id)
            old = current.get(key)
            if old is not None and old.call_id == call_id and old.cseq >= cseq:
                callback(RegisterResult(RegisterOutcome.OUT_OF_ORDER, tuple(current.values())))
                return
            if c.expires == 0:
                current.pop(key, None)
                continue
            current[key] = Binding(
                c.contact, now + c.expires, c.q, call_id, cseq, c.instance, c.reg_id,
                tuple(kw.get("path") or ()), str(kw.get("received") or ""), "", str(kw.get("node") or ""), now,
            )  # fmt: skip
        if len(current) > int(kw["max_contacts"]):  # type: ignore[call-overload]
            callback(RegisterResult(RegisterOutcome.TOO_MANY_CONTACTS, ()))
            return
        self.bindings[aor] = current
        callback(RegisterResult(RegisterOutcome.OK, tuple(current.values())))


class Resolver:
    """Names resolve from a dict, at once."""

    def __init__(self, names: dict[str, str] | None = None) -> None:
        self.names = names or {}

    def cached(self, host: str) -> str | None:
        return self.names.get(host, "")

    def resolve(self, host: str, done: Callable[[str | None], None]) -> None:
        done(self.names.get(host))


@dataclass
class Sent:
    data: bytes
    source: Address
    dest: Address

    @property
    def msg(self) -> SipMessage:
        return parse_message(self.data)


class MemFarm:
    def __init__(
        self,
        nodes: int = 1,
        *,
        users: dict[str, str] | None = None,
        policy: GuardPolicy | None = None,
        node_kwargs: dict[str, object] | None = None,
    ) -> None:
        self.clock = Clock()
        self.state = MemoryState()
        for user, password in (users or {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}).items():
            self.state.add_account(user, password)
        self.keys = ExpiringKeys(self.clock.now)
        self.tokens = FlowTokens(SECRET)
        self.nodes: list[NodeCore] = []
        self.node_addresses: list[Address] = []
        self.endpoints: dict[Address, Callable[[bytes, Address], None]] = {}
        self.stray: list[Sent] = []
        self.log: list[Sent] = []
        for i in range(nodes):
            addr = Address("udp", f"127.0.1.{i + 1}", 5060)
            identity = NodeIdentity(
                node_id=f"node{i + 1}",
                domains=frozenset({DOMAIN}),
                addresses={"udp": (addr.host, addr.port)},
                aliases=frozenset({(addr.host, addr.port)}),
            )
            core = NodeCore(
                identity,
                self.state,  # type: ignore[arg-type]
                auth.NonceFactory(SECRET, 300.0),
                timers=TimerConfig(),
                flow_tokens=self.tokens,
                guard=MemoryGuard(policy or GuardPolicy(), clock=self.clock.now, keys=self.keys),
                resolver=Resolver(),
                clock=self.clock.now,
                wall_clock=self.clock.wall,
                **(node_kwargs or {}),  # type: ignore[arg-type]
            )
            self.nodes.append(core)
            self.node_addresses.append(addr)
            self.endpoints[addr] = self._node_input(core, addr)

    # -- the network ----------------------------------------------------------------------------

    def _node_input(self, core: NodeCore, local: Address) -> Callable[[bytes, Address], None]:
        def deliver(data: bytes, source: Address) -> None:
            try:
                msg = parse_message(data)
                if msg.is_request:
                    stamp_received(msg, source)
                core.on_message(msg, source, local, self.clock.now())
            except SipError as exc:  # what the transport does: a stateless answer
                if not exc.drop and data[:4] != b"SIP/":
                    reply = error_response(msg if "msg" in dir() else None, exc, b"t")  # type: ignore[arg-type]
                    if reply is not None:
                        self.send(reply.to_bytes(), local, source)
            self._drain(core, local)

        return deliver

    def _drain(self, core: NodeCore, local: Address) -> None:
        for data, dest in core.datagrams_to_send():
            self.send(data, local, dest)

    def send(self, data: bytes, source: Address, dest: Address) -> None:
        sent = Sent(data, source, dest)
        self.log.append(sent)
        endpoint = self.endpoints.get(Address("udp", dest.host, dest.port))
        if endpoint is None:
            self.stray.append(sent)
            return
        endpoint(data, source)

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """Let time pass, firing every node's timers on the way."""
        end = self.clock.mono + seconds
        while self.clock.mono < end:
            self.clock.mono = min(end, self.clock.mono + step)
            for core, addr in zip(self.nodes, self.node_addresses, strict=True):
                deadline = core.next_deadline()
                if deadline is not None and deadline <= self.clock.mono:
                    core.handle_timer(self.clock.mono)
                    self._drain(core, addr)

    def phone(self, user: str, host: str, port: int = 5060, password: str | None = None) -> Phone:
        phone = Phone(self, user, Address("udp", host, port), password or f"{user}-pw")
        self.endpoints[phone.address] = phone.receive
        return phone

    def sent_to(self, dest: Address) -> list[Sent]:
        return [s for s in self.log if s.dest == dest]


_counter = itertools.count(1)


@dataclass
class Phone:
    """A UA on the in-memory network: keeps every message it receives, answers as told."""

    farm: MemFarm
    user: str
    address: Address
    password: str
    inbox: list[SipMessage] = field(default_factory=list)
    answer: int | None = None  # auto-answer incoming INVITEs with this status (None: 180 only)
    node: int = 0  # which node it sends to

    @property
    def node_address(self) -> Address:
        return self.farm.node_addresses[self.node]

    def receive(self, data: bytes, source: Address) -> None:
        msg = parse_message(data)
        self.inbox.append(msg)
        if msg.is_request and msg.method not in (b"ACK",):
            self._uas(msg, source)

    def _uas(self, msg: SipMessage, source: Address) -> None:
        from sipfarm.sip.message import make_response  # noqa: PLC0415

        tag = b"uas" + str(next(_counter)).encode()
        if msg.method == b"INVITE":
            self.send(make_response(msg, 180, to_tag=tag).to_bytes(), source)
            if self.answer is not None:
                self.send(
                    make_response(
                        msg, self.answer, to_tag=tag, headers=(("contact", f"<sip:{self.user}@{self.hostport}>"),)
                    ).to_bytes(),
                    source,
                )
        else:
            self.send(make_response(msg, 200, to_tag=tag).to_bytes(), source)

    @property
    def hostport(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    def send(self, data: bytes | SipMessage, dest: Address | None = None) -> None:
        raw = data if isinstance(data, bytes) else data.to_bytes()
        self.farm.send(raw, self.address, dest or self.node_address)

    def request(
        self,
        method: str,
        uri: str,
        *,
        to: str | None = None,
        from_user: str | None = None,
        headers: Sequence[tuple[str, str | bytes]] = (),
        call_id: str | None = None,
        cseq: int = 1,
        branch: str | None = None,
        body: bytes = b"",
        max_forwards: int = 70,
    ) -> SipMessage:
        msg = SipMessage.request(
            method,
            uri,
            [
                ("via", f"SIP/2.0/UDP {self.hostport};branch={branch or 'z9hG4bK' + secrets.token_hex(6)};rport"),
                ("max-forwards", str(max_forwards)),
                ("from", f"<sip:{from_user or self.user}@{DOMAIN}>;tag={secrets.token_hex(3)}"),
                ("to", to or f"<{uri}>"),
                ("call-id", call_id or secrets.token_hex(8)),
                ("cseq", f"{cseq} {method}"),
                ("contact", f"<sip:{self.user}@{self.hostport}>"),
                *headers,
            ],
            body,
        )
        msg.cseq = (cseq, method.encode())
        return msg

    def last(self, status: int | None = None, method: bytes | None = None) -> SipMessage | None:
        for msg in reversed(self.inbox):
            if status is not None and msg.status != status:
                continue
            if method is not None and msg.method != method and msg.cseq[1] != method:
                continue
            return msg
        return None

    def finals(self) -> list[int]:
        return [m.status for m in self.inbox if m.status >= 200]

    def authorize(self, challenge: SipMessage, msg: SipMessage, password: str | None = None) -> SipMessage:
        """``msg`` again with credentials answering ``challenge`` (401 or 407), CSeq + 1."""
        header = "www-authenticate" if challenge.status == 401 else "proxy-authenticate"
        creds_header = "authorization" if challenge.status == 401 else "proxy-authorization"
        chal = auth.parse_challenge(challenge.get_all(header)[0])
        creds = auth.build_credentials(
            chal, self.user, password or self.password, msg.method.decode(), msg.uri.decode(), secrets.token_hex(4)
        )
        again = msg.copy()
        again.remove(creds_header)
        again.append(creds_header, creds)
        number = msg.cseq[0] + 1
        again.set("cseq", f"{number} {msg.method.decode()}".encode())
        again.cseq = (number, msg.method)
        top = again.top_via_value.split(b";branch=")[0] + b";branch=z9hG4bK" + secrets.token_hex(6).encode() + b";rport"
        again.replace_first_value("via", top)
        return again

    def authenticated(self, msg: SipMessage, password: str | None = None) -> SipMessage | None:
        """Send ``msg``, answer its challenge, send it again; the final answer to that."""
        self.inbox.clear()
        self.send(msg)
        challenge = next((m for m in self.inbox if m.status in (401, 407)), None)
        if challenge is None:
            return self.last()
        self.inbox.clear()
        self.send(self.authorize(challenge, msg, password))
        finals = [m for m in self.inbox if m.status >= 200 and m.cseq[1] == msg.method]
        return finals[-1] if finals else (self.inbox[-1] if self.inbox else None)

    def register(self, expires: int = 3600) -> SipMessage | None:
        msg = self.request(
            "REGISTER",
            f"sip:{DOMAIN}",
            to=f"<sip:{self.user}@{DOMAIN}>",
            headers=(("expires", str(expires)),),
        )
        return self.authenticated(msg)
