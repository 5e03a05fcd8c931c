"""Sealed partitions: the manifest (``manifest/<partition>[.v<N>].parquet``, one row per
partition: files, row counts, content hash; each reseal adds a version; the row's model is
``schemas.manifest.ManifestRow``), and sealing once every Kafka partition's watermark passed a
partition. The content hash of its rows is ``storage.content_hash``."""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from prefstream.schemas.manifest import ManifestRow
from prefstream.storage.atomic import live_files, partition_lock, remove_stale_temps, write_atomic
from prefstream.storage.content_hash import (  # noqa: F401  (re-exported)
    HASH_READ_ROWS,
    content_sha256,
    files_hash,
    json_rows_hash,
)
from prefstream.storage.partitions import (
    SCHEMA_DIR,
    partition_bounds,
)
from prefstream.storage.quarantine import readable
from prefstream.storage.tables import SEALED_TABLES
from prefstream.storage.watermarks import read_watermarks

log = logging.getLogger(__name__)


#: the on-disk form of a :class:`ManifestRow` (its fields, in order; unchanged since the first
#: sealed data dirs, which must keep reading)
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

def reseal(*, data_dir: Path, partition: str, keep_sealed_at: bool = False) -> None:
    """Add a version of a sealed partition's manifest row made from its live files (after late
    rows; with ``keep_sealed_at`` after a compaction, which changes the file list, not the hash).
    A new file, never a rewrite: a reader may be reading the previous version."""
    with partition_lock(data_dir / "manifest"):
        versions = manifest_versions(data_dir)[partition]
        old = read_manifest_row(versions[-1])
        _seal(data_dir, partition, old.watermark, (old.start, old.end),
              sealed_at=old.sealed_at if keep_sealed_at else None,
              version=manifest_version(versions[-1].name) + 1,
              known=old if keep_sealed_at else None)

def _seal(data_dir: Path, partition: str, watermark: datetime,
          bounds: tuple[datetime, datetime], sealed_at: datetime | None = None,
          version: int = 0, known: ManifestRow | None = None) -> None:
    """Write a manifest version. ``known``: a previous version whose hash and counts still hold
    when the files hold as many rows (a compaction moves rows, never adds or drops them; rows
    that landed meanwhile without a reseal, a writer killed in between, change the counts)."""
    listed = {t: readable(live_files(data_dir / t / partition)) for t in SEALED_TABLES}
    if known is not None and all(
            known.n_rows(t) == sum(pq.ParquetFile(f).metadata.num_rows for f in paths)
            for t, paths in listed.items()):
        sha256, counts = known.sha256, {t: known.n_rows(t) for t in listed}
    else:
        sha256, counts = files_hash(listed)
    files = sorted(str(f.relative_to(data_dir)) for paths in listed.values() for f in paths)
    start, end = bounds
    row = ManifestRow(
        partition=partition, start=start, end=end,
        sealed_at=sealed_at or datetime.now(timezone.utc), watermark=watermark,
        files=tuple(files), **{f"n_{t}": n for t, n in counts.items()}, sha256=sha256,
    )
    name = f"{partition}.parquet" if version == 0 else f"{partition}.v{version:06d}.parquet"
    write_atomic(manifest_table(row), data_dir / "manifest", lambda: name, exclusive=True)
    log.info("sealed partition %s (%d pairs, %d files, version %d)", partition, row.n_pairs,
             len(files), version)


def manifest_table(row: ManifestRow) -> pa.Table:
    """A manifest row as the one-row table a manifest file holds."""
    return pa.Table.from_pylist([row.model_dump()], schema=MANIFEST_SCHEMA)


def read_manifest_row(path: Path) -> ManifestRow:
    """The row of one manifest file; ``pa.ArrowException``, ``IndexError`` (no row) or
    pydantic's ``ValidationError`` (a row that is not a manifest row) when it is damaged."""
    return ManifestRow.model_validate(
        pq.read_table(path, schema=MANIFEST_SCHEMA).to_pylist()[0])

def sealed_partitions(data_dir: Path) -> list[ManifestRow]:
    """Manifest rows of sealed partitions (each its newest version), oldest partition first: the
    trainer's only view of the data."""
    versions = manifest_versions(data_dir)
    rows = []
    for partition in sorted(versions):
        row = _newest_readable(versions[partition])
        if row is not None:
            rows.append(row)
    return rows

def _newest_readable(versions: Sequence[Path]) -> ManifestRow | None:
    """The newest manifest version that reads (a damaged one is named in a warning)."""
    for path in reversed(versions):
        try:
            return read_manifest_row(path)
        except (pa.ArrowException, IndexError, ValidationError) as exc:
            log.warning("skipping damaged manifest file %s: %s", path, exc)
    return None
