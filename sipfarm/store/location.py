"""Location service (RFC 3261 10): the bindings of every address-of-record, in Redis.

Key layout on one Redis (or Sentinel)::

    sipfarm:loc:{aor}      hash: binding key -> binding (compact JSON array); TTL = latest expiry
    sipfarm:loc:aors       zset: aor -> latest expires_at          (count_all; optional)
    sipfarm:loc:bindings   zset: "aor\\nkey" -> expires_at          (count_all; optional)

On Redis Cluster (``cluster=True``) the index is split in ``LOCATION_SHARDS`` pieces and each
AOR lives with its piece, so that a script touches keys of one hash slot only::

    sipfarm:loc:{<tag>}:<aor>        the AOR's hash, as above
    sipfarm:loc:aors:{<tag>}         the AOR index of the shard
    sipfarm:loc:bindings:{<tag>}     the binding index of the shard

``<tag>`` is the shard's (:func:`shard_tag`: shard = CRC16(aor) mod 1024), chosen so that shard
``k`` hashes to slot ``16 k``: the shards spread evenly over the slot ranges of the masters.
``count_all`` (and the node's gauge) walks the 1,024 shards, pipelined per master.

A binding's key is ``i:<+sip.instance>:<reg-id>`` when the contact carries an instance
(RFC 5626 6: a new flow of the same instance and reg-id replaces the old one; RFC 5627 5: an
instance without reg-id has one binding whatever its contact URI), else ``c:<contact URI>``.
Contact URIs are compared as given: the caller passes them normalized (RFC 3261 19.1.4).

Every REGISTER is one round trip: ``register.lua`` applies RFC 3261 10.3 steps 6-8 atomically
and answers with the AOR's live bindings. On one Redis (not a Cluster) the node's REGISTER
whose credentials it verified without I/O sends :data:`ADMITTED_REGISTER_SCRIPT` instead: the
guard's ban and nonce-use checks (``admit.lua``), then ``register.lua`` only if they pass.
A lookup is one ``HGETALL``; ``lookup_many`` pipelines them. Time is always passed in (``now``,
seconds since the epoch) so expiry is testable without sleeping; Redis's own key TTL is set
relative to that ``now``.
"""

from __future__ import annotations

import binascii
import enum
import json
import json.scanner
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Final, cast

from redis.asyncio import Redis

from sipfarm.sip.memo import BoundedMemo

from .errors import StoreError
from .redis_client import is_cluster_client, redis_errors

LOCATION_PREFIX: Final = "sipfarm:loc:"
AOR_INDEX: Final = "sipfarm:loc:aors"
BINDING_INDEX: Final = "sipfarm:loc:bindings"

