"""The numbers of ``prefstream report``, read through a read-only DuckDB connection to the
catalog's views (the worker and the trainer never wait on it)."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from prefstream.errors import PrefstreamError
from prefstream.storage.catalog import CATALOG_NAME, MODELS_VIEW_SQL, connect_readonly

CONF_BINS, DIFF_SIDE = 40, 15
PAIRS_SQL = """CREATE TEMP TABLE p AS
    SELECT rule, confidence, length(chosen) AS lc, length(rejected) AS lr FROM pairs"""
TOTALS_SQL = """SELECT
    (SELECT coalesce(sum(n_events), 0) FROM sessions), (SELECT count(*) FROM sessions),
    (SELECT coalesce(sum(n_candidates), 0) FROM sessions), (SELECT count(*) FROM p),
    (SELECT count(*) FROM ties), (SELECT count(*) FROM unpaired), (SELECT count(*) FROM refusals),
    (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM late_events),
    (SELECT count(*) FILTER (WHERE sealed) FROM partitions), (SELECT count(*) FROM partitions)"""
TOTALS = ("events", "sessions", "candidates", "pairs", "ties", "unpaired", "refusals",
          "dead_letters", "late_events", "sealed", "partitions")
DIFF_SQL = """SELECT least(greatest(floor((lc - lr) / $w + $k + 0.5), 0), 2 * $k)::INT, count(*)
    FROM p GROUP BY 1"""


def collect(data_dir: Path) -> dict[str, Any]:
    """Every number the page shows, read from the catalog's views."""
    con = connect(data_dir)
    try:
        con.execute(PAIRS_SQL)
        return {
            "data_dir": str(data_dir.resolve()),
            "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "totals": dict(zip(TOTALS, con.execute(TOTALS_SQL).fetchone() or (), strict=True)),
            "funnel": con.execute("SELECT partition, events, sessions, candidates, pairs "
                                  "FROM funnel ORDER BY partition").fetchall(),
            "rules": con.execute("SELECT rule, count(*), avg((lc > lr)::INT) FROM p "
                                 "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall(),
            "length_all": con.execute("SELECT count(*), avg((lc > lr)::INT) FROM p").fetchone(),
            "refusals": con.execute("SELECT reason, count(*) FROM refusals "
                                    "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall(),
            "confidence": _bins(con, f"SELECT least(floor(confidence * {CONF_BINS}), "
                                     f"{CONF_BINS - 1})::INT, count(*) FROM p GROUP BY 1",
                                CONF_BINS),
            "length_diff": _length_diff(con),
            "models": _models(con, data_dir),
        }
    except duckdb.Error as exc:
        raise PrefstreamError(f"cannot read {data_dir / CATALOG_NAME}: {exc}") from exc
    finally:
        con.close()


def connect(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """Read-only; retried briefly because a starting worker holds the file while it (re)creates
    the views."""
    if not (data_dir / CATALOG_NAME).exists():
        raise PrefstreamError(f"no catalog at {data_dir / CATALOG_NAME}: start a worker (or "
                              "`prefstream demo`) on this data dir first")
    for _ in range(20):
        try:
            return connect_readonly(data_dir)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            error = exc
            time.sleep(0.25)
    raise PrefstreamError(f"cannot open {data_dir / CATALOG_NAME} read-only: {error}")


def _bins(con: duckdb.DuckDBPyConnection, sql: str, n: int, **params: Any) -> list[int]:
    counts = [0] * n
    for b, c in con.execute(sql, params or None).fetchall():
        counts[b] = c
    return counts


def _length_diff(con: duckdb.DuckDBPyConnection) -> tuple[list[float], list[int]]:
    """Histogram of len(chosen) - len(rejected): symmetric, 0 in the middle bin, the 2% widest
    differences folded into the outer bars."""
    q = (con.execute("SELECT quantile_cont(abs(lc - lr), 0.98) FROM p").fetchone() or (None,))[0]
    w = max(1, math.ceil((q or 0) / (DIFF_SIDE + 0.5)))
    edges = [(i - DIFF_SIDE - 0.5) * w for i in range(2 * DIFF_SIDE + 2)]
    return edges, _bins(con, DIFF_SQL, 2 * DIFF_SIDE + 1, w=w, k=DIFF_SIDE)


def _models(con: duckdb.DuckDBPyConnection, data_dir: Path) -> list[dict[str, Any]]:
    """Model versions from the ``models`` view; from its definition when the catalog lacks it
    (a catalog written by an older version, before the catalog defined the view)."""
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    source = ("models" if "models" in views
              else f"({MODELS_VIEW_SQL.format(root=data_dir.resolve())})")
    rows = con.execute(f"SELECT version, promoted, is_current, metadata FROM {source}").fetchall()
    found = [{**json.loads(m), "version": v, "promoted": bool(p), "current": bool(c)}
             for v, p, c, m in rows if v]
    return sorted(found, key=lambda m: int(m["version"][1:]))
