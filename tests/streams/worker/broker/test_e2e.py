"""End to end on a real broker process (Tansu), real worker processes and real files.

Events are produced with kafka-python, a ``prefstream worker`` subprocess consumes them, and the
rows are read back through the DuckDB views.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from factories import kafka_records
from kafka import KafkaConsumer, TopicPartition

from prefstream.settings import Settings
from prefstream.sim.demo import end_offsets, wait_until_drained
from prefstream.sim.traffic import TrafficConfig, generate_traffic
from prefstream.storage.catalog import connect_readonly, ensure_catalog
from prefstream.storage.files import init_data_dir, read_watermarks
from prefstream.streams.broker import EmbeddedBroker
from prefstream.streams.producer import FeedbackProducer
from prefstream.streams.worker.pipeline import replay
from prefstream.streams.worker.run import prepare

pytestmark = pytest.mark.broker

FAST = {"idle_s": 1.5, "tick_interval_s": 0.5, "flush_interval_s": 0.5, "rebalance_timeout_s": 2.0,
        "session_timeout_s": 4.0, "metrics_port": 0}
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)


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


def run_until_drained(settings: Settings, log_path: Path) -> None:
    worker = start_worker(settings, log_path)
    try:
        wait_until_drained(settings, end_offsets(settings), worker, timeout_s=90)
    finally:
        stop(worker)


def query(data_dir: Path, sql: str) -> list[tuple]:
    ensure_catalog(data_dir)
    con = connect_readonly(data_dir)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def scripted_session(producer: FeedbackProducer) -> None:
    """One session: two answers shown, thumbs up on b, thumbs down on a; an edit; a lone copy."""
    common = {"session_id": "s-1", "user_id": "u-1"}
    at = lambda s: T0 + timedelta(seconds=s)  # noqa: E731
    for i, (rid, text) in enumerate([("a", "Use a for loop."), ("b", "Use reversed(xs).")]):
        producer.log_impression(**common, request_id="r-1", response_id=rid,
                                prompt="How do I reverse a list?", response_text=text,
                                position=i, model_version="m1", ts=at(i), event_id=f"imp-{rid}")
    producer.log_thumbs(up=True, **common, request_id="r-1", response_id="b", ts=at(10),
                        event_id="up-b")
    producer.log_thumbs(up=False, **common, request_id="r-1", response_id="a", ts=at(11),
                        event_id="down-a")
    producer.log_thumbs(up=False, **common, request_id="r-1", response_id="a", ts=at(11),
                        event_id="down-a")  # a re-send: ignored as duplicate
    producer.log_impression(**common, request_id="r-2", response_id="c", prompt="Say hi",
                            response_text="Hello.", position=0, model_version="m1", ts=at(20),
                            event_id="imp-c")
    producer.log_edit(**common, request_id="r-2", response_id="c", edited_text="Hi there!",
                      ts=at(30), event_id="edit-c")
    producer.log_session_end(**common, request_id="r-2", ts=at(40), event_id="end")


def test_exact_pairs_from_a_scripted_session(broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = make_settings(broker, tmp_path / "data", "scripted")
    prepare(settings)
    producer = FeedbackProducer(broker.bootstrap, topic=settings.events_topic)
    scripted_session(producer)
    producer.send_raw(b"s-1", b"{not json")
    producer.send_raw(b"s-9", b'{"type": "copy"}')
    producer.flush()
    producer.close()
    run_until_drained(settings, tmp_path / "worker.log")

    pairs = query(settings.data_dir, "SELECT rule, prompt, chosen, rejected, session_id, "
                  "chosen_position, rejected_position FROM pairs ORDER BY rule")
    assert pairs == [
        ("edit", "Say hi", "Hi there!", "Hello.", "s-1", None, 0),
        ("thumbs", "How do I reverse a list?", "Use reversed(xs).", "Use a for loop.", "s-1", 1,
         0),
    ]
    sessions = query(settings.data_dir,
                     "SELECT n_events, n_duplicates, close_reason, partition FROM sessions")
    assert sessions == [(7, 1, "session_end", "2026-11-20T09")]
    dead = query(settings.data_dir, "SELECT dead_letter_id, reason FROM dead_letters ORDER BY 1")
    assert len(dead) == 2
    assert all(d[0].startswith("scripted-events[") and "@" in d[0] for d in dead)
    assert any("Invalid JSON" in d[1] for d in dead)
    assert any("event_id: Field required" in d[1] for d in dead)
    assert query(settings.data_dir, "SELECT partition, sealed FROM partitions") == [
        ("2026-11-20T09", True)]
    dlq = read_topic(broker, settings.dead_letter_topic)
    assert len(dlq) == 2 and all(b'"reason"' in v for v in dlq)


def read_topic(broker: EmbeddedBroker, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    values = [m.value for m in consumer]
    consumer.close()
    return values


TABLE_IDS = {"pairs": "pair_id", "ties": "tie_id", "unpaired": "row_id",
             "refusals": "refusal_id", "sessions": "session_key",
             "dead_letters": "dead_letter_id", "late_events": "late_id"}


def snapshot(data_dir: Path) -> dict[str, set[str]]:
    return {t: {r[0] for r in query(data_dir, f"SELECT {c} FROM {t}")}
            for t, c in TABLE_IDS.items()}


def reference(settings: Settings, messages: list[tuple[bytes, bytes]], data_dir: Path) -> None:
    """The same messages through the pure pipeline, partitioned as the producer does."""
    records = kafka_records(messages, settings.partitions, int(time.time() * 1000))
    ref = settings.model_copy(update={"data_dir": data_dir})
    init_data_dir(ref.data_dir)
    replay(ref, records, final_tick_ms=int(time.time() * 1000) + 10**9)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_worker_restarted_mid_stream_loses_and_duplicates_nothing(
    broker: EmbeddedBroker, tmp_path: Path, sig: int
) -> None:
    name = f"restart-{signal.Signals(sig).name.lower()}"
    settings = make_settings(broker, tmp_path / "data", name, flush_max_events=200)
    prepare(settings)
    traffic = generate_traffic(TrafficConfig(n_events=3000, seed=7, end=T0))
    producer = FeedbackProducer(broker.bootstrap, topic=settings.events_topic)
    for key, value in traffic.messages:
        producer.send_raw(key, value)
    producer.flush()
    producer.close()
    targets = end_offsets(settings)

    worker = start_worker(settings, tmp_path / "worker-1.log")
    deadline = time.monotonic() + 60
    while sum(m.applied_offset for m in read_watermarks(settings.data_dir).values()) < 600:
        assert worker.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    stop(worker, sig)
    partial = sum(m.applied_offset + 1 for m in read_watermarks(settings.data_dir).values())
    assert partial < sum(targets.values()), "the kill must happen mid-stream"

    run_until_drained(settings, tmp_path / "worker-2.log")
    got = snapshot(settings.data_dir)
    reference(settings, traffic.messages, tmp_path / "ref")
    want = snapshot(tmp_path / "ref")
    for table in TABLE_IDS:
        assert got[table] == want[table], table
    assert len(want["pairs"]) > 100
    n_accepted = query(settings.data_dir, "SELECT sum(n_events) + sum(n_duplicates) FROM sessions")
    n_side = len(got["dead_letters"]) + len(got["late_events"])
    assert n_accepted[0][0] + n_side == len(traffic.messages)
