"""What the worker does with each message, apart from Faust: validate, sessionize, pair, batch.

:class:`Pipeline` turns raw Kafka records into session state changes and buffered rows; the Faust
agent (``streams/worker/app.py``) feeds it messages, and the worker's
:class:`~prefstream.streams.worker.flush.Flusher` makes a batch durable through its flush steps
(:meth:`Pipeline.start_flush`, :meth:`~Pipeline.take_checkpoint`, :meth:`~Pipeline.write_flush`,
:meth:`~Pipeline.save_checkpoint`, :meth:`~Pipeline.finish_flush`) before committing the offsets
it covers; :func:`flush_offline` runs the same steps for runs without Kafka.

Its size (~480 lines) is the one hot path kept whole: validation, sessionizing, pairing and
batching of a message share the per-message state and are read in one pass; the durability
steps around it are :class:`~prefstream.streams.worker.flush.Flusher`'s.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from prefstream.schemas.events import EVENT_ADAPTER, MAX_WALL_MS, FeedbackEvent
from prefstream.schemas.records import ClosedSession, DeadLetter, LateEvent
from prefstream.settings import Settings
from prefstream.storage.compact import compact_after_flush
from prefstream.storage.files import IdIndex, Watermark, seal_ready, write_rows, write_watermark
from prefstream.storage.ids import StoredIds
from prefstream.storage.partitions import partition_for, stamp
from prefstream.storage.starts import StartLog
from prefstream.storage.tables import release_free_memory
from prefstream.streams.core.compact import StoredSlot
from prefstream.streams.core.outputs import pseudonym, scrub_event, scrub_raw, session_rows
from prefstream.streams.core.pairing import session_to_pairs
from prefstream.streams.core.sessionize import EPOCH, Clock, state_bytes
from prefstream.streams.core.state import PartitionSessions
from prefstream.streams.metrics import Metrics
from prefstream.streams.worker import crashpoints
from prefstream.streams.worker.ticks import sign_tick, tick_key, verify_tick

log = logging.getLogger(__name__)

TICK_PREFIX = b'{"type":"_tick"'
RAW_PREVIEW_CHARS = 4096
MAX_REASON_CHARS = 500


@dataclass
class SideMessage:
    """A record for the dead-letter or late-event topic."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass
class Batch:
    rows: dict[str, list[BaseModel]] = field(default_factory=lambda: defaultdict(list))
    counts: Counter[str] = field(default_factory=Counter)
    applied: dict[int, int] = field(default_factory=dict)  # kafka partition -> last offset
    first_dead_letter: str = ""  # where the first dead letter came from, and why


#: per Kafka partition: its clock and the slots changed since the last checkpoint (None: gone)
Checkpoint = list[tuple[int, Clock, dict[str, StoredSlot | None]]]


@dataclass
class FlushJob:
    """What one flush writes, taken from the state at one moment (``Pipeline.start_flush``)."""

    batch: Batch
    closed: list[ClosedSession] = field(default_factory=list)
    #: per Kafka partition, the pending groups of each session as the job took them
    written: dict[int, dict[str, tuple[ClosedSession, ...]]] = field(default_factory=dict)
    marks: list[Watermark] = field(default_factory=list)
    #: per Kafka partition: the watermark as the job was taken, and the stored ids it wrote
    watermarks: dict[int, datetime] = field(default_factory=dict)
    stored_ids: dict[int, Any] = field(default_factory=dict)


class StateStore(Protocol):
    """Where partition state is persisted (the Faust table in the worker)."""

    def load(self, kafka_partition: int) -> tuple[Clock | None, list[tuple[str, StoredSlot]]]:
        ...

    def save(self, kafka_partition: int, clock: Clock,
             slots: dict[str, StoredSlot | None]) -> None:
        ...


