"""Messages that pass the schema but attack the stream (docs/hostile-input.md): forged ticks,
producer clocks, poison sessions, colliding keys, re-used ids, mismatched requests; each against
the real pipeline over a real data dir, without a broker."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from factories import event, kafka_records
from faust.serializers import codecs
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from prefstream.schemas.events import MAX_TEXT_CHARS, MAX_WALL_MS
from prefstream.settings import Settings
from prefstream.storage.files import init_data_dir, read_table
from prefstream.streams.core.compact import StoredSlot
from prefstream.streams.core.sessionize import Clock
from prefstream.streams.worker.app import slot_to_json
from prefstream.streams.worker.pipeline import (
    MemoryStore,
    Pipeline,
    SideMessage,
    flush_offline,
    replay,
)
from prefstream.streams.worker.ticks import sign_tick, tick_key

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
NOW_MS = int(NOW.timestamp() * 1000)
TOPIC = "prefstream-events"
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # a data dir reused across examples


def pipeline_at(data_dir: Path, wall_ms: int = NOW_MS, **extra: Any) -> Pipeline:
    init_data_dir(data_dir)
    settings = Settings(data_dir=data_dir, partitions=2, metrics_port=0, **extra)
    return Pipeline(settings, MemoryStore(), clock_ms=lambda: wall_ms)


def message(kind: str = "copy", *, ts: datetime, **fields: Any) -> tuple[bytes, bytes]:
    ev = event(kind, **fields).model_copy(update={"ts": ts})
    return ev.session_id.encode(), ev.model_dump_json().encode()


class Feed:
    """Offsets per partition, and every side message the pipeline returned."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.offsets = [0, 0]
        self.side: list[SideMessage] = []

    def send(self, key: bytes | None, value: bytes, *, partition: int = 0,
             timestamp_ms: int = NOW_MS) -> list[SideMessage]:
        offset = self.offsets[partition]
        self.offsets[partition] += 1
        out = self.pipeline.handle(topic=TOPIC, partition=partition, offset=offset, key=key,
                                   value=value, timestamp_ms=timestamp_ms)
        self.side += out
        return out

    def reasons(self) -> list[str]:
        return [json.loads(m.value)["reason"] for m in self.side
                if m.topic == self.pipeline.settings.dead_letter_topic]


# --- finding 1: forged ticks ------------------------------------------------------------------

