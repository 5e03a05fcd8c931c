"""When the worker starts a flush that came due while the previous one was still being written
(``Flusher.flush_if_due``, docs/delivery.md "When rows are written"): handling goes on, the
flush starts as soon as the previous one is done, and past twice ``flush_max_events`` waiting
the worker waits for it.

The flusher here is the worker's own, on a real pipeline; only the durable part of a flush
(rows, changelog, commit: the broker's side, tested end to end in ``broker/``) waits on a gate
the test opens, so a flush can be held "being written" for as long as the test needs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from factories import at, event

from prefstream.settings import Settings
from prefstream.storage.files import init_data_dir
from prefstream.streams.worker.flush import Flusher
from prefstream.streams.worker.pipeline import MemoryStore, Pipeline

MAX_EVENTS = 10
ARRIVAL_MS = int(at(1).timestamp() * 1000)


class GatedFlusher(Flusher):
    """Each flush is durable once the test opens its gate."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(SimpleNamespace(should_stop=False), pipeline, MemoryStore())  # type: ignore[arg-type]
        self.gates: list[asyncio.Event] = []
        self.taken: list[int] = []  # events each flush took

    async def durable_flush(self, job: Any, state: Any, targets: Any) -> None:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        self.pipeline.finish_flush(job, {})


def handle(pipeline: Pipeline, n: int, start: int) -> None:
    for offset in range(start, start + n):
        ev = event("impression", session_id=f"s{offset}", response_id="a", position=0)
        pipeline.handle(topic=pipeline.settings.events_topic, partition=0, offset=offset,
                        key=f"s{offset}".encode(), value=ev.model_dump_json().encode(),
                        timestamp_ms=ARRIVAL_MS)


async def writing_first_flush(tmp_path: Path) -> tuple[GatedFlusher, Pipeline]:
    """A flusher whose first flush (``MAX_EVENTS`` events) is being written, held at its gate."""
    settings = Settings(data_dir=tmp_path / "data", partitions=1, metrics_port=0,
                        flush_max_events=MAX_EVENTS, flush_interval_s=3600.0)
    init_data_dir(settings.data_dir)
    pipeline = Pipeline(settings, MemoryStore(), clock_ms=lambda: ARRIVAL_MS)
    flusher = GatedFlusher(pipeline)
    handle(pipeline, MAX_EVENTS, 0)
    async with flusher.lock:
        await flusher.flush_if_due()
    await settled(flusher, 1)
    return flusher, pipeline


async def settled(flusher: GatedFlusher, flushes: int) -> None:
    """Until ``flushes`` flushes were started (the follow-up one starts from a callback)."""
    for _ in range(100):
        if len(flusher.gates) >= flushes:
            return
        await asyncio.sleep(0.01)


def test_a_flush_due_while_one_is_written_starts_once_it_is_done(tmp_path: Path) -> None:
    async def scenario() -> None:
        flusher, pipeline = await writing_first_flush(tmp_path)
        assert len(flusher.gates) == 1 and flusher.busy
        handle(pipeline, MAX_EVENTS + 3, MAX_EVENTS)  # due again, the first still written
        async with flusher.lock:  # returns at once: handling goes on
            await asyncio.wait_for(flusher.flush_if_due(), timeout=1.0)
        assert len(flusher.gates) == 1 and pipeline.waiting == MAX_EVENTS + 3
        flusher.gates[0].set()  # the first is durable: the second starts with all 13
        await settled(flusher, 2)
        assert len(flusher.gates) == 2 and pipeline.waiting == 0 and flusher.busy
        flusher.gates[1].set()
        await flusher.settle()
        assert not flusher.busy and len(flusher.gates) == 2

    asyncio.run(scenario())


def test_handling_waits_for_the_flush_past_twice_the_flush_size(tmp_path: Path) -> None:
    async def scenario() -> None:
        flusher, pipeline = await writing_first_flush(tmp_path)
        handle(pipeline, 2 * MAX_EVENTS, MAX_EVENTS)  # the bound: wait for the first
        async with flusher.lock:
            waiting = asyncio.ensure_future(flusher.flush_if_due())
            await asyncio.sleep(0.05)
            assert not waiting.done() and pipeline.waiting == 2 * MAX_EVENTS
            flusher.gates[0].set()
            await asyncio.wait_for(waiting, timeout=1.0)
        assert len(flusher.gates) == 2 and pipeline.waiting == 0
        flusher.gates[1].set()
        await flusher.settle()

    asyncio.run(scenario())


def test_a_flush_that_took_the_waiting_events_leaves_no_follow_up(tmp_path: Path) -> None:
    """A rebalance (or the timer) flushes under the lock after the deferral: the follow-up
    finds nothing due and starts no empty flush."""
    async def scenario() -> None:
        flusher, pipeline = await writing_first_flush(tmp_path)
        handle(pipeline, MAX_EVENTS, MAX_EVENTS)
        async with flusher.lock:
            await flusher.flush_if_due()  # deferred
            assert flusher.deferred
            flusher.gates[0].set()
            await flusher.flush()  # as on a revoke: takes the waiting events itself
        await settled(flusher, 3)
        assert len(flusher.gates) == 2 and not flusher.deferred
        flusher.gates[1].set()
        await flusher.settle()

    asyncio.run(scenario())
