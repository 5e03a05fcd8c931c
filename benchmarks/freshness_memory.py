"""The pipeline benchmark's live stages: freshness (event to queryable pair) and memory.

Freshness replays the synthetic traffic in real time, time compressed: ``hours`` of event time
in ``seconds`` of wall time, each message sent at its compressed send time with its event time
mapped the same way, and the worker's gap and grace compressed by the same factor (the idle
timeout, tick and flush interval are the worker's own wall-clock settings). A reader thread polls
the ``pairs`` view; a session's freshness is the wall time from sending its last event to its
first pair being returned. Sessions closed by a ``session_end`` event and sessions closed by the
inactivity gap are reported apart: the second kind waits out the (compressed) gap by design.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm
from workers import (
    Deadline,
    StageError,
    memory_mb,
    metric_sum,
    start_worker,
    stop_worker,
    stored_through,
    wait_consuming,
)

from prefstream.schemas.events import Impression
from prefstream.settings import Settings
from prefstream.sim.demo import end_offsets
from prefstream.sim.traffic import Traffic, TrafficConfig, generate_traffic
from prefstream.storage.catalog import connect_readonly
from prefstream.storage.files import read_watermarks
from prefstream.streams.producer import FeedbackProducer
from prefstream.streams.worker.run import prepare

HOURS = 2
POLL_S = 0.25
ON_TIME = ("valid", "duplicate")


@dataclass(frozen=True)
class Send:
    """One message of the replay: when to send it (seconds after the start), its event time
    (same scale; None for malformed messages, sent as generated), and its session."""

    at: float
    event_at: float | None
    key: bytes
    value: bytes
    session_id: str
    ends_session: bool


def replay_plan(traffic: Traffic, start: datetime, factor: float) -> list[Send]:
    """The traffic's messages in send order, event time divided by ``factor``.

    The generator orders messages by send time; a message is sent at the latest event time of
    the on-time events up to it, so malformed and late messages keep their place in the stream
    instead of being scheduled at their absurd or old timestamps.
    """
    plan, clock = [], 0.0
    for (key, value), label in zip(traffic.messages, traffic.labels, strict=True):
        if label.startswith("bad:"):
            plan.append(Send(clock, None, key, value, "", False))
            continue
        event = json.loads(value)
        event_at = (datetime.fromisoformat(event["ts"]) - start).total_seconds() / factor
        if label in ON_TIME:
            clock = max(clock, event_at)
        plan.append(Send(clock, event_at, key, value,
                         event["session_id"] if label in ON_TIME else "",
                         event["type"] == "session_end"))
    return plan


def retimed(send: Send, t0: float) -> bytes:
    """The message with its event time moved to the replay's clock (malformed ones as they are)."""
    if send.event_at is None:
        return send.value
    event = json.loads(send.value)
    event["ts"] = datetime.fromtimestamp(t0 + send.event_at, tz=timezone.utc).isoformat()
    return json.dumps(event, separators=(",", ":")).encode()


