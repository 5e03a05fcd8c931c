"""Immutable Parquet files per event-time partition, a manifest of sealed partitions, watermarks.

Layout under a data dir::

    <table>/<partition>/part-*.parquet   rows, one file per flushed batch and partition
    <table>/_schema/empty.parquet        zero-row file so views work before the first write
    watermarks/p<N>.json                 per Kafka partition: watermark, offset, open sessions
    manifest/<partition>.parquet         one row per sealed partition (files, row counts, sha256)

Files are written under a hidden temporary name, fsynced, then renamed: readers globbing
``*.parquet`` see whole files or nothing. Rows are never rewritten; rows replayed by
at-least-once redelivery share an id with a stored row and are skipped by the writer
(:class:`IdIndex`), so every id is stored once and the views are plain scans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from storage.partitions import partition_bounds
from storage.tables import SEALED_TABLES, TABLES, arrow_schema, to_arrow

log = logging.getLogger(__name__)

SCHEMA_DIR = "_schema"
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
    open_sessions: int


def _mkdir_private(path: Path) -> None:
    """Create ``path`` and missing parents owner-only (``mkdir(mode=)`` sets only the last)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)


def init_data_dir(data_dir: Path) -> None:
    """Create the layout with owner-only permissions and a zero-row schema file per table."""
    _mkdir_private(data_dir)
    for table, (model, _) in TABLES.items():
        path = data_dir / table / SCHEMA_DIR / "empty.parquet"
        if not path.exists():
            _write_atomic(arrow_schema(model).empty_table(), path)
    if not (data_dir / "manifest" / f"{SCHEMA_DIR}.parquet").exists():
        empty = data_dir / "manifest" / f"{SCHEMA_DIR}.parquet"
        _write_atomic(MANIFEST_SCHEMA.empty_table(), empty)
    _mkdir_private(data_dir / "watermarks")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(table: pa.Table, path: Path) -> None:
    _mkdir_private(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class IdIndex:
    """Ids already stored, per (table, partition): each loaded from its files on first use, then
    kept up to date by :func:`write_rows`, so every id is written once and the views need no
    deduplication. Only the ``capacity`` most recently used partitions stay in memory."""

    def __init__(self, data_dir: Path, *, capacity: int = 512) -> None:
        self.data_dir = data_dir
        self.capacity = capacity
        self._ids: OrderedDict[tuple[str, str], set[Any]] = OrderedDict()

    def ids(self, table: str, partition: str) -> set[Any]:
        key = (table, partition)
        if key not in self._ids:
            self._ids[key] = _stored_ids(self.data_dir, table, partition)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
        self._ids.move_to_end(key)
        return self._ids[key]


def _stored_ids(data_dir: Path, table: str, partition: str) -> set[Any]:
    id_col = TABLES[table][1]
    ids: set[Any] = set()
    for f in sorted((data_dir / table / partition).glob("*.parquet")):
        ids.update(pq.read_table(f, columns=[id_col]).column(id_col).to_pylist())
    return ids


def write_rows(*, data_dir: Path, table: str, rows: Sequence[BaseModel],
               index: IdIndex | None = None) -> list[Path]:
    """Durably write the rows whose id is not stored yet, one new file per partition.

    Redelivery after a crash or a rebalance replays rows that are already stored: they are
    skipped by id (``index`` remembers stored ids between calls; without it they are read from
    the partition's files). New rows for a sealed partition are still written, never lost, and
    its manifest entry is refreshed.
    """
    model, id_col = TABLES[table]
    index = index or IdIndex(data_dir, capacity=1)
    by_partition: dict[str, list[BaseModel]] = defaultdict(list)
    for row in rows:
        by_partition[row.partition].append(row)  # type: ignore[attr-defined]
    written = []
    for partition, part_rows in sorted(by_partition.items()):
        stored = index.ids(table, partition)
        fresh = _first_of_each_id(part_rows, id_col, stored)
        if not fresh:
            continue
        sealed = table in SEALED_TABLES and is_sealed(data_dir=data_dir, partition=partition)
        if sealed:
            log.warning("%d new %s rows for sealed partition %s", len(fresh), table, partition)
        name = f"part-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        path = data_dir / table / partition / name
        _write_atomic(to_arrow(model, fresh), path)
        stored.update(getattr(r, id_col) for r in fresh)
        written.append(path)
        if sealed:  # keep the manifest true to the files: new hash, counts and file list
            _reseal(data_dir, partition)
    return written


def _first_of_each_id(rows: list[BaseModel], id_col: str, stored: set[Any]) -> list[BaseModel]:
    seen = set(stored)
    fresh = []
    for row in rows:
        key = getattr(row, id_col)
        if key not in seen:
            seen.add(key)
            fresh.append(row)
    return fresh


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
    return (data_dir / "manifest" / f"{partition}.parquet").exists()


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
        _seal(data_dir, partition, low, partition_bounds(partition, hours=hours))
    return todo


def _reseal(data_dir: Path, partition: str) -> None:
    old = pq.read_table(data_dir / "manifest" / f"{partition}.parquet").to_pylist()[0]
    _seal(data_dir, partition, old["watermark"], (old["start"], old["end"]))


def _seal(data_dir: Path, partition: str, watermark: datetime,
          bounds: tuple[datetime, datetime]) -> None:
    files = sorted(
        str(f.relative_to(data_dir))
        for t in SEALED_TABLES
        for f in (data_dir / t / partition).glob("*.parquet")
    )
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode())
        digest.update(hashlib.sha256((data_dir / rel).read_bytes()).digest())
    counts = {
        t: len(read_table(data_dir=data_dir, table=t, partitions=[partition]))
        for t in SEALED_TABLES
    }
    start, end = bounds
    row = {
        "partition": partition, "start": start, "end": end,
        "sealed_at": datetime.now(timezone.utc), "watermark": watermark, "files": files,
        **{f"n_{t}": n for t, n in counts.items()}, "sha256": digest.hexdigest(),
    }
    _write_atomic(pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA),
                  data_dir / "manifest" / f"{partition}.parquet")
    log.info("sealed partition %s (%d pairs, %d files)", partition, counts["pairs"], len(files))


def sealed_partitions(data_dir: Path) -> list[dict[str, Any]]:
    """Manifest rows of sealed partitions, oldest first: the trainer's only view of the data."""
    paths = sorted((data_dir / "manifest").glob("[0-9]*.parquet"))
    rows = [r for p in paths for r in pq.read_table(p, schema=MANIFEST_SCHEMA).to_pylist()]
    return sorted(rows, key=lambda r: r["partition"])


def read_table(
    *, data_dir: Path, table: str, partitions: Sequence[str] | None = None
) -> pa.Table:
    """Rows of a table (one per id), from all partitions or the named ones."""
    model, id_col = TABLES[table]
    root = data_dir / table
    names = partitions if partitions is not None else sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name != SCHEMA_DIR
    )
    files = [f for name in names for f in sorted((root / name).glob("*.parquet"))]
    schema = arrow_schema(model)
    if not files:
        return schema.empty_table()
    merged = pa.concat_tables(pq.read_table(f, schema=schema) for f in files)
    return merged.take(_first_of_each(merged.column(id_col).to_pylist()))


def _first_of_each(ids: list[Any]) -> list[int]:
    """Indices of the first occurrence of each id."""
    seen: set[Any] = set()
    keep = []
    for i, v in enumerate(ids):
        if v not in seen:
            seen.add(v)
            keep.append(i)
    return keep
