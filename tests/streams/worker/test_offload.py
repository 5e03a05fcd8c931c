"""The pipeline in its own process (``streams/worker/offload.py``), without a broker: a real
child process fed raw batches stores exactly what the pure pipeline stores, returns the same
dead-letter and late records, and a child that dies fails its flushes and stops the worker."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from factories import T0

from prefstream.settings import Settings
from prefstream.sim.traffic import TrafficConfig, generate_traffic
from prefstream.storage.files import init_data_dir, read_table
from prefstream.streams.core.outputs import pseudonym
from prefstream.streams.core.sessionize import SessionSlot
from prefstream.streams.worker.offload import (
    ChildDied,
    RemotePipeline,
    Written,
    child_env,
    child_settings,
)
from prefstream.streams.worker.offload_child import frame, read_frame
from prefstream.streams.worker.pipeline import MemoryStore, SideMessage, replay
from prefstream.streams.worker.ticks import sign_tick

pytestmark = pytest.mark.slow  # runs processes

PARTITIONS = 2
ARRIVAL_MS = int(T0.timestamp() * 1000) + 3_600_000
FINAL_TICK_MS = ARRIVAL_MS + 10**9
TABLES = ("pairs", "ties", "unpaired", "refusals", "sessions", "late_events", "dead_letters")
Record = tuple[int, int, bytes | None, bytes, int]


def stream(n_events: int) -> list[Record]:
    """Traffic by session over the partitions, with malformed messages among it."""
    traffic = generate_traffic(TrafficConfig(n_events=n_events, seed=3, end=T0))
    offsets = [0] * PARTITIONS
    records = []
    for i, (key, value) in enumerate(traffic.messages):
        p = sum(key or b"") % PARTITIONS
        records.append((p, offsets[p], key, b"{not json" if i % 97 == 5 else value, ARRIVAL_MS))
        offsets[p] += 1
    return records


def stored(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {t: sorted(read_table(data_dir=data_dir, table=t).to_pylist(), key=repr)
            for t in TABLES}


class Worker:
    """What the agent's process does with a :class:`RemotePipeline`, minus Kafka."""

    def __init__(self, settings: Settings, stopping: bool = False) -> None:
        self.settings, self.store = settings, MemoryStore()
        self.side: list[SideMessage] = []
        self.deaths: list[BaseException] = []
        self.pipeline = RemotePipeline(settings, self.store, self.send_side, self.on_dead,
                                       stopping=lambda: stopping)
        self.committed: dict[int, int] = {}

    async def send_side(self, messages: list[SideMessage]) -> None:
        self.side += messages

    async def on_dead(self, exc: BaseException) -> None:
        self.deaths.append(exc)

    async def relay(self, records: list[Record]) -> None:
        topic = self.settings.events_topic
        await self.pipeline.relay([(topic, *r) for r in records])
        self.committed.update({p: offset + 1 for p, offset, *_ in records})

    async def flush(self) -> Written:
        """Rows, then the checkpoint, then the commit (``Flusher.durable_flush``'s order)."""
        job, checkpoint = self.pipeline.start_flush(), self.pipeline.take_checkpoint()
        written = await job.written
        self.pipeline.save_checkpoint(checkpoint)
        self.pipeline.finish_flush(job, dict(self.committed))
        return written


def test_frames_round_trip_and_end_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "frames"
    messages = [("handle", [("t", 0, 1, None, b"x" * 70_000, 5)]), ("flush", 3)]
    path.write_bytes(b"".join(frame(m) for m in messages) + frame(("cut",))[:5])
    with open(path, "rb") as stream_in:
        assert [read_frame(stream_in), read_frame(stream_in)] == messages
        assert read_frame(stream_in) is None  # a message cut short is the end


def test_the_pipeline_process_stores_what_the_pure_pipeline_stores(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "live", partitions=PARTITIONS, metrics_port=0)
    init_data_dir(settings.data_dir)
    records = stream(2000)
    worker = Worker(settings)
    ticks = [(p, 1 << 40, None, sign_tick(worker.pipeline.tick_key, settings.events_topic, p,
                                          FINAL_TICK_MS), FINAL_TICK_MS)
             for p in range(PARTITIONS)]

    async def run() -> list[Written]:
        flushes = []
        for start in range(0, len(records), 250):
            await worker.relay(records[start:start + 250])
            if start % 750 == 0:
                flushes.append(await worker.flush())
        await worker.relay(ticks)
        flushes.append(await worker.flush())
        return flushes

    flushes = asyncio.run(run())
    reference = settings.model_copy(update={"data_dir": tmp_path / "ref"})
    init_data_dir(reference.data_dir)
    want_side = replay(reference, records, final_tick_ms=FINAL_TICK_MS)
    got, want = stored(settings.data_dir), stored(reference.data_dir)
    assert len(want["pairs"]) > 50 and want["dead_letters"]
    for table in TABLES:
        assert got[table] == want[table], table
    assert worker.side == want_side  # the dead letters and late events, in order
    assert sum(f.counts["accepted"] for f in flushes) == worker.pipeline.metrics.value(
        "prefstream_events_total", outcome="accepted") > 1000
    # the checkpoints reached the store, serialized in the child: what a restart loads
    saved = {key: SessionSlot.model_validate_json(slot.model_dump_json())
             for slots in worker.store.slots.values() for key, slot in slots.items()}
    assert saved and set(worker.store.clocks) == set(range(PARTITIONS))
    assert not worker.deaths


