"""Analyst queries on 10 million pairs: the DuckDB views against raw Parquet scans, timed.

    python benchmarks/bench_queries.py [--pairs 10000000] [--days 10]
        [--out benchmarks/results/queries.json]

Writes synthetic pairs and their sessions the way the worker stores them (one file per hour
partition over ``--days`` days, named and written by ``storage``'s own helpers, so the views read
exactly what they read in production), builds the catalog, then times each analyst query through
the views and the same aggregate on a raw ``read_parquet`` of the live files, listed by name
beforehand, as the in-process baseline: ``view / raw`` is the price of the views (finding each
partition's live files at query time). Both answers must agree, and the ``pairs`` view must
return every pair written.

Columns are generated with numpy and Arrow compute, never row by row: 10 million pairs take
about a minute to write on two cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import (  # noqa: E402
    LoadMonitor,
    command_line,
    elapsed_since,
    machine_info,
    now_iso,
    write_result,
)

from prefstream.storage.catalog import connect_readonly, ensure_catalog  # noqa: E402
from prefstream.storage.files import _write_part, init_data_dir, live_files  # noqa: E402
from prefstream.storage.partitions import PARTITION_FORMAT  # noqa: E402
from prefstream.storage.tables import TABLES, arrow_schema  # noqa: E402

RULES = ("copy_over_skipped", "thumbs", "reformulate_same_intent", "edit",
         "click_over_skipped_above", "regenerate_accept")
CLOSE_REASONS = ("gap", "session_end", "max_events", "max_duration")
START = datetime(2030, 1, 1, tzinfo=timezone.utc)
QUERIES = {
    "pairs_by_rule": (
        "SELECT rule, count(*) AS n, avg(confidence) AS c FROM pairs GROUP BY 1 ORDER BY 1",
        "SELECT rule, count(*) AS n, avg(confidence) AS c FROM read_parquet({pairs}) "
        "GROUP BY 1 ORDER BY 1"),
    "funnel_by_hour": (
        "SELECT partition, events, sessions, candidates, pairs FROM funnel ORDER BY 1",
        "SELECT partition, sum(n_events), count(*), sum(n_candidates), sum(n_pairs) "
        "FROM read_parquet({sessions}) GROUP BY 1 ORDER BY 1"),
    "pairs_one_day_by_hour_and_rule": (  # {day}: the middle day of the data
        "SELECT partition, rule, count(*) FROM pairs WHERE partition LIKE '{day}%' "
        "GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT partition, rule, count(*) FROM read_parquet({pairs}) "
        "WHERE partition LIKE '{day}%' GROUP BY 1, 2 ORDER BY 1, 2"),
}


class Columns:
    """Column generators for one partition's rows: vectorised, deterministic per seed."""

    def __init__(self, rng: np.random.Generator, n: int, hour: datetime, first_id: int) -> None:
        self.rng, self.n, self.hour, self.first_id = rng, n, hour, first_id
        self.texts = pa.array([f"synthetic text {i} " + "lorem ipsum dolor " * (i % 12)
                               for i in range(997)])

    def ids(self, prefix: str) -> pa.Array:
        numbers = pc.cast(pa.array(np.arange(self.first_id, self.first_id + self.n)), pa.string())
        return pc.binary_join_element_wise(prefix, numbers, "")

    def timestamps(self) -> pa.Array:
        base = int(self.hour.timestamp() * 1_000_000)
        micros = base + self.rng.integers(0, 3_600_000_000, self.n)
        return pa.array(micros, type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))

    def choice(self, values: tuple[str, ...]) -> pa.Array:
        return pa.array(np.asarray(values)[self.rng.integers(0, len(values), self.n)])

    def text(self) -> pa.Array:
        return self.texts.take(pa.array(self.rng.integers(0, len(self.texts), self.n)))

    def counts(self, high: int) -> pa.Array:
        return pa.array(self.rng.integers(0, high, self.n), type=pa.int64())