def describe_error(exc: ValidationError) -> str:
    """One line naming each failing field, short enough for a dead-letter record (pydantic echoes
    an unknown type tag and names unknown fields: a hostile message controls their length)."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)[:MAX_REASON_CHARS]


def flush_due(settings: Settings, events_since_flush: int, last_flush: float, *,
              caught_up: bool = False) -> bool:
    """Whether a flush is due: ``flush_max_events`` events, or events waiting since the last
    flush (``time.monotonic()`` then) for ``flush_interval_s``, or events waiting when the
    worker just ``caught_up`` with a backlog (nothing more to read now: waiting out the
    interval would only delay the rows; see docs/delivery.md)."""
    if events_since_flush >= settings.flush_max_events:
        return True
    if not events_since_flush:
        return False
    return caught_up or time.monotonic() - last_flush >= settings.flush_interval_s


def arrival_time(timestamp_ms: int) -> datetime | None:
    """A Kafka record timestamp as a time; None when bogus: before the epoch or from
    ``MAX_WALL_MS`` on (a producer may set any 64-bit value)."""
    if not 0 <= timestamp_ms < MAX_WALL_MS:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc)


class Pipeline:
    def __init__(self, settings: Settings, store: StateStore,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.rules = settings.session_rules()
        self.store = store
        self.partitions: dict[int, PartitionSessions] = {}
        # per Kafka partition, the offset a restart would read from: the first one handled
        # after taking the partition over, then each committed offset
        self.resume_offsets: dict[int, int] = {}
        self.batch = Batch()
        self._events_since_flush = 0
        self._last_flush = time.monotonic()
        self._wall_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.metrics = Metrics()
        self.stored = IdIndex(settings.data_dir)
        self.tick_key = tick_key(settings)
        self.starts = StartLog(settings.data_dir)
        self.stored_ids = StoredIds(settings.data_dir,
                                    timedelta(seconds=settings.dedupe_horizon_s))
        self._max_future = timedelta(seconds=settings.max_future_s)  # once, not per event

    # -- state per Kafka partition -------------------------------------------------------
    def state(self, kafka_partition: int, offset: int | None = None) -> PartitionSessions:
        if kafka_partition not in self.partitions:
            clock, slots = self.store.load(kafka_partition)
            clock = clock or Clock(kafka_partition=kafka_partition)
            self.stored_ids.load(kafka_partition)
            self.partitions[kafka_partition] = PartitionSessions(
                clock, self.rules, slots, max_open=self.settings.max_open_sessions)
            if offset is not None:
                self.resume_offsets[kafka_partition] = offset
                n = self.starts.started(kafka_partition, offset)
                self.metrics.set("prefstream_starts_at_same_offset", n,
                                 partition=str(kafka_partition))
            log.info("partition %d: recovered %d session slots, watermark %s; reading from "
                     "offset %s", kafka_partition, len(slots), clock.watermark.isoformat(), offset)
        return self.partitions[kafka_partition]

    def revoke(self, kafka_partitions: Iterable[int]) -> None:
        """Drop state of partitions this worker no longer owns (their new owner replays)."""
        for p in kafka_partitions:
            self.partitions.pop(p, None)
            self.resume_offsets.pop(p, None)
            self.stored_ids.drop(p)
        # Another worker may write the same hours while the partition is away: reload ids.
        self.stored = IdIndex(self.settings.data_dir)

    # -- one message ---------------------------------------------------------------------
    def handle(self, *, topic: str, partition: int, offset: int, key: bytes | None,
               value: bytes | None, timestamp_ms: int) -> list[SideMessage]:
        """Apply one record; returns records for the dead-letter / late topics.

        Never raises for a message: even a bug in the rules sets that one message aside (with
        the exception as its reason) instead of stopping the stream.
        """
        try:
            return self._handle(topic, partition, offset, key, value, timestamp_ms)
        except Exception as exc:
            log.exception("internal error on %s[%d]@%d", topic, partition, offset)
            return [self._dead_letter(topic, partition, offset, key, value or b"",
                                      f"internal error: {exc!r}"[:MAX_REASON_CHARS],
                                      timestamp_ms)]

    def _handle(self, topic: str, partition: int, offset: int, key: bytes | None,
                value: bytes | None, timestamp_ms: int) -> list[SideMessage]:
        state = self.state(partition, offset)
        self.batch.applied[partition] = offset
        self._events_since_flush += 1
        raw = value or b""
        # A producer sets its record timestamps: they count only up to this worker's clock, so
        # a client clock ahead of it moves neither the clock of the partition nor the
        # future-time bound (see docs/hostile-input.md).
        arrival_ms = timestamp_ms  # a bogus one stays bogus: dead-lettered as such
        if 0 <= timestamp_ms < MAX_WALL_MS:  # arrival_time's range, without a datetime per event
            arrival_ms = min(timestamp_ms, self._wall_ms())
        if raw.startswith(TICK_PREFIX):
            wall_ms, reason = verify_tick(self.tick_key, topic, partition, raw)
            if wall_ms is not None:
                state.on_tick(wall_ms)
                return []
            return [self._dead_letter(topic, partition, offset, key, raw, reason, arrival_ms)]
        event, reason = self._validate(raw, key, arrival_ms)
        if event is not None:
            reason = self._stored_duplicate(state, event, partition, offset)
        if event is None or reason:
            return [self._dead_letter(topic, partition, offset, key, raw, reason, arrival_ms)]
        outcome = state.on_event(event, offset=offset, arrival_ms=arrival_ms,
                                 size=state_bytes(raw))
        if outcome == "oversized":
            reason = (f"session_id: the state of session {event.session_id} would exceed "
                      f"max_session_bytes={self.settings.max_session_bytes}: refused until its "
                      "closed groups are written (see docs/hostile-input.md)")
            return [self._dead_letter(topic, partition, offset, key, raw, reason, arrival_ms)]
        self.batch.counts[outcome] += 1
        self.metrics.inc("prefstream_events_total", outcome=outcome)
        if outcome == "late":
            return [self._late(event, state.clock, partition, offset, raw, arrival_ms)]
        return []

    def _validate(self, raw: bytes, key: bytes | None,
                  timestamp_ms: int) -> tuple[FeedbackEvent | None, str]:
        if not raw:
            return None, "empty message"
        if len(raw) > self.settings.max_message_bytes:
            return None, f"message of {len(raw)} bytes over max_message_bytes"
        try:
            event = EVENT_ADAPTER.validate_json(raw)
        except ValidationError as exc:
            return None, describe_error(exc)
        arrival = arrival_time(timestamp_ms)
        if arrival is None:
            return None, f"timestamp: Kafka record timestamp {timestamp_ms} ms is out of range"
        if event.ts > arrival + self._max_future:
            return None, f"ts: {event.ts.isoformat()} is in the future of arrival {arrival}"
        if key is None:  # Kafka spreads unkeyed messages: the session would be split
            return None, "key: message has no key; it must be keyed by session_id"
        if key != event.session_id.encode():
            return None, "key: message key differs from session_id (breaks co-partitioning)"
        if self.settings.pseudonym_key is not None:  # before state: no raw user id is kept
            event = event.model_copy(
                update={"user_id": pseudonym(event.user_id, self.settings.pseudonym_key)})
        return event, ""

    def _stored_duplicate(self, state: PartitionSessions, event: FeedbackEvent, partition: int,
                          offset: int) -> str:
        """Why ``event`` is refused as a re-used id of a stored event ("" if it is not): not
        late, not in the state, its id stored within the dedupe horizon at another offset."""
        at = self.stored_ids.stored_at(partition, event.session_id, event.event_id,
                                       state.clock.watermark)
        if at is None or at == offset:  # the same record read again replays what was stored
            return ""
        if state.clock.is_late(event.ts) or state.holds(event.session_id, event.event_id):
            return ""  # the session rules decide: late, or a duplicate counted on its session
        self.metrics.inc("prefstream_stored_duplicates_total", partition=str(partition))
        return (f"event_id: {event.event_id} of session {event.session_id} was stored already "
                f"(read at offset {at}); ids are kept dedupe_horizon_s="
                f"{self.settings.dedupe_horizon_s:g} after their session's last event")

    def _dead_letter(self, topic: str, partition: int, offset: int, key: bytes | None,
                     raw: bytes, reason: str, timestamp_ms: int) -> SideMessage:
        coords = f"{topic}[{partition}]@{offset}"
        log.debug("dead letter %s: %s", coords, reason)  # a warning per flush sums them up
        if not self.batch.counts["dead_letter"]:
            self.batch.first_dead_letter = f"{coords}: {reason}"
        received = arrival_time(timestamp_ms) or EPOCH  # a bogus record timestamp: unknown
        preview = scrub_raw(raw, pseudonym_key=self.settings.pseudonym_key,
                            text_storage=self.settings.text_storage, limit=RAW_PREVIEW_CHARS)
        row = DeadLetter(dead_letter_id=coords, topic=topic, kafka_partition=partition,
                         offset=offset, reason=reason, raw=preview, received_at=received,
                         partition=self._arrival_partition(received))
        self.batch.rows["dead_letters"].append(row)
        self.batch.counts["dead_letter"] += 1
        self.metrics.inc("prefstream_events_total", outcome="dead_letter")
        payload = {"source": coords, "reason": reason, "raw": preview}
        return SideMessage(self.settings.dead_letter_topic, key, json.dumps(payload).encode())

    def _late(self, event: FeedbackEvent, clock: Clock, partition: int, offset: int, raw: bytes,
              timestamp_ms: int) -> SideMessage:
        if self.settings.pseudonym_key is not None or self.settings.text_storage != "full":
            raw = scrub_event(event, self.settings.text_storage)  # user id: pseudonym already
        received = datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc)
        row = LateEvent(late_id=f"{self.settings.events_topic}[{partition}]@{offset}",
                        event_id=event.event_id, session_id=event.session_id,
                        event_type=event.type, ts=event.ts, watermark=clock.watermark,
                        kafka_partition=partition, offset=offset, raw=raw.decode(errors="replace"),
                        received_at=received,
                        partition=self._arrival_partition(received))
        self.batch.rows["late_events"].append(row)
        return SideMessage(self.settings.late_topic, event.session_id.encode(), raw)

    def _arrival_partition(self, received: datetime) -> str:
        """Where a dead letter or late event is stored: the hour it arrived (so late rows never
        touch a sealed partition)."""
        return partition_for(received, hours=self.settings.partition_hours)

    # -- batches -------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Events handled since the last flush started."""
        return self._events_since_flush

    def due(self, *, caught_up: bool = False) -> bool:
        return flush_due(self.settings, self._events_since_flush, self._last_flush,
                         caught_up=caught_up)

    def start_flush(self) -> FlushJob:
        """Take the batch and the closed sessions to write, as of now; a new batch starts.

        Runs on the event loop. The job holds only immutable values, so :meth:`write_flush`
        may run in a thread while the stream goes on handling events; :meth:`finish_flush`
        then forgets exactly the sessions the job wrote.
        """
        batch, self.batch = self.batch, Batch()
        job = FlushJob(batch)
        for p, state in self.partitions.items():
            groups = state.pending_groups()
            job.written[p] = groups
            job.closed += [c for sid in sorted(groups) for c in groups[sid]]
        for p, offset in batch.applied.items():
            state = self.partitions.get(p)
            if state is not None:
                job.marks.append(Watermark(p, state.clock.watermark, offset, state.unfinished))
        job.watermarks = {p: state.clock.watermark for p, state in self.partitions.items()}
        self._count_state(batch)  # once: it takes the evictions counted since the last flush
        if n := batch.counts["dead_letter"]:  # one line per flush: a flood must not flood the log
            log.warning("%d messages set aside as dead letters since the last flush (in %s and "
                        "the dead_letters table, each with its reason); the first: %s", n,
                        self.settings.dead_letter_topic, batch.first_dead_letter)
        self._events_since_flush = 0
        self._last_flush = time.monotonic()
        return job

    def write_flush(self, job: FlushJob) -> Batch:
        """Pair the job's closed sessions, stamp their rows' storage partition (the hour of the
        session's last event) and write every row durably, then the watermarks; seal and compact
        what is due. Only files are touched here (it runs in a worker thread), never Kafka or
        the session state."""
        batch = job.batch
        hours = self.settings.partition_hours
        for closed in job.closed:
            result = session_to_pairs(closed, self.settings.rules)
            part = partition_for(closed.session.last, hours=hours)
            for table, rows in session_rows(closed, result,
                                            text_storage=self.settings.text_storage).items():
                batch.rows[table] += stamp(rows, part)
        data_dir = self.settings.data_dir
        for table, rows in batch.rows.items():
            if rows:
                write_rows(data_dir=data_dir, table=table, rows=rows, index=self.stored)
                crashpoints.reach("write")
                # the flush's log line says what it stored: a session closed by a tick alone
                # (no event in the batch) is stored by a flush that accepted nothing
                batch.counts[f"stored_{table}"] += len(rows)
        job.stored_ids = self.stored_ids.write(job.closed, job.watermarks)
        self._count_rows(batch)  # before the watermark files: they tell readers we are done
        for mark in job.marks:
            write_watermark(data_dir=data_dir, mark=mark)
        sealed = seal_ready(data_dir=data_dir, n_kafka_partitions=self.settings.partitions,
                            gap=self.rules.gap, hours=hours)
        compact_after_flush(data_dir=data_dir, sealed=sealed, written=batch.rows,
                            max_files=self.settings.compaction_max_files,
                            grace=timedelta(seconds=self.settings.compaction_grace_s))
        batch.counts["sealed"] += len(sealed)
        self.metrics.inc("prefstream_flushes_total")
        self.metrics.inc("prefstream_partitions_sealed_total", len(sealed))
        if sealed:
            release_free_memory()
        return batch

    def finish_flush(self, job: FlushJob, committed: dict[int, int]) -> None:
        """After the job's rows are durable and ``committed`` (next offset per Kafka partition)
        is: forget the sessions the job wrote (but those a restart would still replay events of,
        see :meth:`PartitionSessions.forget_flushed`); sessions closed since it started stay, to
        be written by the next one."""
        self.resume_offsets.update(committed)
        self.stored_ids.remember(job.stored_ids, job.watermarks)  # before their sessions go
        for p, state in self.partitions.items():
            state.forget_flushed(self.resume_offsets.get(p), written=job.written.get(p, {}))

    def _count_rows(self, batch: Batch) -> None:
        m = self.metrics
        for table, rows in batch.rows.items():
            m.inc("prefstream_rows_total", len(rows), table=table)
        for pair in batch.rows.get("pairs", []):
            m.inc("prefstream_pairs_total", rule=pair.rule)  # type: ignore[attr-defined]
        for refusal in batch.rows.get("refusals", []):
            m.inc("prefstream_refusals_total", reason=refusal.reason)  # type: ignore[attr-defined]

    def _count_state(self, batch: Batch) -> None:
        m = self.metrics
        evicted: dict[int, int] = {}
        for p, state in list(self.partitions.items()):
            m.set("prefstream_sessions_open", state.open_sessions, partition=str(p))
            m.set("prefstream_watermark_seconds", state.clock.watermark.timestamp(),
                  partition=str(p))
            if n := state.take_over_bytes():
                batch.counts["closed_max_bytes"] += n
                m.inc("prefstream_sessions_max_bytes_total", n, partition=str(p))
            if n := state.take_evicted():
                evicted[p] = n
                m.inc("prefstream_sessions_evicted_total", n, partition=str(p))
        if evicted:  # one line per flush, not one per session: a flood must not flood the log
            batch.counts["evicted"] += sum(evicted.values())
            log.warning("%d open sessions closed early (evicted) since the last flush, by Kafka "
                        "partition %s: over max_open_sessions=%d", sum(evicted.values()),
                        evicted, self.settings.max_open_sessions)

    def take_checkpoint(self) -> Checkpoint:
        """The clocks and the slots changed since the last one, as of now (immutable values):
        the worker takes it with a flush's job and saves it once that job's rows are durable."""
        return [(p, state.clock, state.take_dirty()) for p, state in self.partitions.items()]

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Persist a checkpoint taken earlier. Never before the rows up to it are durable: a
        restart would go on from this state, and late events read again between the commit
        and it would be recorded with its watermark instead of the one they met first."""
        for p, clock, dirty in checkpoint:
            self.store.save(p, clock, dirty)

    def wall_ms(self) -> int:
        return self._wall_ms()

    # -- runs without Kafka (replays, references) -----------------------------------------
    def tick_all(self, wall_ms: int) -> None:
        """A watermark tick on every partition at ``wall_ms``, as the worker's timer sends."""
        topic = self.settings.events_topic
        for p in range(self.settings.partitions):
            self.handle(topic=topic, partition=p, offset=1 << 40, key=None,
                        value=sign_tick(self.tick_key, topic, p, wall_ms), timestamp_ms=wall_ms)


