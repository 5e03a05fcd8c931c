"""``<data-dir>/prefstream.duckdb``: a catalog of views over the Parquet files, nothing else.

The worker never opens this file: it writes the views into a fresh file and renames it over the
catalog (:func:`ensure_catalog`), so no reader, whatever its mode (a default read-write
``duckdb.connect`` included), can lock the worker out; a read-write connection, which refuses
every other one, gets a fresh copy put in its place at the worker's next flush
(:func:`free_catalog`). A reader's connection holds a lock on the file for as long as it is
open; the worker looks for one (:func:`catalog_in_use`) before it deletes files a view may have
listed, and waits for it a bounded time (``storage.compact``).
Objects an analyst creates in the catalog are dropped at its next rewrite: keep them in your own
database and ``ATTACH`` this one read-only (``docs/storage-safety.md``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import uuid
from pathlib import Path

import duckdb

from storage.files import SCHEMA_DIR, fsync_path, live_files
from storage.quarantine import quarantine_file, readable
from storage.tables import TABLES

log = logging.getLogger(__name__)

CATALOG_NAME = "prefstream.duckdb"
#: extra views other packages register (name -> SQL body using {root} for the data dir)
EXTRA_VIEWS: dict[str, str] = {}


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def table_view_sql(data_dir: Path, table: str) -> str:
    """A plain scan (the writer stores each id once, ``storage.files.IdIndex``) of each
    partition's current generation, through its ``current`` link, and of the partitions written
    before generations existed. A folder matches one glob or the other, never both."""
    root = data_dir.resolve() / table
    globs = ", ".join(_quote(root / "*" / part) for part in ("*.parquet", "current/*.parquet"))
    return (f"SELECT * FROM read_parquet([{globs}], hive_partitioning = false, "
            f"union_by_name = true)")


def live_scan_sql(data_dir: Path, table: str) -> str | None:
    """For a reader without the catalog (an in-memory DuckDB): a scan of the live files listed
    now, by name, like ``storage.files.read_table`` (damaged ones skipped with a warning); None
    when there are none. Safe while the
    query is shorter than the compaction grace, whatever the worker does meanwhile."""
    root = data_dir.resolve() / table
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = [str(f) for f in readable(f for name in names for f in live_files(root / name))]
    if not files:
        return None
    listed = ", ".join(_quote(Path(f)) for f in files)
    return (f"SELECT * FROM read_parquet([{listed}], hive_partitioning = false, "
            f"union_by_name = true)")


#: a manifest file's version: ``<partition>.parquet`` is 0, ``<partition>.v<N>.parquet`` is N
MANIFEST_VERSION_SQL = ("coalesce(TRY_CAST(regexp_extract(filename, '[.]v([0-9]+)[.]parquet$', 1) "
                        "AS BIGINT), 0)")
_MANIFEST_COLUMNS = ("sealed_at", "watermark", "sha256")


def partitions_view_sql(data_dir: Path) -> str:
    """Every partition holding pairs or sessions, with its sealed state from the newest version
    of its manifest row (``storage.files.reseal`` adds versions, never rewrites a file). An
    aggregate, not a window: DuckDB plans ``max(..) OVER (PARTITION BY ..)`` as a self-join that
    globs the folder twice, and two listings may differ."""
    root = data_dir.resolve()
    newest = ", ".join(f"max_by({c}, version) AS {c}" for c in _MANIFEST_COLUMNS)
    manifest = _quote(root / "manifest" / "*.parquet")
    counts = " UNION ALL ".join(
        f"SELECT partition, '{t}' AS tbl FROM {t}" for t in ("pairs", "ties", "unpaired",
                                                             "refusals", "sessions")
    )
    return f"""
        WITH rows AS ({counts}),
        seen AS (
            SELECT partition,
                   count(*) FILTER (WHERE tbl = 'pairs') AS n_pairs,
                   count(*) FILTER (WHERE tbl = 'sessions') AS n_sessions
            FROM rows GROUP BY partition
        ),
        sealed AS (
            SELECT partition, {newest}
            FROM (SELECT *, {MANIFEST_VERSION_SQL} AS version
                  FROM read_parquet({manifest}, filename = true))
            WHERE partition <> '{SCHEMA_DIR}' GROUP BY partition
        )
        SELECT coalesce(seen.partition, sealed.partition) AS partition,
               sealed.partition IS NOT NULL AS sealed,
               sealed.sealed_at, sealed.watermark AS sealed_watermark, sealed.sha256,
               coalesce(seen.n_pairs, 0) AS n_pairs, coalesce(seen.n_sessions, 0) AS n_sessions
        FROM seen FULL OUTER JOIN sealed USING (partition)
        ORDER BY partition
    """


FUNNEL_SQL = """
    SELECT partition,
           sum(n_events) AS events, sum(n_duplicates) AS duplicates, count(*) AS sessions,
           sum(n_candidates) AS candidates, sum(n_pairs) AS pairs, sum(n_ties) AS ties,
           sum(n_unpaired) AS unpaired, sum(n_refusals) AS refusals
    FROM sessions GROUP BY partition ORDER BY partition
