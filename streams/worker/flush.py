"""The worker's flush and commit: what makes a batch durable, in the order a restart relies on.

:meth:`Flusher.durable_flush` reads top to bottom as the protocol (``docs/delivery.md``): the
rows (Parquet files, in the flush thread), then the session state (the table's changelog, until
every record is acknowledged and its marker sent), then the consumer offsets. Each step starts
only once the one before is durable, so a restart never resumes from state ahead of the rows,
and offsets are never ahead of the state.

One flush is written at a time: :meth:`Flusher.flush` takes the batch and the closed sessions
from the state at once (under :attr:`Flusher.lock`), then the flush thread writes them while the
agent goes on handling events; :meth:`Flusher.settle` waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from faust.types import TP

from prefstream.streams.worker import crashpoints
from prefstream.streams.worker.consumer import commit_offsets
from prefstream.streams.worker.pipeline import Checkpoint, FlushJob, Pipeline

if TYPE_CHECKING:
    from prefstream.streams.worker.app import TableStore

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 50


def flush_line(counts: Mapping[str, int]) -> str | None:
    """A flush's log line: what it handled and stored (``stored_<table>``: rows written);
    ``None`` for an idle flush, which handled and stored nothing: a quiet worker logs nothing
    at INFO (one line every flush would be about 720 an hour)."""
    done = {name: n for name, n in counts.items() if n}
    return f"flushed batch: {done}" if done else None


class Flusher:
    """Batches of handled events made durable and committed, one at a time."""

    def __init__(self, app: Any, pipeline: Pipeline, store: TableStore) -> None:
        self.app, self.pipeline, self.store = app, pipeline, store
        #: held while handling a batch of events and while starting a flush
        self.lock = asyncio.Lock()
        # Flushes run one at a time; one long-lived thread does them all, so the files' buffers
        # are always allocated by the same thread (asyncio's default pool spreads them over up
        # to six, each growing its own malloc arena in a long-running worker).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefstream-flush")
        #: next offset to commit, per partition handled since the last flush started
        self.uncommitted: dict[TP, int] = {}
        # the flush being written, at most one (see ``Pipeline.start_flush``)
        self.writing: list[asyncio.Future[None]] = []
        #: a flush came due while another was being written: start it once that one is done
        self.deferred = False
        self._follow_up: asyncio.Future[None] | None = None  # held: the loop holds none
        #: whether this process logged a flush yet: the first is logged even when idle, so an
        #: operator (and the handover test) sees the worker commit before any row is stored
        self.logged_once = False

    def handled(self, tp: TP, offset: int) -> None:
        """The message at ``offset`` of ``tp`` was handled: commit past it at the next flush."""
        self.uncommitted[tp] = offset + 1

    @property
    def busy(self) -> bool:
        """A flush is being written now."""
        return bool(self.writing) and not self.writing[0].done()

    async def flush_if_due(self, *, caught_up: bool = False) -> None:
        """After a batch was handled (under :attr:`lock`): start the flush that is due, or,
        while the previous one is still being written, start it as soon as that one is done
        and go on handling meanwhile, up to twice ``flush_max_events`` waiting (then wait for
        it: the bound on what a flush holds). Handling is not held up by the previous flush's
        changelog and commit, which mostly wait on the broker (docs/delivery.md, "When rows
        are written")."""
        if not self.pipeline.due(caught_up=caught_up):
            return
        if self.busy and self.pipeline.waiting < 2 * self.pipeline.settings.flush_max_events:
            self.deferred = True
            return
        await self.flush()

    async def flush(self) -> None:
        """Start a flush of everything handled so far (under :attr:`lock`), once the previous
        one is done; :meth:`settle` waits for it to be durable and committed."""
        await self.settle()
        self.deferred = False  # this one takes whatever was waiting
        job = self.pipeline.start_flush()
        # as the job took it; saved once its rows are durable
        state = self.pipeline.take_checkpoint()
        targets = dict(self.uncommitted)
        self.uncommitted.clear()
        writing = asyncio.ensure_future(self._complete(job, state, targets))
        writing.add_done_callback(self._written)
        self.writing.append(writing)

    def _written(self, writing: asyncio.Future[None]) -> None:
        if self.deferred and not writing.cancelled() and writing.exception() is None:
            self._follow_up = asyncio.ensure_future(self._flush_deferred())

    async def _flush_deferred(self) -> None:
        """The flush that came due while the previous one was written (see
        :meth:`flush_if_due`), unless a flush took its events meanwhile."""
        async with self.lock:
            if self.deferred and not self.app.should_stop:
                self.deferred = False
                if self.pipeline.due(caught_up=True):
                    await self.flush()

    async def settle(self) -> None:
        """Until the flush being written (if any) is durable and committed."""
        while self.writing:
            await self.writing[0]
            self.writing.pop(0)

    async def _complete(self, job: FlushJob, state: Checkpoint, targets: dict[TP, int]) -> None:
        try:
            await self.durable_flush(job, state, targets)
        except (Exception, asyncio.CancelledError) as exc:
            if self.app.should_stop:  # a requested stop took the producer or consumer away
                log.info("stopping: the last batch is not committed (%r); the next worker "
                         "reads it again and its rows are not stored twice", exc)
                return
            if isinstance(exc, asyncio.CancelledError):
                raise
            # not durable or not committed: stop; a restart replays
            log.critical("flush failed, stopping the worker: %r", exc)
            await self.app.crash(exc)
            raise

    async def durable_flush(self, job: FlushJob, state: Checkpoint,
                            targets: dict[TP, int]) -> None:
        """Rows, then the state changelog, then the offsets."""
        batch = await self.write_rows(job)
        await self.write_changelog(state)
        committed = await self.commit_offsets(targets)
        self.pipeline.finish_flush(job, {tp.partition: off for tp, off in committed.items()})
        self._report_lag(targets)
        line = flush_line(batch.counts)
        if line or not self.logged_once:
            log.info("%s", line or "flushed batch: nothing stored (ticks only), offsets committed")
            self.logged_once = True

    async def write_rows(self, job: FlushJob) -> Any:
        """The batch's rows as Parquet files, in the flush thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.pipeline.write_flush, job)

    async def write_changelog(self, state: Checkpoint) -> None:
        """The session state as of the batch, until the broker acknowledged all of it."""
        self.pipeline.save_checkpoint(state)
        await self.app.producer.flush()
        await self.store.wait_sent()
        crashpoints.reach("checkpoint")

    async def commit_offsets(self, targets: dict[TP, int]) -> dict[TP, int]:
        """Commit exactly these offsets (next offset per partition) for the consumer group.

        Faust's own commit follows its ack bookkeeping, which can lose acks around a
        rebalance and then never pass the hole; our batches know exactly what is durable, so
        they commit it directly. The events topic has acks off, so Faust never commits it.
        Returns the offsets committed (none when the partitions were revoked meanwhile).
        """
        consumer = self.app.consumer
        for _ in range(COMMIT_ATTEMPTS):
            owned = {tp: off for tp, off in targets.items() if tp in consumer.assignment()}
            if not owned:  # revoked meanwhile: the new owner replays, ids keep rows unique
                committed: dict[TP, int] = {}
                break
            if await commit_offsets(consumer, owned):
                committed = owned
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"offsets {targets} not committed after {COMMIT_ATTEMPTS} "
                               "attempts")
        crashpoints.reach("commit")
        return committed

    def _report_lag(self, targets: dict[TP, int]) -> None:
        for tp, next_offset in targets.items():
            end = self.app.consumer.highwater(tp)
            if end is not None:
                self.pipeline.metrics.set("prefstream_lag_messages", max(0, end - next_offset),
                                          partition=str(tp.partition))
