"""A worker killed between its checkpoint and its offset commit, replayed without a broker.

The state changelog then holds the slots as of offset X while the committed offset is W < X: the
next worker recovers that state and reads W..X again. Sessions the killed worker closed between W
and X are pending in the recovered slots; they must stay until a commit passes their last event,
or the replayed events find no session (they would count as late or start it again from its
middle). The stored rows must equal those of one uninterrupted replay, for every crash point.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from factories import T0

from prefstream.settings import Settings
from prefstream.sim.traffic import TrafficConfig, generate_traffic
from prefstream.storage.files import init_data_dir, read_table
from prefstream.streams.worker.pipeline import MemoryStore, Pipeline, flush_offline, replay

pytestmark = pytest.mark.slow

PARTITIONS = 2
ARRIVAL_MS = int(T0.timestamp() * 1000) + 3_600_000
FINAL_TICK_MS = ARRIVAL_MS + 10**9
TABLES = ("pairs", "ties", "unpaired", "refusals", "sessions", "late_events", "dead_letters")
Record = tuple[int, int, bytes | None, bytes, int]


def stream(n_events: int, seed: int) -> list[Record]:
    """The traffic spread over the partitions by session, with per-partition offsets."""
    traffic = generate_traffic(TrafficConfig(n_events=n_events, seed=seed, end=T0))
    offsets = [0] * PARTITIONS
    records = []
    for key, value in traffic.messages:
        p = sum(key or b"") % PARTITIONS
        records.append((p, offsets[p], key, value, ARRIVAL_MS))
        offsets[p] += 1
    return records


Stored = dict[str, list[dict[str, Any]]]


def stored(data_dir: Path) -> Stored:
    return {t: sorted(read_table(data_dir=data_dir, table=t).to_pylist(), key=repr)
            for t in TABLES}


def handle(pipeline: Pipeline, settings: Settings, records: list[Record]) -> None:
    for p, offset, key, value, ts in records:
        pipeline.handle(topic=settings.events_topic, partition=p, offset=offset, key=key,
                        value=value, timestamp_ms=ts)


def resume_and_reference(settings: Settings, store: MemoryStore, records: list[Record],
                         committed: dict[int, int], ref_dir: Path) -> tuple[Stored, Stored]:
    """A next worker recovers the changelog as the killed one left it (``store``) and reads
    from the committed offsets again, in chunks, committing each; returns what it stored and
    what one uninterrupted replay of ``records`` stores."""
    second = Pipeline(settings, copy.deepcopy(store))
    rest = [r for r in records if r[1] >= committed.get(r[0], 0)]
    for start in range(0, len(rest), 70):
        chunk = rest[start:start + 70]
        handle(second, settings, chunk)
        committed.update({p: o + 1 for p, o, *_ in chunk})
        flush_offline(second, committed)
    second.tick_all(FINAL_TICK_MS)
    flush_offline(second, {})
    reference = settings.model_copy(update={"data_dir": ref_dir})
    init_data_dir(reference.data_dir)
    replay(reference, records, final_tick_ms=FINAL_TICK_MS)
    return stored(settings.data_dir), stored(reference.data_dir)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("behind", [40, 150])
def test_a_restart_from_a_checkpoint_ahead_of_the_commit_stores_what_one_run_stores(
    tmp_path: Path, seed: int, behind: int
) -> None:
    records = stream(2500, seed)
    settings = Settings(data_dir=tmp_path / "live", partitions=PARTITIONS, metrics_port=0)
    init_data_dir(settings.data_dir)
    store = MemoryStore()

    # the first worker: flushes every 300 records, committing what each flush covered
    first = Pipeline(settings, store)
    done = 1200
    committed: dict[int, int] = {}
    for start in range(0, done, 300):
        chunk = records[start:start + 300]
        handle(first, settings, chunk)
        committed.update({p: o + 1 for p, o, *_ in chunk})
        flush_offline(first, committed)
    # ...then checkpoints one more chunk and is killed before committing it
    chunk = records[done:done + behind * PARTITIONS]
    handle(first, settings, chunk)
    job, checkpoint = first.start_flush(), first.take_checkpoint()
    first.write_flush(job)
    first.save_checkpoint(checkpoint)
    rest = [r for r in records if r[1] >= committed.get(r[0], 0)]
    assert rest[:len(chunk)] == chunk  # the checkpointed, uncommitted chunk is read again
    got, want = resume_and_reference(settings, store, records, committed, tmp_path / "ref")
    assert len(want["pairs"]) > 50
    for table in TABLES:
        assert got[table] == want[table], table


@pytest.mark.parametrize("saved_before_the_rows", [False, True])
def test_a_checkpoint_is_saved_only_once_its_rows_are_durable(
    tmp_path: Path, saved_before_the_rows: bool
) -> None:
    """The worker takes a flush's checkpoint with its job but saves it after the job's files.
    Killed while writing them, it leaves the previous checkpoint, and the next worker stores
    what one run stores. Saved first, the next worker would resume from state ahead of the
    rows: late events read again meet the newer watermark and are stored with it."""
    records = stream(2500, 0)
    settings = Settings(data_dir=tmp_path / "live", partitions=PARTITIONS, metrics_port=0)
    init_data_dir(settings.data_dir)
    store = MemoryStore()
    first = Pipeline(settings, store)
    committed: dict[int, int] = {}
    head, chunk = records[:1200], records[1200:1500]
    handle(first, settings, head)
    committed.update({p: o + 1 for p, o, *_ in head})
    flush_offline(first, committed)
    handle(first, settings, chunk)
    job, checkpoint = first.start_flush(), first.take_checkpoint()
    handle(first, settings, records[1500:1600])  # the stream goes on while the job is written
    if saved_before_the_rows:
        first.save_checkpoint(checkpoint)
    # killed in the middle of write_flush(job): none of the job's rows are durable
    assert job.batch.rows["late_events"], "the chunk must hold late events to tell them apart"
    got, want = resume_and_reference(settings, store, records, committed, tmp_path / "ref")
    if saved_before_the_rows:
        assert got["late_events"] != want["late_events"]
        assert [r["late_id"] for r in got["late_events"]] == [
            r["late_id"] for r in want["late_events"]]  # the same events, other watermarks
    else:
        for table in TABLES:
            assert got[table] == want[table], table
