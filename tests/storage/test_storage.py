"""Storage: partition names, immutable Parquet files, sealing, and the DuckDB catalog of views.

Everything runs on real files in ``tmp_path`` and a real DuckDB; one test reads from a second
process while this one writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from factories import at, pair, session_row
from helpers.storage import query
from hypothesis import given, settings
from hypothesis import strategies as st

from prefstream.schemas.manifest import ManifestRow
from prefstream.storage import files
from prefstream.storage.catalog import CATALOG_NAME, connect_readonly, ensure_catalog
from prefstream.storage.files import (
    IdIndex,
    Watermark,
    content_sha256,
    init_data_dir,
    is_sealed,
    live_files,
    read_table,
    read_watermarks,
    seal_ready,
    sealable,
    sealed_partitions,
    write_rows,
    write_watermark,
)
from prefstream.storage.partitions import partition_bounds, partition_for
from prefstream.storage.tables import SEALED_TABLES, TABLES, to_arrow

H12, H13 = "2024-05-01T12", "2024-05-01T13"  # the hours of at(0) and at(60)
GAP = timedelta(minutes=30)


def parquet_files(table_dir: Path) -> list[Path]:
    """Data files of a table readers use (not its zero-row schema files)."""
    return sorted(f for p in table_dir.iterdir() if p.name != "_schema" for f in live_files(p))


# --- partition names -------------------------------------------------------------------------

_offsets = st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                            max_value=timedelta(hours=23, minutes=59)))
_aware = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                      timezones=st.one_of(_offsets, st.timezones()), allow_imaginary=False)


@settings(max_examples=300, deadline=None)
@given(_aware, st.sampled_from([1, 2, 3, 4, 6, 12, 24]))
def test_partition_name_round_trips_through_its_bounds(ts, hours):
    name = partition_for(ts, hours=hours)
    start, end = partition_bounds(name, hours=hours)
    assert start <= ts < end
    assert end - start == timedelta(hours=hours)
    assert start.tzinfo == timezone.utc
    assert start.hour % hours == 0 and (start.minute, start.second, start.microsecond) == (0, 0, 0)
    assert partition_for(start, hours=hours) == name
    assert partition_for(end - timedelta(microseconds=1), hours=hours) == name
    assert partition_for(end, hours=hours) != name
    assert partition_for(ts.astimezone(timezone.utc), hours=hours) == name


def test_partition_for_literals():
    berlin = timezone(timedelta(hours=2))
    assert partition_for(datetime(2024, 5, 1, 1, 30, tzinfo=berlin)) == "2024-04-30T23"
    assert partition_for(datetime(2024, 5, 1, 13, 59, tzinfo=timezone.utc), hours=6) == H12
    assert partition_for(datetime(2024, 5, 1, 23, 0, tzinfo=timezone.utc), hours=24) == (
        "2024-05-01T00")
    assert partition_bounds(H12, hours=2) == (at(0), at(120))


def test_partition_for_rejects_naive_datetimes():
    with pytest.raises(ValueError):
        partition_for(datetime(2024, 5, 1, 12))


# --- writing rows ----------------------------------------------------------------------------

def test_write_rows_writes_one_complete_file_per_partition(data_dir):
    rows = [pair("p1", minute=0), pair("p2", minute=59), pair("p3", minute=60)]
    written = write_rows(data_dir=data_dir, table="pairs", rows=rows)
    assert [p.parent.parent.name for p in written] == [H12, H13]
    for path in written:
        assert path.name.startswith("part-") and path.suffix == ".parquet"
        assert path.parent.parent.parent == data_dir / "pairs"
        assert path.parent.name == "g000000"  # the first generation, where ``current`` points
        assert (path.parent.parent / "current").resolve() == path.parent
        pq.ParquetFile(path)  # a whole file with its footer
    assert sorted(pq.read_table(written[0]).column("pair_id").to_pylist()) == ["p1", "p2"]
    leftovers = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert leftovers == []
    assert not [p for p in data_dir.rglob(".*")]  # no hidden temporary names left
    assert write_rows(data_dir=data_dir, table="pairs", rows=[]) == []


def test_rows_round_trip_with_timestamps_in_utc(data_dir):
    eastern = timezone(timedelta(hours=-4))
    row = pair("p1", event_time=datetime(2024, 5, 1, 8, 15, tzinfo=eastern), rules=("a", "b"),
               chosen_position=None)
    write_rows(data_dir=data_dir, table="pairs", rows=[row])
    [back] = read_table(data_dir=data_dir, table="pairs").to_pylist()
    assert back["event_time"] == datetime(2024, 5, 1, 12, 15, tzinfo=timezone.utc)
    assert back["rules"] == ["a", "b"]
    assert back["chosen_position"] is None
    assert back["pair_id"] == "p1" and back["partition"] == H12


def test_writing_the_same_rows_twice_is_idempotent_for_readers(data_dir):
    rows = [pair("p1", minute=0), pair("p2", minute=5), pair("p3", minute=70)]
    first = write_rows(data_dir=data_dir, table="pairs", rows=rows)
    # a redelivered batch: every id is stored already, so no new file at all (was one per
    # partition: the writer now skips stored ids instead of leaving them to the views)
    assert write_rows(data_dir=data_dir, table="pairs", rows=rows) == []
    assert parquet_files(data_dir / "pairs") == sorted(first)
    assert len(first) == 2
    assert query(data_dir, "SELECT pair_id, count(*) FROM pairs GROUP BY ALL ORDER BY 1") == [
        ("p1", 1), ("p2", 1), ("p3", 1)]
    table = read_table(data_dir=data_dir, table="pairs")
    assert sorted(table.column("pair_id").to_pylist()) == ["p1", "p2", "p3"]
    only = read_table(data_dir=data_dir, table="pairs", partitions=[H12])
    assert sorted(only.column("pair_id").to_pylist()) == ["p1", "p2"]
    assert query(data_dir, "SELECT partition, n_pairs, sealed FROM partitions") == [
        (H12, 2, False), (H13, 1, False)]


def test_write_rows_stores_each_id_once_within_a_call_and_across_calls(data_dir):
    """The first row of each id wins; only new ids make a new file, in the partitions that
    have any (the views are plain scans, so this is what keeps them one row per id)."""
    rows = [pair("p1", minute=0, rule="first"), pair("p1", minute=0, rule="second"),
            pair("p2", minute=1)]
    [path] = write_rows(data_dir=data_dir, table="pairs", rows=rows)
    table = pq.read_table(path)
    assert table.column("pair_id").to_pylist() == ["p1", "p2"]
    assert table.column("rule").to_pylist() == ["first", "copy_vs_skip"]
    mixed = [pair("p2", minute=1), pair("p4", minute=2), pair("p1", minute=0),
             pair("p5", minute=61), pair("p5", minute=61)]
    new_files = write_rows(data_dir=data_dir, table="pairs", rows=mixed)
    assert [p.parent.parent.name for p in new_files] == [H12, H13]
    assert [pq.read_table(p).column("pair_id").to_pylist() for p in new_files] == [
        ["p4"], ["p5"]]
    assert query(data_dir, "SELECT pair_id, rule FROM pairs ORDER BY 1") == [
        ("p1", "first"), ("p2", "copy_vs_skip"), ("p4", "copy_vs_skip"), ("p5", "copy_vs_skip")]
    # ids are per (table, partition): the same id in another table is a different row
    [other] = write_rows(data_dir=data_dir, table="sessions", rows=[session_row("p1")])
    assert other.parent.parent.parent.name == "sessions"


def test_an_id_index_shared_across_calls_reads_each_partition_once(data_dir, monkeypatch):
    reads: list[Path] = []
    real_read = pq.read_table

    def counting_read(source, *args, **kwargs):
        reads.append(Path(source))
        return real_read(source, *args, **kwargs)

    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p0", minute=0)])  # from before
    monkeypatch.setattr(files.pq, "read_table", counting_read)
    index = IdIndex(data_dir)
    [path] = write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")], index=index)
    assert len(reads) == 1  # the existing file, once, to load the partition's ids
    assert index.fresh("pairs", H12, ["p2", "p1", "p0", "p2"]) == [0]  # kept up to date
    assert len(reads) == 3  # p0, loaded as a fingerprint only, confirmed from both files once
    reads.clear()
    for _ in range(3):  # redelivered batches: no new file, and no file read again
        assert write_rows(data_dir=data_dir, table="pairs", rows=[pair("p0"), pair("p1")],
                          index=index) == []
    assert reads == []
    [new] = write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1"), pair("p2")],
                       index=index)
    assert reads == []
    assert real_read(new).column("pair_id").to_pylist() == ["p2"]
    assert len(parquet_files(data_dir / "pairs")) == 3
    # without an index every call reads the partition's files again
    assert write_rows(data_dir=data_dir, table="pairs", rows=[pair("p2")]) == []
    assert len(reads) == 3


def test_a_fresh_id_index_reloads_ids_written_by_another_writer(data_dir):
    mine = IdIndex(data_dir)
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")], index=mine)
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p2"), pair("p3", minute=60)],
               index=IdIndex(data_dir))  # another writer, e.g. after a rebalance
    before = parquet_files(data_dir / "pairs")
    fresh = IdIndex(data_dir)
    assert fresh.fresh("pairs", H12, ["p1", "p2", "p3"]) == [2]
    assert fresh.fresh("pairs", H13, ["p1", "p3"]) == [0]
    assert write_rows(data_dir=data_dir, table="pairs",
                      rows=[pair("p1"), pair("p2"), pair("p3", minute=60)], index=fresh) == []
    assert parquet_files(data_dir / "pairs") == before
    assert mine.fresh("pairs", H12, ["p1", "p2"]) == [1]  # it knows what it loaded or wrote


@settings(max_examples=25, deadline=None)
@given(batches=st.lists(st.lists(st.sampled_from([f"p{i}" for i in range(12)]), max_size=6),
                        min_size=1, max_size=6),
       buckets=st.sampled_from([1, 3, 1 << 62]), recent=st.sampled_from([1, 16]))
def test_id_index_fingerprint_collisions_never_drop_or_duplicate_a_row(
        tmp_path_factory, batches, buckets, recent):
    """Fingerprints collide (forced: hash mod ``buckets``); the rows stored are still exactly
    the distinct ids written, whether the exact answer comes from recent writes or the files."""
    data_dir = tmp_path_factory.mktemp("data")
    init_data_dir(data_dir)
    index = IdIndex(data_dir, recent_writes=recent)
    written: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "_fingerprints", lambda ids: np.fromiter(
            (hash(i) % buckets for i in ids), dtype=np.int64))
        for batch in batches:
            write_rows(data_dir=data_dir, table="pairs", rows=[pair(i) for i in batch],
                       index=index)
            written += batch
    stored = read_table(data_dir=data_dir, table="pairs").column("pair_id").to_pylist()
    assert sorted(stored) == sorted(set(written))


def test_an_id_index_keeps_8_bytes_per_stored_id(data_dir):
    """The index of a partition holds fingerprints, not ids: only its last writes exactly."""
    index = IdIndex(data_dir, recent_writes=2)
    for k in range(30):
        write_rows(data_dir=data_dir, table="pairs", index=index,
                   rows=[pair(f"id-{k}-{i}") for i in range(100)])
    [entry] = index._entries.values()
    assert entry.sorted.nbytes + 8 * len(entry.added) == 8 * 3000
    assert sum(len(ids) for ids in entry.recent) == 200
    assert IdIndex(data_dir).fresh("pairs", H12, ["id-0-0", "id-29-99", "new"]) == [2]


def test_an_id_index_over_capacity_reloads_evicted_partitions(data_dir):
    index = IdIndex(data_dir, capacity=1)
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1", minute=0)], index=index)
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p2", minute=60)], index=index)
    assert list(index._entries) == [("pairs", H13)]  # H12 evicted
    before = parquet_files(data_dir / "pairs")
    assert write_rows(data_dir=data_dir, table="pairs",
                      rows=[pair("p1", minute=0), pair("p2", minute=60)], index=index) == []
    assert parquet_files(data_dir / "pairs") == before
    assert query(data_dir, "SELECT count(*), count(DISTINCT pair_id) FROM pairs") == [(2, 2)]


@pytest.mark.parametrize("view", [*TABLES, "partitions"])
def test_views_work_on_an_empty_data_dir(data_dir, view):
    assert query(data_dir, f"SELECT count(*) FROM {view}") == [(0,)]
    if view in TABLES:
        assert read_table(data_dir=data_dir, table=view).num_rows == 0


def test_views_have_every_column_of_their_table(data_dir):
    assert ensure_catalog(data_dir)
    con = connect_readonly(data_dir)
    try:
        for table, (model, _) in TABLES.items():
            cols = [d[0] for d in con.execute(f"SELECT * FROM {table} LIMIT 0").description]
            assert cols == list(model.model_fields), table
    finally:
        con.close()


def test_partial_and_temporary_files_are_ignored(data_dir):
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")])
    [good] = parquet_files(data_dir / "pairs")
    torn = good.read_bytes()[: good.stat().st_size // 2]  # no footer, as a killed writer leaves
    (good.parent / ".part-dead.parquet.0badc0de.tmp").write_bytes(torn)
    (good.parent / "part-dead.parquet.partial").write_bytes(torn)
    assert query(data_dir, "SELECT pair_id FROM pairs") == [("p1",)]
    assert read_table(data_dir=data_dir, table="pairs").column("pair_id").to_pylist() == ["p1"]
    assert query(data_dir, "SELECT partition, n_pairs FROM partitions") == [(H12, 1)]
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(120), 0, 0))
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=GAP) == [H12]
    [manifest] = sealed_partitions(data_dir)
    assert list(manifest.files) == [str(good.relative_to(data_dir))]


def test_a_torn_file_named_parquet_would_break_the_views(data_dir):
    """Why files are renamed into place: the glob reads every ``*.parquet``."""
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")])
    [good] = parquet_files(data_dir / "pairs")
    (good.parent / "part-torn.parquet").write_bytes(good.read_bytes()[:100])
    with pytest.raises(duckdb.Error):
        query(data_dir, "SELECT count(*) FROM pairs")


# --- watermarks and sealing ------------------------------------------------------------------

def test_watermarks_round_trip(data_dir):
    assert read_watermarks(data_dir) == {}
    mark = Watermark(kafka_partition=2, watermark=at(5), applied_offset=41, open_sessions=3)
    write_watermark(data_dir=data_dir, mark=mark)
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(1), 7, 0))
    assert read_watermarks(data_dir)[2] == mark
    assert sorted(read_watermarks(data_dir)) == [0, 2]
    assert not list((data_dir / "watermarks").glob("*.tmp"))


def test_sealable_needs_end_plus_gap():
    parts = ["2024-05-01T10", "2024-05-01T12"]
    assert sealable(partitions=parts, watermark=at(30) - timedelta(microseconds=1), after=GAP,
                    hours=2) == []
    assert sealable(partitions=parts, watermark=at(30), after=GAP, hours=2) == ["2024-05-01T10"]
    assert sealable(partitions=parts, watermark=at(150), after=GAP, hours=2) == parts
    assert sealable(partitions=[H12], watermark=at(90), after=GAP) == [H12]


def _sha256(data_dir: Path, partition: str) -> str:
    """The content hash of a partition's rows as stored now (the manifest must match it)."""
    return content_sha256({t: read_table(data_dir=data_dir, table=t, partitions=[partition])
                           for t in SEALED_TABLES})


