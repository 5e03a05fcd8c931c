"""Rows per second of a sealed partition's content hash, per scheme (``storage.content_hash``).

    python benchmarks/bench_content_hash.py [--events 50000] [--repeats 5]

Runs ``bench_handle``'s traffic through the pipeline into a temporary data dir (so the tables
have the worker's real rows), then hashes every sealed partition's rows, alternating the two
schemes: from tables in memory (what ``storage.verify.read_sealed`` does) and from the files
(what a seal does). Prints the best of ``--repeats`` per scheme, in rows per second (the rows
read, before the first of each id is kept), and CPU time (``time.process_time``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_handle import ARRIVAL_MS, records  # noqa: E402

from prefstream.settings import Settings  # noqa: E402
from prefstream.storage.atomic import live_files  # noqa: E402
from prefstream.storage.content_hash import (  # noqa: E402
    HASH_READ_ROWS,
    content_sha256,
    file_batches,
    files_hash,
    json_rows_hash,
)
from prefstream.storage.files import (  # noqa: E402
    init_data_dir,
    read_table,
    sealed_partitions,
)
from prefstream.storage.tables import SEALED_TABLES  # noqa: E402
from prefstream.streams.worker.pipeline import MemoryStore, Pipeline, flush_offline  # noqa: E402


def fill(data_dir: Path, n_events: int) -> None:
    settings = Settings(data_dir=data_dir)
    init_data_dir(data_dir)
    pipeline = Pipeline(settings, MemoryStore(), clock_ms=lambda: ARRIVAL_MS)
    for p, offset, key, value, ts_ms in records(n_events, settings.partitions):
        pipeline.handle(topic=settings.events_topic, partition=p, offset=offset, key=key,
                        value=value, timestamp_ms=ts_ms)
    pipeline.tick_all(ARRIVAL_MS + 10**9)
    flush_offline(pipeline)


def best_cpu(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        fill(data_dir, args.events)
        parts = [r.partition for r in sealed_partitions(data_dir)]
        tables = {p: {t: read_table(data_dir=data_dir, table=t, partitions=[p])
                      for t in SEALED_TABLES} for p in parts}
        listed = {p: {t: live_files(data_dir / t / p) for t in SEALED_TABLES} for p in parts}
        n_rows = sum(t.num_rows for by_table in tables.values() for t in by_table.values())
        cases: dict[str, Callable[[], object]] = {
            "json-rows, tables": lambda: [content_sha256(tables[p], like="0" * 64)
                                          for p in parts],
            "cols1, tables": lambda: [content_sha256(tables[p]) for p in parts],
            "json-rows, files": lambda: [json_rows_hash({t: file_batches(t, listed[p][t])
                                                         for t in SEALED_TABLES})
                                         for p in parts],
            "cols1, files": lambda: [files_hash(listed[p]) for p in parts],
        }
        best = {name: float("inf") for name in cases}
        for _ in range(args.repeats):  # alternate, so load on the machine hits both alike
            for name, fn in cases.items():
                best[name] = min(best[name], best_cpu(fn, 1))
    print(f"{len(parts)} sealed partitions, {n_rows} rows, read {HASH_READ_ROWS} rows a batch; "
          f"best CPU of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:18s} {seconds * 1e3:8.1f} ms  {n_rows / seconds:12,.0f} rows/s  "
              f"{seconds / n_rows * 1e6:6.2f} µs/row")


if __name__ == "__main__":
    main()
