"""The in-memory test tier: nodes, phones and a network that exist only as Python objects.

A :class:`MemFarm` holds one or more :class:`~sipfarm.node.core.NodeCore` (sans-IO) sharing a
:class:`MemoryState` (accounts and bindings, the Redis of this tier) and one
:class:`~sipfarm.protect.MemoryGuard` key space, a fake clock, and a network that carries each
node's output datagrams to the phone or node at that address.  :class:`Phone` is a minimal UA
that registers, calls, rings, answers (at once, later or never) and answers CANCEL with 487.
Nothing opens a socket: Timer C's three minutes pass in microseconds with
:meth:`MemFarm.advance`.  Anything sent to an address with no endpoint is recorded in
:attr:`MemFarm.stray` (the "victim" of relay attacks).

The network is a FIFO: :meth:`MemFarm.send` queues a datagram and, unless a delivery is already
under way, delivers queued datagrams until none is left, so a test's ``phone.send(...)`` returns
once every consequence has happened (bounded by :data:`MAX_DATAGRAMS_PER_INPUT`: a storm fails
the test with an AssertionError instead of hanging it).  A datagram travels over the transport
of its destination address: a phone made with ``transport="tcp"`` sends to the node over TCP and
the node sees a TCP source (its connection, whose port is not the Contact's).
"""

from __future__ import annotations

import collections
import itertools
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from sipfarm.config import TRYING_DELAY
from sipfarm.edge import FlowTokens, flow_uri
from sipfarm.element import NodeIdentity
from sipfarm.node.core import NodeCore
from sipfarm.protect import ExpiringKeys, GuardPolicy, MemoryGuard
from sipfarm.protect.memory_guard import record_admission
from sipfarm.registrar.gruu import TempGruus
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.errors import SipError
from sipfarm.sip.headers import parse_name_addr, via_branch
from sipfarm.sip.message import SipMessage, error_response, make_response
from sipfarm.sip.parser import parse_message
from sipfarm.sip.transaction import TimerConfig
from sipfarm.sip.uri import SipURI
from sipfarm.sip.via import default_port, stamp_received
from sipfarm.store.accounts import NOT_CACHED, Account, CacheMiss, ha1_md5, ha1_sha256
from sipfarm.store.errors import StoreError
from sipfarm.store.location import (
    AdmittedRegister,
    Binding,
    ContactUpdate,
    RegisterOutcome,
    RegisterResult,
    binding_key,
)
from sipfarm.transport.destinations import DestinationPolicy

DOMAIN = "farm.test"
SECRET = b"memfarm-secret-0123456789abcdef!"
MAX_DATAGRAMS_PER_INPUT = 5_000  # more than any honest exchange; a loop between elements trips it