def test_sealing_waits_for_every_kafka_partition_then_writes_the_manifest(data_dir):
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1", minute=1), pair("p2", minute=2)])
    # redelivered: p1 is stored already, so no file (was a second pairs file in H12)
    assert write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1", minute=1)]) == []
    write_rows(data_dir=data_dir, table="sessions", rows=[session_row("s1@1", minute=2)])
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p3", minute=61)])

    write_watermark(data_dir=data_dir, mark=Watermark(0, at(600), 10, 0))
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=2, gap=GAP) == []  # p1 unknown
    write_watermark(data_dir=data_dir, mark=Watermark(1, at(90) - timedelta(microseconds=1), 5, 1))
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=2, gap=GAP) == []  # min < end + gap
    assert not is_sealed(data_dir=data_dir, partition=H12)
    write_watermark(data_dir=data_dir, mark=Watermark(1, at(90), 6, 1))
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=2, gap=GAP) == [H12]
    assert is_sealed(data_dir=data_dir, partition=H12)
    assert not is_sealed(data_dir=data_dir, partition=H13)
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=2, gap=GAP) == []  # once only

    [row] = sealed_partitions(data_dir)
    files = sorted(str(p.relative_to(data_dir))
                   for t in SEALED_TABLES for p in live_files(data_dir / t / H12))
    assert len(files) == 2  # one pairs and one sessions file: the redelivery wrote none
    assert list(row.files) == files
    assert (row.partition, row.start, row.end) == (H12, at(0), at(60))
    assert row.watermark == at(90)
    assert (row.n_pairs, row.n_sessions, row.n_ties, row.n_unpaired,
            row.n_refusals) == (2, 1, 0, 0, 0)
    assert row.sha256 == _sha256(data_dir, H12)
    assert row.sealed_at <= datetime.now(timezone.utc)

    assert query(data_dir, "SELECT partition, sealed, n_pairs, n_sessions, sha256 IS NOT NULL "
                           "FROM partitions") == [
        (H12, True, 2, 1, True), (H13, False, 1, 0, False)]


