"""Damaged data files: recognised, skipped by readers, moved aside by the worker, never deleted.

A Parquet file is *damaged* when its footer does not read (:func:`damage`): a file cut short (a
disk that filled, a copy interrupted) or bytes that are not Parquet. Readers skip such a file
with a warning naming it (:func:`readable`); the worker moves it into ``<data-dir>/quarantine/``
under its own relative path, with a ``.reason`` file beside it (:func:`quarantine_file`), so an
operator can inspect it and move it back. See ``docs/storage-safety.md`` for what is and is not
caught (a file whose footer reads but whose pages rotted is caught by the trainer's hash check,
not here).

This module imports nothing else from ``storage`` so the file layer can use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefstream.storage.atomic import mkdir_private

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
REASON_SUFFIX = ".reason"
#: what reading a damaged file raises (a missing file, ``FileNotFoundError``, is not damage)
DAMAGED = (OSError, pa.ArrowException)


def damage(path: Path) -> str | None:
    """Why ``path`` cannot be read as Parquet (its footer: magic bytes, schema, row groups);
    None when it reads. A vanished file is not damaged (a compaction's grace ran out)."""
    try:
        pq.ParquetFile(path).close()
    except FileNotFoundError:
        return None
    except DAMAGED as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def split_damaged(files: Iterable[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files whose footer reads, in order, and the others with the reason each is damaged."""
    kept: list[Path] = []
    damaged: list[tuple[Path, str]] = []
    for path in files:
        reason = damage(path)
        if reason is None:
            kept.append(path)
        else:
            damaged.append((path, reason))
    return kept, damaged


def readable(files: Iterable[Path]) -> list[Path]:
    """The files whose footer reads, in order; each other one is named in a warning."""
    kept, damaged = split_damaged(files)
    for path, reason in damaged:
        log.warning("skipping damaged file %s: %s", path, reason)
    return kept


def quarantine_file(data_dir: Path, path: Path, reason: str) -> Path:
    """Move ``path`` (inside ``data_dir``) to ``quarantine/<its relative path>`` with a
    ``.reason`` file; a rename on the same file system, so nothing is copied or deleted."""
    relative = path.resolve().relative_to(data_dir.resolve())
    target = data_dir / QUARANTINE_DIR / relative
    mkdir_private(target.parent)
    if target.exists():  # the same name quarantined before: keep both
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        target = target.with_name(f"{target.name}.{stamp}")
    os.replace(path, target)
    note = target.with_name(target.name + REASON_SUFFIX)
    note.write_text(f"{datetime.now(timezone.utc).isoformat()} {relative}: {reason}\n")
    note.chmod(0o600)
    log.warning("quarantined damaged file %s -> %s: %s", relative,
                target.relative_to(data_dir), reason)
    return target


def quarantined(data_dir: Path) -> list[Path]:
    """Files in the quarantine folder (their ``.reason`` notes aside), by path."""
    root = data_dir / QUARANTINE_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not p.name.endswith(REASON_SUFFIX))
