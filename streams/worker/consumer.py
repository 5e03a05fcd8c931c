"""Faust's consumer with a cheaper hand-off of each fetched message to the streams.

Faust's fetcher hands every message to the conductor inside ``Service.wait_first(callback,
suspend_flow.wait())``, so that a hand-off blocked by flow control (a rebalance) gives way when
the flow is suspended. That race costs four tasks and an ``asyncio.wait`` per message, and on
this worker's hot path it was the largest single cost after the pipeline itself.

Almost every hand-off never blocks: flow control is open, the producer buffer is low and the
stream's queue has room, so the conductor's coroutine runs to its end without suspending once.
:class:`Consumer` runs it that far directly and only races a hand-off that did suspend, with
the same ``wait_first`` Faust uses. Everything else (read offsets, the yield every 100
messages, gap and commit bookkeeping for topics with acks) is Faust's behaviour unchanged.

The adapter to Faust's internals: the only module of the project that reaches into Faust's
private attributes (this consumer, :func:`commit_offsets`, :func:`committed_offsets`), so a Faust
upgrade is checked here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Generator
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.sensors import Sensor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka

YIELD_EVERY = 100  # messages handed off between two returns to the event loop, as Faust does


class Suspended:
    """An awaitable that goes on with a coroutine which already ran up to its first suspension
    (``pending``: what it yielded there), so a task can finish it."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro, self.pending = coro, pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, step = self.coro, self.pending
        while True:
            try:
                sent = yield step
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation included: the coroutine sees it
                try:
                    step = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    step = coro.send(sent)
                except StopIteration as done:
                    return done.value


def run_until_suspended(coro: Coroutine[Any, Any, Any]) -> Suspended | None:
    """Run ``coro`` in place until it finishes (None; its exception propagates) or first
    suspends (the rest, to be awaited)."""
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return Suspended(coro, pending)


class Consumer(faust_aiokafka.Consumer):
    async def _drain_messages(self, fetcher: Any) -> None:
        callback, getmany = self.callback, self.getmany
        stopping, fetcher_stopping = self._stopped.is_set, fetcher._stopped.is_set
        read_offsets = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        since_yield = 0
        try:
            while not (stopping() or fetcher_stopping()):
                self.diag.set_flag(CONSUMER_FETCHING)
                fetched = getmany(timeout=1.0)
                await self.sleep(0)
                if self.should_stop:
                    continue
                async for tp, message in fetched:
                    since_yield += 1
                    if since_yield > YIELD_EVERY:
                        await asyncio.sleep(0)
                        since_yield = 0
                    offset, read = message.offset, read_offsets[tp]
                    if read is not None and offset < read:
                        continue  # fetched before a seek back: Faust drops it too
                    if read and offset - read > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, read + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    rest = run_until_suspended(callback(message))
                    if rest is not None:  # blocked: give way if the flow is suspended
                        await self.wait_first(rest, self.suspend_flow.wait())
                    read_offsets[tp] = offset
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class App(faust.App):
    """A Faust app whose Kafka consumer is :class:`Consumer` (``kafka://`` brokers only)."""

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)

    def on_init_dependencies(self) -> Any:
        """Faust's services, without its Monitor among the sensors: it times and counts every
        message and send for Faust's web views (off here), about 4% of the agent's CPU. The
        worker's own metrics are ``streams/metrics.py``'s; ``app.monitor`` stays for the few
        Faust internals that call it directly. Faust's base sensor, which does nothing, takes
        its place: with no sensor at all Faust logs "Missing sensor state" at every rebalance."""
        services = super().on_init_dependencies()
        self.sensors.remove(self.monitor)
        self.sensors.add(Sensor())
        return services


# --- Faust's private attributes: this module is the only one that touches them -----------------


async def commit_offsets(consumer: Any, offsets: dict[Any, int]) -> bool:
    """Commit exactly ``offsets`` (next offset per partition) for the consumer group; False when
    the group rebalanced meanwhile. Faust keeps no public per-offset commit."""
    return bool(await consumer._commit(offsets))


async def committed_offsets(consumer: Any, tps: set[Any]) -> dict[Any, int | None]:
    """The group's committed offset of each partition (None: never committed). Faust has no
    public per-partition committed lookup: ask aiokafka's consumer in Faust's consumer thread."""
    thread = consumer._thread
    client = thread._ensure_consumer()
    return {tp: await thread.call_thread(client.committed, tp) for tp in tps}


class AbandonedCommit(logging.Filter):
    """One line instead of a traceback for an offset commit abandoned when the connection closed.

    aiokafka runs each offset commit in a task shielded from its caller (``asyncio.shield``). When
    the worker stops while a commit is in flight (a flush or a revoke committing), the caller is
    cancelled, the broker connection closes under the task, and asyncio logs the task's error as
    "Task exception was never retrieved" with a traceback, from Faust's consumer thread. Nothing
    is lost: those offsets were not committed, so the next owner reads from the last committed
    ones, and rows are idempotent (docs/delivery.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KafkaError) and "_do_commit_offsets" in record.getMessage():
            record.msg = ("an offset commit in flight when its connection closed was abandoned "
                          "(%r); the next owner reads from the last committed offsets")
            record.args = (exc,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_abandoned_commits() -> None:
    """Install :class:`AbandonedCommit` on asyncio's logger (once)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, AbandonedCommit) for f in logger.filters):
        logger.addFilter(AbandonedCommit())