class PairWatcher:
    """A thread that polls the ``pairs`` view and notes when each session's first pair shows."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.first_seen: dict[str, float] = {}
        self.polls, self.errors = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pair-watcher", daemon=True)

    def __enter__(self) -> PairWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                con = connect_readonly(self.data_dir)
                try:
                    rows = con.execute("SELECT DISTINCT session_id FROM pairs").fetchall()
                finally:
                    con.close()
            except Exception:  # noqa: BLE001 -- catalog rewritten at worker start: next poll
                self.errors += 1
                continue
            now = time.time()  # after the query: a conservative "queryable at"
            self.polls += 1
            for (sid,) in rows:
                self.first_seen.setdefault(sid, now)


def freshness(settings: Settings, seconds: float, rate: float, log: Path, deadline: Deadline
              ) -> dict[str, Any]:
    end = datetime(2030, 1, 1, HOURS, tzinfo=timezone.utc)  # remapped onto the wall clock
    factor = HOURS * 3600 / seconds
    traffic = generate_traffic(TrafficConfig(n_events=max(1, int(seconds * rate)), seed=1,
                                             end=end, hours=HOURS))
    plan = replay_plan(traffic, end - timedelta(hours=HOURS), factor)
    settings = settings.model_copy(update={
        "gap_s": settings.gap_s / factor, "grace_s": settings.grace_s / factor, "idle_s": 2.0,
        "tick_interval_s": 0.5, "flush_interval_s": 1.0})
    prepare(settings)
    worker = start_worker(settings, log, deadline)
    try:
        wait_consuming(settings, deadline)
        with PairWatcher(settings.data_dir) as watcher:
            last_sent, ended = _replay(settings, plan, deadline)
            _wait_drained(settings, deadline)
            time.sleep(3 * POLL_S)  # the watcher's next polls see the last flush
            first_seen = dict(watcher.first_seen)
            polls, poll_errors = watcher.polls, watcher.errors
    finally:
        stop_worker(worker)
    if not first_seen:
        raise StageError(f"freshness: no pair became queryable ({polls} polls, {poll_errors} "
                         "failed)")
    # a pair seen before the session's last event was sent came from an earlier part of it
    # (split by the event cap or the longest duration): not a freshness sample
    lags = {sid: first_seen[sid] - last_sent[sid] for sid in first_seen
            if sid in last_sent and first_seen[sid] >= last_sent[sid]}
    by_end = [lag for sid, lag in lags.items() if sid in ended]
    by_gap = [lag for sid, lag in lags.items() if sid not in ended]
    return {
        "sessions_with_pairs": len(lags), **_summary(list(lags.values())),
        "pairs_before_last_event": len(first_seen) - len(lags),
        "closed_by_session_end": _summary(by_end),
        "closed_by_gap": {**_summary(by_gap), "gap_s": round(settings.gap_s, 3)},
        "events": len(plan), "replay_seconds": seconds, "time_compression": factor,
        "gap_s": round(settings.gap_s, 3), "grace_s": round(settings.grace_s, 3),
        "idle_s": settings.idle_s, "flush_interval_s": settings.flush_interval_s,
        "poll_interval_s": POLL_S, "polls": polls, "poll_errors": poll_errors,
    }


def _replay(settings: Settings, plan: list[Send], deadline: Deadline
            ) -> tuple[dict[str, float], set[str]]:
    """Send the plan in real time: each session's last send time, the sessions ended by a
    ``session_end`` event."""
    producer = FeedbackProducer(str(settings.kafka_bootstrap), topic=settings.events_topic,
                                max_block_ms=30_000, linger_ms=1)
    last_sent: dict[str, float] = {}
    ended: set[str] = set()
    t0 = time.time() + 1.0
    behind = 0.0
    try:
        for send in tqdm(plan, desc="real-time replay", unit="ev", leave=False, disable=None):
            wait = t0 + send.at - time.time()
            if wait > 0:
                time.sleep(wait)
            else:
                behind = max(behind, -wait)
                deadline.check("the real-time replay")
            producer.send_raw(send.key, retimed(send, t0))
            if send.session_id:
                last_sent[send.session_id] = time.time()
                if send.ends_session:
                    ended.add(send.session_id)
        producer.flush(timeout_s=60)
    finally:
        producer.close()
    if behind > 5.0:
        raise StageError(f"freshness: the replay fell {behind:.1f} s behind its schedule (the "
                         "producer could not keep up): lower --freshness-rate")
    return last_sent, ended


def _wait_drained(settings: Settings, deadline: Deadline) -> None:
    """Until every partition's rows are stored up to its end offset and no session is open."""
    ends = end_offsets(settings)
    while True:
        marks = read_watermarks(settings.data_dir)
        if all(p in marks and marks[p].applied_offset + 1 >= end and marks[p].open_sessions == 0
               for p, end in ends.items()):
            return
        deadline.check("every session to close and its rows to be stored")
        time.sleep(POLL_S)