_REGISTER_LUA: Final = files(__package__).joinpath("register.lua").read_text()
_REMOVE_LUA: Final = files(__package__).joinpath("remove.lua").read_text()
_ADMIT_LUA: Final = files(__package__).joinpath("admit.lua").read_text()

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)
# JSONEncoder.encode's C core without its interpreted frames (encode -> iterencode -> the C
# encoder): one binding encoded per REGISTER. Same output: no indent, no markers, NaN allowed.
_c_encoder = cast(Any, json.encoder).c_make_encoder
_iterencode = (
    None
    if _c_encoder is None
    else _c_encoder(None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
)


def _dumps(value: object) -> str:
    if _iterencode is None:
        return _ENCODER.encode(value)
    return "".join(_iterencode(value, 0))


_scan = json.scanner.make_scanner(cast(Any, json.JSONDecoder()))  # C scanner, no Python wrapper


def _loads(data: bytes | str) -> Any:
    """Decode one stored JSON value (strictly: the whole text, nothing after it)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text):
        raise ValueError("trailing data after JSON")
    return value


#: pieces of the location index on Redis Cluster (a constant of the key layout: every process of
#: a farm must agree on it)
LOCATION_SHARDS: Final = 1024
_SLOTS: Final = 16384
_shard_tags: list[str] = []


def shard_tags() -> list[str]:
    """The hash tag of every shard: shard ``k``'s tag hashes to slot ``16 k`` (computed once,
    deterministically: the first hexadecimal numbers that land on each of those slots)."""
    if not _shard_tags:
        step = _SLOTS // LOCATION_SHARDS
        tags: list[str] = [""] * LOCATION_SHARDS
        left = LOCATION_SHARDS
        i = 0
        while left:
            tag = f"{i:x}"
            slot = binascii.crc_hqx(tag.encode(), 0) & (_SLOTS - 1)
            if slot % step == 0 and not tags[slot // step]:
                tags[slot // step] = tag
                left -= 1
            i += 1
        _shard_tags.extend(tags)
    return _shard_tags


def shard_tag(aor: str) -> str:
    return shard_tags()[binascii.crc_hqx(aor.encode(), 0) % LOCATION_SHARDS]


def location_key(aor: str, cluster: bool = False) -> str:
    if cluster:
        return f"{LOCATION_PREFIX}{{{shard_tag(aor)}}}:{aor}"
    return f"{LOCATION_PREFIX}{{{aor}}}"


def index_keys(aor: str, cluster: bool = False) -> list[str]:
    """KEYS of the scripts for ``aor``: its hash, then the AOR and binding index (pieces)."""
    if cluster:
        tag = shard_tag(aor)
        return [f"{LOCATION_PREFIX}{{{tag}}}:{aor}", f"{AOR_INDEX}:{{{tag}}}", f"{BINDING_INDEX}:{{{tag}}}"]
    return [f"{LOCATION_PREFIX}{{{aor}}}", AOR_INDEX, BINDING_INDEX]


def index_pieces(cluster: bool = False) -> list[tuple[str, str]]:
    """Every (AOR index, binding index) pair: one on one Redis, one per shard on a Cluster."""
    if cluster:
        return [(f"{AOR_INDEX}:{{{t}}}", f"{BINDING_INDEX}:{{{t}}}") for t in shard_tags()]
    return [(AOR_INDEX, BINDING_INDEX)]


def binding_key(contact: str, instance: str | None, reg_id: int | None) -> str:
    """The identity of a binding within its AOR (see the module docstring)."""
    if instance is not None:
        return f"i:{instance}:{'' if reg_id is None else reg_id}"
    return f"c:{contact}"


_BINDING_FIELDS: Final = (
    "contact",
    "expires_at",
    "q",
    "call_id",
    "cseq",
    "instance",
    "reg_id",
    "path",
    "received",
    "user_agent",
    "node",
    "updated",
)


class Binding:
    """One registered contact of an AOR, as stored.

    Immutable (Final attributes, which a compiled build enforces) with value equality: a plain
    class, not a frozen dataclass, whose generated __init__ costs ~15x a compiled one."""

    def __init__(
        self,
        contact: str,
        expires_at: float,
        q: float,
        call_id: str,
        cseq: int,
        instance: str | None,
        reg_id: int | None,
        path: tuple[str, ...],
        received: str,
        user_agent: str,
        node: str,
        updated: float,
    ) -> None:
        self.contact: Final = contact
        self.expires_at: Final = expires_at  # absolute, seconds since the epoch
        self.q: Final = q
        self.call_id: Final = call_id
        self.cseq: Final = cseq
        self.instance: Final = instance  # RFC 5626 +sip.instance
        self.reg_id: Final = reg_id  # RFC 5626 reg-id
        self.path: Final = path  # RFC 3327 Path, top first, to use as the Route set
        self.received: Final = received  # where the REGISTER came from, e.g. "udp:1.2.3.4:5060", or a flow token
        self.user_agent: Final = user_agent
        self.node: Final = node  # the node that accepted the REGISTER
        self.updated: Final = updated  # when it was last written

    def _fields(self) -> tuple[object, ...]:
        return (
            self.contact,
            self.expires_at,
            self.q,
            self.call_id,
            self.cseq,
            self.instance,
            self.reg_id,
            self.path,
            self.received,
            self.user_agent,
            self.node,
            self.updated,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Binding) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "Binding(" + ", ".join(f"{n}={v!r}" for n, v in zip(_BINDING_FIELDS, self._fields(), strict=True)) + ")"

    @property
    def key(self) -> str:
        return binding_key(self.contact, self.instance, self.reg_id)

    def expires_in(self, now: float) -> int:
        """Whole seconds left, for the ``expires`` parameter of the 200 OK's Contact: rounded up,
        never above what was granted (``expires_at - updated``). The 200 is built with a clock
        read after the write: truncating told a phone granted 60 s (min_expires) 59, and a
        phone copying that into its refresh gets 423 (RFC 3261 10.2.8, 10.3 step 8)."""
        granted = round(self.expires_at - self.updated)
        return max(0, min(granted, math.ceil(self.expires_at - now)))

    def to_json(self) -> str:
        # A positional array: about half the bytes of an object. register.lua reads
        # positions 2 (expires_at), 4 (call_id) and 5 (cseq); remove.lua reads 1 (contact).
        return _dumps(self._fields())  # the C encoder writes a tuple as an array

    @classmethod
    def from_json(cls, data: bytes | str) -> Binding:
        """Decode a stored binding. Bindings are immutable, so a lookup's decodes are memoised
        by their raw value (a busy callee's bindings are read on every call to it)."""
        return _DECODED(data)

    @classmethod
    def _decode(cls, data: bytes | str) -> Binding:
        try:
            c, e, q, ci, cs, ins, rid, path, rcv, ua, node, upd = _loads(data)
            return cls(c, e, q, ci, cs, ins, rid, tuple(path), rcv, ua, node, upd)
        except (ValueError, TypeError) as exc:
            raise StoreError(f"corrupt binding {data!r:.200}: {exc}") from exc


# A stored binding's JSON carries the Contact, Call-ID, Path and User-Agent of its REGISTER:
# several hundred bytes for a real one, so its memo remembers keys up to 2 KB (4,096 x 2 KB).
_DECODED: BoundedMemo[bytes | str, Binding] = BoundedMemo(Binding._decode, max_key=2048)


def _order(bindings: Iterable[Binding]) -> list[Binding]:
    # Highest q first (RFC 3261 16.6 / 8.1.3.4 use q for forking order), then most recent.
    return sorted(bindings, key=lambda b: (-b.q, -b.updated))


_CONTACTUPDATE_FIELDS: Final = ("contact", "expires", "q", "instance", "reg_id")


class ContactUpdate:
    """One Contact of a REGISTER, already parsed: ``expires`` 0 removes the binding.

    Immutable (Final attributes, which a compiled build enforces) with value equality: a plain
    class, not a frozen dataclass, whose generated __init__ costs ~15x a compiled one."""

    def __init__(
        self,
        contact: str,
        expires: int,
        q: float = 1.0,
        instance: str | None = None,
        reg_id: int | None = None,
    ) -> None:
        self.contact: Final = contact
        self.expires: Final = expires
        self.q: Final = q
        self.instance: Final = instance
        self.reg_id: Final = reg_id

    def _fields(self) -> tuple[object, ...]:
        return (self.contact, self.expires, self.q, self.instance, self.reg_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ContactUpdate) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            "ContactUpdate("
            + ", ".join(f"{n}={v!r}" for n, v in zip(_CONTACTUPDATE_FIELDS, self._fields(), strict=True))
            + ")"
        )


