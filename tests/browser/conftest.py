"""The browser tests' page: each test module names its library (``CLIENT``: ``jssip`` or
``sipjs``), bundled once per module, served with its page by a fresh :class:`PageServer` per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from webphone import JSSIP_ENTRY, SIPJS_ENTRY, PageServer, build_bundle, missing_tools

# client -> (page under web/, library entry point, its global name)
LIBRARIES = {"jssip": ("phone", JSSIP_ENTRY, "JsSIP"), "sipjs": ("sipjs", SIPJS_ENTRY, "SIP")}


@pytest.fixture(scope="module")
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = missing_tools()
    if missing is not None:
        pytest.fail(missing)
    client = request.module.CLIENT
    _, entry, name = LIBRARIES[client]
    return build_bundle(tmp_path_factory.mktemp(client), entry, name)


@pytest.fixture
def page_server(request: pytest.FixtureRequest, bundle: Path, tmp_path: Path) -> Iterator[PageServer]:
    page = LIBRARIES[request.module.CLIENT][0]
    with PageServer(bundle, tmp_path / "page-reports.jsonl", page=page) as server:
        yield server