def pairs_table(c: Columns) -> pa.Table:
    rules = c.choice(RULES)
    event_time = c.timestamps()
    values: dict[str, pa.Array] = {
        "pair_id": c.ids("pair-"), "rule": rules,
        "rules": pa.ListArray.from_arrays(pa.array(np.arange(c.n + 1, dtype=np.int32)), rules),
        "confidence": pa.array(c.rng.uniform(0.5, 1.0, c.n)),
        "propensity_weight": pa.array(c.rng.uniform(1.0, 5.0, c.n)),
        "prompt": c.text(), "chosen": c.text(), "rejected": c.text(),
        "session_id": c.ids("s-"), "user_id": c.ids("u-"), "request_id": c.ids("q-"),
        "rejected_request_id": c.ids("q-"), "chosen_response_id": c.ids("r-"),
        "rejected_response_id": c.ids("x-"), "chosen_model": c.choice(("m1", "m2")),
        "rejected_model": c.choice(("m1", "m2")), "chosen_position": c.counts(4),
        "rejected_position": c.counts(4), "event_time": event_time,
        "session_start": event_time, "session_end": event_time,
    }
    return _table("pairs", c, values)


def sessions_table(c: Columns) -> pa.Table:
    start = c.timestamps()
    values: dict[str, pa.Array] = {
        "session_key": c.ids("sk-"), "session_id": c.ids("s-"), "user_id": c.ids("u-"),
        "kafka_partition": c.counts(4), "start": start, "end": start,
        "close_reason": c.choice(CLOSE_REASONS), "n_events": pa.array(
            c.rng.integers(1, 30, c.n), type=pa.int64()),
        **{name: c.counts(high) for name, high in (
            ("n_duplicates", 2), ("n_requests", 3), ("n_impressions", 8), ("n_candidates", 6),
            ("n_pairs", 4), ("n_ties", 2), ("n_unpaired", 2), ("n_refusals", 3))},
    }
    return _table("sessions", c, values)


def _table(name: str, c: Columns, values: dict[str, pa.Array]) -> pa.Table:
    """The table in the stored schema: every column of it present, in its order and types."""
    schema = arrow_schema(TABLES[name][0])
    partition = pa.array([c.hour.strftime(PARTITION_FORMAT)] * 1).take(
        pa.array(np.zeros(c.n, dtype=np.int32)))
    values = {**values, "partition": partition}
    missing = set(schema.names) - values.keys()
    if missing:  # the stored schema grew: the benchmark must write every column
        raise SystemExit(f"bench_queries: no generator for {name} columns {sorted(missing)}")
    return pa.table([values[f.name].cast(f.type) for f in schema], schema=schema)


