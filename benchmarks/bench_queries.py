"""Analyst queries on 10 million pairs: the DuckDB views against raw Parquet scans, timed.

    python benchmarks/bench_queries.py [--pairs 10000000] [--out benchmarks/results/queries.json]

Writes synthetic pairs (and their sessions) as the worker would, one file per hour partition over
many days, builds the catalog, then times each analyst query through the views (which keep one
row per id) and the same aggregate on a raw ``read_parquet`` scan as the in-process baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.catalog import connect_readonly, ensure_catalog  # noqa: E402
from storage.files import init_data_dir  # noqa: E402
from storage.tables import TABLES, arrow_schema  # noqa: E402

RULES = ["copy_over_skipped", "thumbs", "reformulate_same_intent", "edit",
         "click_over_skipped_above", "regenerate_accept"]
QUERIES = {
    "pairs_by_rule": (
        "SELECT rule, count(*), avg(confidence) FROM pairs GROUP BY 1 ORDER BY 2 DESC",
        "SELECT rule, count(*), avg(confidence) FROM read_parquet('{root}/pairs/*/*.parquet') "
        "GROUP BY 1 ORDER BY 2 DESC"),
    "funnel_by_hour": (
        "SELECT * FROM funnel",
        "SELECT partition, sum(n_events), count(*), sum(n_candidates), sum(n_pairs) "
        "FROM read_parquet('{root}/sessions/*/*.parquet') GROUP BY 1 ORDER BY 1"),
    "pairs_one_day_by_hour_and_rule": (
        "SELECT partition, rule, count(*) FROM pairs WHERE partition LIKE '2030-01-05%' "
        "GROUP BY 1, 2",
        "SELECT partition, rule, count(*) FROM read_parquet('{root}/pairs/*/*.parquet') "
        "WHERE partition LIKE '2030-01-05%' GROUP BY 1, 2"),
}


def hour_table(model_table: str, n: int, hour: datetime, rng: np.random.Generator,
               offset: int) -> pa.Table:
    """``n`` rows of a table for one hour, built column-wise (fast at millions of rows)."""
    schema = arrow_schema(TABLES[model_table][0])
    ts = pa.array([hour + timedelta(seconds=int(s)) for s in rng.integers(0, 3600, n)],
                  type=pa.timestamp("us", tz="UTC"))
    partition = hour.strftime("%Y-%m-%dT%H")
    columns: dict[str, Any] = {}
    for field in schema:
        if field.name == "partition":
            columns[field.name] = pa.array([partition] * n)
        elif pa.types.is_timestamp(field.type):
            columns[field.name] = ts
        elif field.name == "rule":
            columns[field.name] = pa.array(np.array(RULES)[rng.integers(0, len(RULES), n)])
        elif pa.types.is_floating(field.type):
            columns[field.name] = pa.array(rng.uniform(0.5, 1.0, n))
        elif pa.types.is_integer(field.type):
            columns[field.name] = pa.array(rng.integers(0, 8, n), type=pa.int64())
        elif pa.types.is_list(field.type):
            columns[field.name] = pa.array([["thumbs"]] * n, type=field.type)
        else:  # ids and texts: unique ids, short varied texts
            columns[field.name] = pa.array([f"{field.name[:3]}-{offset + i}" for i in range(n)])
    return pa.table(columns, schema=schema)


def build(root: Path, n_pairs: int, days: int) -> None:
    init_data_dir(root)
    hours = days * 24
    rng = np.random.default_rng(0)
    start = datetime(2030, 1, 1, tzinfo=timezone.utc)
    per_hour = n_pairs // hours
    for h in tqdm(range(hours), desc="writing partitions", unit="h", disable=None):
        hour = start + timedelta(hours=h)
        for table, n in (("pairs", per_hour), ("sessions", per_hour // 2)):
            folder = root / table / hour.strftime("%Y-%m-%dT%H")
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(hour_table(table, n, hour, rng, h * per_hour), folder / "part-0.parquet")
    ensure_catalog(root)


def timed(con: Any, sql: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        con.execute(sql).fetchall()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/queries.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-queries-"))
    try:
        build(root, args.pairs, args.days)
        con = connect_readonly(root)
        results: dict[str, Any] = {"pairs": args.pairs, "partitions": args.days * 24,
                                   "machine": {"cpus": os.cpu_count(),
                                               "platform": platform.platform()}}
        for name, (view_sql, raw_sql) in QUERIES.items():
            view_s = timed(con, view_sql, args.repeat)
            raw_s = timed(con, raw_sql.format(root=root), args.repeat)
            results[name] = {"view_s": round(view_s, 3), "raw_scan_s": round(raw_s, 3),
                             "view_over_raw": round(view_s / raw_s, 2)}
            print(f"{name:<34} view {view_s:7.3f} s   raw scan {raw_s:7.3f} s   "
                  f"ratio {view_s / raw_s:5.2f}")
        con.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
