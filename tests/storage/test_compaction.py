"""Compaction: generations behind a ``current`` link, merged without changing a row.

Real files in ``tmp_path``, real DuckDB views, real reader processes holding the catalog, the real
pipeline for the flush hook. Many readers at once while the worker runs are in
``test_concurrent_readers.py``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import at, pair, session_row
from helpers.storage import (
    ARRIVAL_MS,
    H12,
    analyst_connected,
    canonical,
    feed_pipeline,
    query,
    traffic_records,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefstream.schemas.manifest import ManifestRow
from prefstream.schemas.records import DeadLetter, Pair
from prefstream.settings import Settings
from prefstream.storage import compact, files
from prefstream.storage.catalog import (
    catalog_in_use,
    live_scan_sql,
    table_view_sql,
)
from prefstream.storage.compact import (
    GC,
    MARKERS_DIR,
    MAX_PER_PASS,
    TODO,
    compact_after_flush,
    compact_partition,
    marked,
    remove_superseded,
    remove_superseded_manifests,
)
from prefstream.storage.files import (
    IdIndex,
    Watermark,
    content_sha256,
    init_data_dir,
    is_sealed,
    live_files,
    manifest_version,
    manifest_versions,
    read_table,
    reseal,
    seal_ready,
    sealed_partitions,
    write_rows,
    write_watermark,
)
from prefstream.storage.partitions import (
    CURRENT,
    file_name,
    generation_dir,
    generation_number,
    partition_for,
    stamp_of,
)
from prefstream.storage.tables import SEALED_TABLES, TABLES, to_arrow
from prefstream.streams.worker.pipeline import replay

H13 = "2024-05-01T13"
GAP = timedelta(minutes=30)
GRACE = timedelta(minutes=10)


def stored_rows(files: Iterable[Path]) -> list[dict]:
    """Every row of the files as stored (no dedupe), in file order."""
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def live_rows(data_dir: Path, table: str, partition: str) -> list[dict]:
    return stored_rows(live_files(data_dir / table / partition))


view = query  # a SQL query through the catalog's views


def current(data_dir: Path, table: str, partition: str) -> str:
    return os.readlink(data_dir / table / partition / CURRENT)


def generations(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if generation_number(n) is not None)


# --- names -----------------------------------------------------------------------------------

def test_names_inside_a_partition_folder():
    when = datetime(2024, 5, 1, 14, 30, 1, 250, tzinfo=timezone(timedelta(hours=2)))
    assert file_name(compacted=True, at=when, token="ab12cd34") == (
        "compact-20240501T123001000250-ab12cd34.parquet")
    assert file_name(compacted=False, at=when, token="00ff00ff").startswith("part-2024")
    assert generation_dir(3) == "g000003" and generation_number("g000003") == 3
    assert [generation_number(n) for n in ("current", "g12", "g0000001", ".g000001")] == [
        None, None, None, None]
    # merged rows sort first, then flushes in write order
    names = [file_name(compacted=False, at=at(1), token="b"), file_name(compacted=True,
             at=at(2), token="a"), file_name(compacted=False, at=at(0), token="c")]
    assert [n.split("-")[0] for n in sorted(names)] == ["compact", "part", "part"]


# --- one partition ---------------------------------------------------------------------------

def test_compaction_merges_in_write_order_into_the_next_generation(data_dir):
    index = IdIndex(data_dir)
    for batch in ([pair("p3"), pair("p1")], [pair("p2", minute=5)], [pair("p0", minute=9)]):
        write_rows(data_dir=data_dir, table="pairs", rows=batch, index=index)
    folder = data_dir / "pairs" / H12
    before = live_files(folder)
    assert [f.parent.name for f in before] == ["g000000"] * 3

    merged = compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    assert merged is not None and merged.parent == folder / "g000001"
    assert merged.name.startswith("compact-") and current(data_dir, "pairs", H12) == "g000001"
    assert live_files(folder) == [merged]
    assert stored_rows([merged]) == stored_rows(before)  # same rows, same order
    assert [r["pair_id"] for r in stored_rows([merged])] == ["p3", "p1", "p2", "p0"]
    assert all(f.exists() for f in before)  # the old generation stays for the grace period
    assert marked(data_dir, GC) == [("pairs", H12)]
    assert view(data_dir, "SELECT count(*), count(DISTINCT pair_id) FROM pairs") == [(4, 4)]

    listing = sorted(folder.rglob("*"))
    assert compact_partition(data_dir=data_dir, table="pairs", partition=H12) is None
    assert sorted(folder.rglob("*")) == listing  # idempotent: one file is left as it is

    # late rows land in the current generation, after the merged rows
    [late] = write_rows(data_dir=data_dir, table="pairs", rows=[pair("p9"), pair("p1")],
                        index=index)
    assert late.parent == merged.parent and live_files(folder) == [merged, late]
    assert [r["pair_id"] for r in read_table(data_dir=data_dir, table="pairs").to_pylist()] == [
        "p3", "p1", "p2", "p0", "p9"]
    again = compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    assert again is not None and again.parent.name == "g000002"
    assert stored_rows([again]) == stored_rows([merged, late])


def test_a_merge_streams_row_groups_and_never_holds_the_partition_whole(data_dir, monkeypatch):
    """A partition written to all day is merged again and again as it grows: the merge copies
    record batches into row groups of bounded size instead of loading every file at once."""
    monkeypatch.setattr(compact, "MERGE_ROW_GROUP", 4)
    index = IdIndex(data_dir)
    for start in range(0, 30, 6):
        write_rows(data_dir=data_dir, table="pairs", index=index,
                   rows=[pair(f"p{i:02d}", minute=i % 50) for i in range(start, start + 6)])
    folder = data_dir / "pairs" / H12
    before = live_files(folder)
    merged = compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    assert merged is not None and stored_rows([merged]) == stored_rows(before)
    meta = pq.ParquetFile(merged).metadata
    assert meta.num_rows == 30
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert len(sizes) >= 5 and max(sizes) < 2 * 4  # never more than one batch past the bound
    assert pq.read_schema(merged) == pq.read_schema(before[0])


def test_a_merge_bounds_row_groups_by_bytes_for_long_texts(data_dir, monkeypatch):
    """Rows with long texts: the byte bound cuts row groups long before the row bound."""
    monkeypatch.setattr(compact, "MERGE_GROUP_BYTES", 64 << 10)
    monkeypatch.setattr(compact, "MERGE_READ_ROWS", 2)
    index = IdIndex(data_dir)
    long = "x" * 8000
    for start in range(0, 40, 8):
        write_rows(data_dir=data_dir, table="pairs", index=index, rows=[
            pair(f"p{i:02d}", minute=i % 50).model_copy(update={"chosen": long})
            for i in range(start, start + 8)])
    before = live_files(data_dir / "pairs" / H12)
    merged = compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    assert merged is not None and stored_rows([merged]) == stored_rows(before)
    meta = pq.ParquetFile(merged).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 40 and max(sizes) <= 10  # 64 KiB of 8 KB texts, plus one batch


def test_a_reader_that_listed_before_a_compaction_reads_the_old_files_until_the_grace(data_dir):
    for i in range(3):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}")])
    listed = live_files(data_dir / "pairs" / H12)  # a reader lists, then is slow to open
    merged = compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    assert merged is not None
    swap = stamp_of(merged.name)  # taken right before the swap
    assert swap is not None
    assert remove_superseded(data_dir=data_dir, table="pairs", partition=H12, grace=GRACE,
                             now=swap + GRACE - timedelta(microseconds=1)) == []
    assert [r["pair_id"] for r in stored_rows(listed)] == ["p0", "p1", "p2"]  # still there
    removed = remove_superseded(data_dir=data_dir, table="pairs", partition=H12, grace=GRACE,
                                now=swap + GRACE)
    assert removed == [data_dir / "pairs" / H12 / "g000000"]
    assert generations(data_dir / "pairs" / H12) == ["g000001"]
    assert marked(data_dir, GC) == []  # the marker goes with the last old generation
    assert view(data_dir, "SELECT pair_id FROM pairs ORDER BY 1") == [("p0",), ("p1",), ("p2",)]


def test_a_generation_left_empty_by_a_crash_is_removed_once_a_later_one_is_current(data_dir):
    """A kill between creating a generation and swapping it in leaves a folder without a merged
    file; the next compaction goes past it. It was never read: it goes at once, and the older
    generation waits for the grace after the swap that really retired it."""
    folder = data_dir / "pairs" / H12
    for i in range(2):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}")])
    (folder / "g000001").mkdir()  # the crash leftover: created, never swapped in
    merged = compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    assert merged is not None and merged.parent.name == "g000002"
    swap = stamp_of(merged.name)
    assert swap is not None
    removed = remove_superseded(data_dir=data_dir, table="pairs", partition=H12, grace=GRACE,
                                now=swap + GRACE - timedelta(microseconds=1))
    assert [p.name for p in removed] == ["g000001"]
    removed = remove_superseded(data_dir=data_dir, table="pairs", partition=H12, grace=GRACE,
                                now=swap + GRACE)
    assert [p.name for p in removed] == ["g000000"]
    assert generations(folder) == ["g000002"] and marked(data_dir, GC) == []
    assert sorted(r["pair_id"] for r in live_rows(data_dir, "pairs", H12)) == ["p0", "p1"]


def test_each_generation_waits_for_the_grace_after_its_own_retirement(data_dir):
    """The hour being written is merged again and again: each old generation goes a grace after
    the swap that retired it, not after the last one; a folder above ``current`` (a crash
    between writing a merge and swapping) is never read and goes at once."""
    folder = data_dir / "pairs" / H12
    stamps = []
    for i in range(3):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"a{i}"), pair(f"b{i}", minute=1)])
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"c{i}", minute=2)])
        merged = compact_partition(data_dir=data_dir, table="pairs", partition=H12)
        assert merged is not None
        stamps.append(stamp_of(merged.name))
        time.sleep(0.002)
    (folder / "g000009").mkdir()  # an orphan
    assert generations(folder) == ["g000000", "g000001", "g000002", "g000003", "g000009"]
    removed = remove_superseded(data_dir=data_dir, table="pairs", partition=H12, grace=GRACE,
                                now=stamps[1] + GRACE - timedelta(microseconds=1))
    assert [p.name for p in removed] == ["g000000", "g000009"]
    assert marked(data_dir, GC) == [("pairs", H12)]
    removed = remove_superseded(data_dir=data_dir, table="pairs", partition=H12, grace=GRACE,
                                now=stamps[2] + GRACE)
    assert [p.name for p in removed] == ["g000001", "g000002"]
    assert generations(folder) == ["g000003"] and marked(data_dir, GC) == []
    assert len(live_rows(data_dir, "pairs", H12)) == 9


_row = st.tuples(st.integers(0, 14), st.sampled_from(["a", "b"]))  # id (it fixes the hour), rule
_ops = st.lists(st.one_of(st.lists(_row, min_size=1, max_size=6), st.just("compact")),
                min_size=1, max_size=10)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_compaction_keeps_the_exact_rows_of_every_partition(ops):
    """Any interleaving of writes (redeliveries included) and compactions: compacting changes
    no row of any partition nor their order, keeps ids, is idempotent; the views show each row
    once, old generations included on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        init_data_dir(data_dir)
        index = IdIndex(data_dir)
        for op in ops:
            if op != "compact":
                rows = [pair(f"p{i}", minute=i * 17 % 120, rule=r) for i, r in op]
                write_rows(data_dir=data_dir, table="pairs", rows=rows, index=index)
                continue
            for partition in (H12, H13):
                before = live_rows(data_dir, "pairs", partition)
                merged = compact_partition(data_dir=data_dir, table="pairs", partition=partition)
                assert live_rows(data_dir, "pairs", partition) == before
                assert len(live_files(data_dir / "pairs" / partition)) <= 1
                if merged is not None:
                    listing = sorted(merged.parent.parent.rglob("*"))
                    assert compact_partition(data_dir=data_dir, table="pairs",
                                             partition=partition) is None
                    assert sorted(merged.parent.parent.rglob("*")) == listing
        stored = [r for p in (H12, H13) for r in live_rows(data_dir, "pairs", p)]
        ids = [r["pair_id"] for r in stored]
        assert len(ids) == len(set(ids)) == len({f"p{i}" for op in ops if op != "compact"
                                                 for i, _ in op})
        shown = view(data_dir, "SELECT * FROM pairs")
        names = list(TABLES["pairs"][0].model_fields)
        assert canonical(dict(zip(names, r, strict=True)) for r in shown) == canonical(stored)


