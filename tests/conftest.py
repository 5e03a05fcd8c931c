"""Fixtures shared by the test modules that run against the embedded broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from prefstream.streams.broker import EmbeddedBroker


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded Tansu broker per test module (memory storage: each module starts empty)."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, so a test shows the product sets file modes itself."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``prefstream demo`` as the README runs it, once per test session: no ``--data-dir`` (the
    default ``prefstream-data`` in its working directory), training included. Shared by
    tests/sim/broker/test_demo.py and tests/cli/broker/test_first_hour.py."""
    cwd = tmp_path_factory.mktemp("first-hour")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFSTREAM_")}
    out = subprocess.run(
        [sys.executable, "-m", "prefstream.cli", "demo", "--events", "1500", "--seed", "0",
         "--json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"summary": json.loads(out.stdout), "cwd": cwd, "data_dir": cwd / "prefstream-data",
            "stderr": out.stderr, "env": env}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 3 --dist loadgroup``) the tests that share
    the session's ``demo_run`` go to one worker, so the demo runs once.

    Markers follow what a test uses, so ``pytest -m "not broker and not slow"`` (the pure tests)
    never starts a broker: the ``broker`` fixture or a ``broker/`` folder marks ``broker``, the
    demo marks ``broker`` and ``slow``."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "demo_run" in fixtures:
            item.add_marker(pytest.mark.xdist_group("demo"))
            item.add_marker(pytest.mark.slow)
        if "broker" in fixtures or "demo_run" in fixtures or "broker" in item.path.parts[:-1]:
            item.add_marker(pytest.mark.broker)
