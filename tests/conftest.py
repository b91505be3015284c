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
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

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

# The processes tests start run the modules this process imports (the source tree, or the build
# under SIPFARM_TEST_COMPILED), never re-exec into build/compiled/ (sipfarm.build): what a stage
# tests does not depend on whether `make run` built it before.
os.environ["SIPFARM_BUILD"] = "interpreted"

# Property tests judge answers, not time: no per-example deadline and no "too slow" health
# check, which a loaded machine (make test runs two workers on two cores) trips at random.
# Speed lives in benchmarks/.
settings.register_profile("sipfarm", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sipfarm")

pytest_plugins = [
    "fixtures.redis_server",
    "fixtures.redis_sentinel",
    "fixtures.farm",
    "fixtures.default_farm",
    "fixtures.matrix",
]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Runs ``async def`` tests (each on its own event loop, bounded to 60 s) without a plugin."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    _run_bounded(pyfuncitem.obj(**args), ASYNC_TEST_SECONDS)
    return True


ASYNC_TEST_SECONDS = 60.0
CLEANUP_SECONDS = 5.0


def _run_bounded(coro: Any, seconds: float) -> None:
    """Run ``coro`` on a new loop for at most ``seconds``, then at most CLEANUP_SECONDS to cancel
    what is left. ``asyncio.run(wait_for(...))`` waits without limit for a task that does not
    end when cancelled (a client stuck reconnecting to a Redis a test stopped), hanging the
    whole suite; here such a test fails and the suite goes on."""
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(coro)
        loop.run_until_complete(asyncio.wait({task}, timeout=seconds))
        timed_out = not task.done()
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in leftovers:
            t.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=CLEANUP_SECONDS))
        if timed_out:
            pytest.fail(f"async test still running after {seconds:.0f} s")
        task.result()  # the test's own outcome (an assertion error, say)
    finally:
        loop.run_until_complete(asyncio.wait({loop.create_task(loop.shutdown_asyncgens())}, timeout=CLEANUP_SECONDS))
        loop.close()
