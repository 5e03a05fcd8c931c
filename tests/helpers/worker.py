"""Worker processes on the real broker, shared by the tests under ``tests/streams/worker``:
settings for a fast worker, starting and stopping ``prefstream worker`` subprocesses, reading
back topics and stored rows, and the uninterrupted reference run (the pure pipeline over the
same messages) that the crash, handover and fuzz tests compare against."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from factories import kafka_records
from kafka import KafkaConsumer, TopicPartition

from prefstream.settings import Settings
from prefstream.sim.demo import drained
from prefstream.sim.traffic import TrafficConfig, generate_traffic
from prefstream.storage.catalog import connect_readonly, ensure_catalog
from prefstream.storage.files import init_data_dir, read_watermarks
from prefstream.streams.broker import EmbeddedBroker
from prefstream.streams.producer import FeedbackProducer
from prefstream.streams.worker.pipeline import TICK_PREFIX, replay
from prefstream.streams.worker.run import prepare
from prefstream.streams.worker.ticks import with_tick_key_of

FAST = {"idle_s": 1.5, "tick_interval_s": 0.5, "flush_interval_s": 0.5, "rebalance_timeout_s": 2.0,
        "session_timeout_s": 4.0, "metrics_port": 0}
#: the end of the generated traffic streams (not ``factories.T0``)
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
TABLE_IDS = {"pairs": "pair_id", "ties": "tie_id", "unpaired": "row_id",
             "refusals": "refusal_id", "sessions": "session_key",
             "dead_letters": "dead_letter_id", "late_events": "late_id"}


def make_settings(broker: EmbeddedBroker, data_dir: Path, name: str, **extra: object) -> Settings:
    return Settings(kafka_bootstrap=broker.bootstrap, data_dir=data_dir, app_id=name,
                    events_topic=f"{name}-events", dead_letter_topic=f"{name}-dlq",
                    late_topic=f"{name}-late", partitions=2, **FAST, **extra)


def start_worker(settings: Settings, log_path: Path,
                 **extra_env: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.as_env(), **extra_env}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "prefstream.cli", "worker"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(timeout=30)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float,
             workers: Iterable[subprocess.Popen[bytes]] = ()) -> None:
    """Until ``condition()``; fails once ``timeout_s`` passed or any of ``workers`` exited."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for w in workers:
            assert w.poll() is None, f"a worker exited with {w.returncode} waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.1)


def query(data_dir: Path, sql: str) -> list[tuple]:
    ensure_catalog(data_dir)
    con = connect_readonly(data_dir)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def read_topic(broker: EmbeddedBroker, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    values = [m.value for m in consumer]
    consumer.close()
    return values


def reference(settings: Settings, messages: list[tuple[bytes, bytes]], data_dir: Path) -> None:
    """The same messages through the pure pipeline, partitioned as the producer does."""
    records = kafka_records(messages, settings.partitions, int(time.time() * 1000))
    ref = settings.model_copy(update={"data_dir": data_dir})
    init_data_dir(ref.data_dir)
    replay(ref, records, final_tick_ms=int(time.time() * 1000) + 10**9)


def rows(data_dir: Path) -> dict[str, list[tuple]]:
    """Every stored row of every table, all columns, in id order."""
    out = {}
    for table, id_col in TABLE_IDS.items():
        cols = [c[0] for c in query(data_dir, f"DESCRIBE {table}")]
        listed = ", ".join(f'"{c}"' for c in cols)
        out[table] = query(data_dir, f"SELECT {listed} FROM {table} ORDER BY {id_col}")
    return out


def produce_stream(settings: Settings, n_events: int, seed: int,
                   upto: int | None = None) -> list[tuple[bytes, bytes]]:
    """Publishes the traffic's messages (only the first ``upto`` of them, if given; see
    ``publish``) and returns them all."""
    prepare(settings)
    traffic = generate_traffic(TrafficConfig(n_events=n_events, seed=seed, end=T0))
    publish(settings, traffic.messages[:upto])
    return traffic.messages


def publish(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    producer = FeedbackProducer(settings.kafka_bootstrap, topic=settings.events_topic)
    for key, value in messages:
        producer.send_raw(key, value)
    producer.flush()
    producer.close()


def applied(settings: Settings) -> int:
    """Messages the stored batches cover, over all partitions."""
    return sum(m.applied_offset + 1 for m in read_watermarks(settings.data_dir).values())


def is_drained(settings: Settings, targets: dict[int, int], since: datetime) -> Callable[[], bool]:
    idle_mark = since - timedelta(seconds=settings.grace_s)
    return lambda: drained(read_watermarks(settings.data_dir), targets, idle_mark)


def recorded(settings: Settings) -> list[tuple[int, int, bytes | None, bytes, int]]:
    """The stream as the broker holds it: offsets, arrival times, and the watermark ticks the
    workers added (a tick before a late message decides whether it is late)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, consumer_timeout_ms=3000,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = [(m.partition, m.offset, m.key, m.value, m.timestamp) for m in consumer]
    consumer.close()
    return records


def assert_equals_uninterrupted(settings: Settings, n_messages: int, ref_dir: Path) -> int:
    """The stored rows equal the pure pipeline's over the same records; returns rows compared."""
    records = recorded(settings)
    assert sum(not r[3].startswith(TICK_PREFIX) for r in records) == n_messages
    # the reference trusts the ticks the workers signed (their key is in their data dir)
    ref = with_tick_key_of(settings.model_copy(update={"data_dir": ref_dir}), settings)
    init_data_dir(ref_dir)
    replay(ref, records, final_tick_ms=int(time.time() * 1000) + 10**9)
    got, want = rows(settings.data_dir), rows(ref_dir)
    for table in TABLE_IDS:
        assert got[table] == want[table], table
    assert len(want["pairs"]) > 100
    return sum(len(r) for r in want.values())
