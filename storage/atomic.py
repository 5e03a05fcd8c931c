"""Atomic writes in a data dir: a hidden temporary file, fsynced, then renamed, so readers
globbing ``*.parquet`` see whole files or nothing; the partition lock between writers; the live
files readers use; clean-up of what a killed writer left. Owner-only folders and files."""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefstream.storage.partitions import (
    CURRENT,
)

log = logging.getLogger(__name__)


#: a hidden temporary file (``write_atomic``) this old is a killed writer's: no write takes so
#: long between two of its appends, so removing it never pulls a file from a live writer
STALE_TEMP_S = 600.0

def mkdir_private(path: Path) -> None:
    """Create ``path`` and missing parents owner-only (``mkdir(mode=)`` sets only the last)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)

def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries: a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def _write_atomic(table: pa.Table, path: Path) -> None:
    write_atomic(table, path.parent, lambda: path.name)

def write_atomic(table: pa.Table | Callable[[Path], None], folder: Path,
                 name: Callable[[], str], *, exclusive: bool = False) -> Path:
    """Write ``table`` to a hidden temporary file in ``folder``, fsync it, then rename it to
    ``name()`` (asked for once the file is complete). ``table`` may also be a function writing
    the Parquet file at the path it is given (a file too large to hold in memory at once).
    ``exclusive``: ``FileExistsError`` rather than replacing a file of that name."""
    mkdir_private(folder)
    tmp = folder / f".{uuid.uuid4().hex[:8]}.parquet.tmp"
    try:
        if callable(table):
            table(tmp)
        else:
            pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), 0o600)  # owner-only whatever the umask
            os.fsync(fh.fileno())
        path = folder / name()
        if exclusive:
            os.link(tmp, path)  # fails when the name exists: a file is never rewritten
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(folder)
    return path

@contextmanager
def partition_lock(folder: Path) -> Iterator[None]:
    """Exclusive between writers (``flock`` on the folder itself, so no lock file): a write adds
    its file to the current generation and a compaction swaps ``current`` under it. Readers never
    lock."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock

def live_files(folder: Path) -> list[Path]:
    """The files readers use in a partition folder, by their real paths, merged rows first and
    then in write order: those of the generation ``current`` points to (read once, so a swap
    meanwhile changes nothing: the old generation outlives the compaction grace), or the folder's
    own files when it has no ``current``. Empty when the folder is missing."""
    try:
        folder = folder / os.readlink(folder / CURRENT)
    except FileNotFoundError:
        pass
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / n for n in sorted(names) if n.endswith(".parquet")]

def remove_stale_temps(folder: Path, *, older_than_s: float = STALE_TEMP_S,
                       now: float | None = None) -> list[Path]:
    """Delete the hidden temporary files (``.*.tmp``: a Parquet file or a link being written)
    in ``folder`` last modified ``older_than_s`` or more ago: a writer killed before its rename
    leaves them, and nothing ever reads them."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        path = folder / name
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                if now - path.lstat().st_mtime >= older_than_s:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue  # renamed into place or removed meanwhile
    if removed:
        log.info("removed %d temporary files a killed writer left in %s", len(removed), folder)
    return removed
