"""Fixtures shared by the whole suite.

Test files live in directories without ``__init__.py`` (pytest's default "prepend" import
mode), so their basenames must be unique across ``tests/`` (hence ``test_store_*.py``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

# Until the project is installed (`make setup` does `pip install -e .`), import it from the
# checkout.
if importlib.util.find_spec("sipfarm") is None:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytest_plugins = ["fixtures.redis_server", "fixtures.farm"]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Runs ``async def`` tests (each on its own event loop, bounded to 60 s) without a plugin."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), timeout=60))
    return True