_folder = st.tuples(st.booleans(), st.integers(0, 3), st.lists(st.integers(0, 3), max_size=5))


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(st.tuples(_folder, _folder))
def test_the_views_read_the_current_generation_or_a_folder_from_before(folders):
    """Per partition folder: from before generations (files in the folder itself) or with
    generations (files in several ``g<N>/``, ``current`` at one of them). The views read exactly
    what ``live_files`` lists, never an old generation."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_data_dir(root)
        expected = []
        for partition, (legacy, current_gen, file_gens) in zip((H12, H13), folders, strict=True):
            folder = root / "pairs" / partition
            folder.mkdir()
            for i, gen in enumerate(file_gens):  # one row per file, its id where it lies
                where = folder if legacy else folder / generation_dir(gen)
                where.mkdir(exist_ok=True)
                pair_id = f"{partition}/{where.name}/{i}"
                row = pair(pair_id, minute=0 if partition == H12 else 60)
                pq.write_table(to_arrow(Pair, [row]), where / f"part-{i}.parquet")
            if not legacy:
                (folder / generation_dir(current_gen)).mkdir(exist_ok=True)
                os.symlink(generation_dir(current_gen), folder / CURRENT)
            expected += [r["pair_id"] for r in stored_rows(live_files(folder))]
        con = duckdb.connect()
        try:
            got = con.execute(f"SELECT pair_id FROM ({table_view_sql(root, 'pairs')})").fetchall()
        finally:
            con.close()
        assert sorted(r[0] for r in got) == sorted(expected)


def test_a_folder_from_before_generations_keeps_its_layout(data_dir):
    folder = data_dir / "pairs" / H12
    folder.mkdir()
    for i in range(2):  # as the worker wrote them before generations existed
        name = f"part-2024050112000{i}-x.parquet"
        pq.write_table(to_arrow(Pair, [pair(f"old{i}")]), folder / name)
    [new] = write_rows(data_dir=data_dir, table="pairs", rows=[pair("new"), pair("old0")])
    assert new.parent == folder and not (folder / CURRENT).exists()
    assert compact_partition(data_dir=data_dir, table="pairs", partition=H12) is None
    assert compact_after_flush(data_dir=data_dir, sealed=[H12], written={"pairs": [pair("new")]},
                               max_files=1, grace=GRACE) == []
    assert marked(data_dir, TODO) == []  # never compacted: no retry left behind
    assert view(data_dir, "SELECT pair_id FROM pairs ORDER BY 1") == [
        ("new",), ("old0",), ("old1",)]


# --- sealed partitions and the manifest ------------------------------------------------------

def seal_all(data_dir: Path) -> list[str]:
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(600), 1, 0))
    return seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=GAP)


def manifest_row(data_dir: Path, partition: str) -> ManifestRow:
    return next(r for r in sealed_partitions(data_dir) if r.partition == partition)


def test_a_compaction_after_rows_landed_without_a_reseal_hashes_them(data_dir):
    """A writer killed between a late row's file and its reseal: the next merge's manifest
    counts and hashes that row instead of carrying the old hash over."""
    for i in range(3):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}")])
    assert seal_all(data_dir) == [H12]
    old = manifest_row(data_dir, H12)
    files._write_part(data_dir / "pairs" / H12, to_arrow(Pair, [pair("p9")]))  # no reseal
    assert manifest_row(data_dir, H12).sha256 == old.sha256
    compact_after_flush(data_dir=data_dir, sealed=[], written={"pairs": [pair("p9")]},
                        max_files=1, grace=GRACE)
    row = manifest_row(data_dir, H12)
    assert row.n_pairs == 4 and row.sha256 != old.sha256
    assert row.sha256 == content_sha256(
        {t: read_table(data_dir=data_dir, table=t, partitions=[H12]) for t in SEALED_TABLES})


def test_compacting_a_sealed_partition_keeps_its_hash_and_lists_the_new_files(data_dir):
    for i in range(3):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}")])
        write_rows(data_dir=data_dir, table="sessions", rows=[session_row(f"s{i}@0")])
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("q0", minute=60)])
    sealed = seal_all(data_dir)
    assert sealed == [H12, H13]
    old = manifest_row(data_dir, H12)
    assert len(old.files) == 6

    made = compact_after_flush(data_dir=data_dir, sealed=sealed, written={}, max_files=32,
                               grace=GRACE)
    assert sorted(p.parent.parent.name for p in made) == [H12, H12]  # pairs and sessions
    assert marked(data_dir, TODO) == []
    row = manifest_row(data_dir, H12)
    assert list(row.files) == sorted(str(p.relative_to(data_dir)) for p in made)
    assert row.sha256 == old.sha256
    assert (row.n_pairs, row.n_sessions, row.sealed_at) == (
        old.n_pairs, old.n_sessions, old.sealed_at)
    assert [manifest_version(p.name) for p in manifest_versions(data_dir)[H12]] == [0, 1]
    assert len(manifest_row(data_dir, H13).files) == 1  # one file: nothing to merge
    assert view(data_dir, "SELECT partition, sealed, sha256, n_pairs FROM partitions") == [
        (H12, True, old.sha256, 3), (H13, True, manifest_row(data_dir, H13).sha256, 1)]

    # a late row for the sealed, compacted partition still lands, and is resealed
    [late] = write_rows(data_dir=data_dir, table="pairs", rows=[pair("p9"), pair("p0")])
    assert late.parent.name == "g000001"
    resealed = manifest_row(data_dir, H12)
    assert resealed.n_pairs == 4 and resealed.sha256 != old.sha256
    assert str(late.relative_to(data_dir)) in resealed.files
    assert view(data_dir, f"SELECT sha256, n_pairs FROM partitions WHERE partition = '{H12}'"
                ) == [(resealed.sha256, 4)]
    [again] = compact_after_flush(data_dir=data_dir, sealed=[], written={"pairs": [pair("p9")]},
                                  max_files=1, grace=GRACE)
    assert again.parent.name == "g000002"
    final = manifest_row(data_dir, H12)
    assert final.sha256 == resealed.sha256 and final.n_pairs == 4
    assert [f for f in final.files if f.startswith("pairs/")] == [
        str(again.relative_to(data_dir))]
    assert sorted(r["pair_id"] for r in read_table(data_dir=data_dir, table="pairs",
                                                   partitions=[H12]).to_pylist()) == [
        "p0", "p1", "p2", "p9"]


def test_a_manifest_version_is_never_rewritten(data_dir):
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p0")])
    seal_all(data_dir)
    first = manifest_versions(data_dir)[H12][0]
    inode = first.stat().st_ino
    reseal(data_dir=data_dir, partition=H12)
    reseal(data_dir=data_dir, partition=H12, keep_sealed_at=True)
    versions = manifest_versions(data_dir)[H12]
    assert [manifest_version(p.name) for p in versions] == [0, 1, 2]
    assert first.stat().st_ino == inode
    rows = [pq.read_table(p).to_pylist()[0] for p in versions]
    assert rows[2]["sealed_at"] == rows[1]["sealed_at"] > rows[0]["sealed_at"]
    assert sealed_partitions(data_dir) == [ManifestRow.model_validate(rows[2])]
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=GAP) == []  # sealed once
    # old versions go after the grace, version 0 stays: it marks the partition sealed
    assert remove_superseded_manifests(data_dir=data_dir, grace=GRACE) == []
    assert remove_superseded_manifests(data_dir=data_dir, grace=timedelta(0)) == [versions[1]]
    assert manifest_versions(data_dir)[H12] == [versions[0], versions[2]]
    assert is_sealed(data_dir=data_dir, partition=H12)
    reseal(data_dir=data_dir, partition=H12)
    assert manifest_version(manifest_versions(data_dir)[H12][-1].name) == 3


# --- the catalog held open: swaps and manifest deletions wait --------------------------------

def test_nothing_a_view_may_list_changes_while_a_reader_holds_the_catalog(data_dir):
    for i in range(3):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}")])
    seal_all(data_dir)
    reseal(data_dir=data_dir, partition=H12)
    reseal(data_dir=data_dir, partition=H12)
    assert catalog_in_use(data_dir) is False  # no catalog file yet
    with analyst_connected(data_dir):
        assert catalog_in_use(data_dir) is True
        folder = data_dir / "pairs" / H12
        listing = sorted(folder.rglob("*"))
        assert compact_after_flush(data_dir=data_dir, sealed=[H12], written={}, max_files=32,
                                   grace=timedelta(0)) == []
        assert sorted(folder.rglob("*")) == listing and current(data_dir, "pairs", H12) == (
            "g000000")
        assert marked(data_dir, TODO) == [("pairs", H12)]  # retried at a later flush
        assert len(manifest_versions(data_dir)[H12]) == 3
        write_rows(data_dir=data_dir, table="pairs", rows=[pair("p3")])  # writes go on
    assert catalog_in_use(data_dir) is False
    [merged] = compact_after_flush(data_dir=data_dir, sealed=[], written={}, max_files=32,
                                   grace=timedelta(0))
    assert merged.parent.name == "g000001" and marked(data_dir, TODO) == []
    assert len(stored_rows([merged])) == 4
    versions = manifest_versions(data_dir)[H12]
    assert [manifest_version(p.name) for p in versions] == [0, 4]  # 3 was the late row's
    assert view(data_dir, "SELECT partition, sealed, n_pairs FROM partitions") == [(H12, True, 4)]


def test_old_generations_need_no_reader_check_only_the_grace(data_dir):
    """Views never list old generations (they go through ``current``): deleting them is safe
    with the catalog held; readers that listed real paths are covered by the grace."""
    for i in range(2):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}")])
    compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    with analyst_connected(data_dir):
        removed = remove_superseded(data_dir=data_dir, table="pairs", partition=H12,
                                    grace=GRACE, now=datetime.now(timezone.utc) + GRACE)
        assert [p.name for p in removed] == ["g000000"]


def test_the_live_scan_for_readers_without_the_catalog(data_dir):
    assert live_scan_sql(data_dir, "pairs") is not None  # the zero-row schema file
    for i in range(3):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}")])
    listed = live_scan_sql(data_dir, "pairs")
    compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    after = live_scan_sql(data_dir, "pairs")
    assert listed is not None and after is not None
    assert "/current/" not in listed and listed.count(".parquet'") == 4  # real paths
    assert after.count(".parquet'") == 2  # the merged file and the schema file
    con = duckdb.connect()
    try:
        for sql in (listed, after):  # the old generation is still there within the grace
            assert con.execute(f"SELECT count(*) FROM ({sql})").fetchall() == [(3,)]
    finally:
        con.close()


# --- the flush pass --------------------------------------------------------------------------

def test_the_flush_pass_compacts_only_what_it_is_told_and_removes_what_is_due(data_dir):
    for i in range(3):  # three files in 12:00 and in 13:00
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"a{i}"), pair(f"b{i}", minute=60)])
    dead = [DeadLetter(dead_letter_id=f"t[0]@{i}", topic="t", kafka_partition=0, offset=i,
                       reason="bad", raw="x", received_at=at(1), partition=H12) for i in range(3)]
    for row in dead:
        write_rows(data_dir=data_dir, table="dead_letters", rows=[row])
    # only partitions written in this flush are looked at, and only above the threshold
    made = compact_after_flush(data_dir=data_dir, sealed=[], max_files=3, grace=GRACE,
                               written={"pairs": [pair("a0")], "dead_letters": dead[:1]})
    assert made == []
    made = compact_after_flush(data_dir=data_dir, sealed=[], max_files=2, grace=GRACE,
                               written={"pairs": [pair("a0")], "dead_letters": dead[:1]})
    assert sorted((p.parents[2].name, p.parents[1].name) for p in made) == [
        ("dead_letters", H12), ("pairs", H12)]
    assert len(live_files(data_dir / "pairs" / H13)) == 3  # over the threshold, not written
    assert marked(data_dir, GC) == [("dead_letters", H12), ("pairs", H12)]
    assert view(data_dir, "SELECT count(*), count(DISTINCT dead_letter_id) FROM dead_letters"
                ) == [(3, 3)]
    # a later pass with a zero grace deletes every old generation and every marker
    compact_after_flush(data_dir=data_dir, sealed=[], written={}, max_files=2,
                        grace=timedelta(0))
    assert marked(data_dir, GC) == []
    assert [generations(data_dir / t / H12) for t in ("pairs", "dead_letters")] == [
        ["g000001"], ["g000001"]]
    assert view(data_dir, "SELECT count(*) FROM pairs") == [(6,)]


def test_a_backlog_is_worked_off_a_few_merges_per_flush(data_dir):
    hours = [partition_for(at(60 * h)) for h in range(MAX_PER_PASS + 3)]
    for i in range(2):
        write_rows(data_dir=data_dir, table="pairs",
                   rows=[pair(f"p{h}-{i}", minute=60 * h) for h in range(len(hours))])
    first = compact_after_flush(data_dir=data_dir, sealed=hours, written={}, max_files=32,
                                grace=GRACE)
    assert len(first) == MAX_PER_PASS and len(marked(data_dir, TODO)) == 3
    second = compact_after_flush(data_dir=data_dir, sealed=[], written={}, max_files=32,
                                 grace=GRACE)
    assert len(second) == 3 and marked(data_dir, TODO) == []
    assert sorted(p.parents[1].name for p in first + second) == hours


def test_a_failed_compaction_is_logged_and_changes_nothing(data_dir, caplog):
    for i in range(2):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"a{i}"), pair(f"b{i}", minute=60)])
    [good, _] = live_files(data_dir / "pairs" / H12)
    rows = pq.read_table(good)  # readable, but its times cannot be cast: the merge fails
    at_col = rows.schema.get_field_index("event_time")
    pq.write_table(rows.set_column(at_col, "event_time", pa.array(["not a time"] * len(rows))),
                   good.parent / "part-99999999T000000000000-deadbeef.parquet")
    listing = sorted((data_dir / "pairs" / H12).rglob("*"))
    with caplog.at_level(logging.ERROR, logger="prefstream.storage.compact"):
        made = compact_after_flush(data_dir=data_dir, sealed=[H12, H13], written={},
                                   max_files=32, grace=GRACE)
    assert [p.parents[1].name for p in made] == [H13]
    assert sorted((data_dir / "pairs" / H12).rglob("*")) == listing
    assert "compaction of pairs/2024-05-01T12 failed" in caplog.text
    assert ("pairs", H12) in marked(data_dir, TODO)  # tried again at the next flush


def test_markers_and_merged_files_are_owner_only(data_dir):
    old = os.umask(0o022)
    try:
        for i in range(2):
            write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}")])
        merged = compact_partition(data_dir=data_dir, table="pairs", partition=H12)
    finally:
        os.umask(old)
    assert merged is not None
    folder = data_dir / MARKERS_DIR
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    assert [oct(p.stat().st_mode & 0o777) for p in folder.iterdir()] == [oct(0o600)]
    assert oct(merged.stat().st_mode & 0o777) == oct(0o600)
    assert oct(merged.parent.stat().st_mode & 0o777) == oct(0o700)


# --- the worker's flush hook -----------------------------------------------------------------

@pytest.mark.slow
def test_the_pipeline_compacts_after_sealing_and_matches_a_single_flush(tmp_path):
    records = traffic_records(700, 2)
    compacted = Settings(data_dir=tmp_path / "many", partitions=2, metrics_port=0,
                         compaction_max_files=2, compaction_grace_s=0)
    init_data_dir(compacted.data_dir)
    assert feed_pipeline(compacted, records, flush_every=25) > 20
    reference = compacted.model_copy(update={"data_dir": tmp_path / "one"})
    init_data_dir(reference.data_dir)
    replay(reference, records, final_tick_ms=ARRIVAL_MS + 10**9)  # one flush: one file each

    many, one = sealed_partitions(compacted.data_dir), sealed_partitions(reference.data_dir)
    assert len(many) >= 4
    assert [(r.partition, r.sha256, r.n_pairs) for r in many] == [
        (r.partition, r.sha256, r.n_pairs) for r in one]
    for row in many:  # sealed: one live file per table, and the manifest lists exactly those
        live = [f for t in SEALED_TABLES for f in live_files(compacted.data_dir / t /
                                                             row.partition)]
        assert list(row.files) == sorted(str(f.relative_to(compacted.data_dir)) for f in live)
        assert len(live) == len({f.parents[1] for f in live})
    assert any(f.name.startswith("compact-")
               for f in compacted.data_dir.glob("*/*/current/*.parquet"))
    assert marked(compacted.data_dir, GC) == [] == marked(compacted.data_dir, TODO)
    for table in TABLES:
        got = read_table(data_dir=compacted.data_dir, table=table).to_pylist()
        want = read_table(data_dir=reference.data_dir, table=table).to_pylist()
        assert canonical(got) == canonical(want), table
