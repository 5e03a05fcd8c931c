"""``<data-dir>/prefstream.duckdb``: a catalog of views over the Parquet files, nothing else.

The worker never keeps this file open: it (re)creates the views at start-up and closes the
connection, so analysts and the trainer can open it read-only at any time while the stream
writes Parquet files next to it. A reader's connection holds a shared lock on the file for as
long as it is open; the worker looks for one (:func:`catalog_in_use`) before it deletes files a
view may have listed (``storage.compact``).

Two properties keep the catalog readable wherever it goes (docs/analysts.md):

- It is written in DuckDB's storage format of version 1.0 (:data:`STORAGE_VERSION`), which
  every DuckDB from 1.0 on opens, 2.x included: analysts' CLIs, notebooks and GUI tools still
  on 1.x read it. A catalog written in a newer format is rebuilt once nobody holds it.
- Views name their files relative to the data dir (``pairs/*/current/*.parquet``), so a copied
  or moved data dir reads its own files. DuckDB resolves a relative path against the reader's
  working directory or its ``file_search_path``: :func:`connect_readonly` sets the latter; in
  the ``duckdb`` CLI run from the data dir (or ``-cmd "SET file_search_path='DIR'"``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import uuid
from pathlib import Path

import duckdb

from storage.files import SCHEMA_DIR, live_files
from storage.tables import TABLES

log = logging.getLogger(__name__)

CATALOG_NAME = "prefstream.duckdb"
#: DuckDB storage format the catalog is written in: readable by DuckDB 1.0 and every later one
STORAGE_VERSION = "v1.0.0"
#: the version number DuckDB writes in the file header for :data:`STORAGE_VERSION`
STORAGE_NUMBER = 64
#: where a DuckDB file's header keeps its storage version number (after the magic ``DUCK``)
_HEADER_MAGIC, _HEADER_VERSION_AT = b"DUCK", 12
#: what DuckDB raises when another connection holds the file (another process: a lock error;
#: this process: the file is attached already, read-only)
_HELD = tuple(getattr(duckdb, name) for name in (
    "IOException", "ConnectionException", "ResourceInUseException") if hasattr(duckdb, name))
#: extra views other packages register (name -> SQL body using {root} for the data dir)
EXTRA_VIEWS: dict[str, str] = {}


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _root(data_dir: Path, relative: bool) -> Path:
    """Where view paths start: ``.`` (the data dir, for the catalog) or the absolute folder."""
    return Path(".") if relative else data_dir.resolve()


def table_view_sql(data_dir: Path, table: str, *, relative: bool = False) -> str:
    """A plain scan (the writer stores each id once, ``storage.files.IdIndex``) of each
    partition's current generation, through its ``current`` link, and of the partitions written
    before generations existed. A folder matches one glob or the other, never both. With
    ``relative`` the paths start at the data dir (the catalog's views)."""
    root = _root(data_dir, relative) / table
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


def partitions_view_sql(data_dir: Path, *, relative: bool = False) -> str:
    """Every partition holding pairs or sessions, with its sealed state from the newest version
    of its manifest row (``storage.files.reseal`` adds versions, never rewrites a file). An
    aggregate, not a window: DuckDB plans ``max(..) OVER (PARTITION BY ..)`` as a self-join that
    globs the folder twice, and two listings may differ."""
    root = _root(data_dir, relative)
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


def funnel_view_sql(data_dir: Path, *, relative: bool = False) -> str:
    """Per hour: the funnel counts, and ``sealed`` (in the manifest: final) or not (still
    filling; its counts can grow)."""
    manifest = _quote(_root(data_dir, relative) / "manifest" / "*.parquet")
    return f"""
    SELECT f.partition,
           f.partition IN (SELECT partition FROM read_parquet({manifest})) AS sealed,
           f.* EXCLUDE (partition)
    FROM (SELECT partition,
                 sum(n_events) AS events, sum(n_duplicates) AS duplicates, count(*) AS sessions,
                 sum(n_candidates) AS candidates, sum(n_pairs) AS pairs, sum(n_ties) AS ties,
                 sum(n_unpaired) AS unpaired, sum(n_refusals) AS refusals
          FROM sessions GROUP BY partition) AS f
    ORDER BY f.partition
"""


def storage_number(path: Path) -> int | None:
    """The storage version number in a DuckDB file's header (None: not a DuckDB file)."""
    with open(path, "rb") as fh:
        header = fh.read(_HEADER_VERSION_AT + 8)
    if header[8:12] != _HEADER_MAGIC or len(header) < _HEADER_VERSION_AT + 8:
        return None
    return int(struct.unpack_from("<Q", header, _HEADER_VERSION_AT)[0])


def ensure_catalog(data_dir: Path) -> bool:
    """(Re)create the views; returns False when a reader holds the file (views then stay).

    A catalog in another storage format than :data:`STORAGE_VERSION` (written by an earlier
    prefstream under DuckDB 2) is rebuilt beside it and renamed over it, once no reader holds
    it; otherwise the views are replaced in place."""
    path = data_dir / CATALOG_NAME
    if path.exists() and storage_number(path) != STORAGE_NUMBER:
        if catalog_in_use(data_dir):
            log.warning("catalog %s is in an old format and held by a reader: kept", path)
            return False
        tmp = data_dir / f".{CATALOG_NAME}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            _write_views(data_dir, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("catalog %s rewritten in DuckDB storage %s", path, STORAGE_VERSION)
        return True
    try:
        _write_views(data_dir, path)
    except _HELD as exc:
        log.warning("catalog %s is locked by a reader, keeping its views: %s", path, exc)
        return False
    return True


def _write_views(data_dir: Path, path: Path) -> None:
    """Create or replace every view in the DuckDB file ``path``, paths relative to the data
    dir (resolved while creating through ``file_search_path``, as readers do)."""
    con = duckdb.connect(config={"file_search_path": str(data_dir.resolve())})
    try:
        con.execute(f"ATTACH {_quote(path)} AS prefstream_catalog "
                    f"(STORAGE_VERSION '{STORAGE_VERSION}')")
        con.execute("USE prefstream_catalog")
        for table in TABLES:
            sql = table_view_sql(data_dir, table, relative=True)
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {sql}")
        views = {"partitions": partitions_view_sql(data_dir, relative=True),
                 "funnel": funnel_view_sql(data_dir, relative=True),
                 **{name: body.format(root=".") for name, body in EXTRA_VIEWS.items()}}
        for name, sql in views.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    finally:
        con.close()


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
    """An analyst's connection: read-only, never blocks or is blocked by the worker; the views'
    relative paths resolve in ``data_dir`` wherever the process runs."""
    return duckdb.connect(str(data_dir / CATALOG_NAME), read_only=True,
                          config={"file_search_path": str(data_dir.resolve())})