def build(root: Path, n_pairs: int, days: int, seed: int = 0) -> dict[str, int]:
    """Write ``n_pairs`` pairs and half as many sessions over ``days`` days of hour partitions,
    each partition one file named as the worker names its flushes."""
    init_data_dir(root)
    hours = days * 24
    rng = np.random.default_rng(seed)
    per_hour = [n_pairs // hours + (1 if h < n_pairs % hours else 0) for h in range(hours)]
    first, sessions = 0, 0
    for h in tqdm(range(hours), desc="writing partitions", unit="h", leave=False, disable=None):
        hour = START + timedelta(hours=h)
        for table, n, build_table in (("pairs", per_hour[h], pairs_table),
                                      ("sessions", per_hour[h] // 2, sessions_table)):
            rows = build_table(Columns(rng, n, hour, first))
            _write(root / table / hour.strftime(PARTITION_FORMAT), rows)
        first += per_hour[h]
        sessions += per_hour[h] // 2
    ensure_catalog(root)
    return {"pairs": n_pairs, "sessions": sessions, "partitions": hours}


def _write(folder: Path, rows: pa.Table) -> None:
    """One flush of the worker: ``storage.files`` picks the folder's generation, the file name
    and writes it atomically (the same private helper ``write_rows`` uses, minus the pydantic
    rows, which would take most of an hour at 10 million)."""
    _write_part(folder, rows)


def live_list(root: Path, table: str) -> str:
    """The live files of every partition of a table as a DuckDB list literal."""
    folders = sorted(p for p in (root / table).iterdir() if p.is_dir())
    files = [str(f) for folder in folders for f in live_files(folder)]
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def timed(con: Any, sql: str, repeat: int) -> tuple[float, float, list[Any]]:
    """First run, best of ``repeat`` runs (seconds), and the answer."""
    times, rows = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        rows = con.execute(sql).fetchall()
        times.append(time.perf_counter() - started)
    return times[0], min(times), rows


def same_answer(a: list[Any], b: list[Any]) -> bool:
    """Row by row, floats to 9 significant digits (sums in another order differ in the last)."""
    def norm(rows: list[Any]) -> list[tuple[Any, ...]]:
        return [tuple(float(f"{v:.9g}") if isinstance(v, float) else v for v in r) for r in rows]
    return norm(a) == norm(b)


def run_queries(root: Path, repeat: int, n_pairs: int, days: int) -> dict[str, Any]:
    con = connect_readonly(root)
    day = (START + timedelta(days=days // 2)).strftime("%Y-%m-%d")
    lists = {table: live_list(root, table) for table in ("pairs", "sessions")}
    out: dict[str, Any] = {}
    try:
        stored = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        if stored != n_pairs:  # the storage layout changed under the benchmark
            raise SystemExit(f"bench_queries: the pairs view returns {stored} of the {n_pairs} "
                             "pairs written")
        for name, (view_template, raw_template) in QUERIES.items():
            view_sql = view_template.format(day=day)
            view_first, view_s, view_rows = timed(con, view_sql, repeat)
            raw_sql = raw_template.format(day=day, **lists)
            raw_first, raw_s, raw_rows = timed(con, raw_sql, repeat)
            if not same_answer(view_rows, raw_rows):
                raise SystemExit(f"bench_queries: {name}: the view and the raw scan disagree")
            out[name] = {"view_s": round(view_s, 4), "raw_scan_s": round(raw_s, 4),
                         "view_first_s": round(view_first, 4), "raw_first_s": round(raw_first, 4),
                         "view_over_raw": round(view_s / raw_s, 2), "rows": len(view_rows),
                         "sql": view_sql}
            print(f"{name:<32} view {view_s:7.3f} s   raw scan {raw_s:7.3f} s   "
                  f"view/raw {view_s / raw_s:5.2f}   ({len(view_rows)} rows)", flush=True)
    finally:
        con.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=10, help="hour partitions = 24 x days")
    parser.add_argument("--repeat", type=int, default=3, help="runs per query (best is kept)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where to write the data "
                        "(default: a temporary dir, removed afterwards)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/queries.json")
    args = parser.parse_args(argv)
    if args.pairs < args.days * 24:
        parser.error("--pairs must be at least one per hour partition")
    started, when = time.perf_counter(), now_iso()
    with tempfile.TemporaryDirectory(prefix="bench-queries-") as tmp, LoadMonitor() as load:
        root = args.data_dir or Path(tmp) / "data"
        built = time.perf_counter()
        counts = build(root, args.pairs, args.days)
        build_s = time.perf_counter() - built
        size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
        print(f"wrote {counts['pairs']:,} pairs and {counts['sessions']:,} sessions in "
              f"{counts['partitions']} partitions ({size / 2**20:.0f} MiB) in {build_s:.1f} s",
              flush=True)
        queries = run_queries(root, args.repeat, counts["pairs"], args.days)
    write_result(args.out, {
        "benchmark": "queries", "command": command_line(__file__, argv), "started": when, **counts,
        "days": args.days, "repeat": args.repeat, "bytes_on_disk": size,
        "build_s": round(build_s, 1), "pairs_written_per_s": round(args.pairs / build_s),
        "queries": queries, "machine": machine_info(), "load": load.summary(),
        "wall_s": elapsed_since(started)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
