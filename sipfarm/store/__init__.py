"""Shared state of the farm in Redis: accounts and registrations (location bindings).

Nodes are stateless; each concern has one small async store here. Every store method raises
:class:`StoreUnavailable` (answer 503 + Retry-After) when Redis cannot serve, and nothing
but :class:`StoreError` subclasses otherwise.
"""

from .accounts import Account, AccountStore, ha1_md5, ha1_sha256
from .errors import AccountExists, AccountNotFound, StoreError, StoreUnavailable
from .location import (
    Binding,
    ContactUpdate,
    LocationCounts,
    LocationStore,
    RegisterOutcome,
    RegisterResult,
)
from .redis_client import create_redis
from .redis_server import RedisProcess, start_redis

__all__ = [
    "Account",
    "AccountExists",
    "AccountNotFound",
    "AccountStore",
    "Binding",
    "ContactUpdate",
    "LocationCounts",
    "LocationStore",
    "RedisProcess",
    "RegisterOutcome",
    "RegisterResult",
    "StoreError",
    "StoreUnavailable",
    "create_redis",
    "ha1_md5",
    "ha1_sha256",
    "start_redis",
]
