"""End to end on a real broker process (Tansu), real worker processes and real files.

Events are produced with kafka-python, a ``prefstream worker`` subprocess consumes them, and the
rows are read back through the DuckDB views.
"""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
from helpers.worker import (
    T0,
    TABLE_IDS,
    make_settings,
    query,
    read_topic,
    reference,
    start_worker,
    stop,
)

from prefstream.settings import Settings
from prefstream.sim.demo import end_offsets, wait_until_drained
from prefstream.sim.traffic import Traffic, TrafficConfig, generate_traffic
from prefstream.storage.files import read_watermarks
from prefstream.streams.broker import EmbeddedBroker
from prefstream.streams.producer import FeedbackProducer
from prefstream.streams.worker.run import prepare

pytestmark = pytest.mark.broker


def run_until_drained(settings: Settings, log_path: Path) -> None:
    worker = start_worker(settings, log_path)
    try:
        wait_until_drained(settings, end_offsets(settings), worker, timeout_s=90)
    finally:
        stop(worker)


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


def produce_traffic(broker: EmbeddedBroker, settings: Settings, *, n_events: int,
                    seed: int) -> tuple[Traffic, dict[int, int]]:
    """Generated traffic on the settings' (new) topic; returns it and the end offsets."""
    prepare(settings)
    traffic = generate_traffic(TrafficConfig(n_events=n_events, seed=seed, end=T0))
    producer = FeedbackProducer(broker.bootstrap, topic=settings.events_topic)
    for key, value in traffic.messages:
        producer.send_raw(key, value)
    producer.flush()
    producer.close()
    return traffic, end_offsets(settings)


def snapshot(data_dir: Path) -> dict[str, set[str]]:
    return {t: {r[0] for r in query(data_dir, f"SELECT {c} FROM {t}")}
            for t, c in TABLE_IDS.items()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_worker_restarted_mid_stream_loses_and_duplicates_nothing(
    broker: EmbeddedBroker, tmp_path: Path, sig: int
) -> None:
    name = f"restart-{signal.Signals(sig).name.lower()}"
    settings = make_settings(broker, tmp_path / "data", name, flush_max_events=200,
                             take_max_events=100)  # many flushes: the stop lands mid-stream
    traffic, targets = produce_traffic(broker, settings, n_events=3000, seed=7)

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


def test_a_backlog_is_stored_once_read_not_a_flush_interval_later(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A worker that caught up with a backlog flushes at once (docs/delivery.md, "When rows are
    written"): with a 60 s flush interval and more events than one flush's count takes, the
    backlog's rows are durable within seconds of its last batch."""
    settings = make_settings(broker, tmp_path / "data", "backlog", take_max_events=100,
                             flush_max_events=100_000).model_copy(
                                 update={"flush_interval_s": 60.0})
    _, targets = produce_traffic(broker, settings, n_events=1000, seed=3)

    worker = start_worker(settings, tmp_path / "worker.log")
    started = time.monotonic()
    try:
        while True:
            marks = read_watermarks(settings.data_dir)
            if all(p in marks and marks[p].applied_offset + 1 >= end
                   for p, end in targets.items()):
                break
            assert worker.poll() is None, "the worker exited"
            assert time.monotonic() - started < 30, "the backlog waited for the flush interval"
            time.sleep(0.1)
    finally:
        stop(worker)
    assert query(settings.data_dir, "SELECT count(*) FROM sessions")[0][0] > 50
