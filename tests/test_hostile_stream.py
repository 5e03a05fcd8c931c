"""Messages that pass the schema but attack the stream (docs/hostile-input.md): forged ticks,
producer clocks, poison sessions, colliding keys, re-used ids, mismatched requests; each against
the real pipeline over a real data dir, without a broker."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from factories import event
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from prefstream.settings import Settings
from schemas.events import MAX_WALL_MS
from storage.files import init_data_dir
from streams.pipeline import MemoryStore, Pipeline, SideMessage
from streams.ticks import sign_tick, tick_key

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


@hsettings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
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

@hsettings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(ahead_s=st.floats(0, 10 * 365 * 86_400), same_record_time=st.booleans())
def test_a_producer_clock_ahead_never_makes_another_users_recent_event_late(
    tmp_path: Path, ahead_s: float, same_record_time: bool
) -> None:
    """Client A's event and record time ahead of the worker by any amount; client B's event
    30 s old, within the grace: B's event is accepted, and A's clock moved no watermark."""
    pipeline = pipeline_at(tmp_path / "data")
    feed = Feed(pipeline)
    skewed = NOW + timedelta(seconds=ahead_s)
    record_ms = int(skewed.timestamp() * 1000) if same_record_time else NOW_MS
    feed.send(*message(ts=skewed, session_id="attacker", user_id="a"), timestamp_ms=record_ms)
    assert pipeline.partitions[0].clock.watermark <= NOW - timedelta(seconds=300)
    canary = message(ts=NOW - timedelta(seconds=30), session_id="canary", user_id="b")
    assert feed.send(*canary) == []
    assert pipeline.batch.counts["accepted"] == 1 + (ahead_s <= 300)