def test_sealed_partition_skips_known_ids_but_keeps_new_ones(data_dir):
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1"), pair("p2")])
    write_rows(data_dir=data_dir, table="sessions", rows=[session_row("s1@0")])
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(600), 1, 0))
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=GAP) == [H12]
    before = parquet_files(data_dir / "pairs") + parquet_files(data_dir / "sessions")

    assert write_rows(data_dir=data_dir, table="pairs", rows=[pair("p2"), pair("p1")]) == []
    assert write_rows(data_dir=data_dir, table="sessions", rows=[session_row("s1@0")]) == []
    assert parquet_files(data_dir / "pairs") + parquet_files(data_dir / "sessions") == before

    [old] = sealed_partitions(data_dir)
    [path] = write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1"), pair("p9")])
    assert pq.read_table(path).column("pair_id").to_pylist() == ["p9"]  # no data loss
    ids = read_table(data_dir=data_dir, table="pairs", partitions=[H12]).column("pair_id")
    assert sorted(ids.to_pylist()) == ["p1", "p2", "p9"]
    assert query(data_dir, "SELECT count(*), count(DISTINCT pair_id) FROM pairs") == [(3, 3)]
    # the manifest is refreshed to match the files: new file list, counts and hash
    [row] = sealed_partitions(data_dir)
    rel = sorted(str(p.relative_to(data_dir)) for p in before + [path])
    assert list(row.files) == rel
    assert (row.n_pairs, row.n_sessions) == (3, 1)
    assert row.sha256 == _sha256(data_dir, H12) != old.sha256
    assert (row.start, row.end, row.watermark) == (old.start, old.end,
                                                            old.watermark)


