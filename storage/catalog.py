"""``<data-dir>/prefstream.duckdb``: a catalog of views over the Parquet files, nothing else.

The worker never keeps this file open: it (re)creates the views at start-up and closes the
connection, so analysts and the trainer can open it read-only at any time while the stream
writes Parquet files next to it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

from storage.files import SCHEMA_DIR
from storage.tables import TABLES

log = logging.getLogger(__name__)

CATALOG_NAME = "prefstream.duckdb"
#: extra views other packages register (name -> SQL body using {root} for the data dir)
EXTRA_VIEWS: dict[str, str] = {}


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def table_view_sql(data_dir: Path, table: str) -> str:
    """A plain scan: the writer stores each id once (``storage.files.IdIndex``)."""
    glob = _quote(data_dir.resolve() / table / "*" / "*.parquet")
    return f"SELECT * FROM read_parquet({glob}, hive_partitioning = false, union_by_name = true)"


def partitions_view_sql(data_dir: Path) -> str:
    """Every partition holding pairs or sessions, with its sealed state from the manifest."""
    root = data_dir.resolve()
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
        sealed AS (SELECT * FROM read_parquet({manifest}) WHERE partition <> '{SCHEMA_DIR}')
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
        for name, body in EXTRA_VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {body.format(root=data_dir.resolve())}")
    finally:
        con.close()
    return True


def connect_readonly(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """An analyst's connection: read-only, never blocks or is blocked by the worker."""
    return duckdb.connect(str(data_dir / CATALOG_NAME), read_only=True)
