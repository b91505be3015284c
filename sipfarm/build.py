"""Which build of sipfarm runs: the mypyc-compiled hot path, or the pure-Python modules.

The compiled build (``scripts/build-compiled.sh``, run by ``make run``, ``make test`` and
``make compiled``) is a copy of ``sipfarm/`` and ``media/`` in ``build/compiled/`` of the
checkout, with extension modules beside the copied sources. It is used by putting that
directory first on ``PYTHONPATH``.

The serving commands (``sipfarm up``, ``node``, ``balancer``, ``relay``) run the compiled build
whenever it is fresh: started from the pure-Python modules, :func:`reexec_compiled` replaces the
process (same pid, same arguments) with one whose ``PYTHONPATH`` names the build, so the
children ``sipfarm up`` starts inherit it. ``SIPFARM_BUILD`` chooses: ``auto`` (the default:
compiled when fresh, else the pure-Python modules, saying why), ``compiled`` (refuse to start
without a fresh build) or ``interpreted``. Every process says which build it runs in its start
log line (:func:`running_build`), and ``sipfarm up`` in its banner and READY line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BUILD_ENV", "COMPILED_DIR", "BuildError", "compiled_build_state", "reexec_compiled", "running_build"]

BUILD_ENV = "SIPFARM_BUILD"
_REEXEC_ENV = "SIPFARM_BUILD_REEXEC"  # set across the exec: never a second one
_CHOICES = ("auto", "compiled", "interpreted")
_HERE = Path(__file__).resolve().parent.parent  # the checkout, or its build/compiled/ copy
REPO = _HERE.parent.parent if (_HERE.name, _HERE.parent.name) == ("compiled", "build") else _HERE
COMPILED_DIR = REPO / "build" / "compiled"


#: why this process runs the build it runs (set by :func:`reexec_compiled`; logged at start)
explanation = ""


class BuildError(Exception):
    """SIPFARM_BUILD asks for what cannot run (a bad value, or ``compiled`` with no fresh build)."""


def compiled_build_state(build_dir: Path = COMPILED_DIR, source: Path = REPO) -> str:
    """'fresh', 'stale' (a source changed since the build) or 'missing'.

    Fresh: extension modules are there, every copied source (.py, and the .c/.h of the
    hand-written C extensions) equals its source and no source file is missing from the copy.
    """
    if not any(build_dir.glob("sipfarm/**/*.so")):
        return "missing"
    for package in ("sipfarm", "media"):
        for src in _sources(source / package):
            copy = build_dir / src.relative_to(source)
            try:
                if copy.read_bytes() != src.read_bytes():
                    return "stale"
            except OSError:
                return "stale"
    return "fresh"


def _sources(package: Path) -> list[Path]:
    return [path for pattern in ("*.py", "*.c", "*.h") for path in package.rglob(pattern)]


def running_build() -> str:
    """``compiled`` when this process runs the mypyc build of the hot path, else ``interpreted``."""
    import sipfarm.sip.parser  # noqa: PLC0415 - the first compiled module

    return "compiled" if str(sipfarm.sip.parser.__file__).endswith((".so", ".pyd")) else "interpreted"


def _choice(env: dict[str, str] | os._Environ[str]) -> str:
    choice = env.get(BUILD_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise BuildError(f"{BUILD_ENV}={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def reexec_compiled(argv: Sequence[str]) -> str:
    """Before serving: replace this process with the compiled build when it should run.

    Returns (when it does not exec) why this process stays as it is: ``compiled`` (it already
    runs the build), ``interpreted (SIPFARM_BUILD=interpreted)``, ``interpreted (compiled build
    missing)``... for the start log line. Raises :class:`BuildError` for ``SIPFARM_BUILD=compiled``
    without a fresh build.
    """
    global explanation  # one process-wide fact, read by setup_logging
    explanation = _decide(argv)
    return explanation


def _decide(argv: Sequence[str]) -> str:
    choice = _choice(os.environ)
    if running_build() == "compiled":
        # the children (sipfarm up's) inherit PYTHONPATH, not the re-exec mark
        return "compiled (re-executed into build/compiled)" if os.environ.pop(_REEXEC_ENV, "") else "compiled"
    if choice == "interpreted":
        return f"interpreted ({BUILD_ENV}=interpreted)"
    if os.environ.get(_REEXEC_ENV):
        return "interpreted (the compiled build did not load)"
    state = compiled_build_state()
    if state != "fresh":
        if choice == "compiled":
            raise BuildError(f"{BUILD_ENV}=compiled but the compiled build is {state}: run 'make compiled'")
        return f"interpreted (compiled build {state}; 'make compiled' builds it)"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COMPILED_DIR), env.get("PYTHONPATH")]))
    env["PYTHONSAFEPATH"] = "1"  # `-m` would put the cwd (a checkout's sources) first
    env[_REEXEC_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "sipfarm", *argv], env)  # noqa: S606 - no shell: argv as is
    raise AssertionError("unreachable")  # pragma: no cover