def _seal_all(data_dir: Path) -> list[ManifestRow]:
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(600), 1, 0))
    seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=GAP)
    return sealed_partitions(data_dir)


def test_the_manifest_hash_is_of_the_rows_not_of_the_files_holding_them(tmp_path):
    rows = [pair(f"p{i}", minute=i) for i in range(6)]
    dirs = {name: tmp_path / name for name in ("one", "three", "edited", "elsewhere")}
    for path in dirs.values():
        init_data_dir(path)
    write_rows(data_dir=dirs["one"], table="pairs", rows=rows)
    for chunk in (rows[4:], rows[:2], rows[2:4]):  # other files, other write order
        write_rows(data_dir=dirs["three"], table="pairs", rows=chunk)
    write_rows(data_dir=dirs["edited"], table="pairs",
               rows=[*rows[:5], pair("p5", minute=5, rule="thumbs")])
    write_rows(data_dir=dirs["elsewhere"], table="pairs", rows=rows[:5])
    write_rows(data_dir=dirs["elsewhere"], table="sessions", rows=[session_row("p5", minute=5)])
    hashes = {name: _seal_all(path)[0].sha256 for name, path in dirs.items()}
    assert len(_seal_all(dirs["three"])[0].files) == 3
    assert hashes["one"] == hashes["three"]
    assert len({hashes["one"], hashes["edited"], hashes["elsewhere"]}) == 3


