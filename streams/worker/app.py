"""The Faust app's wiring: topics, the session table, one agent, the flush timer and the
watermark ticker. The durability protocol is :class:`~prefstream.streams.worker.flush.Flusher`'s
(rows -> changelog -> offsets), the rebalance handling
:class:`~prefstream.streams.worker.rebalance.Rebalance`'s.

The agent reads raw bytes (Faust would commit and drop undecodable messages before our code saw
them), hands each batch of records to the :class:`~streams.worker.pipeline.Pipeline` (in this
process, or with ``pipeline_process`` in a process of its own:
:mod:`~prefstream.streams.worker.offload`), and acknowledges offsets only after a flush made the
batch durable: at-least-once delivery, idempotent rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime
from typing import Any

import faust
from faust.types import TP

from prefstream.settings import Settings
from prefstream.streams import metrics
from prefstream.streams.core.compact import OpenSlot, StoredSlot
from prefstream.streams.core.compact_record import slot_from_json, slot_to_json
from prefstream.streams.core.sessionize import Clock
from prefstream.streams.worker import crashpoints
from prefstream.streams.worker.consumer import App
from prefstream.streams.worker.flush import Flusher
from prefstream.streams.worker.offload import (
    Record,
    RemoteFlusher,
    RemotePipeline,
    force_exit_later,
)
from prefstream.streams.worker.offsetguard import DROP, HANDLE
from prefstream.streams.worker.pipeline import Pipeline, SideMessage
from prefstream.streams.worker.rebalance import Rebalance
from prefstream.streams.worker.ticks import sign_tick

log = logging.getLogger(__name__)

CLOCK_KEY = "__clock__:{}"
CHANGELOG_CHUNK = 2_000  # changelog records in flight at once (see TableStore.wait_sent)
MARK_KEY = "__mark__:{}"  # ends a checkpoint in its changelog partition


class TableStore:
    """Session slots and clocks in a Faust table, written with an explicit changelog partition.

    Checkpoints happen at flush time, outside the event that triggered them, so the partition of
    every key is the Kafka partition its session lives in, never Faust's "current event".

    The table's in-memory data is not kept up to date: the pipeline holds the state, and the
    changelog is its durable copy. Faust fills the data at recovery, when it takes a partition
    over (from the changelog's start) and, for a partition it keeps across a rebalance, from
    where its last recovery stopped reading: each record written since is read back then. So a
    write here only drops the key's recovered value, no longer current, and the data holds the
    latest record of every key whenever :meth:`load` reads it (docs/operations.md, "State
    memory").
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        #: records saved and not sent yet: (changelog partition, key, slot, clock or None)
        self.queued: list[tuple[int, str, StoredSlot | Clock | None]] = []
        self.touched: set[int] = set()  # changelog partitions written since the last marker

    async def wait_sent(self) -> None:
        """Until every changelog record of the checkpoint is acknowledged, then end it with a
        marker record per changelog partition written.

        The marker goes out alone, in its own record batch, once the checkpoint is
        acknowledged: some brokers (Tansu) report a partition's end offset as the first offset
        of its last batch plus one, and Faust's recovery reads a changelog only up to that end,
        so without the marker a restarted worker could miss the tail of the last checkpoint
        (the clock is written last).

        Records go out ``CHANGELOG_CHUNK`` at a time, each chunk once the one before is
        acknowledged: a record in flight costs about 1 KB until then, and a checkpoint of 20,000
        sessions sent at once left that much in the allocator for good (docs/operations.md,
        "State memory").

        Records go to the Kafka producer directly, encoded as the table would (``prepare_key``
        and ``prepare_value`` of its changelog topic): through the table they would queue in
        Faust's producer buffer, and Faust's conductor holds every fetched message back while
        that buffer holds over 100 (logging "producer buffer full" for each).
        """
        queued, self.queued = self.queued, []
        for start in range(0, len(queued), CHANGELOG_CHUNK):
            await asyncio.gather(*[await self._send(p, key, self._record(value))
                                   for p, key, value in queued[start:start + CHANGELOG_CHUNK]])
        if queued:
            crashpoints.reach("changelog")
        touched, self.touched = sorted(self.touched), set()
        if touched:
            await asyncio.gather(*[await self._send(p, MARK_KEY.format(p), "1") for p in touched])

    def load(self, kafka_partition: int) -> tuple[Clock | None, list[tuple[str, StoredSlot]]]:
        clock = None
        slots = []
        for key, value in list(self.table.data.items()):
            key = key.decode() if isinstance(key, bytes) else key
            if value is None:
                continue
            if key == CLOCK_KEY.format(kafka_partition):
                clock = _clock_from_json(value)
            elif not key.startswith("__"):
                slot = slot_from_json(value, key)
                if _slot_partition(slot) == kafka_partition:
                    slots.append((key, slot))
        return clock, slots

    def save(self, kafka_partition: int, clock: Clock,
             slots: dict[str, StoredSlot | None]) -> None:
        """Queue the slots, then the clock, for :meth:`wait_sent` (values are immutable)."""
        for key, slot in slots.items():
            self._put(kafka_partition, key, slot)
        self._put(kafka_partition, CLOCK_KEY.format(kafka_partition), clock)

    def _put(self, partition: int, key: str, value: StoredSlot | Clock | None) -> None:
        self.table.data.pop(key, None)  # a recovered value, no longer current (see above)
        self.queued.append((partition, key, value))
        self.touched.add(partition)

    @staticmethod
    def _record(value: StoredSlot | Clock | None) -> str | None:
        if value is None:  # a tombstone: no value, as Faust itself sends deletions
            return None
        return _clock_to_json(value) if isinstance(value, Clock) else slot_to_json(value)

    async def _send(self, partition: int, key: str, record: str | None) -> Any:
        """Hand one changelog record to the producer; returns its acknowledgement."""
        topic = self.table.changelog_topic
        key_bytes, _ = topic.prepare_key(key, None)
        value_bytes = None if record is None else topic.prepare_value(record, None)[0]
        return await self.table.app.producer.send(topic.get_topic_name(), key_bytes,
                                                  value_bytes, partition, None, None)


def _slot_partition(slot: StoredSlot) -> int:
    if isinstance(slot, OpenSlot):
        return slot.kafka_partition
    session = slot.open if slot.open is not None else (*slot.pending, *slot.held)[0].session
    return session.kafka_partition


def _clock_to_json(clock: Clock) -> str:
    return json.dumps({"p": clock.kafka_partition, "max": clock.max_event_ts.isoformat(),
                       "wm": clock.watermark.isoformat(), "arr": clock.last_arrival_ms,
                       "tick": clock.last_tick_ms, "next": clock.next_offset})


def _clock_from_json(raw: bytes | str) -> Clock:
    d = json.loads(raw)
    return Clock(kafka_partition=d["p"], max_event_ts=datetime.fromisoformat(d["max"]),
                 watermark=datetime.fromisoformat(d["wm"]), last_arrival_ms=d["arr"],
                 last_tick_ms=d.get("tick", 0), next_offset=d.get("next", 0))


def create_app(settings: Settings) -> faust.App:
    """Build the worker's Faust app for one broker and data dir."""
    app = App(  # Faust's app with a cheaper per-message hand-off (see streams.worker.consumer)
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=settings.kafka_security().faust_credentials(),  # None = PLAINTEXT
        store="memory://",
        datadir=str(settings.data_dir / "faust"),  # Faust's own files, not in the cwd
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=1.0,
        # Faust checks that no changelog offset it already read is past the partition's end.
        # A worker killed between a checkpoint and its marker leaves a last record batch of
        # several records; brokers that report the end as that batch's first offset plus one
        # (Tansu) then fail the check for a standby that read the whole batch, and Faust's
        # recovery crashes the worker. The check guards RocksDB files left over from deleted
        # topics; the memory store has none, and reading on from the offset read is right.
        recovery_consistency_check=False,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        stream_wait_empty=False,
        # Faust's repaired Cython fast paths (opt-in in 0.15): the stream takes messages already
        # queued without awaiting the channel for each; measured about +9% events/s here
        cython_optimizations=True,
        # Faust pauses fetching a partition while its stream's buffer is full; with batches of
        # take_max_events, a buffer of a few batches keeps the fetcher going instead of pausing
        # and resuming it every batch (Faust's default is 4,096): measured +20-40% events/s in
        # one process, about 10 µs less CPU an event in the agent's process
        stream_buffer_maxsize=max(4096, 4 * settings.take_max_events),
    )
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    # acks=False: Faust keeps no ack bookkeeping for the events topic, so it never commits its
    # offsets on its own. Otherwise it could: its stream acks the messages it skips after a
    # rebalance (fetched in the previous generation), and its periodic commit commits acked
    # offsets although nothing handled them; the next owner would start past them.
    events = app.topic(settings.events_topic, partitions=settings.partitions, acks=False, **raw)
    side = {name: app.topic(name, partitions=1, **raw)
            for name in (settings.dead_letter_topic, settings.late_topic)}
    table = app.Table("sessions", default=None, partitions=settings.partitions,
                      key_type=str, value_type=str)
    crashpoints.arm()  # none unless a crash test asks; a bad value stops the worker here
    store = TableStore(table)

    async def send_side(messages: list[SideMessage]) -> None:
        for m in messages:
            await side[m.topic].send(key=m.key, value=m.value)

    pipeline: Pipeline | RemotePipeline
    if settings.pipeline_process:  # in a process of its own, fed whole batches (offload.py)
        async def pipeline_died(exc: BaseException) -> None:
            force_exit_later()  # never hang on a stop that waits for the dead process
            await app.crash(exc)

        pipeline = RemotePipeline(settings, store, send_side, pipeline_died,
                                  stopping=lambda: bool(app.should_stop))
        flusher: Flusher = RemoteFlusher(app, pipeline, store)  # type: ignore[arg-type]

        @app.task
        async def start_pipeline() -> None:  # while Faust joins the group and recovers
            await pipeline.start()  # type: ignore[union-attr]
    else:
        pipeline = Pipeline(settings, store)
        flusher = Flusher(app, pipeline, store)
    rebalance = Rebalance(app, settings, flusher)

    @app.agent(events, concurrency=1)
    async def process(stream: faust.StreamT) -> None:
        """Events in batches: Faust's per-event agent overhead is paid once per batch.

        ``noack_take`` yields the buffered events without acking them, so Faust never commits
        on its own (see ``Flusher.commit_offsets``).
        """
        events_in = stream.noack()

        def note_epoch(value: Any) -> Any:  # runs as each message enters the batch buffer
            event = events_in.current_event
            if event is not None:
                rebalance.fetched(event.message)
            return value

        events_in.add_processor(note_epoch)  # before the buffer's own processor
        behind = False  # whether the last batch was full: a backlog being read
        async for batch in events_in.noack_take(settings.take_max_events,
                                                within=settings.take_within_s):
            full = len(batch) >= settings.take_max_events
            async with flusher.lock:
                # a short batch after full ones: the backlog is read, flush without waiting
                # out flush_interval_s (docs/delivery.md, "When rows are written")
                await handle_batch(batch, caught_up=behind and not full)
            behind = full

    async def handle_batch(batch: list[Any], caught_up: bool = False) -> None:
        records: list[Record] = []
        stale = 0
        rewind: dict[TP, int] = {}
        for event in batch:
            msg = event.message
            if rebalance.stale(msg):
                stale += 1
                continue
            verdict = rebalance.guard.admit(msg.tp, msg.offset, time.monotonic())
            if verdict is not HANDLE:
                if verdict != DROP:
                    rewind[msg.tp] = verdict
                    log.warning("%s[%d]: offset %d came before %d..%d, which never reached "
                                "this worker (dropped by Faust around a rebalance): reading "
                                "from %d again", msg.topic, msg.partition, msg.offset, verdict,
                                msg.offset - 1, verdict)
                continue
            records.append((msg.topic, msg.partition, msg.offset, msg.key, msg.value,
                            int(msg.timestamp * 1000)))
            flusher.handled(msg.tp, msg.offset)
        if stale:
            log.info("dropped %d events fetched before the last rebalance: whoever owns "
                     "their partitions now reads them from the committed offsets", stale)
        for tp, offset in rewind.items():
            await rebalance.seek_back(tp, offset)
        if isinstance(pipeline, RemotePipeline):
            if records:  # the side records come back from the pipeline process on their own
                await pipeline.relay(records)
            crashpoints.reach("handle", len(batch))
        else:
            side_messages = [m for topic, partition, offset, key, value, ts_ms in records
                             for m in pipeline.handle(topic=topic, partition=partition,
                                                      offset=offset, key=key, value=value,
                                                      timestamp_ms=ts_ms)]
            crashpoints.reach("handle", len(batch))
            await send_side(side_messages)
        await flusher.flush_if_due(caught_up=caught_up)

    @app.timer(interval=min(0.25, settings.flush_interval_s / 4))
    async def flush_when_due() -> None:
        """A batch is due after ``flush_interval_s`` even when no further event arrives."""
        if pipeline.due() and not flusher.lock.locked() and not flusher.busy:
            async with flusher.lock:
                if pipeline.due():
                    await flusher.flush()

    @app.timer(interval=settings.tick_interval_s)
    async def tick() -> None:
        wall_ms = pipeline.wall_ms()
        for p in range(settings.partitions):
            value = sign_tick(pipeline.tick_key, settings.events_topic, p, wall_ms)
            await events.send(partition=p, value=value)

    @app.on_rebalance_complete.connect
    async def on_rebalanced(sender: Any, **kwargs: Any) -> None:
        await rebalance.on_assigned()

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        await rebalance.on_revoked(revoked)

    if settings.metrics_port:
        @app.task
        async def start_metrics() -> None:
            metrics.serve(pipeline.metrics.render, host=settings.metrics_host,
                          port=settings.metrics_port)

    app.pipeline = pipeline  # type: ignore[attr-defined]
    return app