def _summary(lags: list[float]) -> dict[str, Any]:
    return {"n": len(lags), "p50_s": _pct(lags, 50), "p95_s": _pct(lags, 95),
            "max_s": round(max(lags), 3) if lags else None}


def _pct(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return round(values[0], 3) if values else None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


def memory(settings: Settings, n_sessions: int, log: Path, deadline: Deadline
           ) -> dict[str, Any]:
    """Resident memory of the worker holding ``n_sessions`` open sessions (one impression each,
    a gap of a day so none closes), opened in two halves.

    ``bytes_per_session``: all growth over the idle worker, per session; it includes what
    reading 100,000s of messages leaves resident whatever they hold (fetch and stream buffers,
    the allocator's high-water mark). ``marginal_bytes_per_session``: the growth from the first
    half to the second, per session: what one more open session costs once the worker has read
    traffic."""
    settings = settings.model_copy(update={"gap_s": 24 * 3600.0, "max_session_duration_s":
                                           48 * 3600.0, "flush_max_events": 20_000})
    prepare(settings)
    worker = start_worker(settings, log, deadline)
    try:
        wait_consuming(settings, deadline)
        idle = memory_mb(worker.pid)
        half = n_sessions // 2
        _open_sessions(settings, range(half))
        _wait_open(settings, half, deadline)
        halfway = memory_mb(worker.pid)
        half_open = metric_sum(settings, "prefstream_sessions_open")
        _open_sessions(settings, range(half, n_sessions))
        _wait_open(settings, n_sessions, deadline)
        held = memory_mb(worker.pid)
        open_now = metric_sum(settings, "prefstream_sessions_open")
    finally:
        stop_worker(worker)
    mib = 1024 * 1024
    return {"open_sessions": int(open_now), "rss_idle_mb": idle["rss_mb"],
            "rss_half_mb": halfway["rss_mb"], "rss_mb": held["rss_mb"],
            "peak_mb": held["peak_mb"],
            "bytes_per_session": round((held["rss_mb"] - idle["rss_mb"]) * mib
                                       / max(open_now, 1)),
            "marginal_bytes_per_session": round((held["rss_mb"] - halfway["rss_mb"]) * mib
                                                / max(open_now - half_open, 1))}


#: after a flush covered every message: time for its changelog to be acknowledged and its
#: offsets committed, so the reading is of a settled worker, not of a checkpoint in flight
SETTLE_S = 3.0


def _wait_open(settings: Settings, n: int, deadline: Deadline) -> None:
    """Until ``n`` sessions are open and a flush covered every message sent, then settled."""
    while metric_sum(settings, "prefstream_sessions_open") < n:
        deadline.check(f"{n} open sessions (the worker reports "
                       f"{metric_sum(settings, 'prefstream_sessions_open'):.0f})")
        time.sleep(0.5)
    ends = end_offsets(settings)
    while stored_through(settings, ends) != ends:
        deadline.check(f"a flush covering the {n} sessions' events")
        time.sleep(0.2)
    time.sleep(SETTLE_S)


def _open_sessions(settings: Settings, numbers: range) -> None:
    now = datetime.now(timezone.utc)
    producer = FeedbackProducer(str(settings.kafka_bootstrap), topic=settings.events_topic,
                                max_block_ms=30_000, linger_ms=20, batch_size=256 * 1024)
    try:
        for i in tqdm(numbers, desc="open sessions", unit="s", leave=False, disable=None):
            sid = f"mem-{i:07d}"
            producer.send_raw(sid.encode(), Impression(
                event_id=f"e{i}", session_id=sid, user_id=f"u{i % 5000}", request_id=f"r{i}",
                ts=now, response_id=f"a{i}", prompt="How do I sort a dict by value?",
                response_text="Use sorted(d.items(), key=lambda kv: kv[1]).", position=0,
                model_version="m1").model_dump_json().encode())
        producer.flush(timeout_s=300)
    finally:
        producer.close()
    if producer.failed:
        raise StageError(f"memory: {producer.failed} events not delivered: {producer.errors[:3]}")