# --- readers never blocked by the writer -----------------------------------------------------

READER = r"""
import json, sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        n, d = con.execute("SELECT count(*), count(DISTINCT pair_id) FROM pairs").fetchone()
        print(json.dumps([n, d]), flush=True)
    except Exception as exc:
        print(json.dumps({"error": repr(exc)}), flush=True)
con.close()
"""


@pytest.mark.slow
def test_a_reader_in_another_process_sees_growing_deduplicated_pairs(data_dir, tmp_path):
    assert ensure_catalog(data_dir)
    catalog = data_dir / CATALOG_NAME
    out = tmp_path / "reader.out"
    with open(out, "w") as fh:
        reader = subprocess.Popen([sys.executable, "-c", READER, CATALOG_NAME, "3"], stdout=fh,
                                  stderr=subprocess.STDOUT, cwd=data_dir)  # as an analyst
    try:
        deadline = time.monotonic() + 20
        while not out.read_text().startswith("ready"):
            assert reader.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "reader never started"
            time.sleep(0.02)
        # the reader holds the catalog: re-creating the views neither waits nor fails (a new
        # file renamed over it; the reader keeps the one it opened)
        assert ensure_catalog(data_dir)
        catalog_stat = catalog.stat()

        unique = 0
        for batch in range(50):
            fresh = [pair(f"b{batch}-{i}", minute=(batch + i) % 180) for i in range(8)]
            again = [pair(f"b{batch - 1}-{i}", minute=(batch - 1 + i) % 180) for i in range(3)]
            write_rows(data_dir=data_dir, table="pairs", rows=fresh + (again if batch else []))
            unique += len(fresh)
            time.sleep(0.03)
        assert reader.wait(timeout=30) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()

    lines = out.read_text().splitlines()
    assert lines[0] == "ready"
    reads = [json.loads(line) for line in lines[1:]]
    errors = [r for r in reads if isinstance(r, dict)]
    assert errors == []
    assert len(reads) >= 10
    counts = [n for n, _ in reads]
    assert all(n == d for n, d in reads)
    assert counts == sorted(counts)  # never decreases
    assert len(set(counts)) > 5  # it really read while the batches landed
    assert max(counts) <= unique
    assert catalog.stat().st_mtime_ns == catalog_stat.st_mtime_ns  # the writer never touched it
    assert query(data_dir, "SELECT count(*), count(DISTINCT pair_id) FROM pairs") == [
        (unique, unique)]


