"""Fixtures shared by the test modules that run against the embedded broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streams.broker import EmbeddedBroker


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded Tansu broker per test module (memory storage: each module starts empty)."""
    with EmbeddedBroker() as running:
        yield running
