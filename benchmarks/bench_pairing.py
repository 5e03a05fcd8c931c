"""CPU per closed session of turning it into rows, as the worker's flush does.

    python benchmarks/bench_pairing.py [--events 50000] [--runs 5]

Runs ``bench_handle.py``'s traffic through the worker's ``Pipeline`` once to collect the
sessions it closes, then times, per closed session, the three steps ``Pipeline.write_flush``
runs for each: ``session_to_pairs``, ``session_rows`` and ``partition_for`` + ``stamp``. Prints
CPU µs per closed session and per event of the traffic (the unit of ``bench_handle.py``), best of
``--runs``; garbage collection is left out (the collector is off while a run is timed), as the
worker's tuned collector (streams/worker/gctune.py) leaves it out of most flushes.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_handle import records, run_once  # noqa: E402

from prefstream.schemas.records import ClosedSession  # noqa: E402
from prefstream.settings import Settings  # noqa: E402
from prefstream.storage.partitions import partition_for, stamp  # noqa: E402
from prefstream.streams.core.outputs import session_rows  # noqa: E402
from prefstream.streams.core.pairing import session_to_pairs  # noqa: E402
from prefstream.streams.worker import pipeline  # noqa: E402

STEPS = ("session_to_pairs", "session_rows", "partition_for + stamp")


def closed_sessions(n_events: int) -> tuple[list[ClosedSession], int]:
    """The sessions bench_handle's traffic closes, in flush order, and its number of events."""
    recs = records(n_events, Settings().partitions)
    closed: list[ClosedSession] = []
    write_flush = pipeline.Pipeline.write_flush

    def collecting(self: pipeline.Pipeline, job: pipeline.FlushJob) -> pipeline.Batch:
        closed.extend(job.closed)
        return write_flush(self, job)

    pipeline.Pipeline.write_flush = collecting  # type: ignore[method-assign]
    try:
        run_once(recs, Settings().flush_max_events)
    finally:
        pipeline.Pipeline.write_flush = write_flush  # type: ignore[method-assign]
    return closed, len(recs)


def time_steps(closed: list[ClosedSession], settings: Settings) -> list[float]:
    """CPU seconds of each step over every closed session, session by session as
    ``write_flush`` runs them (its events still in the CPU's caches for the later steps); each
    step's figure includes one read of the clock (a system call, about 0.4 µs here)."""
    spent = [0.0, 0.0, 0.0]
    clock, rules, hours = time.process_time, settings.rules, settings.partition_hours
    for session in closed:
        t0 = clock()
        result = session_to_pairs(session, rules)
        t1 = clock()
        rows = session_rows(session, result, text_storage=settings.text_storage)
        t2 = clock()
        part = partition_for(session.session.last, hours=hours)
        for table_rows in rows.values():
            stamp(table_rows, part)
        t3 = clock()
        spent[0] += t1 - t0
        spent[1] += t2 - t1
        spent[2] += t3 - t2
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the per-flush dead-letter warnings are expected
    closed, n_events = closed_sessions(args.events)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        gc.freeze()
        gc.disable()
        best = [float("inf")] * len(STEPS)
        for _ in range(args.runs):
            best = [min(b, s) for b, s in zip(best, time_steps(closed, settings), strict=True)]
            gc.collect()
    print(f"{len(closed)} closed sessions of {n_events} events, best of {args.runs}:")
    for step, seconds in zip(STEPS, best, strict=True):
        print(f"  {step:22s} {seconds / len(closed) * 1e6:6.1f} µs/session "
              f"{seconds / n_events * 1e6:5.2f} µs/event")
    total = sum(best)
    print(f"  {'total':22s} {total / len(closed) * 1e6:6.1f} µs/session "
          f"{total / n_events * 1e6:5.2f} µs/event")


if __name__ == "__main__":
    main()
