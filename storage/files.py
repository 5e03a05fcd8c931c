"""Immutable Parquet files per event-time partition: the layout of a data dir, writing and reading
rows, and the index of stored row ids (:class:`IdIndex`). The other concerns have their own
modules, whose names this one re-exports: atomic writes (``storage.atomic``), watermarks
(``storage.watermarks``), seals, the manifest and content hashes (``storage.seals``); compaction
is ``storage.compact``, the DuckDB catalog ``storage.catalog``.

Layout under a data dir::

    <table>/<partition>/current -> g<N>          the generation readers use (a symlink)
    <table>/<partition>/g<N>/part-*.parquet      rows, one file per flushed batch and partition
    <table>/<partition>/g<N>/compact-*.parquet   generation N-1 merged (``storage.compact``)
    <table>/_schema/[g000000/]empty.parquet      zero-row files so views work before any write
    watermarks/p<N>.json                         per Kafka partition: watermark, offset, sessions
    manifest/<partition>[.v<N>].parquet          a sealed partition's row (files, counts, sha256);
                                                 each reseal adds a version, the newest counts
    compaction/<table>@<partition>.{todo,gc}     a compaction to retry, old generations to delete

Files are written under a hidden temporary name, fsynced, then renamed: readers globbing
``*.parquet`` see whole files or nothing. Readers use the *live* files of a partition: those of
the generation ``current`` points to (:func:`live_files`), or, in a folder without ``current``
(written before generations existed, never compacted), the folder's own files. Rows replayed by
at-least-once redelivery share an id with a stored row and are skipped by the writer
(:class:`IdIndex`), so every id is stored once among the live files.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from prefstream.storage.atomic import (  # noqa: F401  (re-exported)
    STALE_TEMP_S,
    _write_atomic,
    fsync_path,
    live_files,
    mkdir_private,
    partition_lock,
    remove_stale_temps,
    write_atomic,
)
from prefstream.storage.partitions import (
    CURRENT,
    SCHEMA_DIR,
    UNSTAMPED,
    file_name,
    generation_dir,
)
from prefstream.storage.quarantine import DAMAGED
from prefstream.storage.seals import (  # noqa: F401  (re-exported)
    HASH_READ_ROWS,
    MANIFEST_SCHEMA,
    content_sha256,
    is_sealed,
    json_rows_hash,
    manifest_version,
    manifest_versions,
    reseal,
    seal_ready,
    sealable,
    sealed_partitions,
)
from prefstream.storage.tables import SEALED_TABLES, TABLES, arrow_schema, to_arrow
from prefstream.storage.watermarks import (  # noqa: F401  (re-exported)
    Watermark,
    read_watermarks,
    write_watermark,
)

log = logging.getLogger(__name__)


def init_data_dir(data_dir: Path) -> None:
    """Create the layout with owner-only permissions and zero-row schema files per table (one
    for each glob of the views: partitions with and without generations)."""
    mkdir_private(data_dir)
    for table, (model, _) in TABLES.items():
        folder = data_dir / table / SCHEMA_DIR
        for path in (folder / "empty.parquet", folder / generation_dir(0) / "empty.parquet"):
            if not path.exists():
                _write_atomic(arrow_schema(model).empty_table(), path)
        if not (folder / CURRENT).is_symlink():
            os.symlink(generation_dir(0), folder / CURRENT)
    if not (data_dir / "manifest" / f"{SCHEMA_DIR}.parquet").exists():
        empty = data_dir / "manifest" / f"{SCHEMA_DIR}.parquet"
        _write_atomic(MANIFEST_SCHEMA.empty_table(), empty)
    mkdir_private(data_dir / "watermarks")

class IdIndex:
    """Which ids are stored, per (table, partition), so every id is written once and the views
    need no deduplication.

    Memory is 8 bytes per stored id, not the id itself: each (table, partition) keeps the
    fingerprints (Python's 64-bit string hash, stable within the process) of its stored ids,
    read from its files on first use and kept up to date by :func:`write_rows`, plus the exact
    ids of its last ``recent_writes`` writes. A fingerprint miss proves an id new. A hit is
    confirmed by those recent ids (a closed session emitted again until its offsets are
    committed) or, failing that, by the exact ids read from the partition's files (a replay
    after a restart or a rebalance, or a fingerprint collision): never a guess either way.

    Only the ``capacity`` most recently used (table, partition) entries stay in memory: the
    default, 64, holds the seven tables of about nine hourly partitions, more than the hours a
    worker writes to around its watermark; an older partition is read again from its files
    when a late row or a replay reaches it.
    """

    def __init__(self, data_dir: Path, *, capacity: int = 64, recent_writes: int = 16) -> None:
        self.data_dir = data_dir
        self.capacity = capacity
        self.recent_writes = recent_writes
        self._entries: OrderedDict[tuple[str, str], _StoredIds] = OrderedDict()

    def fresh(self, table: str, partition: str, ids: Sequence[Any]) -> list[int]:
        """Positions in ``ids`` of the first occurrence of each id not stored yet."""
        entry, exact = self._entry(table, partition)
        first = _first_of_each(list(ids))
        candidates = [ids[i] for i in first]
        stored: set[int] = set()
        unsure: list[int] = []
        for k in entry.may_contain(candidates):
            if entry.recently_written(candidates[k]):
                stored.add(k)
            else:
                unsure.append(k)
        if unsure:
            if exact is None:  # a replay, or a fingerprint collision: ask the files
                exact = _stored_ids(self.data_dir, table, partition)
            confirmed = [k for k in unsure if candidates[k] in exact]
            if confirmed:  # a redelivery of the same rows finds them without reading again
                entry.recent.append(frozenset(candidates[k] for k in confirmed))
            stored.update(confirmed)
        return [i for k, i in enumerate(first) if k not in stored]

    def add(self, table: str, partition: str, ids: Sequence[Any]) -> None:
        """Record ids just written to the partition."""
        self._entry(table, partition)[0].add(ids)

    def _entry(self, table: str, partition: str) -> tuple[_StoredIds, set[Any] | None]:
        """The partition's entry, and its exact stored ids when they were just read for it."""
        key = (table, partition)
        exact = None
        if key not in self._entries:
            exact = _stored_ids(self.data_dir, table, partition)
            self._entries[key] = _StoredIds(_fingerprints(exact), self.recent_writes)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return self._entries[key], exact

