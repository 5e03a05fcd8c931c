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

Two properties keep the catalog readable wherever it goes (docs/storage.md):

- It is written in DuckDB's storage format of version 1.0 (:data:`STORAGE_VERSION`), which
  every DuckDB from 1.0 on opens, 2.x included: analysts' CLIs, notebooks and GUI tools still
  on 1.x read it. Each rewrite makes a fresh file, so a catalog an older prefstream wrote in
  a newer format is replaced at the worker's first start.
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

from prefstream.storage.comparisons import COMPARISONS_SQL
from prefstream.storage.files import SCHEMA_DIR, fsync_path, live_files
from prefstream.storage.quarantine import quarantine_file, readable
from prefstream.storage.tables import TABLES

log = logging.getLogger(__name__)

CATALOG_NAME = "prefstream.duckdb"
#: DuckDB storage format the catalog is written in: readable by DuckDB 1.0 and every later one
STORAGE_VERSION = "v1.0.0"
#: the version number DuckDB writes in the file header for :data:`STORAGE_VERSION`
STORAGE_NUMBER = 64
#: where a DuckDB file's header keeps its storage version number (after the magic ``DUCK``)
_HEADER_MAGIC, _HEADER_VERSION_AT = b"DUCK", 12
#: the trainer's model versions (``prefstream.trainer.registry`` writes them under ``models/``),
#: registered here with the other views so every catalog has it; ``curren[t]``: a glob, so no
#: promoted version yet reads as no row instead of an error
MODELS_VIEW_SQL = """
    WITH cur AS (SELECT content->>'$.version' AS version
                 FROM read_text('{root}/models/curren[t]/metadata.json'))
    SELECT content->>'$.version' AS version,
           CAST(content->>'$.created_at' AS TIMESTAMPTZ) AS created_at,
           CAST(content->>'$.promoted' AS BOOLEAN) AS promoted,
           (content->>'$.version') IN (SELECT version FROM cur) AS is_current,
           CAST(content->>'$.cutoff' AS TIMESTAMPTZ) AS cutoff,
           content->>'$.backbone' AS backbone,
           json_extract_string(content, '$.partitions.train[*].partition') AS train_partitions,
           json_extract_string(content, '$.partitions.eval[*].partition') AS eval_partitions,
           CAST(content->>'$.n_train' AS BIGINT) AS n_train,
           CAST(content->>'$.n_eval' AS BIGINT) AS n_eval,
           CAST(content->>'$.metrics.eval.accuracy' AS DOUBLE) AS heldout_accuracy,
           CAST(content->>'$.metrics.eval.length_matched.accuracy' AS DOUBLE)
               AS length_matched_accuracy,
           CAST(content->>'$.gates.calibration.agreement' AS DOUBLE) AS calibration_agreement,
           CAST(content->>'$.metrics.probes.overall_rate' AS DOUBLE) AS probe_raise_rate,
           json_extract_string(content, '$.reasons[*]') AS reasons,
           CAST(content AS JSON) AS metadata
    FROM read_text('{root}/models/v*/metadata.json')
    ORDER BY version
"""


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
    """(Re)create the views in a new file, then rename it over the catalog: readers connected
    to the old file keep it (and its views) until they close; new connections get the new one.
    Never waits for a reader; returns False only for a folder that is not a data dir (no
    schema files for the views to fall back on)."""
    if not all((data_dir / table / SCHEMA_DIR).is_dir() for table in TABLES):
        return False
    path = data_dir / CATALOG_NAME
    tmp = data_dir / f".{CATALOG_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _write_views(data_dir, tmp)
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
                 "comparisons": COMPARISONS_SQL,
                 "models": MODELS_VIEW_SQL.format(root=".")}
        for name, sql in views.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
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
    """An analyst's connection: read-only, never blocks the worker; the views' relative paths
    resolve in ``data_dir`` wherever the process runs. When a read-write connection holds the
    catalog, a fresh copy is put in its place first (if this process may write the data dir), so
    this one is not refused either."""
    path = str(data_dir / CATALOG_NAME)
    config = {"file_search_path": str(data_dir.resolve())}
    try:
        return duckdb.connect(path, read_only=True, config=config)
    except duckdb.IOException:
        if not free_catalog(data_dir):
            raise
    return duckdb.connect(path, read_only=True, config=config)