def issue8(reason: str) -> pytest.MarkDecorator:
    """Behaviour issue 8 asks for that the node does not have yet: the test must fail with an
    AssertionError (anything else is a broken test); once the fix lands it passes, strict xfail
    turns that into a failure, and the mark goes."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"issue 8: {reason}")


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall_offset = 1_790_000_000.0

    def now(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.mono + self.wall_offset


class MemoryState:
    """FarmState's interface over dicts: accounts, and RFC 3261 10.3 bindings.

    Every account counts as cached (``cached_account``), so a REGISTER whose credentials verify
    takes the one-round-trip path (``register_admitted``, over the guard's ``keys``) unless
    ``admits`` is False (what a Redis Cluster's FarmState says) or ``cache_accounts`` is
    False. ``writes`` counts each path's writes: (plain, admitted)."""

    def __init__(self, keys: ExpiringKeys | None = None) -> None:
        self.accounts: dict[tuple[str, str], Account] = {}
        self.bindings: dict[str, dict[str, Binding]] = {}
        self.fail_with: StoreError | None = None  # make every call fail (Redis down)
        self.call_relays: dict[bytes, dict[bytes, str]] = {}  # FarmState's sipfarm:media:{call}
        self.keys = keys  # the guard's key space (the farm's Redis)
        self.admits = keys is not None
        self.cache_accounts = True
        self.writes = [0, 0]

    def add_account(self, user: str, password: str, domain: str = DOMAIN, max_contacts: int = 10) -> None:
        self.accounts[(user, domain)] = Account(
            user, domain, ha1_md5(user, domain, password), ha1_sha256(user, domain, password), True, max_contacts, 0.0
        )

    def get_account(self, user: str, domain: str, callback: Callable[[Account | StoreError | None], None]) -> None:
        callback(self.fail_with or self.accounts.get((user, domain)))

    def cached_account(self, user: str, domain: str) -> Account | CacheMiss | None:
        return self.accounts.get((user, domain)) if self.cache_accounts else NOT_CACHED

    def register_admitted(
        self,
        aor: str,
        contacts: Sequence[ContactUpdate],
        source_ip: str,
        nonce_use: str,
        nonce_ttl: float,
        callback: Callable[[AdmittedRegister | StoreError], None],
        **kw: object,
    ) -> None:
        """admit.lua: the guard's two checks over its keys, then ``register`` only if they pass."""
        assert self.keys is not None and self.admits
        self.writes[1] += 1
        # the guard's part first: ``fail_with`` fails the whole after it, as on the other path,
        # whose MemoryGuard (unlike one Redis) never fails
        ban_left, first_use = record_admission(self.keys, source_ip, nonce_use, nonce_ttl)
        if self.fail_with is not None:
            callback(self.fail_with)
            return
        if ban_left is not None or not first_use:
            callback(AdmittedRegister(ban_left, first_use, None))
            return
        results: list[RegisterResult | StoreError] = []
        self._apply(aor, contacts, results.append, **kw)
        result = results[0]
        callback(result if isinstance(result, StoreError) else AdmittedRegister(None, True, result))

    def lookup(self, aor: str, now: float, callback: Callable[[list[Binding] | StoreError], None]) -> None:
        if self.fail_with is not None:
            callback(self.fail_with)
            return
        live = [b for b in self.bindings.get(aor, {}).values() if b.expires_at > now]
        callback(sorted(live, key=lambda b: (-b.q, -b.updated)))

    def remove_binding(self, aor: str, binding: Binding, callback: Callable[[bool | StoreError], None]) -> None:
        """FarmState.remove_binding: only if the stored one has the same contact, Path and flow."""
        if self.fail_with is not None:
            callback(self.fail_with)
            return
        current = self.bindings.get(aor, {})
        stored = current.get(binding.key)
        same = stored is not None and (stored.contact, stored.path, stored.received) == (
            binding.contact,
            binding.path,
            binding.received,
        )
        if same:
            del current[binding.key]
        callback(same)

    def record_relay(self, call_id: bytes, tag: bytes, relay: str, ttl: int) -> None:
        if self.fail_with is None:
            self.call_relays.setdefault(call_id, {})[tag] = relay

    def find_relay(self, call_id: bytes, callback: Callable[[str | None], None]) -> None:
        found = self.call_relays.get(call_id) if self.fail_with is None else None
        callback(next(iter(found.values())) if found else None)

    def forget_relay(self, call_id: bytes) -> None:
        self.call_relays.pop(call_id, None)

    def register(
        self,
        aor: str,
        contacts: Sequence[ContactUpdate],
        callback: Callable[[RegisterResult | StoreError], None],
        **kw: object,
    ) -> None:
        self.writes[0] += 1
        self._apply(aor, contacts, callback, **kw)

    def _apply(
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
    """One datagram on the in-memory network (``source`` carries the transport it went over)."""

    data: bytes
    source: Address
    dest: Address

    @property
    def msg(self) -> SipMessage:
        return parse_message(self.data)


def _key(address: Address) -> tuple[str, int]:
    return (address.host, address.port)


class MemFarm:
    """Nodes at ``127.0.1.<n>:5060`` sharing one state, guard key space, flow-token secret and clock."""

    def __init__(
        self,
        nodes: int = 1,
        *,
        users: dict[str, str] | None = None,
        policy: GuardPolicy | None = None,
        node_kwargs: dict[str, object] | None = None,
        node_hosts: Sequence[str] | None = None,
        worker_via_port: int | None = None,
        domains: Sequence[str] = (DOMAIN,),
    ) -> None:
        """``node_hosts``: the nodes' IP addresses (default 127.0.1.<n>; IPv6 allowed).
        ``domains``: the served domains (``[node] domains``).
        ``worker_via_port``: each node is a worker of a multi-worker node, whose Via names that
        private port while Record-Route and Path name the shared 5060."""
        self.clock = Clock()
        self.keys = ExpiringKeys(self.clock.now)
        self.state = MemoryState(self.keys)
        for user, password in (users or {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}).items():
            self.state.add_account(user, password)
        self.tokens = FlowTokens(SECRET)
        # loopback is refused by default: each phone is allowed by its exact address
        self.destinations = DestinationPolicy()
        self.nodes: list[NodeCore] = []
        self.node_addresses: list[Address] = []
        self.endpoints: dict[tuple[str, int], Callable[[bytes, Address], None]] = {}
        self.stray: list[Sent] = []  # sent to an address nobody listens on
        self.log: list[Sent] = []  # every datagram, in the order sent
        self._queue: collections.deque[Sent] = collections.deque()
        self._delivering = False
        for i in range(nodes):
            addr = Address("udp", node_hosts[i] if node_hosts else f"127.0.1.{i + 1}", 5060)
            via_port = worker_via_port or addr.port
            identity = NodeIdentity(
                node_id=f"node{i + 1}",
                domains=frozenset(domains),
                addresses={"udp": (addr.host, via_port)},
                aliases=frozenset({(addr.host, addr.port), (addr.host, via_port)}),
                route_addresses={"udp": (addr.host, addr.port)},
            )
            kwargs: dict[str, object] = {"timers": TimerConfig(trying=TRYING_DELAY)}  # as a node process
            kwargs.update(node_kwargs or {})
            core = NodeCore(
                identity,
                self.state,  # type: ignore[arg-type]
                auth.NonceFactory(SECRET, 300.0),
                flow_tokens=self.tokens,
                temp_gruus=TempGruus(SECRET),
                guard=MemoryGuard(policy or GuardPolicy(), clock=self.clock.now, keys=self.keys),
                resolver=Resolver(),
                destinations=self.destinations,
                clock=self.clock.now,
                wall_clock=self.clock.wall,
                **kwargs,  # type: ignore[arg-type]
            )
            self.nodes.append(core)
            self.node_addresses.append(addr)
            self.endpoints[_key(addr)] = self._node_input(core, addr)
            if via_port != addr.port:
                private = Address("udp", addr.host, via_port)
                self.endpoints[_key(private)] = self._node_input(core, private)

    # -- the network ----------------------------------------------------------------------------

    def _node_input(self, core: NodeCore, addr: Address) -> Callable[[bytes, Address], None]:
        def deliver(data: bytes, source: Address) -> None:
            local = Address(source.transport, addr.host, addr.port)  # the listener it reached
            msg: SipMessage | None = None
            try:
                msg = parse_message(data)
                if msg.is_request:
                    stamp_received(msg, source)
                core.on_message(msg, source, local, self.clock.now())
            except SipError as exc:  # what the transport does: a stateless answer
                if not exc.drop and data[:4] != b"SIP/":
                    reply = error_response(msg, exc, b"t")
                    if reply is not None:
                        self.send(reply.to_bytes(), local, source)
            self._drain(core, local)

        return deliver

    def _drain(self, core: NodeCore, local: Address) -> None:
        """What the node glue does: a request to a client flow (``core.flow_destinations``)
        goes only to an endpoint that is there (a connection that still exists); when it is
        gone, the send fails and the node hears of it (``transport_failure``)."""
        for _ in range(8):
            out = core.datagrams_to_send()
            flows = core.flow_destinations
            failed: set[Address] = set()
            for data, dest in out:
                if dest in flows and data[:8] != b"SIP/2.0 " and _key(dest) not in self.endpoints:
                    failed.add(dest)  # not dialled: nothing leaves
                    continue
                self.send(data, local, dest)
            if not failed:
                return
            for dest in failed:
                core.transport_failure(dest, self.clock.now())

    def send(self, data: bytes, source: Address, dest: Address) -> None:
        """Queue ``data`` from ``source`` to ``dest`` (over ``dest``'s transport) and deliver
        everything queued, unless a delivery further up the stack is doing so already."""
        self._queue.append(Sent(data, Address(dest.transport, source.host, source.port), dest))
        if self._delivering:
            return
        self._delivering = True
        try:
            for _ in range(MAX_DATAGRAMS_PER_INPUT):
                if not self._queue:
                    return
                sent = self._queue.popleft()
                self.log.append(sent)
                endpoint = self.endpoints.get(_key(sent.dest))
                if endpoint is None:
                    self.stray.append(sent)
                else:
                    endpoint(sent.data, sent.source)
            raise AssertionError(f"more than {MAX_DATAGRAMS_PER_INPUT} datagrams for one input: a loop")
        finally:
            self._queue.clear()
            self._delivering = False

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

    # -- endpoints ------------------------------------------------------------------------------

    def phone(
        self,
        user: str,
        host: str,
        port: int = 5060,
        password: str | None = None,
        *,
        transport: str = "udp",
        contact: str | None = None,
    ) -> Phone:
        """A phone at ``host:port`` (its source address; ``contact`` overrides the Contact URI,
        e.g. a TCP phone whose connection comes from an ephemeral port)."""
        phone = Phone(self, user, Address(transport, host, port), password or f"{user}-pw", contact_uri=contact)
        self.destinations.allow([f"{host}:{port}"])  # loopback is refused unless allowed exactly
        self.endpoints[_key(phone.address)] = phone.receive
        return phone

    def tcp_phone(self, user: str, host: str, *, connection_port: int = 40001) -> Phone:
        """A phone connected to its node over TCP from an ephemeral port: its Contact
        (``host:5060;transport=tcp``) is not reachable, only its connection is."""
        return self.phone(user, host, connection_port, transport="tcp", contact=f"sip:{user}@{host}:5060;transport=tcp")

    def disconnect(self, phone: Phone) -> None:
        """``phone``'s connection closes (a TCP phone): nothing reaches it any more, and a
        node's request over that flow fails to send instead of reaching :attr:`stray`."""
        del self.endpoints[_key(phone.address)]

    def flow_route(self, flow: Address, node: int = 0) -> str:
        """A Route/Record-Route value of node ``node`` naming ``flow`` with a valid token."""
        host, port = self.node_addresses[node].host, self.node_addresses[node].port
        return flow_uri(self.tokens, flow, host, port).decode()

    # -- what happened --------------------------------------------------------------------------

    def sent_to(self, dest: Address) -> list[Sent]:
        """Datagrams sent to ``dest``'s host and port (any transport)."""
        return [s for s in self.log if _key(s.dest) == _key(dest)]

    def stray_to(self, host: str, port: int | None = None) -> list[Sent]:
        """Datagrams that reached no endpoint at ``host`` (and ``port``)."""
        return [s for s in self.stray if s.dest.host == host and (port is None or s.dest.port == port)]

    def sent_by_node(self, node: int = 0, since: int = 0) -> list[Sent]:
        """Datagrams node ``node`` sent, from position ``since`` of :attr:`log` on."""
        addr = self.node_addresses[node]
        return [s for s in self.log[since:] if _key(s.source) == _key(addr)]

    def transactions(self, node: int = 0) -> int:
        """Live transactions (server and client) of node ``node``."""
        return len(self.nodes[node].layer)


_counter = itertools.count(1)


@dataclass
class Ringing:
    """An INVITE a phone has not answered finally yet."""

    request: SipMessage
    source: Address
    tag: bytes


@dataclass
class Phone:
    """A UA on the in-memory network: keeps every message it receives, answers as told.

    As UAS: an INVITE gets 180 (unless ``ring`` is False) and then ``answer`` at once, or stays
    in :attr:`ringing` for :meth:`answer_call` / :meth:`provisional`; a CANCEL gets 200 and its
    INVITE 487; other requests get 200.  ``silent`` phones answer nothing (gone, or an attack's
    bystander).  As UAC: a non-2xx final to an INVITE is ACKed (RFC 3261 17.1.1.3); the dialog
    helpers :meth:`ack` and :meth:`in_dialog` follow a 2xx's route set.
    """

    farm: MemFarm
    user: str
    address: Address
    password: str
    inbox: list[SipMessage] = field(default_factory=list)
    sent: list[SipMessage] = field(default_factory=list)  # requests this phone sent
    answer: int | None = None  # auto-answer incoming INVITEs with this status (None: ring only)
    ring: bool = True  # send 180 on an INVITE
    silent: bool = False  # answer nothing at all
    node: int = 0  # which node it sends to
    contact_uri: str | None = None
    ringing: list[Ringing] = field(default_factory=list)

    @property
    def node_address(self) -> Address:
        node = self.farm.node_addresses[self.node]
        return Address(self.address.transport, node.host, node.port)

    @property
    def hostport(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    @property
    def contact(self) -> str:
        return self.contact_uri or f"sip:{self.user}@{self.hostport}"

    # -- receiving --------------------------------------------------------------------------------

    def receive(self, data: bytes, source: Address) -> None:
        msg = parse_message(data)
        self.inbox.append(msg)
        if msg.is_request:
            if msg.method != b"ACK" and not self.silent:
                self._uas(msg, source)
        elif msg.cseq[1] == b"INVITE" and msg.status >= 300:
            self._ack_non_2xx(msg)

    def _uas(self, msg: SipMessage, source: Address) -> None:
        if msg.method == b"CANCEL":
            self.send(make_response(msg, 200, to_tag=b"cancel"), source)
            branch = via_branch(msg.top_via_value)
            for call in list(self.ringing):
                if via_branch(call.request.top_via_value) == branch:
                    self.ringing.remove(call)
                    self.send(make_response(call.request, 487, to_tag=call.tag), call.source)
            return
        tag = b"uas" + str(next(_counter)).encode()
        if msg.method != b"INVITE":
            self.send(make_response(msg, 200, to_tag=tag), source)
            return
        branch = via_branch(msg.top_via_value)
        if any(via_branch(c.request.top_via_value) == branch for c in self.ringing):
            return  # a retransmission of an INVITE ringing here
        call = Ringing(msg, source, tag)
        self.ringing.append(call)
        if self.ring:
            self.send(make_response(msg, 180, to_tag=tag, record_route=True), source)
        if self.answer is not None:
            self.answer_call(self.answer, call)

    def provisional(self, status: int = 180, call: Ringing | None = None) -> None:
        """Send a provisional for a ringing INVITE (the latest by default)."""
        call = call or self.ringing[-1]
        self.send(make_response(call.request, status, to_tag=call.tag, record_route=True), call.source)

    def answer_call(self, status: int = 200, call: Ringing | None = None) -> None:
        """Answer a ringing INVITE (the latest by default) finally with ``status``."""
        call = call or self.ringing[-1]
        self.ringing.remove(call)
        headers = (("contact", f"<{self.contact}>"),) if status < 300 else ()
        response = make_response(call.request, status, to_tag=call.tag, headers=headers, record_route=status < 300)
        self.send(response, call.source)

    def _ack_non_2xx(self, response: SipMessage) -> None:
        branch = via_branch(response.top_via_value)
        invite = next((m for m in self.sent if m.method == b"INVITE" and via_branch(m.top_via_value) == branch), None)
        if invite is None:
            return
        ack = SipMessage.request(
            "ACK",
            invite.uri.decode(),
            [
                ("via", invite.top_via_value),
                ("max-forwards", "70"),
                ("from", invite.get("from") or b""),
                ("to", response.get("to") or b""),
                ("call-id", invite.call_id),
                ("cseq", f"{invite.cseq[0]} ACK"),
                *(("route", r) for r in invite.get_all("route")),
            ],
        )
        ack.cseq = (invite.cseq[0], b"ACK")
        self.send(ack)

    # -- sending ----------------------------------------------------------------------------------

    def send(self, data: bytes | SipMessage, dest: Address | None = None) -> None:
        if isinstance(data, SipMessage):
            if data.is_request:
                self.sent.append(data)
            raw = data.to_bytes()
        else:
            raw = data
        self.farm.send(raw, self.address, dest or self.node_address)

    def request(
        self,
        method: str,
        uri: str,
        *,
        to: str | None = None,
        from_user: str | None = None,
        from_: str | None = None,
        headers: Sequence[tuple[str, str | bytes]] = (),
        call_id: str | None = None,
        cseq: int = 1,
        branch: str | None = None,
        body: bytes = b"",
        max_forwards: int = 70,
    ) -> SipMessage:
        """An out-of-dialog request (``from_``: the whole From value, without its tag)."""
        via_transport = self.address.transport.upper()
        branch = branch or "z9hG4bK" + secrets.token_hex(6)
        from_value = from_ or f"<sip:{from_user or self.user}@{DOMAIN}>"
        msg = SipMessage.request(
            method,
            uri,
            [
                ("via", f"SIP/2.0/{via_transport} {self.hostport};branch={branch};rport"),
                ("max-forwards", str(max_forwards)),
                ("from", f"{from_value};tag={secrets.token_hex(3)}"),
                ("to", to or f"<{uri}>"),
                ("call-id", call_id or secrets.token_hex(8)),
                ("cseq", f"{cseq} {method}"),
                ("contact", f"<{self.contact}>"),
                *headers,
            ],
            body,
        )
        msg.cseq = (cseq, method.encode())
        return msg

    def in_dialog(self, method: str, answer: SipMessage, *, cseq: int | None = None) -> SipMessage:
        """A request in the dialog ``answer`` (a 2xx to this phone's INVITE) set up: Request-URI
        the remote Contact, Route the Record-Route reversed (RFC 3261 12.1.2, 12.2.1.1)."""
        remote = answer.name_addrs("contact")[0].uri
        number = cseq if cseq is not None else answer.cseq[0] + (0 if method == "ACK" else 1)
        headers: list[tuple[str, str | bytes]] = [
            ("via", f"SIP/2.0/{self.address.transport.upper()} {self.hostport};branch=z9hG4bK{secrets.token_hex(6)}"),
            ("max-forwards", "70"),
            ("from", answer.get("from") or b""),
            ("to", answer.get("to") or b""),
            ("call-id", answer.call_id),
            ("cseq", f"{number} {method}"),
        ]
        headers += [("route", r) for r in reversed(answer.values("record-route"))]
        msg = SipMessage.request(method, str(remote), headers)
        msg.cseq = (number, method.encode())
        return msg

    def cancel(self, invite: SipMessage) -> SipMessage:
        """CANCEL ``invite`` (one this phone sent): same Request-URI, top Via, Route (RFC 3261 9.1)."""
        cancel = SipMessage.request(
            "CANCEL",
            invite.uri.decode(),
            [
                ("via", invite.top_via_value),
                ("max-forwards", "70"),
                ("from", invite.get("from") or b""),
                ("to", invite.get("to") or b""),
                ("call-id", invite.call_id),
                ("cseq", f"{invite.cseq[0]} CANCEL"),
                *(("route", r) for r in invite.get_all("route")),
            ],
        )
        cancel.cseq = (invite.cseq[0], b"CANCEL")
        self.send(cancel)
        return cancel

    def ack(self, answer: SipMessage) -> SipMessage:
        """The ACK for the 2xx ``answer``, sent to the first hop of its route set."""
        ack = self.in_dialog("ACK", answer)
        self.send(ack, self.first_hop(ack))
        return ack

    def first_hop(self, msg: SipMessage) -> Address:
        """Where a UA sends ``msg``: its top Route (loose routing), else this phone's node."""
        routes = msg.values("route")
        if not routes:
            return self.node_address
        uri = parse_name_addr(routes[0]).uri
        assert isinstance(uri, SipURI)
        return Address(uri.transport, uri.host.strip("[]"), uri.port or default_port(uri.transport))

    # -- what it saw ------------------------------------------------------------------------------

    def requests(self, method: bytes | None = None) -> list[SipMessage]:
        """Requests this phone received (of ``method``)."""
        return [m for m in self.inbox if m.is_request and (method is None or m.method == method)]

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

    # -- authentication ---------------------------------------------------------------------------

    def authorize(
        self, challenge: SipMessage, msg: SipMessage, password: str | None = None, *, user: str | None = None
    ) -> SipMessage:
        """``msg`` again with credentials (for ``user``, default this phone's) answering
        ``challenge`` (401 or 407), CSeq + 1, a new branch."""
        header = "www-authenticate" if challenge.status == 401 else "proxy-authenticate"
        creds_header = "authorization" if challenge.status == 401 else "proxy-authorization"
        chal = auth.parse_challenge(challenge.get_all(header)[0])
        creds = auth.build_credentials(
            chal,
            user or self.user,
            password or self.password,
            msg.method.decode(),
            msg.uri.decode(),
            secrets.token_hex(4),
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

    def authenticated(
        self, msg: SipMessage, password: str | None = None, *, user: str | None = None
    ) -> SipMessage | None:
        """Send ``msg``, answer its challenge, send it again; the final answer to that."""
        self.inbox.clear()
        self.send(msg)
        challenge = next((m for m in self.inbox if m.status in (401, 407)), None)
        if challenge is None:
            return self.last()
        self.inbox.clear()
        self.send(self.authorize(challenge, msg, password, user=user))
        finals = [m for m in self.inbox if m.status >= 200 and m.cseq[1] == msg.method]
        return finals[-1] if finals else (self.inbox[-1] if self.inbox else None)

    def register(
        self,
        expires: int = 3600,
        *,
        contact: str | None = None,
        call_id: str | None = None,
        cseq: int = 1,
        password: str | None = None,
        user: str | None = None,
        headers: Sequence[tuple[str, str | bytes]] = (),
    ) -> SipMessage | None:
        """REGISTER (challenge answered) for ``user`` (default: this phone's); the final answer.
        ``contact``: a whole Contact value (e.g. ``*``, or with ``;q=0.5``); ``headers``: more
        headers (e.g. ``Supported: gruu``)."""
        user = user or self.user
        msg = self.request(
            "REGISTER",
            f"sip:{DOMAIN}",
            to=f"<sip:{user}@{DOMAIN}>",
            from_user=user,
            headers=(("expires", str(expires)), *headers),
            call_id=call_id,
            cseq=cseq,
        )
        if contact is not None:
            msg.set("contact", contact)
        return self.authenticated(msg, password, user=user)