def test_a_dead_pipeline_process_fails_its_flushes_and_stops_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "live", partitions=PARTITIONS, metrics_port=0)
    init_data_dir(settings.data_dir)
    worker = Worker(settings)

    async def run() -> None:
        await worker.relay(stream(300))
        assert (await worker.flush()).counts["accepted"] > 100  # alive: flushes complete
        assert worker.pipeline.proc is not None
        os.kill(worker.pipeline.proc.pid, signal.SIGKILL)
        async with asyncio.timeout(30):  # never hangs
            while not worker.deaths:
                await asyncio.sleep(0.05)
        job = worker.pipeline.start_flush()
        with pytest.raises(ChildDied, match="signal 9"):
            await job.written
        await worker.relay(stream(10))  # a stopping worker relays nothing, and does not hang

    with caplog.at_level(logging.CRITICAL, logger="prefstream.streams.worker.offload"):
        asyncio.run(run())
    assert isinstance(worker.deaths[0], ChildDied)
    assert "stopping the worker" in caplog.text and "signal 9" in caplog.text


@pytest.mark.parametrize("stopping", [False, True], ids=["running", "stopping"])
def test_side_records_that_cannot_be_sent_end_the_pipeline_process_and_fail_the_flush(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stopping: bool
) -> None:
    """Running, that is an error with its traceback; during a stop (Faust's producer stopped
    before the last replies came) it is expected: one line, no traceback (the crash loop's
    SIGTERM runs check the log for one)."""
    settings = Settings(data_dir=tmp_path / "live", partitions=PARTITIONS, metrics_port=0)
    init_data_dir(settings.data_dir)
    worker = Worker(settings, stopping=stopping)

    async def refuse(messages: list[SideMessage]) -> None:
        raise RuntimeError("the producer is gone")

    worker.pipeline.send_side = refuse

    async def run() -> None:
        await worker.relay(stream(300))  # holds malformed messages: dead letters to send
        job = worker.pipeline.start_flush()
        with pytest.raises(ChildDied):  # never committed, and never waited for forever
            async with asyncio.timeout(30):
                await job.written

    with caplog.at_level(logging.INFO, logger="prefstream.streams.worker.offload"):
        asyncio.run(run())
    tracebacks = [r for r in caplog.records if r.exc_info]
    if stopping:  # the worker stops anyway: nothing more to stop
        assert not worker.deaths and not tracebacks and "left unsent" in caplog.text
    else:
        assert len(worker.deaths) == 1
        assert tracebacks and "reading from the pipeline process failed" in caplog.text


def parsed(record: Record) -> Any:
    try:
        return json.loads(record[3])
    except ValueError:
        return None


def test_the_pipeline_process_gets_no_secret_it_does_not_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its settings come over the command pipe: its environment holds no secret setting (in any
    case) and its settings no Kafka password; the pseudonym and tick keys it uses reach it."""
    secrets = {"PREFSTREAM_KAFKA_SASL_PASSWORD": "sasl-password-not-for-it",
               "prefstream_pseudonym_key": "pseudonym-key-not-for-it",
               "PREFSTREAM_TICK_KEY": "tick-key-not-for-it-" * 2}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    settings = Settings(data_dir=tmp_path / "live", partitions=PARTITIONS, metrics_port=0)
    assert settings.kafka_sasl_password is not None and settings.pseudonym_key is not None
    init_data_dir(settings.data_dir)
    worker = Worker(settings)
    records = stream(300)
    tick = [(p, 1 << 40, None, sign_tick(worker.pipeline.tick_key, settings.events_topic, p,
                                         FINAL_TICK_MS), FINAL_TICK_MS)
            for p in range(PARTITIONS)]

    async def run() -> None:
        await worker.relay(records + tick)
        assert worker.pipeline.proc is not None
        environ = Path(f"/proc/{worker.pipeline.proc.pid}/environ").read_bytes()
        assert not [v for v in secrets.values() if v.encode() in environ]
        assert b"PREFSTREAM_ROOT" in environ or "PREFSTREAM_ROOT" not in os.environ
        await worker.flush()

    asyncio.run(run())
    assert not worker.deaths
    assert not [m for m in worker.side if b'"tick:' in m.value]  # the signed ticks verified
    assert child_settings(settings).kafka_sasl_password is None
    assert child_settings(settings).pseudonym_key == settings.pseudonym_key
    assert child_env({"PREFSTREAM_KAFKA_SSL_KEY_PASSWORD": "k", "PREFSTREAM_GAP_S": "9",
                      "PATH": "/bin"}) == {"PREFSTREAM_GAP_S": "9", "PATH": "/bin"}
    users = {r["user_id"] for r in read_table(data_dir=settings.data_dir, table="sessions")
             .to_pylist()}
    sent = {e["user_id"] for e in map(parsed, records) if isinstance(e, dict) and "user_id" in e}
    assert users and users <= {pseudonym(u, settings.pseudonym_key) for u in sent}
