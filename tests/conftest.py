"""Fixtures shared by the whole suite.

Test files live in directories without ``__init__.py`` (pytest's default "prepend" import
mode), so their basenames must be unique across ``tests/`` (hence ``test_store_*.py``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("SIPFARM_TEST_COMPILED"):  # pragma: no cover
    # scripts/test-compiled.sh: run against the mypyc build in build/compiled/, in this process
    # and in the `python -m sipfarm` children. They run from our cwd, which `-m` puts first on
    # their sys.path: make it the build (from the checkout, the source tree would shadow it).
    _COMPILED = str(_ROOT / "build" / "compiled")
    sys.path.insert(0, _COMPILED)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_COMPILED, os.environ.get("PYTHONPATH")]))
    os.chdir(_COMPILED)
    import sipfarm.sip.parser

    _parser = str(sipfarm.sip.parser.__file__)
    if not (_parser.startswith(_COMPILED) and _parser.endswith(".so")):
        pytest.exit(f"SIPFARM_TEST_COMPILED: sipfarm.sip.parser is {_parser}, not the compiled build", 2)
# Until the project is installed (`make setup` does `pip install -e .`), import it from the
# checkout.
elif importlib.util.find_spec("sipfarm") is None:  # pragma: no cover
    sys.path.insert(0, str(_ROOT))

pytest_plugins = ["fixtures.redis_server", "fixtures.farm"]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Runs ``async def`` tests (each on its own event loop, bounded to 60 s) without a plugin."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), timeout=60))
    return True
