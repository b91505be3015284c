"""Event loop selection: uvloop when installed, the default asyncio loop otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def install_uvloop() -> bool:
    """Make new event loops uvloop loops; True when uvloop is in use.

    Called once at process start, before the loop is created.
    """
    try:
        import uvloop  # noqa: PLC0415 - optional dependency, imported where it is chosen
    except ImportError:
        logger.info("event=loop_selected loop=asyncio reason=uvloop_not_installed")
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    logger.info("event=loop_selected loop=uvloop version=%s", getattr(uvloop, "__version__", "?"))
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion on a fresh loop (uvloop when available and asked for)."""
    if use_uvloop:
        install_uvloop()
    return asyncio.run(main)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running SIP process.

    A node holds tens of thousands of live transactions (each a few messages, lists and tuples)
    for Timer J/K; with the default thresholds every few thousand allocations trigger a
    collection that walks them all, which showed up as ~15% of a node's CPU under load.  What
    exists at start-up is frozen out of collections, and the young generation is collected
    less often (the TU breaks its own cycles when a transaction terminates).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def stop_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: a serving process's main loop waits on it."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop
