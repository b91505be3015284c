"""Types shared by the store tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sipfarm.store import AccountStore, LocationStore


@dataclass
class Stores:
    accounts: AccountStore
    location: LocationStore


OpenStores = Callable[..., AbstractAsyncContextManager[Stores]]
