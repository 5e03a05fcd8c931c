"""When the worker flushes (docs/delivery.md) and its flush log line (docs/first-hour.md,
"Logs"): a flush that stored rows says so, even when a tick alone closed the session; an idle
flush logs nothing."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from factories import at, event

from prefstream.settings import Settings
from prefstream.storage.files import init_data_dir
from prefstream.streams.worker.flush import flush_line
from prefstream.streams.worker.pipeline import MemoryStore, Pipeline, flush_due, flush_offline

ARRIVAL_MS = int(at(1).timestamp() * 1000)  # a minute after the events


def test_a_flush_names_what_it_stored_and_an_idle_one_logs_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", partitions=1, metrics_port=0)
    init_data_dir(settings.data_dir)
    wall = [ARRIVAL_MS]
    pipeline = Pipeline(settings, MemoryStore(), clock_ms=lambda: wall[0])
    shown = [event("impression", response_id=a, position=i) for i, a in enumerate("ab")]
    for offset, ev in enumerate([*shown, event("copy", response_id="b"),
                                 event("session_end")]):
        assert pipeline.handle(topic=settings.events_topic, partition=0, offset=offset,
                               key=b"s1", value=ev.model_dump_json().encode(),
                               timestamp_ms=ARRIVAL_MS) == []
    # the events: accepted, their session still open (within grace_s of its end)
    assert flush_line(flush_offline(pipeline).counts) == "flushed batch: {'accepted': 4}"
    assert flush_line(flush_offline(pipeline).counts) is None  # idle: no line
    wall[0] += int(timedelta(hours=1).total_seconds() * 1000)
    pipeline.tick_all(wall[0])  # idle partition: the watermark follows the wall clock
    line = flush_line(flush_offline(pipeline).counts)
    assert line is not None and "accepted" not in line
    assert "'stored_pairs': 1" in line and "'stored_sessions': 1" in line
    assert flush_line(flush_offline(pipeline).counts) is None


def test_a_flush_is_due_on_count_interval_or_a_caught_up_backlog() -> None:
    s = Settings(flush_max_events=100, flush_interval_s=60.0)
    now = time.monotonic()
    assert flush_due(s, 100, now) and not flush_due(s, 99, now)
    assert flush_due(s, 1, now - 61) and not flush_due(s, 0, now - 61)
    assert flush_due(s, 1, now, caught_up=True)
    assert not flush_due(s, 0, now, caught_up=True)  # nothing handled: nothing to write
