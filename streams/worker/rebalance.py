"""What the worker does when partitions move: durable and committed before a revoke, read from
the right offset after an assignment.

- :meth:`Rebalance.on_revoked`: flush and commit everything handled, then start a new *epoch*,
  so messages fetched before the revoke and still buffered are dropped unhandled (their next
  owner reads them again from the committed offset).
- :meth:`Rebalance.on_assigned`: rewind partitions never committed to their earliest offset,
  read partitions whose topic was re-created from the start (``logwatch``), and tell the
  :class:`~prefstream.streams.worker.offsetguard.OffsetGuard` where each partition goes on.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from aiokafka.errors import KafkaError
from faust.types import TP

from prefstream.settings import Settings
from prefstream.streams.worker import crashpoints
from prefstream.streams.worker.consumer import commit_offsets, committed_offsets
from prefstream.streams.worker.flush import Flusher
from prefstream.streams.worker.logwatch import LogWatch, TopicIds
from prefstream.streams.worker.offsetguard import OffsetGuard

log = logging.getLogger(__name__)


class Rebalance:
    """The worker's side of a consumer group rebalance."""

    def __init__(self, app: Any, settings: Settings, flusher: Flusher) -> None:
        self.app, self.settings, self.flusher = app, settings, flusher
        # Assignments seen so far (bumped by every revoke), and the one each buffered message
        # was fetched in: only messages of the current one are handled (see ``on_revoked``).
        self.epoch = 0
        self.fetched_in: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        # The next offset the agent must handle per partition: the committed one at each
        # assignment, then one past each handled message (see ``offsetguard``).
        self.guard = OffsetGuard()
        self.watch = LogWatch(settings.partitions)
        self.topic_ids = TopicIds(str(settings.kafka_bootstrap),
                                  **settings.kafka_client_config())

    def fetched(self, message: Any) -> None:
        """``message`` entered the agent's batch buffer in the current epoch."""
        self.fetched_in[message] = self.epoch

    def stale(self, message: Any) -> bool:
        """``message`` was fetched before the last revoke (and is forgotten here)."""
        return self.fetched_in.pop(message, self.epoch) != self.epoch

    async def on_revoked(self, revoked: set[TP]) -> None:
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
        self.epoch += 1
        ours = {tp.partition for tp in revoked if tp.topic == self.settings.events_topic}
        if ours:
            crashpoints.reach("revoke")
        flusher = self.flusher
        async with flusher.lock:
            if flusher.uncommitted:
                await flusher.flush()
            await flusher.settle()
            flusher.pipeline.revoke(ours)

    async def on_assigned(self) -> None:
        """Rewind partitions never committed, and read partitions whose topic was re-created
        again from the start (see ``logwatch``).

        Runs after every assignment, before Faust seeks to the committed offsets; a broker that
        lost its data always brings a rebalance (the consumer group is gone with it). The start
        is committed, then sought: aiokafka never seeks to a committed 0, so a later seek to the
        committed offsets leaves the position alone, and an earlier one is undone.
        """
        consumer, topic = self.app.consumer, self.settings.events_topic
        tps = {tp for tp in consumer.assignment() if tp.topic == topic}
        try:
            await self.rewind_uncommitted(tps)
        except KafkaError as exc:  # the broker went away: the next assignment retries
            self.guard.assign({})
            log.warning("cannot look up committed offsets yet: %r", exc)
        topic_id = await asyncio.to_thread(self.topic_ids.topic_id, topic)
        due = self.watch.observe(topic_id, {tp.partition for tp in tps})
        if not due:
            return
        try:
            starts = await consumer.earliest_offsets(*(tp for tp in tps if tp.partition in due))
            if not await commit_offsets(consumer, starts):
                return  # rebalanced meanwhile: the next assignment tries again
            for tp, offset in starts.items():
                await consumer.seek(tp, offset)
            self.guard.assign(starts, keep=True)
        except KafkaError as exc:  # the broker went away again: the next assignment retries
            log.warning("cannot read %s from the start yet: %r", sorted(due), exc)
            return
        log.warning("%s: reading from offsets %s", topic,
                    {tp.partition: offset for tp, offset in starts.items()})
        self.watch.done({tp.partition for tp in starts})

    async def rewind_uncommitted(self, tps: set[TP]) -> None:
        """Seek partitions with no committed offset (or 0) to their earliest offset, and expect
        every assigned partition to go on from there or from its committed offset.

        After a rebalance Faust seeks every partition to its committed offset, but aiokafka
        skips a committed offset of None or 0 and leaves the position where the last fetch
        left it. Messages fetched before the rebalance and never handled (see ``on_revoked``)
        would then never be read again by a worker that keeps such a partition.
        """
        consumer = self.app.consumer
        offsets = await committed_offsets(consumer, tps)
        starts = {tp: offset for tp, offset in offsets.items() if offset}
        fresh = [tp for tp in tps if not offsets[tp]]
        if fresh:
            for tp, offset in (await consumer.earliest_offsets(*fresh)).items():
                await consumer.seek(tp, offset)
                starts[tp] = offset
        self.guard.assign(starts)
        log.info("assigned %s: reading from %s", self.settings.events_topic,
                 {tp.partition: offset for tp, offset in sorted(starts.items())})

    async def seek_back(self, tp: TP, offset: int) -> None:
        """Read ``tp`` again from ``offset``: messages from there never reached the agent."""
        consumer = self.app.consumer
        if tp not in consumer.assignment():
            return  # revoked meanwhile: its next owner reads from the committed offset
        earliest = (await consumer.earliest_offsets(tp)).get(tp, offset)
        if earliest > offset:
            log.error("%s[%d]: offsets %d..%d were deleted from the log before this worker "
                      "read them (retention); going on from %d", tp.topic, tp.partition, offset,
                      earliest - 1, earliest)
            offset = earliest
            self.guard.seeking(tp, offset)
        await consumer.seek(tp, offset)
