"""What a worker does to its data dir before it starts: set damaged files aside, sweep temp files.

A killed writer can leave hidden temporary files (``storage.files.write_atomic``), and a failing
disk or an operator can leave a Parquet file that does not read. Neither may stop the worker:
:func:`repair_data_dir` moves each damaged live file and manifest version into ``quarantine/``
(``storage.quarantine``) and deletes temporary files older than
``storage.files.STALE_TEMP_S``. Cost: one footer read per live file and manifest version, once
per worker start (``docs/storage-safety.md``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prefstream.storage.files import SCHEMA_DIR, live_files, partition_lock, remove_stale_temps
from prefstream.storage.quarantine import damage, quarantine_file
from prefstream.storage.tables import TABLES

log = logging.getLogger(__name__)


def repair_data_dir(data_dir: Path) -> list[Path]:
    """Quarantine every damaged live data file and manifest version, remove stale temporary
    files; returns where the damaged files went (empty: nothing was damaged)."""
    moved = []
    for table in TABLES:
        for folder in _partition_folders(data_dir / table):
            with partition_lock(folder):
                moved += _quarantine_damaged(data_dir, live_files(folder))
                for sub in (folder, *(p for p in folder.iterdir() if p.is_dir())):
                    remove_stale_temps(sub)
    manifest = data_dir / "manifest"
    if manifest.is_dir():
        with partition_lock(manifest):
            moved += _quarantine_damaged(data_dir, sorted(
                manifest / n for n in os.listdir(manifest) if n.endswith(".parquet")))
            remove_stale_temps(manifest)
    remove_stale_temps(data_dir)  # the catalog's temporary files
    return moved


def _partition_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                  and p.name != SCHEMA_DIR)


def _quarantine_damaged(data_dir: Path, files: list[Path]) -> list[Path]:
    moved = []
    for path in files:
        reason = damage(path)
        if reason is not None:
            moved.append(quarantine_file(data_dir, path, reason))
    return moved
