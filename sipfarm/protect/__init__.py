"""Protection of the farm's edge: brute-force bans and digest replay checks, shared through Redis.

See :mod:`sipfarm.protect.guard` for the theory of operation.
"""

from .guard import Admission, FailureOutcome, Guard, GuardPolicy, GuardRules
from .memory_guard import ExpiringKeys, MemoryGuard
from .redis_guard import RedisGuard

__all__ = [
    "Admission",
    "ExpiringKeys",
    "FailureOutcome",
    "Guard",
    "GuardPolicy",
    "GuardRules",
    "MemoryGuard",
    "RedisGuard",
]