class RegisterOutcome(enum.Enum):
    """What ``apply_register`` did, and the final response the registrar answers."""

    OK = "ok"
    #: RFC 3261 10.3 steps 6/7: same Call-ID, CSeq not higher than stored -> "the request fails"
    OUT_OF_ORDER = "out of order"
    #: the request would add a binding beyond the account's max_contacts. 403, not 503:
    #: the limit is policy, retrying elsewhere cannot help (RFC 3261 21.4.4). (Kamailio's
    #: registrar answers 503 here.)
    TOO_MANY_CONTACTS = "too many contacts"

    @property
    def sip_status(self) -> int:
        return _OUTCOME_STATUS[self][0]

    @property
    def sip_reason(self) -> str:
        return _OUTCOME_STATUS[self][1]


_OUTCOME_STATUS: Final = {
    RegisterOutcome.OK: (200, "OK"),
    RegisterOutcome.OUT_OF_ORDER: (500, "Server Internal Error"),
    RegisterOutcome.TOO_MANY_CONTACTS: (403, "Too Many Contacts"),
}
_SCRIPT_OUTCOME: Final = (RegisterOutcome.OK, RegisterOutcome.OUT_OF_ORDER, RegisterOutcome.TOO_MANY_CONTACTS)


_REGISTERRESULT_FIELDS: Final = ("outcome", "bindings")


