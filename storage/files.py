"""Immutable Parquet files per event-time partition, a manifest of sealed partitions, watermarks.

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

import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import BaseModel

from storage.partitions import CURRENT, file_name, generation_dir, partition_bounds
from storage.quarantine import DAMAGED, mkdir_private, readable
from storage.tables import SEALED_TABLES, TABLES, arrow_schema, to_arrow

log = logging.getLogger(__name__)

SCHEMA_DIR = "_schema"
#: a hidden temporary file (``write_atomic``) this old is a killed writer's: no write takes so
#: long between two of its appends, so removing it never pulls a file from a live writer
STALE_TEMP_S = 600.0
#: rows per record batch when hashing a partition at its seal
HASH_READ_ROWS = 4096
MANIFEST_SCHEMA = pa.schema(
    [
        ("partition", pa.string()),
        ("start", pa.timestamp("us", tz="UTC")),
        ("end", pa.timestamp("us", tz="UTC")),
        ("sealed_at", pa.timestamp("us", tz="UTC")),
        ("watermark", pa.timestamp("us", tz="UTC")),
        ("files", pa.list_(pa.string())),
        ("n_pairs", pa.int64()),
        ("n_ties", pa.int64()),
        ("n_unpaired", pa.int64()),
        ("n_refusals", pa.int64()),
        ("n_sessions", pa.int64()),
        ("sha256", pa.string()),
    ]
)


@dataclass(frozen=True)
class Watermark:
    kafka_partition: int
    watermark: datetime
    applied_offset: int
    #: sessions whose rows are still to come: open ones and groups the event cap holds
    open_sessions: int


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


def write_watermark(*, data_dir: Path, mark: Watermark) -> None:
    path = data_dir / "watermarks" / f"p{mark.kafka_partition}.json"
    tmp = path.with_suffix(".tmp")
    payload = {
        "kafka_partition": mark.kafka_partition,
        "watermark": mark.watermark.isoformat(),
        "applied_offset": mark.applied_offset,
        "open_sessions": mark.open_sessions,
    }
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def read_watermarks(data_dir: Path) -> dict[int, Watermark]:
    marks = {}
    for path in (data_dir / "watermarks").glob("p*.json"):
        raw = json.loads(path.read_text())
        raw["watermark"] = datetime.fromisoformat(raw["watermark"])
        marks[raw["kafka_partition"]] = Watermark(**raw)
    return marks


def is_sealed(*, data_dir: Path, partition: str) -> bool:
    return (data_dir / "manifest" / f"{partition}.parquet").exists()  # version 0 is never deleted


_MANIFEST_NAME = re.compile(r"^(?P<partition>[0-9][^.]*)(?:\.v(?P<version>[0-9]+))?\.parquet$")


def manifest_version(name: str) -> int:
    """Version of a manifest file: ``<partition>.parquet`` is 0, ``<partition>.v<N>.parquet`` N."""
    match = _MANIFEST_NAME.match(name)
    return int(match["version"] or 0) if match else -1


def manifest_versions(data_dir: Path) -> dict[str, list[Path]]:
    """The manifest files of each sealed partition, oldest version first."""
    found: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in os.listdir(data_dir / "manifest"):
        match = _MANIFEST_NAME.match(name)
        if match:
            found[match["partition"]].append((manifest_version(name), name))
    return {p: [data_dir / "manifest" / n for _, n in sorted(v)] for p, v in found.items()}


def sealable(
    *, partitions: Iterable[str], watermark: datetime, after: timedelta, hours: int = 1
) -> list[str]:
    """Partitions whose end plus ``after`` (the session gap) the watermark has passed."""
    return sorted(p for p in partitions if partition_bounds(p, hours=hours)[1] + after <= watermark)


def seal_ready(
    *, data_dir: Path, n_kafka_partitions: int, gap: timedelta, hours: int = 1
) -> list[str]:
    """Seal every partition the slowest Kafka partition's watermark has passed; returns new seals.

    A session is stored under the hour of its last event and closes once the watermark is past
    that event plus the gap, so no row can arrive for an hour after ``end + gap``.
    """
    marks = read_watermarks(data_dir)
    if len(marks) < n_kafka_partitions:
        return []
    low = min(m.watermark for m in marks.values())
    present = {p.name for t in SEALED_TABLES for p in (data_dir / t).iterdir() if p.is_dir()}
    present.discard(SCHEMA_DIR)
    todo = [p for p in sealable(partitions=present, watermark=low, after=gap, hours=hours)
            if not is_sealed(data_dir=data_dir, partition=p)]
    for partition in todo:
        try:
            _seal(data_dir, partition, low, partition_bounds(partition, hours=hours))
        except FileExistsError:
            log.info("partition %s was sealed meanwhile by another writer", partition)
    if todo:  # what a writer killed during an earlier seal left behind
        remove_stale_temps(data_dir / "manifest")
    return todo


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


def reseal(*, data_dir: Path, partition: str, keep_sealed_at: bool = False) -> None:
    """Add a version of a sealed partition's manifest row made from its live files (after late
    rows; with ``keep_sealed_at`` after a compaction, which changes the file list, not the hash).
    A new file, never a rewrite: a reader may be reading the previous version."""
    with partition_lock(data_dir / "manifest"):
        versions = manifest_versions(data_dir)[partition]
        old = pq.read_table(versions[-1], schema=MANIFEST_SCHEMA).to_pylist()[0]
        _seal(data_dir, partition, old["watermark"], (old["start"], old["end"]),
              sealed_at=old["sealed_at"] if keep_sealed_at else None,
              version=manifest_version(versions[-1].name) + 1,
              known=old if keep_sealed_at else None)


def _seal(data_dir: Path, partition: str, watermark: datetime,
          bounds: tuple[datetime, datetime], sealed_at: datetime | None = None,
          version: int = 0, known: Mapping[str, Any] | None = None) -> None:
    """Write a manifest version. ``known``: a previous version whose hash and counts still hold
    when the files hold as many rows (a compaction moves rows, never adds or drops them; rows
    that landed meanwhile without a reseal, a writer killed in between, change the counts)."""
    listed = {t: readable(live_files(data_dir / t / partition)) for t in SEALED_TABLES}
    if known is not None and all(
            known[f"n_{t}"] == sum(pq.ParquetFile(f).metadata.num_rows for f in paths)
            for t, paths in listed.items()):
        sha256, counts = known["sha256"], {t: known[f"n_{t}"] for t in listed}
    else:
        sha256, counts = _content_hash({t: _file_batches(t, paths)
                                        for t, paths in listed.items()})
    files = sorted(str(f.relative_to(data_dir)) for paths in listed.values() for f in paths)
    start, end = bounds
    row = {
        "partition": partition, "start": start, "end": end,
        "sealed_at": sealed_at or datetime.now(timezone.utc), "watermark": watermark,
        "files": files, **{f"n_{t}": n for t, n in counts.items()}, "sha256": sha256,
    }
    name = f"{partition}.parquet" if version == 0 else f"{partition}.v{version:06d}.parquet"
    write_atomic(pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA), data_dir / "manifest",
                 lambda: name, exclusive=True)
    log.info("sealed partition %s (%d pairs, %d files, version %d)", partition, row["n_pairs"],
             len(files), version)


def content_sha256(tables: Mapping[str, pa.Table]) -> str:
    """Hash of the rows, not of the files holding them (so a compaction keeps it): per table, in
    the given order, its name and then the SHA-256 of every row's canonical JSON, in id order."""
    return _content_hash({t: rows.to_batches(max_chunksize=HASH_READ_ROWS)
                          for t, rows in tables.items()})[0]


