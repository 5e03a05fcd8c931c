"""The worker's garbage-collector settings (streams/worker/gctune.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from prefstream.streams.worker.gctune import THRESHOLDS, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_gc_freezes_what_exists_and_collects_less_often(restored_gc: None) -> None:
    survivor = [object() for _ in range(10)]  # built "at start-up"
    tune_gc()
    assert gc.get_threshold() == THRESHOLDS
    assert THRESHOLDS[0] > 700  # fewer young collections than CPython's default
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())  # frozen: never walked again