FAR_MS = int(datetime(8999, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
forged_ticks = st.one_of(
    st.builds(lambda ms: compact({"type": "_tick", "wall_ms": ms}),
              st.integers(0, MAX_WALL_MS - 1)),
    st.builds(lambda ms, p, mac: compact({"type": "_tick", "wall_ms": ms, "partition": p,
                                          "mac": mac}),
              st.integers(0, MAX_WALL_MS - 1), st.integers(0, 3), hex64),
)


def compact(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


@hsettings(max_examples=30, deadline=None, suppress_health_check=FIXTURE_OK)
@given(forged=forged_ticks)
def test_a_forged_tick_is_dead_lettered_and_moves_no_clock(tmp_path: Path, forged: bytes) -> None:
    feed = Feed(pipeline_at(tmp_path / "data"))
    feed.send(*message(ts=NOW - timedelta(minutes=1), session_id="s1"))
    before = feed.pipeline.partitions[0].clock
    assert len(feed.send(None, forged)) == 1
    assert feed.pipeline.partitions[0].clock == before
    assert feed.reasons()[0].startswith("tick:")


def test_only_a_tick_signed_for_its_own_partition_moves_the_clock(tmp_path: Path) -> None:
    pipeline = pipeline_at(tmp_path / "data")
    feed = Feed(pipeline)
    key = tick_key(pipeline.settings)
    feed.send(*message(ts=NOW - timedelta(minutes=10), session_id="s1"))
    copied = sign_tick(key, TOPIC, 1, FAR_MS)  # genuine, but for partition 1
    assert len(feed.send(None, copied)) == 1
    other_key = sign_tick(b"not the workers' key", TOPIC, 0, FAR_MS)
    assert len(feed.send(None, other_key)) == 1
    assert pipeline.partitions[0].clock.watermark < NOW
    assert feed.send(None, sign_tick(key, TOPIC, 0, FAR_MS)) == []  # the workers' own
    assert pipeline.partitions[0].clock.watermark > NOW


def test_the_tick_key_is_created_once_owner_only_and_shared(tmp_path: Path) -> None:
    first = pipeline_at(tmp_path / "data")
    second = pipeline_at(tmp_path / "data")
    assert first.tick_key == second.tick_key and len(first.tick_key) == 64
    assert (tmp_path / "data" / "tick.key").stat().st_mode & 0o777 == 0o600
    given_key = pipeline_at(tmp_path / "other", tick_key="k" * 40)
    assert given_key.tick_key == b"k" * 40
    assert not (tmp_path / "other" / "tick.key").exists()


# --- finding 2: producer clocks ---------------------------------------------------------------

@hsettings(max_examples=25, deadline=None, suppress_health_check=FIXTURE_OK)
@given(ahead_s=st.floats(0, 10 * 365 * 86_400), same_record_time=st.booleans(),
       lag_s=st.floats(0, 600))
def test_a_producer_clock_ahead_never_makes_another_users_recent_event_late(
    tmp_path: Path, ahead_s: float, same_record_time: bool, lag_s: float
) -> None:
    """Client A's event (and maybe its record time) ahead of the broker by any amount, then
    client B's event 20 s old, within the grace (30 s); the worker reads both ``lag_s`` after
    they were appended, after a worker tick. B's event is accepted: A moved the clock no
    further than the tick allows."""
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    settings = Settings(data_dir=data_dir, partitions=2, metrics_port=0, grace_s=30,
                        tick_interval_s=1)
    pipeline = Pipeline(settings, MemoryStore(), clock_ms=lambda: NOW_MS + int(lag_s * 1000))
    feed = Feed(pipeline)
    feed.send(None, sign_tick(pipeline.tick_key, TOPIC, 0, NOW_MS - 500))
    skewed = NOW + timedelta(seconds=ahead_s)
    record_ms = int(skewed.timestamp() * 1000) if same_record_time else NOW_MS
    feed.send(*message(ts=skewed, session_id="attacker", user_id="a"), timestamp_ms=record_ms)
    assert pipeline.partitions[0].clock.watermark <= NOW - timedelta(seconds=28)
    canary = message(ts=NOW - timedelta(seconds=20), session_id="canary", user_id="b")
    assert feed.send(*canary) == []
    assert pipeline.batch.counts["late"] == 0


# --- finding 3: poison sessions ---------------------------------------------------------------

class MeasuredStore(MemoryStore):
    """A state store that measures each slot's changelog record as the worker's Faust table
    encodes it (a ``str`` value through Faust's json codec)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def save(self, kafka_partition: int, clock: Clock,
             slots: dict[str, StoredSlot | None]) -> None:
        for slot in slots.values():
            if slot is not None:
                record = codecs.dumps("json", slot_to_json(slot))
                self.largest = max(self.largest, len(record))
        super().save(kafka_partition, clock, slots)


def accounted(data_dir: Path) -> int:
    """Messages the stored rows account for: events and duplicates in sessions, dead letters."""
    sessions = read_table(data_dir=data_dir, table="sessions").to_pylist()
    dead = read_table(data_dir=data_dir, table="dead_letters").num_rows
    return sum(s["n_events"] + s["n_duplicates"] for s in sessions) + dead


def impression(n: int, text: str, *, ts: datetime, session_id: str = "poison",
               event_id: str | None = None) -> tuple[bytes, bytes]:
    return message("impression", ts=ts, session_id=session_id, event_id=event_id or f"i{n}",
                   response_id=f"r{n}", prompt=text[:MAX_TEXT_CHARS],
                   response_text=text[:MAX_TEXT_CHARS])


def test_a_session_of_huge_impressions_closes_early_and_its_state_stays_checkpointable(
        tmp_path: Path) -> None:
    """The issue's case: 20 impressions of 66 KB in one session, the worker flushing every five
    messages; the largest changelog record stays under max_session_bytes (main: 1.3 MB, over the
    producer's 1 MB limit, and the worker crashed at every checkpoint)."""
    store = MeasuredStore()
    init_data_dir(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", partitions=2, metrics_port=0)
    pipeline = Pipeline(settings, store, clock_ms=lambda: NOW_MS)
    feed = Feed(pipeline)
    for n in range(20):
        feed.send(*impression(n, "x" * MAX_TEXT_CHARS, ts=NOW - timedelta(minutes=50)))
        if n % 5 == 4:
            flush_offline(pipeline)
    pipeline.tick_all(NOW_MS + 10**9)
    flush_offline(pipeline)
    assert 0 < store.largest <= settings.max_session_bytes
    assert accounted(settings.data_dir) == 20
    reasons = {s["close_reason"] for s in read_table(data_dir=settings.data_dir,
                                                       table="sessions").to_pylist()}
    assert "max_bytes" in reasons
    assert pipeline.metrics.value("prefstream_sessions_max_bytes_total", partition="0") > 0


texts = st.tuples(st.sampled_from(["x", "é", "語", "😀", '"', "\\", "\n"]),
                  st.integers(1, MAX_TEXT_CHARS)).map(lambda t: t[0] * t[1])


@pytest.mark.slow
@hsettings(max_examples=15, deadline=None, suppress_health_check=FIXTURE_OK)
@given(plan=st.lists(st.tuples(st.integers(0, 3), st.one_of(texts, st.none()), st.booleans()),
                     min_size=1, max_size=40),
       cap=st.integers(2, 30))
@example(plan=[(0, "\N{GRINNING FACE}" * 32741, False)], cap=2)  # found by CI: over the size
@example(plan=[(0, None, False), (0, "x" * 15105, False), (0, None, False), (0, "x", False),
               (0, "\N{GRINNING FACE}" * 1359, False), (0, "x", False)], cap=2)  # found by CI:
# groups of one event each, their own fields not counted, took the record 2 bytes over the bound
def test_no_session_outgrows_its_bound_and_every_message_is_accounted_for(
        tmp_path: Path, plan: list[tuple[int, str | None, bool]], cap: int) -> None:
    """Any mix of big and small events, re-sent copies and flushes, in one session at one time:
    no changelog record passes max_session_bytes, and every message is stored in exactly one
    session or dead-lettered with its reason."""
    data_dir = tmp_path / f"d{uuid.uuid4().hex[:6]}"
    init_data_dir(data_dir)
    settings = Settings(data_dir=data_dir, partitions=2, metrics_port=0,
                        max_session_bytes=64 * 1024, max_events_per_session=cap)
    store = MeasuredStore()
    pipeline = Pipeline(settings, store, clock_ms=lambda: NOW_MS)
    feed = Feed(pipeline)
    ts = NOW - timedelta(minutes=50)
    sent: list[tuple[bytes, bytes]] = []
    for n, (copy_of, text, flush) in enumerate(plan):
        msg = sent[copy_of % len(sent)] if text is None and sent else impression(
            n, text or "short", ts=ts)
        sent.append(msg)
        feed.send(*msg)
        if flush:
            flush_offline(pipeline)
    pipeline.tick_all(NOW_MS + 10**9)
    flush_offline(pipeline)
    assert store.largest <= settings.max_session_bytes
    assert accounted(data_dir) == len(plan)
    assert all(r.startswith("session_id: the state of session") or "was stored already" in r
               or "bytes over max_message_bytes" in r  # 4-byte characters: a message too big
               for r in feed.reasons())  # a copy of an event of a group closed and written


# --- finding 4: capped groups -----------------------------------------------------------------

def test_every_event_of_a_session_split_by_the_cap_in_one_millisecond_is_stored(
        tmp_path: Path) -> None:
    """The issue's case: 2,010 events of one session at one time, cap 500 (main stored 510)."""
    settings = Settings(data_dir=tmp_path / "data", partitions=2, metrics_port=0)
    init_data_dir(settings.data_dir)
    ts = NOW - timedelta(minutes=50)
    messages = [message("click", ts=ts, session_id="busy", event_id=f"c{n}", response_id="a")
                for n in range(2010)]
    replay(settings, kafka_records(messages, 2, NOW_MS), final_tick_ms=NOW_MS + 10**9)
    sessions = read_table(data_dir=settings.data_dir, table="sessions").to_pylist()
    assert sum(s["n_events"] for s in sessions) == 2010
    assert sorted(s["n_events"] for s in sessions) == [10, 500, 500, 500, 500]
    assert len({s["session_key"] for s in sessions}) == 5


@hsettings(max_examples=12, deadline=None, suppress_health_check=FIXTURE_OK)
@given(n=st.integers(2, 80), cap=st.integers(2, 12),
       times=st.lists(st.integers(0, 2), min_size=80, max_size=80))
def test_each_accepted_event_lands_in_exactly_one_stored_session(
        tmp_path: Path, n: int, cap: int, times: list[int]) -> None:
    data_dir = tmp_path / f"d{uuid.uuid4().hex[:6]}"
    settings = Settings(data_dir=data_dir, partitions=2, metrics_port=0,
                        max_events_per_session=cap)
    init_data_dir(data_dir)
    base = NOW - timedelta(minutes=50)
    messages = [message("click", ts=base + timedelta(milliseconds=times[i]), session_id="busy",
                        event_id=f"c{i}", response_id="a") for i in range(n)]
    replay(settings, kafka_records(messages, 2, NOW_MS), final_tick_ms=NOW_MS + 10**9)
    sessions = read_table(data_dir=data_dir, table="sessions").to_pylist()
    assert sum(s["n_events"] for s in sessions) == n


# --- finding 3: a worker stuck at one offset says so ------------------------------------------

def test_starts_at_the_same_offset_are_counted_across_restarts_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    counts = []
    for offset in (7, 7, 7, 9):  # a new worker process each time: a restart
        pipeline = pipeline_at(data_dir)
        pipeline.state(1, offset)
        counts.append(pipeline.metrics.value("prefstream_starts_at_same_offset", partition="1"))
    assert counts == [1, 2, 3, 1]
    stuck = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(stuck) == 1 and "start 3 in a row at offset 7" in stuck[0].getMessage()


# --- finding 5: ids re-used after their session was stored ------------------------------------

def test_an_id_reused_after_its_session_was_stored_is_refused_within_the_horizon(
        tmp_path: Path) -> None:
    """A session is stored and forgotten; its event ids come back with fresh times, in time:
    refused as duplicates of stored events, after a restart too, and accepted again only once
    the watermark passed the stored session's last event by the horizon."""
    init_data_dir(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", partitions=2, metrics_port=0,
                        dedupe_horizon_s=3600)
    wall = [NOW_MS]
    store = MemoryStore()
    first = Pipeline(settings, store, clock_ms=lambda: wall[0])
    feed = Feed(first)
    t = NOW - timedelta(minutes=40)
    original = [message("copy", ts=t, session_id="s", event_id=f"e{n}") for n in range(3)]
    for m in original:
        feed.send(*m)
    first.tick_all(NOW_MS + 60_000)  # idle: watermark NOW - 4 min, past t + gap: stored
    flush_offline(first)
    assert first.partitions[0].slots == {}
    again = [message("copy", ts=NOW - timedelta(minutes=1), session_id="s", event_id=f"e{n}")
             for n in range(3)]
    for m in again[:2]:
        assert len(feed.send(*m)) == 1
    assert len(feed.reasons()) == 2 and all("was stored already" in r for r in feed.reasons())
    assert first.metrics.value("prefstream_stored_duplicates_total", partition="0") == 2
    flush_offline(first)
    kept = [p for p in (tmp_path / "data").rglob("*") if "dedupe" in p.parts]
    assert kept and {p.stat().st_mode & 0o777 for p in kept} == {0o700, 0o600}

    restarted = Pipeline(settings, store, clock_ms=lambda: wall[0])  # state from the changelog
    feed2 = Feed(restarted)
    feed2.offsets = feed.offsets
    assert len(feed2.send(*again[2])) == 1  # stored ids count after a restart
    feed2.offsets[0] = 0  # the original records read again (a replay): never refused as stored
    for m in original:
        feed2.send(*m)
    assert sum("was stored already" in r for r in feed2.reasons()) == 1

    wall[0] = NOW_MS + 40 * 60_000
    restarted.tick_all(wall[0] + 60_000)  # watermark NOW + 36 min: past t + 1 h
    later = message("copy", ts=NOW + timedelta(minutes=38), session_id="s", event_id="e0")
    assert feed2.send(*later, timestamp_ms=wall[0]) == []
    assert restarted.batch.counts["accepted"] == 1