class MemoryStore:
    """A StateStore in a dict: for running the pipeline without Kafka (replays, references)."""

    def __init__(self) -> None:
        self.clocks: dict[int, Clock] = {}
        self.slots: dict[int, dict[str, StoredSlot]] = defaultdict(dict)

    def load(self, kafka_partition: int) -> tuple[Clock | None, list[tuple[str, StoredSlot]]]:
        return self.clocks.get(kafka_partition), list(self.slots[kafka_partition].items())

    def save(self, kafka_partition: int, clock: Clock,
             slots: dict[str, StoredSlot | None]) -> None:
        self.clocks[kafka_partition] = clock
        for key, slot in slots.items():
            if slot is None:
                self.slots[kafka_partition].pop(key, None)
            else:
                self.slots[kafka_partition][key] = slot


def replay(settings: Settings, records: Iterable[tuple[int, int, bytes | None, bytes, int]],
           *, final_tick_ms: int) -> list[SideMessage]:
    """Run ``(partition, offset, key, value, timestamp_ms)`` records through a fresh pipeline
    into ``settings.data_dir``, then tick every partition at ``final_tick_ms`` and flush.

    Returns the dead-letter and late-event messages the worker would have sent.
    """
    pipeline = Pipeline(settings, MemoryStore())
    side: list[SideMessage] = []
    for partition, offset, key, value, ts_ms in records:
        side += pipeline.handle(topic=settings.events_topic, partition=partition, offset=offset,
                                key=key, value=value, timestamp_ms=ts_ms)
    pipeline.tick_all(final_tick_ms)
    flush_offline(pipeline)
    return side


def flush_offline(pipeline: Pipeline, committed: dict[int, int] | None = None) -> Batch:
    """The worker's flush, its steps in the worker's order, with no Kafka to wait for (replays,
    references): take the job and the checkpoint, write the rows, save the checkpoint, then
    forget as after a commit of ``committed`` (next offset per Kafka partition; ``None``: every
    record the job covers, as a replay has nothing left to read again)."""
    job = pipeline.start_flush()
    checkpoint = pipeline.take_checkpoint()
    batch = pipeline.write_flush(job)
    pipeline.save_checkpoint(checkpoint)
    if committed is None:
        committed = {p: offset + 1 for p, offset in job.batch.applied.items()}
    pipeline.finish_flush(job, committed)
    return batch