class RegisterResult:
    """The outcome and the AOR's live bindings (after the request if OK, untouched if not),
    ordered as ``lookup`` orders them: the 200 OK lists them all with ``expires_in(now)``.

    Immutable (Final attributes, which a compiled build enforces) with value equality: a plain
    class, not a frozen dataclass, whose generated __init__ costs ~15x a compiled one."""

    def __init__(
        self,
        outcome: RegisterOutcome,
        bindings: tuple[Binding, ...],
    ) -> None:
        self.outcome: Final = outcome
        self.bindings: Final = bindings

    def _fields(self) -> tuple[object, ...]:
        return (self.outcome, self.bindings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegisterResult) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            "RegisterResult("
            + ", ".join(f"{n}={v!r}" for n, v in zip(_REGISTERRESULT_FIELDS, self._fields(), strict=True))
            + ")"
        )

    @property
    def ok(self) -> bool:
        return self.outcome is RegisterOutcome.OK


@dataclass(frozen=True, slots=True)
class LocationCounts:
    aors: int
    bindings: int


def register_arguments(
    aor: str,
    contacts: Sequence[ContactUpdate],
    *,
    call_id: str,
    cseq: int,
    now: float,
    max_contacts: int,
    remove_all: bool = False,
    path: Sequence[str] = (),
    received: str = "",
    user_agent: str = "",
    node: str = "",
    index: bool = True,
    cluster: bool = False,
) -> tuple[list[str], list[str | int | float]]:
    """KEYS and ARGV of ``register.lua`` for one REGISTER (shared by every Redis client)."""
    if remove_all and contacts:
        raise ValueError("Contact: * comes alone (RFC 3261 10.2.2)")
    path_t = tuple(path)
    args: list[str | int | float] = [
        aor,
        repr(now),
        call_id,
        cseq,
        max_contacts,
        "1" if remove_all else "0",
        len(contacts),
    ]
    for c in contacts:
        if c.expires < 0 or not 0.0 <= c.q <= 1.0:
            raise ValueError(f"bad contact update {c!r}: expires >= 0 and 0 <= q <= 1")
        expires_at = now + c.expires
        value = ""
        if c.expires > 0:
            binding = Binding(
                c.contact, expires_at, c.q, call_id, cseq, c.instance, c.reg_id,
                path_t, received, user_agent, node, now,
            )  # fmt: skip
            value = binding.to_json()
            # register.lua answers with every binding of the AOR, this one among them: the
            # node reads it back as the value it has (a look-up, not a JSON decode per REGISTER)
            _DECODED.seed(value.encode("utf-8"), binding)
        args += (binding_key(c.contact, c.instance, c.reg_id), repr(expires_at), value)
    keys = index_keys(aor, cluster)
    return (keys if index else keys[:1]), args


def register_result(reply: object) -> RegisterResult:
    """Decode ``register.lua``'s reply."""
    try:
        outcome = _SCRIPT_OUTCOME[reply[0]]  # type: ignore[index]
        values = reply[1:]  # type: ignore[index]
    except (IndexError, TypeError, KeyError) as exc:
        raise StoreError(f"unexpected register.lua reply {reply!r:.200}") from exc
    return RegisterResult(outcome, tuple(_order(Binding.from_json(v) for v in values)))


def live_bindings(values: Iterable[bytes | str], now: float) -> list[Binding]:
    """Decode an HVALS of an AOR's hash: live bindings in lookup order."""
    return _live(values, now)


REGISTER_SCRIPT: Final = _REGISTER_LUA
#: the guard's admission, then ``register.lua`` (see ``admit.lua``): one Redis only
ADMITTED_REGISTER_SCRIPT: Final = _ADMIT_LUA + _REGISTER_LUA
#: the first element of ``ADMITTED_REGISTER_SCRIPT``'s reply when the admission refused the write
#: (register.lua's statuses are 0, 1 and 2)
ADMISSION_REFUSED: Final = 3


def admitted_register_arguments(
    aor: str,
    contacts: Sequence[ContactUpdate],
    ban_key: str,
    nonce_key: str,
    nonce_ttl_ms: int,
    kwargs: dict[str, Any],
) -> tuple[list[str], list[str | int | float]]:
    """KEYS and ARGV of :data:`ADMITTED_REGISTER_SCRIPT`: ``register_arguments``' (one Redis's
    key layout, ``kwargs`` its keyword arguments) with the guard's two keys and the nonce use's
    expiry after them.  ``kwargs`` as a dict, not ``**``: a compiled caller then calls this
    natively (a ``**`` call goes through the Python calling convention, a new dict each)."""
    keys, args = register_arguments(aor, contacts, cluster=False, **kwargs)
    keys += (ban_key, nonce_key)
    args.append(nonce_ttl_ms)
    return keys, args