class _StoredIds:
    """Fingerprints of one partition's stored ids (a sorted array, plus a set of those added
    since the last merge into it) and the exact ids of its most recent writes."""

    MERGE_EVERY = 1024

    def __init__(self, fingerprints: np.ndarray, recent_writes: int) -> None:
        self.sorted = np.unique(fingerprints)
        self.added: set[int] = set()
        self.recent: deque[frozenset[Any]] = deque(maxlen=recent_writes)

    def may_contain(self, ids: Sequence[Any]) -> list[int]:
        """Positions of the ids whose fingerprint is known (stored, or a collision)."""
        fps = _fingerprints(ids)
        if len(self.sorted):
            at = np.minimum(np.searchsorted(self.sorted, fps), len(self.sorted) - 1)
            hit = (self.sorted[at] == fps).tolist()
        else:
            hit = [False] * len(fps)
        return [k for k, fp in enumerate(fps.tolist()) if hit[k] or fp in self.added]

    def recently_written(self, id_: Any) -> bool:
        return any(id_ in ids for ids in self.recent)

    def add(self, ids: Sequence[Any]) -> None:
        self.added.update(_fingerprints(ids).tolist())
        self.recent.append(frozenset(ids))
        if len(self.added) >= self.MERGE_EVERY:
            merged = np.fromiter(self.added, dtype=np.int64, count=len(self.added))
            self.sorted = np.union1d(self.sorted, merged)
            self.added = set()

def _fingerprints(ids: Iterable[Any]) -> np.ndarray:
    return np.fromiter((hash(i) for i in ids), dtype=np.int64)

def _stored_ids(data_dir: Path, table: str, partition: str) -> set[Any]:
    id_col = TABLES[table][1]
    ids: set[Any] = set()
    for f in live_files(data_dir / table / partition):
        try:
            ids.update(pq.read_table(f, columns=[id_col]).column(id_col).to_pylist())
        except FileNotFoundError:
            raise
        except DAMAGED as exc:  # its rows count as never stored: a replay rewrites them
            log.warning("skipping damaged file %s: %s", f, exc)
    return ids