def test_writing_and_sealing_never_open_the_catalog(data_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the writer opened DuckDB")

    monkeypatch.setattr(duckdb, "connect", refuse)
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")])
    write_rows(data_dir=data_dir, table="sessions", rows=[session_row()])
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(600), 1, 0))
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=GAP) == [H12]
    assert read_table(data_dir=data_dir, table="pairs").num_rows == 1
    assert not (data_dir / CATALOG_NAME).exists()


def test_ensure_catalog_never_waits_for_a_reader_in_the_same_process(data_dir):
    assert ensure_catalog(data_dir)
    con = connect_readonly(data_dir)
    try:
        assert ensure_catalog(data_dir)  # a new file renamed over the one the reader holds
        assert con.execute("SELECT count(*) FROM pairs").fetchall() == [(0,)]
    finally:
        con.close()


# --- data dir layout -------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_data_dir_is_owner_only_and_idempotent(tmp_path, umask_022):
    data_dir = tmp_path / "nested" / "data"
    init_data_dir(data_dir)
    assert _mode(data_dir) == 0o700
    for leaf in ("watermarks", "manifest", *(f"{t}/_schema" for t in TABLES)):
        assert _mode(data_dir / leaf) == 0o700, leaf
    schema_file = data_dir / "pairs" / "_schema" / "empty.parquet"
    before = schema_file.stat()
    init_data_dir(data_dir)
    assert schema_file.stat().st_ino == before.st_ino  # kept, not rewritten
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")])
    assert _mode(data_dir / "pairs" / H12) == 0o700


