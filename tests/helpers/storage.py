"""Storage helpers shared by the tests of ``prefstream.storage``: the catalog's views, an
analyst process holding the catalog, and the worker's flush loop over generated traffic (also
imported by the writer process of ``tests/storage/test_concurrent_readers.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from kafka.partitioner.default import murmur2

from prefstream.settings import Settings
from prefstream.sim.traffic import TrafficConfig, generate_traffic
from prefstream.storage.catalog import connect_readonly, ensure_catalog
from prefstream.streams.worker.pipeline import MemoryStore, Pipeline, flush_offline

ROOT = Path(__file__).resolve().parents[2]
H12 = "2024-05-01T12"  # the partition of factories.T0
#: the arrival time of every record of ``traffic_records``
ARRIVAL_MS = int(datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc).timestamp() * 1000)


def query(data_dir: Path, sql: str) -> list[tuple]:
    """A SQL query through the catalog's views."""
    assert ensure_catalog(data_dir)
    con = connect_readonly(data_dir)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def canonical(rows: Iterable[dict]) -> list[tuple]:
    """A multiset of rows as a sorted list (lists made hashable)."""
    return sorted(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(r.items()))
                  for r in rows)


HOLD_CATALOG = r"""
import sys
from pathlib import Path
from prefstream.storage.catalog import connect_readonly
con = connect_readonly(Path(sys.argv[1]))
con.execute("SELECT count(*) FROM pairs").fetchall()
print("ready", flush=True)
sys.stdin.readline()  # hold the connection until told
con.close()
"""


@contextmanager
def analyst_connected(data_dir: Path) -> Iterator[None]:
    """Another process holding the catalog open, as an analyst's session does."""
    assert ensure_catalog(data_dir)
    reader = subprocess.Popen([sys.executable, "-c", HOLD_CATALOG, str(data_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert reader.stdin is not None and reader.stdout is not None
    try:
        assert reader.stdout.readline() == "ready\n"
        yield
    finally:
        reader.stdin.write("done\n")
        reader.stdin.close()
        assert reader.wait(timeout=30) == 0


def kafka_records(messages: Sequence[tuple[bytes, bytes]], partitions: int
                  ) -> list[tuple[int, int, bytes, bytes, int]]:
    """``(partition, offset, key, value, timestamp_ms)`` as the producer would partition them."""
    offsets = [0] * partitions
    records = []
    for key, value in messages:
        p = (murmur2(key) & 0x7FFFFFFF) % partitions
        records.append((p, offsets[p], key, value, ARRIVAL_MS))
        offsets[p] += 1
    return records


def feed_pipeline(settings: Settings, records: Sequence[tuple[int, int, bytes, bytes, int]], *,
                  flush_every: int, pause_s: float = 0.0) -> int:
    """The worker's loop without Kafka: handle records, flush (write, seal, compact) every
    ``flush_every``, then tick every partition far ahead and flush once more. Returns flushes."""
    pipeline = Pipeline(settings, MemoryStore())
    flushes = 0
    for i, (p, offset, key, value, ts_ms) in enumerate(records, 1):
        pipeline.handle(topic=settings.events_topic, partition=p, offset=offset, key=key,
                        value=value, timestamp_ms=ts_ms)
        if i % flush_every == 0 or i == len(records):
            if i == len(records):
                pipeline.tick_all(ARRIVAL_MS + 10**9)
            flush_offline(pipeline)
            flushes += 1
            time.sleep(pause_s)
    return flushes


def traffic_records(n_events: int, partitions: int) -> list[tuple[int, int, bytes, bytes, int]]:
    traffic = generate_traffic(TrafficConfig(n_events=n_events, seed=3, hours=4,
                                             end=datetime(2026, 11, 20, 10, tzinfo=timezone.utc)))
    return kafka_records(traffic.messages, partitions)