def _first_of_each(ids: list[Any]) -> list[int]:
    """Indices of the first occurrence of each id."""
    seen: set[Any] = set()
    keep = []
    for i, v in enumerate(ids):
        if v not in seen:
            seen.add(v)
            keep.append(i)
    return keep


def write_rows(*, data_dir: Path, table: str, rows: Sequence[BaseModel],
               index: IdIndex | None = None) -> list[Path]:
    """Durably write the rows whose id is not stored yet, one new file per partition.

    Redelivery after a crash or a rebalance replays rows that are already stored: they are
    skipped by id (``index`` remembers stored ids between calls; without it they are read from
    the partition's files). New rows for a sealed or compacted partition are still written (in
    its committed generation), never lost, and a sealed partition's manifest entry is refreshed.
    """
    model, id_col = TABLES[table]
    index = index or IdIndex(data_dir, capacity=1)
    by_partition: dict[str, list[BaseModel]] = defaultdict(list)
    for row in rows:
        by_partition[row.partition].append(row)  # type: ignore[attr-defined]
    if UNSTAMPED in by_partition:  # an empty name would put the rows in the table's folder
        raise ValueError(f"{len(by_partition[UNSTAMPED])} {table} rows without a storage "
                         "partition: the writer stamps them first (storage.partitions.stamp)")
    written = []
    for partition, part_rows in sorted(by_partition.items()):
        ids = [getattr(r, id_col) for r in part_rows]
        keep = index.fresh(table, partition, ids)
        if not keep:
            continue
        fresh = [part_rows[i] for i in keep]
        sealed = table in SEALED_TABLES and is_sealed(data_dir=data_dir, partition=partition)
        if sealed:
            log.warning("%d new %s rows for sealed partition %s", len(fresh), table, partition)
        path = _write_part(data_dir / table / partition, to_arrow(model, fresh))
        index.add(table, partition, [ids[i] for i in keep])
        written.append(path)
        if sealed:  # keep the manifest true to the files: new hash, counts and file list
            reseal(data_dir=data_dir, partition=partition)
    return written

def _write_part(folder: Path, rows: pa.Table) -> Path:
    mkdir_private(folder)
    with partition_lock(folder):
        target = _generation_for_writes(folder)
        token = uuid.uuid4().hex[:8]
        return write_atomic(rows, target, lambda: file_name(
            compacted=False, at=datetime.now(timezone.utc), token=token))

def _generation_for_writes(folder: Path) -> Path:
    """The current generation; a new partition starts generation 0 (``current`` first, so a
    reader sees it empty, then filling); a folder of files from before generations stays so."""
    try:
        return folder / os.readlink(folder / CURRENT)
    except FileNotFoundError:
        pass
    if any(name.endswith(".parquet") for name in os.listdir(folder)):
        return folder
    first = folder / generation_dir(0)
    mkdir_private(first)
    os.symlink(first.name, folder / CURRENT)
    return first

def read_table(
    *, data_dir: Path, table: str, partitions: Sequence[str] | None = None
) -> pa.Table:
    """Rows of a table (one per id, live files only), from all partitions or the named ones."""
    root = data_dir / table
    names = partitions if partitions is not None else sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name != SCHEMA_DIR
    )
    return _read_files(table, [f for name in names for f in live_files(root / name)])

def _read_files(table: str, files: Sequence[Path]) -> pa.Table:
    """Rows of the given files of a table with its schema, the first of each id, in order."""
    model, id_col = TABLES[table]
    tables = [arrow_schema(model).empty_table()]
    for f in files:
        try:
            tables.append(pq.read_table(f, schema=arrow_schema(model)))
        except FileNotFoundError:
            raise
        except DAMAGED as exc:
            log.warning("skipping damaged file %s: %s", f, exc)
    merged = pa.concat_tables(tables)
    return merged.take(pa.array(_first_of_each(merged.column(id_col).to_pylist()),
                                type=pa.int64()))
