"""The Faust app: topics, the session table, one agent and the watermark ticker.

The agent reads raw bytes (Faust would commit and drop undecodable messages before our code saw
them), hands each record to the :class:`~streams.worker.pipeline.Pipeline`, and acknowledges offsets
only after a flush made the batch durable: at-least-once delivery, idempotent rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.types import TP

from prefstream.settings import Settings
from prefstream.streams import metrics
from prefstream.streams.core.sessionize import Clock, SessionSlot
from prefstream.streams.worker.consumer import App
from prefstream.streams.worker.crashpoints import CrashPoints
from prefstream.streams.worker.logwatch import LogWatch, TopicIds
from prefstream.streams.worker.offsetguard import DROP, HANDLE, OffsetGuard
from prefstream.streams.worker.pipeline import Checkpoint, FlushJob, Pipeline, SideMessage
from prefstream.streams.worker.ticks import sign_tick

log = logging.getLogger(__name__)

CLOCK_KEY = "__clock__:{}"
MARK_KEY = "__mark__:{}"  # ends a checkpoint in its changelog partition
COMMIT_ATTEMPTS = 50


class TableStore:
    """Session slots and clocks in a Faust table, written with an explicit changelog partition.

    Checkpoints happen at flush time, outside the event that triggered them, so the partition of
    every key is the Kafka partition its session lives in, never Faust's "current event".
    """

    def __init__(self, table: Any, crash: CrashPoints | None = None) -> None:
        self.table = table
        self.crash = crash or CrashPoints({})
        self.in_flight: list[Any] = []  # changelog sends not yet acknowledged by the broker
        self.touched: set[int] = set()  # changelog partitions written since the last marker

    async def wait_sent(self) -> None:
        """Until every changelog record of the checkpoint is acknowledged, then end it with a
        marker record per changelog partition written.

        ``producer.flush()`` alone is not enough: Faust's buffer flush returns after 0.1 s
        without progress, possibly with records still queued. The marker goes out alone, in its
        own record batch, once the checkpoint is acknowledged: some brokers (Tansu) report a
        partition's end offset as the first offset of its last batch plus one, and Faust's
        recovery reads a changelog only up to that end, so without the marker a restarted
        worker could miss the tail of the last checkpoint (the clock is written last).
        """
        sends, self.in_flight = self.in_flight, []
        if sends:
            await asyncio.gather(*sends)
            self.crash.reach("changelog")
        touched, self.touched = sorted(self.touched), set()
        if touched:
            await asyncio.gather(*(self.table.send_changelog(p, MARK_KEY.format(p), "1")
                                   for p in touched))

    def load(self, kafka_partition: int) -> tuple[Clock | None, list[tuple[str, SessionSlot]]]:
        clock = None
        slots = []
        for key, value in list(self.table.data.items()):
            key = key.decode() if isinstance(key, bytes) else key
            if value is None:
                continue
            if key == CLOCK_KEY.format(kafka_partition):
                clock = _clock_from_json(value)
            elif not key.startswith("__"):
                slot = SessionSlot.model_validate_json(value)
                if _slot_partition(slot) == kafka_partition:
                    slots.append((key, slot))
        return clock, slots

    def save(self, kafka_partition: int, clock: Clock,
             slots: dict[str, SessionSlot | None]) -> None:
        for key, slot in slots.items():
            self._put(kafka_partition, key, None if slot is None else slot.model_dump_json())
        self._put(kafka_partition, CLOCK_KEY.format(kafka_partition), _clock_to_json(clock))

    def _put(self, partition: int, key: str, value: str | None) -> None:
        if value is None:  # a tombstone, sent raw as Faust itself does for deletions
            self.table.data.pop(key, None)
            sent = self.table.send_changelog(partition, key, None, value_serializer="raw")
        else:
            self.table.data[key] = value
            sent = self.table.send_changelog(partition, key, value)
        self.in_flight.append(sent)
        self.touched.add(partition)


def _slot_partition(slot: SessionSlot) -> int:
    session = slot.open if slot.open is not None else (*slot.pending, *slot.held)[0].session
    return session.kafka_partition


def _clock_to_json(clock: Clock) -> str:
    return json.dumps({"p": clock.kafka_partition, "max": clock.max_event_ts.isoformat(),
                       "wm": clock.watermark.isoformat(), "arr": clock.last_arrival_ms,
                       "tick": clock.last_tick_ms})


def _clock_from_json(raw: bytes | str) -> Clock:
    d = json.loads(raw)
    return Clock(kafka_partition=d["p"], max_event_ts=datetime.fromisoformat(d["max"]),
                 watermark=datetime.fromisoformat(d["wm"]), last_arrival_ms=d["arr"],
                 last_tick_ms=d.get("tick", 0))


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
    crash = CrashPoints.from_env()  # empty unless a crash test asks
    store = TableStore(table, crash)
    pipeline = Pipeline(settings, store, crash=crash)
    lock = asyncio.Lock()
    # Flushes run one at a time; one long-lived thread does them all, so the files' buffers are
    # always allocated by the same thread (asyncio's default pool spreads them over up to six,
    # each growing its own malloc arena in a long-running worker).
    flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefstream-flush")
    uncommitted: dict[TP, int] = {}  # next offset to commit, per partition handled since
    # Assignments seen so far (bumped by every revoke), and the one each buffered message was
    # fetched in: only messages of the current one are handled (see ``on_revoked``).
    epoch = [0]
    fetched_in: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
    # The next offset the agent must handle per partition: the committed one at each
    # assignment, then one past each handled message (see ``streams.worker.offsetguard``).
    guard = OffsetGuard()

    # The flush being written, at most one: a flush takes the batch and the closed sessions
    # from the state at once, then writes them in the flush thread and commits while the agent
    # goes on handling events (see ``Pipeline.start_flush``).
    writing: list[asyncio.Future[None]] = []

    async def flush() -> None:
        """Start a flush of everything handled so far (under ``lock``), once the previous one
        is done; ``settle()`` waits for it to be durable and committed."""
        await settle()
        job = pipeline.start_flush()
        state = pipeline.take_checkpoint()  # as the job took it; saved once its rows are durable
        targets = dict(uncommitted)
        uncommitted.clear()
        writing.append(asyncio.ensure_future(complete(job, state, targets)))

    async def settle() -> None:
        """Until the flush being written (if any) is durable and committed."""
        while writing:
            await writing[0]
            writing.pop(0)

    async def complete(job: FlushJob, state: Checkpoint, targets: dict[TP, int]) -> None:
        try:
            await durable_flush(job, state, targets)
        except (Exception, asyncio.CancelledError) as exc:
            if app.should_stop:  # a requested stop took the producer or consumer away
                log.info("stopping: the last batch is not committed (%r); the next worker "
                         "reads it again and its rows are not stored twice", exc)
                return
            if isinstance(exc, asyncio.CancelledError):
                raise
            # not durable or not committed: stop; a restart replays
            log.critical("flush failed, stopping the worker: %r", exc)
            await app.crash(exc)
            raise

    async def durable_flush(job: FlushJob, state: Checkpoint, targets: dict[TP, int]) -> None:
        """Rows, then the state changelog, then the offsets: each step only once the one before
        it is durable, so a restart never resumes from state ahead of the rows."""
        batch = await asyncio.get_running_loop().run_in_executor(flusher, pipeline.write_flush,
                                                                 job)
        pipeline.save_checkpoint(state)
        await app.producer.flush()
        await store.wait_sent()
        crash.reach("checkpoint")
        committed = await commit_through(targets)
        crash.reach("commit")
        pipeline.finish_flush(job, {tp.partition: offset for tp, offset in committed.items()})
        for tp, next_offset in targets.items():
            end = app.consumer.highwater(tp)
            if end is not None:
                pipeline.metrics.set("prefstream_lag_messages", max(0, end - next_offset),
                                     partition=str(tp.partition))
        done = {name: n for name, n in batch.counts.items() if n}  # idle flushes: no line
        if done:
            log.info("flushed batch: %s", done)

    async def commit_through(targets: dict[TP, int]) -> dict[TP, int]:
        """Commit exactly these offsets (next offset per partition) for the consumer group.

        Faust's own commit follows its ack bookkeeping, which can lose acks around a
        rebalance and then never pass the hole; our batches know exactly what is durable, so
        they commit it directly. The events topic has acks off, so Faust never commits it.
        Returns the offsets committed (none when the partitions were revoked meanwhile).
        """
        for _ in range(COMMIT_ATTEMPTS):
            owned = {tp: off for tp, off in targets.items() if tp in app.consumer.assignment()}
            if not owned:  # revoked meanwhile: the new owner replays, ids keep rows unique
                return {}
            if await app.consumer._commit(owned):  # Faust keeps no public per-offset commit
                return owned
            await asyncio.sleep(0.1)
        raise RuntimeError(f"offsets {targets} not committed after {COMMIT_ATTEMPTS} attempts")

    async def send_side(messages: list[SideMessage]) -> None:
        for m in messages:
            await side[m.topic].send(key=m.key, value=m.value)

    @app.agent(events, concurrency=1)
    async def process(stream: faust.StreamT) -> None:
        """Events in batches: Faust's per-event agent overhead is paid once per batch.

        ``noack_take`` yields the buffered events without acking them, so Faust never commits
        on its own (see ``commit_through``).
        """
        events_in = stream.noack()

        def note_epoch(value: Any) -> Any:  # runs as each message enters the batch buffer
            event = events_in.current_event
            if event is not None:
                fetched_in[event.message] = epoch[0]
            return value

        events_in.add_processor(note_epoch)  # before the buffer's own processor
        async for batch in events_in.noack_take(settings.take_max_events,
                                                within=settings.take_within_s):
            async with lock:
                side_messages: list[SideMessage] = []
                stale = 0
                rewind: dict[TP, int] = {}
                for event in batch:
                    msg = event.message
                    if fetched_in.pop(msg, epoch[0]) != epoch[0]:
                        stale += 1
                        continue
                    verdict = guard.admit(msg.tp, msg.offset, time.monotonic())
                    if verdict is not HANDLE:
                        if verdict != DROP:
                            rewind[msg.tp] = verdict
                            log.warning("%s[%d]: offset %d came before %d..%d, which never "
                                        "reached this worker (dropped by Faust around a "
                                        "rebalance): reading from %d again", msg.topic,
                                        msg.partition, msg.offset, verdict, msg.offset - 1,
                                        verdict)
                        continue
                    side_messages += pipeline.handle(
                        topic=msg.topic, partition=msg.partition, offset=msg.offset,
                        key=msg.key, value=msg.value, timestamp_ms=int(msg.timestamp * 1000))
                    uncommitted[msg.tp] = msg.offset + 1
                if stale:
                    log.info("dropped %d events fetched before the last rebalance: whoever owns "
                             "their partitions now reads them from the committed offsets", stale)
                for tp, offset in rewind.items():
                    await seek_back(tp, offset)
                crash.reach("handle", len(batch))
                await send_side(side_messages)
                if pipeline.due():
                    await flush()

    @app.timer(interval=min(0.25, settings.flush_interval_s / 4))
    async def flush_when_due() -> None:
        """A batch is due after ``flush_interval_s`` even when no further event arrives."""
        if pipeline.due() and not lock.locked() and not (writing and not writing[0].done()):
            async with lock:
                if pipeline.due():
                    await flush()

    @app.timer(interval=settings.tick_interval_s)
    async def tick() -> None:
        wall_ms = pipeline.wall_ms()
        for p in range(settings.partitions):
            value = sign_tick(pipeline.tick_key, settings.events_topic, p, wall_ms)
            await events.send(partition=p, value=value)

    watch = LogWatch(settings.partitions)
    topic_ids = TopicIds(str(settings.kafka_bootstrap), **settings.kafka_client_config())

    async def committed(tps: set[TP]) -> dict[TP, int | None]:
        """The group's committed offset of each partition (None: never committed)."""
        thread = app.consumer._thread  # Faust has no public per-partition committed lookup
        client = thread._ensure_consumer()
        return {tp: await thread.call_thread(client.committed, tp) for tp in tps}

    async def rewind_uncommitted(tps: set[TP]) -> None:
        """Seek partitions with no committed offset (or 0) to their earliest offset, and expect
        every assigned partition to go on from there or from its committed offset.

        After a rebalance Faust seeks every partition to its committed offset, but aiokafka
        skips a committed offset of None or 0 and leaves the position where the last fetch
        left it. Messages fetched before the rebalance and never handled (see ``on_revoked``)
        would then never be read again by a worker that keeps such a partition.
        """
        offsets = await committed(tps)
        starts = {tp: offset for tp, offset in offsets.items() if offset}
        fresh = [tp for tp in tps if not offsets[tp]]
        if fresh:
            for tp, offset in (await app.consumer.earliest_offsets(*fresh)).items():
                await app.consumer.seek(tp, offset)
                starts[tp] = offset
        guard.assign(starts)
        log.info("assigned %s: reading from %s", settings.events_topic,
                 {tp.partition: offset for tp, offset in sorted(starts.items())})

    async def seek_back(tp: TP, offset: int) -> None:
        """Read ``tp`` again from ``offset``: messages from there never reached the agent."""
        if tp not in app.consumer.assignment():
            return  # revoked meanwhile: its next owner reads from the committed offset
        earliest = (await app.consumer.earliest_offsets(tp)).get(tp, offset)
        if earliest > offset:
            log.error("%s[%d]: offsets %d..%d were deleted from the log before this worker "
                      "read them (retention); going on from %d", tp.topic, tp.partition, offset,
                      earliest - 1, earliest)
            offset = earliest
            guard.seeking(tp, offset)
        await app.consumer.seek(tp, offset)

    @app.on_rebalance_complete.connect
    async def on_rebalanced(sender: Any, **kwargs: Any) -> None:
        """Rewind partitions never committed, and read partitions whose topic was re-created
        again from the start (see ``logwatch``).

        Runs after every assignment, before Faust seeks to the committed offsets; a broker that
        lost its data always brings a rebalance (the consumer group is gone with it). The start
        is committed, then sought: aiokafka never seeks to a committed 0, so a later seek to the
        committed offsets leaves the position alone, and an earlier one is undone.
        """
        tps = {tp for tp in app.consumer.assignment() if tp.topic == settings.events_topic}
        try:
            await rewind_uncommitted(tps)
        except KafkaError as exc:  # the broker went away: the next assignment retries
            guard.assign({})
            log.warning("cannot look up committed offsets yet: %r", exc)
        topic_id = await asyncio.to_thread(topic_ids.topic_id, settings.events_topic)
        due = watch.observe(topic_id, {tp.partition for tp in tps})
        if not due:
            return
        try:
            starts = await app.consumer.earliest_offsets(*(tp for tp in tps
                                                           if tp.partition in due))
            if not await app.consumer._commit(starts):
                return  # rebalanced meanwhile: the next assignment tries again
            for tp, offset in starts.items():
                await app.consumer.seek(tp, offset)
            guard.assign(starts, keep=True)
        except KafkaError as exc:  # the broker went away again: the next assignment retries
            log.warning("cannot read %s from the start yet: %r", sorted(due), exc)
            return
        log.warning("%s: reading from offsets %s", settings.events_topic,
                    {tp.partition: offset for tp, offset in starts.items()})
        watch.done({tp.partition for tp in starts})

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        """Make everything processed durable and committed before partitions move.

        Faust does not redeliver events a worker already received when a partition comes back
        to it, so their offsets must be committed now or they would be skipped.

        Events fetched before this point but still waiting in the agent's batch buffer are
        dropped unhandled (a new epoch): handled after the revoke, they would rebuild their
        partition's state from this worker's stale table and write it to a changelog partition
        another worker may own by then, whose next recovery reads it back over its own slots.
        Not handled, they are not committed, so the partition's next owner reads them again
        (Faust seeks every assigned partition to its committed offset after a rebalance).
        Faust's own fence, the consumer generation stamped in each message, changes only at the
        next assignment, after this point, and cannot tell the first assignment from the time
        before it (both generation 0 with Tansu); an epoch bumped here can.
        """
        epoch[0] += 1
        ours = {tp.partition for tp in revoked if tp.topic == settings.events_topic}
        if ours:
            crash.reach("revoke")
        async with lock:
            if uncommitted:
                await flush()
            await settle()
            pipeline.revoke(ours)

    if settings.metrics_port:
        @app.task
        async def start_metrics() -> None:
            metrics.serve(pipeline.metrics.render, host=settings.metrics_host,
                          port=settings.metrics_port)

    app.pipeline = pipeline  # type: ignore[attr-defined]
    return app
