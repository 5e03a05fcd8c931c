"""CPU per event of the worker's pipeline, in process, without a broker.

    python benchmarks/bench_handle.py [--events 50000] [--flush-every 20000] [--runs 3]
        [--gc worker|default]

Generates traffic (``prefstream.sim.traffic``), partitions it as the producer would, and feeds
it through :class:`~prefstream.streams.worker.pipeline.Pipeline` with the worker's flush steps
every ``--flush-every`` records (as ``flush_offline``) into a temporary data dir. Prints the
µs per event spent in ``handle`` and in the flushes separately, best of ``--runs``.
Deterministic input (fixed seed, fixed arrival time), so two commits can be compared on one
machine; profile it with ``python -m cProfile -s cumtime benchmarks/bench_handle.py --runs 1``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from kafka.partitioner.default import murmur2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefstream.settings import Settings  # noqa: E402
from prefstream.sim.traffic import TrafficConfig, generate_traffic  # noqa: E402
from prefstream.storage.files import init_data_dir  # noqa: E402
from prefstream.streams.worker.gctune import tune_gc  # noqa: E402
from prefstream.streams.worker.pipeline import MemoryStore, Pipeline, flush_offline  # noqa: E402

END = datetime(2026, 11, 20, 10, tzinfo=timezone.utc)
ARRIVAL_MS = int(END.timestamp() * 1000) + 60_000  # every record arrives a minute after the end


def records(n_events: int, partitions: int) -> list[tuple[int, int, bytes, bytes, int]]:
    """``(partition, offset, key, value, timestamp_ms)`` as the producer would partition them."""
    traffic = generate_traffic(TrafficConfig(n_events=n_events, seed=0, hours=4, end=END))
    offsets = [0] * partitions
    out = []
    for key, value in traffic.messages:
        p = (murmur2(key) & 0x7FFFFFFF) % partitions
        out.append((p, offsets[p], key, value, ARRIVAL_MS))
        offsets[p] += 1
    return out


def run_once(recs: list[tuple[int, int, bytes, bytes, int]], flush_every: int
             ) -> tuple[float, float]:
    """Seconds spent handling and flushing ``recs`` into a fresh data dir."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        init_data_dir(settings.data_dir)
        pipeline = Pipeline(settings, MemoryStore(), clock_ms=lambda: ARRIVAL_MS)
        topic = settings.events_topic
        handle_s = flush_s = 0.0
        for start in range(0, len(recs), flush_every):
            t0 = time.perf_counter()
            for p, offset, key, value, ts_ms in recs[start:start + flush_every]:
                pipeline.handle(topic=topic, partition=p, offset=offset, key=key, value=value,
                                timestamp_ms=ts_ms)
            if start + flush_every >= len(recs):
                pipeline.tick_all(ARRIVAL_MS + 10**9)  # closes every session: all get written
            t1 = time.perf_counter()
            flush_offline(pipeline)
            t2 = time.perf_counter()
            handle_s += t1 - t0
            flush_s += t2 - t1
        return handle_s, flush_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--flush-every", type=int, default=Settings().flush_max_events,
                        help="records between two flushes (default: the worker's "
                             "flush_max_events)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gc", choices=("worker", "default"), default="worker",
                        help="the worker's garbage-collector settings (streams/worker/gctune.py) "
                             "or CPython's defaults")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the per-flush dead-letter warnings are expected
    recs = records(args.events, Settings().partitions)
    n = len(recs)
    if args.gc == "worker":
        tune_gc()
    best_h = best_f = float("inf")
    for i in range(args.runs):
        h, f = run_once(recs, args.flush_every)
        best_h, best_f = min(best_h, h), min(best_f, f)
        print(f"run {i + 1}: handle {h / n * 1e6:.1f} µs/event, flush {f / n * 1e6:.1f} µs/event")
    print(f"best of {args.runs} ({n} events): handle {best_h / n * 1e6:.1f} µs/event, "
          f"flush {best_f / n * 1e6:.1f} µs/event, total {(best_h + best_f) / n * 1e6:.1f}")


if __name__ == "__main__":
    main()