_ADMITTEDREGISTER_FIELDS: Final = ("ban_left", "first_use", "result")


class AdmittedRegister:
    """What :data:`ADMITTED_REGISTER_SCRIPT` established: the admission's facts, as the guard's
    admit reports them (seconds left of the source's ban, None: none, ``math.inf``: no end;
    whether the nonce use was new), and ``register.lua``'s result when they let the write
    through (None: refused, nothing written).

    Immutable (Final attributes): a plain class, as the others here."""

    def __init__(self, ban_left: float | None, first_use: bool, result: RegisterResult | None) -> None:
        self.ban_left: Final = ban_left
        self.first_use: Final = first_use
        self.result: Final = result

    def _fields(self) -> tuple[object, ...]:
        return (self.ban_left, self.first_use, self.result)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AdmittedRegister) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            "AdmittedRegister("
            + ", ".join(f"{n}={v!r}" for n, v in zip(_ADMITTEDREGISTER_FIELDS, self._fields(), strict=True))
            + ")"
        )


def seconds_left(pttl: int) -> float | None:
    """Seconds left of a key from ``PTTL``: None when it is missing, ``math.inf`` when it has no expiry."""
    if pttl == -2:
        return None
    if pttl == -1:
        return math.inf
    return pttl / 1000


def admitted_register_result(reply: object) -> AdmittedRegister:
    """Decode ``ADMITTED_REGISTER_SCRIPT``'s reply."""
    if isinstance(reply, list) and reply and reply[0] == ADMISSION_REFUSED:
        if len(reply) != 3 or not isinstance(reply[1], int) or reply[2] not in (0, 1):
            raise StoreError(f"unexpected admission reply {reply!r:.200}")
        return AdmittedRegister(seconds_left(reply[1]), reply[2] == 1, None)
    return AdmittedRegister(None, True, register_result(reply))


# Remove one binding if it is still the one a proxy routed over: same key, contact, Path and
# received flow. A dead flow's 430 (RFC 5626 5.3, 11) must not take away the binding the same
# instance and reg-id registered since over a new flow (RFC 5626 6: same key, new Path).
# KEYS as register.lua. ARGV: aor, binding key, contact, received, then the Path entries.
# Returns 1 if removed, else 0. Binding JSON positions read here: [1], [8], [9].
REMOVE_BINDING_SCRIPT: Final = """
local loc = KEYS[1]
local stored = redis.call('HGET', loc, ARGV[2])
if not stored then return 0 end
local b = cjson.decode(stored)
if b[1] ~= ARGV[3] or b[9] ~= ARGV[4] or #b[8] ~= #ARGV - 4 then return 0 end
for i = 1, #b[8] do
  if b[8][i] ~= ARGV[4 + i] then return 0 end
end
redis.call('HDEL', loc, ARGV[2])
if #KEYS == 3 then
  redis.call('ZREM', KEYS[3], ARGV[1] .. '\\n' .. ARGV[2])
  if redis.call('EXISTS', loc) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
end
return 1
"""


