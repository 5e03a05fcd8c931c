"""The worker's consumer hands each message to Faust's conductor without a race per message,
and races only a hand-off that blocked (``streams.worker.consumer``)."""

from __future__ import annotations

import asyncio

import pytest

from prefstream.settings import Settings
from prefstream.streams.worker import consumer
from prefstream.streams.worker.consumer import Suspended, run_until_suspended


def test_a_hand_off_that_never_blocks_runs_to_its_end_in_place():
    done = []

    async def hand_off() -> None:
        done.append("delivered")

    assert run_until_suspended(hand_off()) is None
    assert done == ["delivered"]


def test_an_error_in_a_hand_off_that_never_blocks_propagates():
    async def hand_off() -> None:
        raise ValueError("bad message")

    with pytest.raises(ValueError, match="bad message"):
        run_until_suspended(hand_off())


def test_a_blocked_hand_off_goes_on_where_it_stopped_once_awaited():
    steps = []

    async def scenario() -> str:
        gate = asyncio.Event()

        async def hand_off() -> str:
            steps.append("before")
            await gate.wait()  # flow control suspended, say
            steps.append("after")
            return "delivered"

        rest = run_until_suspended(hand_off())
        assert isinstance(rest, Suspended) and steps == ["before"]
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0.01)
        assert steps == ["before"] and not task.done()
        gate.set()
        return await task

    assert asyncio.run(scenario()) == "delivered"
    assert steps == ["before", "after"]


def test_a_blocked_hand_off_that_loses_the_race_is_cancelled_inside():
    """As Faust's ``wait_first`` cancels the hand-off when the flow is suspended first."""
    seen = []

    async def scenario() -> None:
        async def hand_off() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        suspend_flow = asyncio.Event()
        rest = run_until_suspended(hand_off())
        assert rest is not None
        first = asyncio.ensure_future(rest)
        other = asyncio.ensure_future(suspend_flow.wait())
        suspend_flow.set()
        done, pending = await asyncio.wait({first, other}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {other}
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(scenario())
    assert seen == ["cancelled"]


def test_an_error_after_the_hand_off_blocked_propagates_to_its_awaiter():
    async def scenario() -> None:
        async def hand_off() -> None:
            await asyncio.sleep(0)
            raise KeyError("late failure")

        rest = run_until_suspended(hand_off())
        assert rest is not None
        with pytest.raises(KeyError, match="late failure"):
            await asyncio.ensure_future(rest)

    asyncio.run(scenario())


def test_the_worker_app_consumes_through_this_consumer(tmp_path, caplog):
    from prefstream.streams.worker.app import create_app

    app = create_app(Settings(data_dir=tmp_path, metrics_port=0))
    assert isinstance(app.consumer, consumer.Consumer)
    app.on_init_dependencies()  # what starting the app does first
    assert app.monitor not in app.sensors  # Faust's per-message stats for its web views: off
    with caplog.at_level("WARNING"):  # Faust's rebalance bookkeeping still has a sensor state
        app.on_rebalance_start()
        app.on_rebalance_return()
        app.on_rebalance_end()
    assert not [r for r in caplog.records if "sensor state" in r.getMessage()]


def test_an_abandoned_offset_commit_is_one_line_not_a_traceback(caplog):
    """aiokafka's shielded commit task failing after its caller was cancelled (a stop): asyncio
    logs "Task exception was never retrieved" with a traceback; the worker's filter makes it one
    INFO line. Other unretrieved task errors keep their traceback."""
    import gc
    import logging

    from aiokafka.errors import KafkaConnectionError

    from prefstream.streams.worker.consumer import AbandonedCommit, quiet_abandoned_commits

    async def _do_commit_offsets():  # named as aiokafka's commit coroutine
        raise KafkaConnectionError("Connection at 127.0.0.1:1 closed")

    async def other():
        raise KafkaConnectionError("elsewhere")

    async def abandon():
        for coro in (_do_commit_offsets(), other()):
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            del task  # never awaited: its error is logged when the task is collected

    logger = logging.getLogger("asyncio")
    quiet_abandoned_commits()
    quiet_abandoned_commits()  # once only
    try:
        assert sum(isinstance(f, AbandonedCommit) for f in logger.filters) == 1
        with caplog.at_level(logging.INFO, logger="asyncio"):
            asyncio.run(abandon())
            gc.collect()
        records = [r for r in caplog.records if r.name == "asyncio"]
        commit = [r for r in records if "offset commit in flight" in r.getMessage()]
        assert len(commit) == 1 and commit[0].levelno == logging.INFO
        assert commit[0].exc_info is None and "Connection at 127.0.0.1:1" in commit[0].getMessage()
        kept = [r for r in records if "never retrieved" in r.getMessage()]
        assert len(kept) == 1 and kept[0].exc_info is not None and "other()" in kept[0].getMessage()
    finally:
        for f in [f for f in logger.filters if isinstance(f, AbandonedCommit)]:
            logger.removeFilter(f)


@pytest.mark.parametrize("level", ["warning", "error"])
def test_a_quiet_worker_leaves_debug_records_unbuilt(tmp_path, level):
    """At WARNING and above Faust's terminal spinner would set the root logger to DEBUG for the
    whole run (a record built for every debug call of Faust and aiokafka); the worker has none."""
    import logging

    from prefstream.streams.worker.app import create_app
    from prefstream.streams.worker.run import faust_worker

    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        worker = faust_worker(create_app(Settings(data_dir=tmp_path, metrics_port=0)),
                              Settings(data_dir=tmp_path), level)
        worker._setup_logging()  # what the worker does first when it runs
        assert not logging.getLogger("faust.topics").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("aiokafka").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