def test_every_dir_under_the_data_dir_is_owner_only(tmp_path, umask_022):
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")])
    modes = {str(p.relative_to(data_dir)): oct(_mode(p)) for p in data_dir.rglob("*")
             if p.is_dir()}
    assert modes == dict.fromkeys(modes, oct(0o700))


@pytest.mark.parametrize("env, expected", [(None, "jemalloc"), ("system", "system")])
def test_prefstream_processes_use_jemalloc_for_arrow_unless_the_user_names_a_pool(
        env, expected, tmp_path):
    """The pool is chosen once per process, at pyarrow's first use: a fresh interpreter that
    imports the CLI first, as every ``prefstream`` process does, then reads and writes Parquet;
    Arrow's own C++ code (Parquet reader and writer) must allocate from that pool too."""
    code = (
        "import prefstream.cli, pyarrow as pa, pyarrow.parquet as pq, sys\n"
        "path = sys.argv[1]\n"
        "pq.write_table(pa.table({'a': list(range(100000))}), path)\n"
        "pq.read_table(path)\n"
        "from prefstream.storage.tables import memory_pool\n"
        "others = [p for p in ('mimalloc', 'jemalloc', 'system') if p != memory_pool()]\n"
        "used = {p: getattr(pa, p + '_memory_pool')().max_memory() for p in others}\n"
        "assert not any(used.values()), used\n"
        "print(memory_pool())\n")
    environ = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if env is not None:
        environ["ARROW_DEFAULT_MEMORY_POOL"] = env
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.parquet")],
                         env=environ, cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.sampled_from(["p1", "p2", "p10", "P2", "p\u00e9", "p\u4e2d", "p\U0001f600"]),
                    max_size=12),
       chunk=st.integers(1, 5))
def test_the_content_hash_is_sha256_over_row_digests_in_id_order_first_of_each_id(ids, chunk):
    """The definition, computed the plain way: per table its name line, then the SHA-256 of
    each row's canonical JSON in id order (code point order), the first row of each id."""
    rows = [pair(pid, minute=i % 50) for i, pid in enumerate(ids)]
    table = to_arrow(TABLES["pairs"][0], rows)
    first: dict[str, bytes] = {}
    for row in table.to_pylist():
        line = json.dumps(row, sort_keys=True, default=lambda v: v.isoformat())
        first.setdefault(row["pair_id"], hashlib.sha256(line.encode()).digest())
    want = hashlib.sha256(b"table pairs\n" + b"".join(first[k] for k in sorted(first)))
    got, counts = files.json_rows_hash({"pairs": table.to_batches(max_chunksize=chunk)})
    assert (got, counts) == (want.hexdigest(), {"pairs": len(first)})