"""


def ensure_catalog(data_dir: Path) -> bool:
    """(Re)create the views in a new file, then rename it over the catalog: readers connected
    to the old file keep it (and its views) until they close; new connections get the new one.
    Never waits for a reader; returns True."""
    path = data_dir / CATALOG_NAME
    tmp = data_dir / f".{CATALOG_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _write_views(tmp, data_dir)
        tmp.chmod(0o600)  # owner-only whatever the umask: the views name the data
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(data_dir)
        _set_aside_wal(data_dir)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return True


def _set_aside_wal(data_dir: Path) -> None:
    """A ``prefstream.duckdb.wal`` now belongs to the old file (an analyst wrote into the
    catalog over a read-write connection): DuckDB would refuse to open the new file with it
    ("WAL does not match database file"), so it goes to quarantine, never deleted."""
    wal = data_dir / f"{CATALOG_NAME}.wal"
    if wal.exists():
        quarantine_file(data_dir, wal, "write-ahead log of a replaced catalog: an analyst wrote "
                        "into prefstream.duckdb over a read-write connection")


def _write_views(path: Path, data_dir: Path) -> None:
    con = duckdb.connect(str(path))
    try:
        for table in TABLES:
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {table_view_sql(data_dir, table)}")
        con.execute(f"CREATE OR REPLACE VIEW partitions AS {partitions_view_sql(data_dir)}")
        con.execute(f"CREATE OR REPLACE VIEW funnel AS {FUNNEL_SQL}")
        for name, body in EXTRA_VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {body.format(root=data_dir.resolve())}")
    finally:
        con.close()


def catalog_lock(data_dir: Path) -> int:
    """The lock another process holds on the catalog: ``fcntl.F_UNLCK`` (none), ``F_RDLCK`` (a
    read-only DuckDB connection) or ``F_WRLCK`` (a read-write one; DuckDB keeps its POSIX lock
    for a connection's lifetime). Asks with ``F_GETLK``, which takes no lock and blocks nobody;
    the calling process must not hold the catalog itself (closing this descriptor would drop its
    locks, and the kernel never reports a process's own locks)."""
    path = data_dir / CATALOG_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return fcntl.F_UNLCK
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    finally:
        os.close(fd)
    kind: int = struct.unpack("hhqqi", answer)[0]
    return kind


def catalog_in_use(data_dir: Path) -> bool:
    """Whether another process holds the catalog open (see :func:`catalog_lock`)."""
    return catalog_lock(data_dir) != fcntl.F_UNLCK


def free_catalog(data_dir: Path) -> bool:
    """When a process holds the catalog read-write (every other connection is refused), put a
    fresh copy in its place (:func:`ensure_catalog`); returns whether it did. The worker calls
    this at each flush, so such a connection locks other readers out for one flush at most."""
    if catalog_lock(data_dir) != fcntl.F_WRLCK:
        return False
    log.warning("a process holds %s read-write, locking every other reader out: writing a new "
                "catalog in its place", data_dir / CATALOG_NAME)
    return ensure_catalog(data_dir)


def connect_readonly(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """An analyst's connection: read-only, never blocks the worker. When a read-write connection
    holds the catalog, a fresh copy is put in its place first (if this process may write the
    data dir), so this one is not refused either."""
    path = str(data_dir / CATALOG_NAME)
    try:
        return duckdb.connect(path, read_only=True)
    except duckdb.IOException:
        if not free_catalog(data_dir):
            raise
    return duckdb.connect(path, read_only=True)