def remove_binding_arguments(
    aor: str, binding: Binding, *, index: bool = True, cluster: bool = False
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of :data:`REMOVE_BINDING_SCRIPT` for ``binding`` as it was looked up."""
    keys = index_keys(aor, cluster)
    return (keys if index else keys[:1]), [aor, binding.key, binding.contact, binding.received, *binding.path]


class LocationStore:
    """Bindings of all AORs. Holds no state of its own: any node may serve any AOR."""

    def __init__(self, redis: Redis, *, index: bool = True, cluster: bool | None = None) -> None:
        """``cluster``: the Redis Cluster key layout (None: when ``redis`` is a ``RedisCluster``)."""
        self._redis = redis
        self._cluster = is_cluster_client(redis) if cluster is None else cluster
        self._register = redis.register_script(_REGISTER_LUA)
        self._remove = redis.register_script(_REMOVE_LUA)
        self._remove_binding = redis.register_script(REMOVE_BINDING_SCRIPT)
        self._index = index

    def _keys(self, aor: str) -> list[str]:
        keys = index_keys(aor, self._cluster)
        return keys if self._index else keys[:1]

    async def apply_register(
        self,
        aor: str,
        contacts: Sequence[ContactUpdate],
        *,
        call_id: str,
        cseq: int,
        now: float,
        max_contacts: int,
        remove_all: bool = False,
        path: Sequence[str] = (),
        received: str = "",
        user_agent: str = "",
        node: str = "",
    ) -> RegisterResult:
        """Apply one REGISTER (RFC 3261 10.3 steps 6-8) atomically, in one round trip.

        ``remove_all`` is ``Contact: *`` (the caller has checked it came alone with
        ``Expires: 0``, else 400). ``contacts`` carry the expiry the registrar granted
        (after its min/max policy). A REGISTER with no Contact and not ``*`` is a query:
        the result just lists the bindings. Raises :class:`StoreUnavailable` (503).
        """
        keys, args = register_arguments(
            aor, contacts, call_id=call_id, cseq=cseq, now=now, max_contacts=max_contacts,
            remove_all=remove_all, path=path, received=received, user_agent=user_agent, node=node,
            index=self._index, cluster=self._cluster,
        )  # fmt: skip
        with redis_errors:
            reply = await self._register(keys=keys, args=args)
        return register_result(reply)

    async def lookup(self, aor: str, now: float) -> list[Binding]:
        """Live bindings of ``aor``, highest q first then most recently updated (one HGETALL)."""
        with redis_errors:
            values = await self._redis.hvals(location_key(aor, self._cluster))
        return _live(values, now)

    async def lookup_many(self, aors: Sequence[str], now: float) -> dict[str, list[Binding]]:
        """``lookup`` of several AORs in one pipelined round trip (per Cluster node)."""
        if not aors:
            return {}
        with redis_errors:
            async with self._redis.pipeline(transaction=False) as pipe:
                for aor in aors:
                    pipe.hvals(location_key(aor, self._cluster))
                replies = await pipe.execute()
        return {aor: _live(values, now) for aor, values in zip(aors, replies, strict=True)}

    async def remove(self, aor: str, contact: str) -> int:
        """Remove the bindings of ``aor`` whose contact URI is ``contact``; return how many."""
        if not contact:
            raise ValueError("empty contact; use clear() to remove every binding")
        with redis_errors:
            removed: int = await self._remove(keys=self._keys(aor), args=[aor, contact])
        return removed

    async def remove_binding(self, aor: str, binding: Binding) -> bool:
        """Remove ``binding`` (as looked up) if it is still stored unchanged in contact, Path and
        flow; a newer binding under its key stays. True if removed."""
        keys, args = remove_binding_arguments(aor, binding, index=self._index, cluster=self._cluster)
        with redis_errors:
            removed: int = await self._remove_binding(keys=keys, args=args)
        return bool(removed)

    async def clear(self, aor: str) -> int:
        """Remove every binding of ``aor`` (e.g. its account was deleted); return how many."""
        with redis_errors:
            removed: int = await self._remove(keys=self._keys(aor), args=[aor, ""])
        return removed

    async def count_all(self, now: float) -> LocationCounts:
        """Registered AORs and bindings, for a gauge: O(log n) plus pruning what expired.

        Approximate: an AOR whose bindings were removed by ``remove`` counts until its
        latest expiry. On Redis Cluster: every shard of the index, pipelined.
        """
        if not self._index:
            raise StoreError("count_all needs the location index (LocationStore(index=True))")
        aors = bindings = 0
        with redis_errors:
            async with self._redis.pipeline(transaction=False) as pipe:
                for aor_index, binding_index in index_pieces(self._cluster):
                    pipe.zremrangebyscore(aor_index, "-inf", now)
                    pipe.zremrangebyscore(binding_index, "-inf", now)
                    pipe.zcard(aor_index)
                    pipe.zcard(binding_index)
                replies = await pipe.execute()
        for i in range(0, len(replies), 4):
            aors += int(replies[i + 2])
            bindings += int(replies[i + 3])
        return LocationCounts(aors=aors, bindings=bindings)


def _live(values: Iterable[bytes | str], now: float) -> list[Binding]:
    # Expired bindings stay in Redis until the AOR's next REGISTER purges them (or its key
    # TTL drops it); a read never returns one.
    return _order(b for b in map(Binding.from_json, values) if b.expires_at > now)
