"""Compaction: merge a partition's small files into one while readers list and read at any moment.

What readers do. DuckDB (the catalog's views) expands a glob while it plans a query and then opens
the files *by the paths it listed*, more than once per query (footers while binding, data while
executing), and it may plan one view as two scans that each list the folder (DuckDB 2.0 turns
``max(..) OVER (PARTITION BY ..)`` into an aggregate joined back to a second scan). Seen with
DuckDB 2.0 while building this: deleting a listed file fails the query ("Cannot open file");
rewriting a file under the same name gives Thrift errors (one file's footer read against
another's bytes); keeping old and new files side by side and choosing in SQL loses rows when the
two scans list different files; swapping a ``current`` link under a running query fails it (the
link is resolved again at each open). A path a glob returned must resolve to the same bytes until
the query ends, and no SQL can tell which queries are running. Python readers (the trainer,
``prefstream status``) are simpler: they list once (:func:`storage.files.live_files`, real paths)
and read what they listed.

The design:

* ``<table>/<partition>/current`` is a symlink to the generation folder ``g<N>/``; writes add
  files to it (under the partition lock, :func:`storage.files.partition_lock`); the views glob
  ``<table>/*/current/*.parquet``, plain scans, one listing of one generation per folder (and
  ``<table>/*/*.parquet`` for folders written before generations, never compacted).
* A compaction (:func:`compact_partition`), under the lock: reads the files of ``g<N>`` in name
  order (merged rows first, then write order), writes their rows unchanged and in that order to
  ``g<N+1>/compact-....parquet``, then points ``current`` at ``g<N+1>`` with one atomic
  ``os.replace`` of a new symlink. A listing through ``current`` sees ``g<N>`` or ``g<N+1>``,
  never both and never half of one: no row is lost or doubled. Ids and rows never change, so a
  sealed partition's content hash stays (``storage.files.content_sha256``); its manifest gets a
  new version listing the new file (``storage.files.reseal``: versions are new files, never a
  rewrite, and the ``partitions`` view takes the newest with an aggregate).
* The swap is the one step a DuckDB query can trip over: one that listed ``current/x.parquet``
  before it and opens it after resolves ``current`` again and finds ``g<N+1>``. So the swap is
  made only while no process holds the catalog open (:func:`storage.catalog.catalog_in_use`:
  DuckDB keeps a lock on the file per connection), checked just before it; otherwise the
  compaction waits (a ``.todo`` marker for sealed partitions; the next flush for the others) and
  readers keep reading the small files, but for :data:`READER_WAIT` at most
  (:func:`readers_allow`): a session left open must not let the live files grow for as long as
  it stays open; a query running at the very moment of the swap may then fail once.
  The gap left: a reader that connects *and* plans a query
  in the microseconds between that check and the swap. DuckDB sessions that read the globs
  without the catalog are not covered; ``storage.catalog.live_scan_sql`` lists real paths
  instead, as the Python readers do.
* Old generations are deleted (:func:`remove_superseded`) once ``current`` has pointed away from
  them for ``compaction_grace_s``. No view lists them (views go through ``current``); a Python
  reader that resolved ``current`` before the swap reads real paths that stay for the grace, so
  any read shorter than the grace is safe. Superseded manifest versions are deleted after the
  grace too, and only while no process holds the catalog (the ``partitions`` view lists them).

Cost: a compaction rewrites a whole partition. The worker runs :func:`compact_after_flush` after
each flush: every table of newly sealed partitions, partitions written in that flush holding more
than ``compaction_max_files`` files, retries, then the deletions that are due (found through the
``compaction/`` markers; no other folder is listed).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from prefstream.storage.catalog import catalog_in_use, free_catalog
from prefstream.storage.files import (
    SCHEMA_DIR,
    is_sealed,
    live_files,
    manifest_versions,
    mkdir_private,
    partition_lock,
    reseal,
    write_atomic,
)
from prefstream.storage.partitions import (
    CURRENT,
    file_name,
    generation_dir,
    generation_number,
    stamp_of,
)
from prefstream.storage.quarantine import quarantine_file, split_damaged
from prefstream.storage.tables import SEALED_TABLES, TABLES, arrow_schema

log = logging.getLogger(__name__)

MARKERS_DIR = "compaction"
TODO, GC = "todo", "gc"
#: merges per flush at most: a backlog (merges held back by an analyst's session) is worked off
#: over several flushes instead of stalling one
MAX_PER_PASS = 8
#: most rows and bytes (in memory, as Arrow) of a merged file's row group: about what a merge
#: holds at once, whether a partition's rows are a few bytes (refusals) or carry long texts
MERGE_ROW_GROUP = 65_536
MERGE_GROUP_BYTES = 16 << 20
#: rows per record batch read from the files being merged
MERGE_READ_ROWS = 4096
#: longest a process holding the catalog open holds back a swap of ``current`` or a deletion of
#: manifest versions (``docs/storage-safety.md``): after that they go ahead, and only a query
#: running at that very moment can fail (a file it listed is gone; run it again)
READER_WAIT = timedelta(seconds=60)
#: marker whose age is how long the catalog has been seen held, without a free moment
BUSY_SINCE = "catalog-busy-since"


def compact_partition(*, data_dir: Path, table: str, partition: str,
                      reader_wait: timedelta = READER_WAIT) -> Path | None:
    """Merge the current generation's files into the next generation and point ``current`` at
    it; returns the merged file. None when there is nothing to merge (one file at most, or a
    folder without generations) or when a process holds the catalog and has not held it for
    ``reader_wait`` yet (try again later). A damaged file is moved to quarantine first."""
    folder = data_dir / table / partition
    if partition == SCHEMA_DIR or not (folder / CURRENT).is_symlink():
        return None
    with partition_lock(folder):
        files = _undamaged(data_dir, live_files(folder))
        if len(files) <= 1 or not readers_allow(data_dir, reader_wait):
            return None
        schema = arrow_schema(TABLES[table][0])
        numbers = [n for n in map(generation_number, os.listdir(folder)) if n is not None]
        nxt = folder / generation_dir(max(numbers) + 1)
        _mark(data_dir, table, partition, GC)  # first: a crash leaves no unmarked folder
        mkdir_private(nxt)  # nobody reads it before the swap
        token = uuid.uuid4().hex[:8]
        n_rows = 0

        def merge(tmp: Path) -> None:
            nonlocal n_rows
            n_rows = stream_merge(files, schema, tmp)

        path = write_atomic(merge, nxt, lambda: file_name(
            compacted=True, at=datetime.now(timezone.utc), token=token))
        if not readers_allow(data_dir, reader_wait):  # connected while we merged
            shutil.rmtree(nxt)
            return None
        link = folder / f".{CURRENT}.{token}.tmp"
        os.symlink(nxt.name, link)
        os.replace(link, folder / CURRENT)
    log.info("compacted %s/%s: %d files, %d rows -> %s", table, partition, len(files),
             n_rows, path.relative_to(data_dir))
    return path


def readers_allow(data_dir: Path, wait: timedelta, *, now: datetime | None = None) -> bool:
    """Whether a step that can fail a running query may go ahead: no process holds the catalog,
    or every check for ``wait`` found it held (a reader that never lets go blocks no longer)."""
    marker = data_dir / MARKERS_DIR / BUSY_SINCE
    if not catalog_in_use(data_dir):
        marker.unlink(missing_ok=True)
        return True
    if not marker.exists():
        mkdir_private(marker.parent)
        marker.touch(mode=0o600)
    now = now or datetime.now(timezone.utc)
    held = now - datetime.fromtimestamp(marker.stat().st_mtime, tz=timezone.utc)
    if held < wait:
        return False
    log.warning("the catalog has been held open for %.0f s: compacting anyway (a query running "
                "at this moment may fail once; run it again)", held.total_seconds())
    return True


def _undamaged(data_dir: Path, files: list[Path]) -> list[Path]:
    """``files`` less the damaged ones, which go to quarantine (a merge would fail on them,
    and deleting the old generation would delete them)."""
    kept, damaged = split_damaged(files)
    for path, reason in damaged:
        quarantine_file(data_dir, path, reason)
    return kept


def stream_merge(files: Sequence[Path], schema: pa.Schema, out: Path) -> int:
    """Copy the rows of ``files``, in order, into one Parquet file at ``out``; returns the rows.

    Reads record batches and writes row groups of up to :data:`MERGE_ROW_GROUP` rows or
    :data:`MERGE_GROUP_BYTES` bytes as it goes, so memory stays bounded by a row group whatever
    the partition's size (a partition written to all hour is merged again and again as it
    grows; holding it whole made every merge allocate more than the last, and a row group of
    65,536 pairs with their texts is hundreds of MiB).
    """
    n_rows = 0
    pending: list[pa.Table] = []  # rows not yet written, under both bounds
    rows = held = 0  # their count and bytes
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=MERGE_READ_ROWS):
                pending.append(pa.Table.from_batches([batch]).select(schema.names).cast(schema))
                rows, held = rows + pending[-1].num_rows, held + pending[-1].nbytes
                if rows >= MERGE_ROW_GROUP or held >= MERGE_GROUP_BYTES:
                    n_rows += _write_group(writer, pending)
                    rows = held = 0
        n_rows += _write_group(writer, pending)
    return n_rows


def _write_group(writer: pq.ParquetWriter, tables: list[pa.Table]) -> int:
    """Write ``tables`` as one row group and empty the list; returns the rows written."""
    if not tables:
        return 0
    group = pa.concat_tables(tables)
    writer.write_table(group, row_group_size=group.num_rows)
    tables.clear()
    return group.num_rows


def remove_superseded(*, data_dir: Path, table: str, partition: str, grace: timedelta,
                      now: datetime | None = None) -> list[Path]:
    """Delete the generation folders ``current`` moved away from at least ``grace`` before
    ``now`` (a generation is retired when the next one's merged file is swapped in; its name
    holds that time, taken just before the swap) and any folder that never became ``current``:
    above it, or below it without a merged file (both left by a crash between creating a
    generation and swapping it in; never read). The partition's marker goes with the last old
    generation."""
    folder = data_dir / table / partition
    now = now or datetime.now(timezone.utc)
    if not (folder / CURRENT).is_symlink():
        _unmark(data_dir, table, partition, GC)
        return []
    with partition_lock(folder):
        current = generation_number(os.readlink(folder / CURRENT))
        numbers = sorted(n for n in map(generation_number, os.listdir(folder)) if n is not None)
        retired = {n: _merged_at(folder / generation_dir(n)) for n in numbers}
        never_current = {n for n in numbers if current is not None and (
            n > current or (0 < n < current and retired[n] is None))}
        due = [n for n in numbers if n in never_current or (
            current is not None and n < current
            and _retired_at(n, numbers, retired) + grace <= now)]
        for n in due:
            shutil.rmtree(folder / generation_dir(n))
        if len(due) == len(numbers) - 1:
            _unmark(data_dir, table, partition, GC)
    if due:
        log.info("removed %d old generations of %s/%s", len(due), table, partition)
    return [folder / generation_dir(n) for n in due]


def _merged_at(generation: Path) -> datetime | None:
    return next((stamp_of(f.name) for f in generation.glob("compact-*.parquet")), None)


def _retired_at(number: int, numbers: list[int], merged: dict[int, datetime | None]) -> datetime:
    """When ``current`` left generation ``number``: the merge time of the next generation that
    became current (of the next one kept, if it is gone: a later time, so never too early)."""
    successor = next(n for n in numbers if n > number and merged[n] is not None)
    stamp = merged[successor]
    assert stamp is not None, f"generation {successor} holds no merged file"
    return stamp


def remove_superseded_manifests(*, data_dir: Path, grace: timedelta,
                                now: datetime | None = None,
                                reader_wait: timedelta = READER_WAIT) -> list[Path]:
    """Delete manifest versions older than the newest whose successor is ``grace`` old, unless a
    process holds the catalog open (for less than ``reader_wait`` so far). Version 0 stays: it
    marks the partition sealed."""
    now = now or datetime.now(timezone.utc)
    due = []
    for versions in manifest_versions(data_dir).values():
        for old, successor in zip(versions[1:-1], versions[2:], strict=True):
            made = datetime.fromtimestamp(successor.stat().st_mtime, tz=timezone.utc)
            if made + grace <= now:
                due.append(old)
    if not due or not readers_allow(data_dir, reader_wait):
        return []
    with partition_lock(data_dir / "manifest"):
        for path in due:
            path.unlink(missing_ok=True)
    return due


def compact_after_flush(*, data_dir: Path, sealed: Sequence[str],
                        written: Mapping[str, Sequence[BaseModel]], max_files: int,
                        grace: timedelta) -> list[Path]:
    """The worker's pass after a flush; returns the merged files it wrote. Compacts each
    partition ``written`` to (table -> rows of the flush) holding more than ``max_files`` files
    and every table of the newly ``sealed`` partitions (and those left to retry), at most
    :data:`MAX_PER_PASS`; then deletes what is due. A failure is logged and skipped: the readers'
    files stay as they were. First, a catalog held read-write is replaced
    (:func:`storage.catalog.free_catalog`): it would lock every other reader out."""
    free_catalog(data_dir)
    for partition in sealed:
        for table in SEALED_TABLES:
            _mark(data_dir, table, partition, TODO)
    crowded = sorted((t, p) for t, p in _touched(written)
                     if len(live_files(data_dir / t / p)) > max_files)
    todo = [tp for tp in dict.fromkeys([*crowded, *marked(data_dir, TODO)])
            if not _done(data_dir, *tp)]
    made = []
    for table, partition in todo[:MAX_PER_PASS]:
        try:
            path = compact_partition(data_dir=data_dir, table=table, partition=partition)
        except (OSError, pa.ArrowException):
            log.exception("compaction of %s/%s failed; its files are unchanged", table, partition)
            continue
        _done(data_dir, table, partition)
        made += [path] if path is not None else []
    for partition in sorted({p.parents[1].name for p in made if p.parents[2].name in
                             SEALED_TABLES}):  # .../<table>/<partition>/g<N>/compact-...
        if is_sealed(data_dir=data_dir, partition=partition):
            reseal(data_dir=data_dir, partition=partition, keep_sealed_at=True)
    _remove_due(data_dir, grace)
    return made


def _done(data_dir: Path, table: str, partition: str) -> bool:
    """Whether a partition needs no merge (one file at most, or files from before generations,
    never merged); its retry marker goes if so."""
    folder = data_dir / table / partition
    done = len(live_files(folder)) <= 1 or not (folder / CURRENT).is_symlink()
    if done:
        _unmark(data_dir, table, partition, TODO)
    return done


def _touched(written: Mapping[str, Sequence[BaseModel]]) -> set[tuple[str, str]]:
    return {(t, row.partition) for t, rows in written.items() for row in rows}  # type: ignore[attr-defined]


def _remove_due(data_dir: Path, grace: timedelta) -> None:
    try:
        for table, partition in marked(data_dir, GC):
            remove_superseded(data_dir=data_dir, table=table, partition=partition, grace=grace)
        remove_superseded_manifests(data_dir=data_dir, grace=grace)
    except OSError:
        log.exception("removing superseded files failed; the next pass retries")


def marked(data_dir: Path, kind: str) -> list[tuple[str, str]]:
    """(table, partition) pairs with a ``kind`` marker (``todo``: a compaction to retry; ``gc``:
    old generations to delete)."""
    try:
        names = os.listdir(data_dir / MARKERS_DIR)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        stem, _, suffix = name.rpartition(".")
        table, _, partition = stem.partition("@")
        if suffix == kind and table in TABLES and partition:
            found.append((table, partition))
    return sorted(found)


def _mark(data_dir: Path, table: str, partition: str, kind: str) -> None:
    folder = data_dir / MARKERS_DIR
    mkdir_private(folder)
    (folder / f"{table}@{partition}.{kind}").touch(mode=0o600)


def _unmark(data_dir: Path, table: str, partition: str, kind: str) -> None:
    (data_dir / MARKERS_DIR / f"{table}@{partition}.{kind}").unlink(missing_ok=True)
