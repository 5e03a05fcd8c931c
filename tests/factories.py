"""Small builders for test data: feedback events and stored rows with every field filled.

Times are given in minutes after ``T0`` so session gaps read naturally (``event(minute=31)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from itertools import count
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from prefstream.schemas.events import EVENT_ADAPTER, FeedbackEvent
from prefstream.schemas.records import Pair, SessionSummary
from prefstream.storage.partitions import partition_for

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
_ids = count()


def at(minute: float = 0.0) -> datetime:
    """``T0`` plus ``minute`` minutes."""
    return T0 + timedelta(minutes=minute)


def event(
    kind: str = "copy",
    *,
    minute: float = 0.0,
    event_id: str | None = None,
    session_id: str = "s1",
    user_id: str = "u1",
    request_id: str = "q1",
    response_id: str = "a",
    **fields: Any,
) -> FeedbackEvent:
    """A validated event of any type at ``at(minute)``; ``fields`` override the type's defaults."""
    data: dict[str, Any] = dict(
        type=kind, event_id=event_id or f"e{next(_ids)}", session_id=session_id,
        user_id=user_id, request_id=request_id, ts=at(minute),
    )
    if kind == "impression":
        data |= dict(prompt="How do I sort a list?", response_text=f"answer {response_id}",
                     position=0, model_version="m1")
    elif kind == "click":
        data["dwell_ms"] = 5_000
    elif kind == "edit":
        data["edited_text"] = "edited answer"
    elif kind == "reformulate":
        data |= dict(prompt="How do I sort a list in Python?", previous_request_id="q0")
    if kind not in ("reformulate", "session_end"):
        data["response_id"] = response_id
    return EVENT_ADAPTER.validate_python(data | fields)


def pair(pair_id: str = "p1", *, minute: float = 0.0, **fields: Any) -> Pair:
    """A stored pair whose ``partition`` is the hour of ``at(minute)`` unless given."""
    ts = at(minute)
    data: dict[str, Any] = dict(
        pair_id=pair_id, rule="copy_vs_skip", rules=("copy_vs_skip",), confidence=0.8,
        propensity_weight=1.0, prompt="How do I sort a list?", chosen="sorted(xs)",
        rejected="use a loop", session_id="s1", user_id="u1", request_id="q1",
        rejected_request_id="q1", chosen_response_id="a", rejected_response_id="b",
        chosen_model="m1", rejected_model="m1", chosen_position=1, rejected_position=0,
        event_time=ts, session_start=ts, session_end=ts, partition=partition_for(ts),
    )
    return Pair(**(data | fields))


def session_row(session_key: str = "s1@0", *, minute: float = 0.0, **fields: Any) -> SessionSummary:
    """A stored session summary whose ``partition`` is the hour of ``at(minute)`` unless given."""
    ts = at(minute)
    data: dict[str, Any] = dict(
        session_key=session_key, session_id="s1", user_id="u1", kafka_partition=0, start=ts,
        end=ts, close_reason="gap", n_events=3, n_duplicates=0, n_requests=1, n_impressions=2,
        n_candidates=1, n_pairs=1, n_ties=0, n_unpaired=0, n_refusals=0,
        partition=partition_for(ts),
    )
    return SessionSummary(**(data | fields))


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed message."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def kafka_records(messages: Iterable[tuple[bytes, bytes]], partitions: int, timestamp_ms: int
                  ) -> list[tuple[int, int, bytes, bytes, int]]:
    """``(partition, offset, key, value, timestamp_ms)`` records for
    ``streams.worker.pipeline.replay``:
    keyed messages partitioned as the producer does, offsets counted per partition."""
    offsets = [0] * partitions
    records = []
    for key, value in messages:
        p = kafka_partition(key, partitions)
        records.append((p, offsets[p], key, value, timestamp_ms))
        offsets[p] += 1
    return records


def read_records(bootstrap: str, topic: str, **config: object) -> list[Any]:
    """Every record of ``topic`` from the beginning, partition after partition."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=3000, **config)
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = list(consumer)
    consumer.close()
    return records


def read_all(bootstrap: str, topic: str, **config: object) -> list[bytes]:
    """The values of every record of ``topic``, as ``read_records`` reads them."""
    return [r.value for r in read_records(bootstrap, topic, **config)]
