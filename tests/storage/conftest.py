"""Fixtures of the storage tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefstream.storage.files import init_data_dir


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data dir (``init_data_dir``) in the test's temporary folder."""
    path = tmp_path / "data"
    init_data_dir(path)
    return path