def _content_hash(batches: Mapping[str, Iterable[pa.RecordBatch]]) -> tuple[str, dict[str, int]]:
    """:func:`content_sha256` of tables given as record batches, read one batch at a time (a
    sealed partition is never held whole, nor as a Python object per row: only the id column and
    a 32-byte digest per row, in flat buffers); also the rows per table (the first of each id
    counts)."""
    digest = hashlib.sha256()
    counts = {}
    for table, stream in batches.items():
        id_col = TABLES[table][1]
        ids: list[pa.Array] = []
        digests = bytearray()
        for batch in stream:
            ids.append(batch.column(id_col))
            for row in batch.to_pylist():
                digests += hashlib.sha256(_CANONICAL_JSON.encode(row).encode()).digest()
        digest.update(f"table {table}\n".encode())
        counts[table] = 0
        if not ids:
            continue
        keyed = pa.table({"id": pa.chunked_array(ids),
                          "at": pa.array(np.arange(len(digests) // 32, dtype=np.int64))})
        ordered = keyed.sort_by([("id", "ascending"), ("at", "ascending")])
        sorted_ids = ordered.column("id").combine_chunks()
        first = np.ones(len(sorted_ids), dtype=bool)  # the first row of each id, in read order
        if len(sorted_ids) > 1:
            first[1:] = ~np.asarray(pc.equal(sorted_ids[1:], sorted_ids[:-1]))
        rows = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 32)
        digest.update(rows[ordered.column("at").to_numpy()[first]].tobytes())
        counts[table] = int(first.sum())
    return digest.hexdigest(), counts


def _file_batches(table: str, files: Sequence[Path]) -> Iterator[pa.RecordBatch]:
    """The rows of a table's files as record batches of its schema, in file order."""
    if not files:
        return iter(())
    scan = ds.dataset([str(f) for f in files], schema=arrow_schema(TABLES[table][0]),
                      format="parquet")
    return iter(scan.to_batches(batch_size=HASH_READ_ROWS, use_threads=False))


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"no canonical JSON for {type(value).__name__}")


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, default=_json_value)


def sealed_partitions(data_dir: Path) -> list[dict[str, Any]]:
    """Manifest rows of sealed partitions (each its newest version), oldest partition first: the
    trainer's only view of the data."""
    versions = manifest_versions(data_dir)
    rows = []
    for partition in sorted(versions):
        row = _newest_readable(versions[partition])
        if row is not None:
            rows.append(row)
    return rows


def _newest_readable(versions: Sequence[Path]) -> dict[str, Any] | None:
    """The newest manifest version that reads (a damaged one is named in a warning)."""
    for path in reversed(versions):
        try:
            row: dict[str, Any] = pq.read_table(path, schema=MANIFEST_SCHEMA).to_pylist()[0]
            return row
        except (pa.ArrowException, IndexError) as exc:
            log.warning("skipping damaged manifest file %s: %s", path, exc)
    return None


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


def _first_of_each(ids: list[Any]) -> list[int]:
    """Indices of the first occurrence of each id."""
    seen: set[Any] = set()
    keep = []
    for i, v in enumerate(ids):
        if v not in seen:
            seen.add(v)
            keep.append(i)
    return keep
