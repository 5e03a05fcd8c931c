"""``<data-dir>/prefstream.duckdb``: a catalog of views over the Parquet files, nothing else.

The worker never keeps this file open: it (re)creates the views at start-up and closes the
connection, so analysts and the trainer can open it read-only at any time while the stream
writes Parquet files next to it. A reader's connection holds a shared lock on the file for as
long as it is open; the worker looks for one (:func:`catalog_in_use`) before it deletes files a
view may have listed (``storage.compact``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from pathlib import Path

import duckdb

from storage.comparisons import COMPARISONS_SQL
from storage.files import SCHEMA_DIR, live_files
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
    now, by name, like ``storage.files.read_table``; None when there are none. Safe while the
    query is shorter than the compaction grace, whatever the worker does meanwhile."""
    root = data_dir.resolve() / table
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = [str(f) for name in names for f in live_files(root / name)]
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
    """(Re)create the views; returns False when a reader holds the file (views then stay)."""
    path = data_dir / CATALOG_NAME
    try:
        con = duckdb.connect(str(path))
    except (duckdb.IOException, duckdb.ConnectionException) as exc:
        log.warning("catalog %s is locked by a reader, keeping its views: %s", path, exc)
        return False
    try:
        for table in TABLES:
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {table_view_sql(data_dir, table)}")
        con.execute(f"CREATE OR REPLACE VIEW partitions AS {partitions_view_sql(data_dir)}")
        con.execute(f"CREATE OR REPLACE VIEW funnel AS {FUNNEL_SQL}")
        con.execute(f"CREATE OR REPLACE VIEW comparisons AS {COMPARISONS_SQL}")
        for name, body in EXTRA_VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {body.format(root=data_dir.resolve())}")
    finally:
        con.close()
    return True


def catalog_in_use(data_dir: Path) -> bool:
    """Whether another process holds the catalog open (DuckDB keeps a POSIX lock on the file for
    a connection's lifetime). Asks with ``F_GETLK``, which takes no lock and blocks nobody; the
    calling process must not hold the catalog itself (closing this descriptor would drop its
    locks, and the kernel never reports a process's own locks)."""
    path = data_dir / CATALOG_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    finally:
        os.close(fd)
    return struct.unpack("hhqqi", answer)[0] != fcntl.F_UNLCK


def connect_readonly(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """An analyst's connection: read-only, never blocks or is blocked by the worker."""
    return duckdb.connect(str(data_dir / CATALOG_NAME), read_only=True)
