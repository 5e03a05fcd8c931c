"""The content hash of sealed rows (``storage.content_hash``): the ``cols1`` scheme against a plain
reference of its definition, over the sealed tables' real schemas; what changes it and what does
not; and manifests of both schemes verifying (``storage.verify.read_sealed``)."""

from __future__ import annotations

import hashlib
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import at, pair, session_row
from helpers.storage import H12
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prefstream.storage import content_hash
from prefstream.storage.compact import compact_after_flush
from prefstream.storage.content_hash import (
    COLUMNS,
    JSON_ROWS,
    columns_hash,
    content_sha256,
    files_hash,
    hash_scheme,
    json_rows_hash,
)
from prefstream.storage.files import (
    Watermark,
    live_files,
    read_table,
    seal_ready,
    sealed_partitions,
    write_rows,
    write_watermark,
)
from prefstream.storage.seals import MANIFEST_SCHEMA, manifest_table
from prefstream.storage.tables import SEALED_TABLES, TABLES, arrow_schema
from prefstream.storage.verify import read_sealed

UTC = timezone.utc
SCHEMAS = {t: arrow_schema(TABLES[t][0]) for t in SEALED_TABLES}


# --- the definition, the plain way -------------------------------------------------------------

def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _ref_text(text: str) -> bytes:
    return _u64(len(text.encode())) + text.encode()


def _ref_values(kind: pa.DataType, values: list[Any]) -> bytes:
    """A column's bytes as ``storage.content_hash._feed_array`` defines them, value by value."""
    out = bytes(v is not None for v in values)
    if pa.types.is_string(kind):
        raw = [(v or "").encode() for v in values]
        return out + b"".join(struct.pack("<q", len(r)) for r in raw) + b"".join(raw)
    if pa.types.is_list(kind):
        items = [v or [] for v in values]
        lengths = b"".join(struct.pack("<q", len(v)) for v in items)
        return out + lengths + _ref_values(kind.value_type, [x for v in items for x in v])
    if pa.types.is_timestamp(kind):
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return out + b"".join(struct.pack("<q", 0 if v is None else (v - epoch)
                                          // timedelta(microseconds=1)) for v in values)
    fmt = "<d" if kind == pa.float64() else "<q"
    return out + b"".join(struct.pack(fmt, 0 if v is None else v) for v in values)


def reference_hash(tables: dict[str, pa.Table], block_rows: int) -> str:
    digest = hashlib.sha256()
    for name, table in tables.items():
        id_col = TABLES[name][1]
        first: dict[str, dict[str, Any]] = {}
        for row in table.to_pylist():
            first.setdefault(row[id_col], row)
        rows = [first[k] for k in sorted(first)]  # code point order
        digest.update(_ref_text(name) + _u64(len(rows)) + _u64(len(table.schema)))
        for field in table.schema:
            digest.update(_ref_text(field.name) + _ref_text(str(field.type)))
        for start in range(0, len(rows), block_rows):
            block = rows[start:start + block_rows]
            for field in table.schema:
                digest.update(_ref_values(field.type, [r[field.name] for r in block]))
    return f"{COLUMNS}:{digest.hexdigest()}"


# --- rows of the real schemas ------------------------------------------------------------------

IDS = st.sampled_from(["a", "b", "ab", "B", "a\u00e9", "\u4e2d", "\U0001f600", ""])
TEXT = st.text(max_size=6)


def _value(field: pa.Field) -> st.SearchStrategy[Any]:
    kind = field.type
    if pa.types.is_string(kind):
        base: st.SearchStrategy[Any] = TEXT
    elif pa.types.is_list(kind):
        base = st.lists(TEXT, max_size=3)
    elif pa.types.is_timestamp(kind):
        base = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1),
                            timezones=st.just(UTC))
    elif kind == pa.float64():
        base = st.floats(allow_nan=False, width=64)
    elif kind == pa.bool_():
        base = st.booleans()
    else:
        base = st.integers(-2**63, 2**63 - 1)
    return st.one_of(st.none(), base)  # every column of the schemas is nullable


@st.composite
def tables(draw: st.DrawFn, min_rows: int = 0) -> dict[str, pa.Table]:
    """One or two sealed tables (their real schemas), rows with repeated ids, random chunks."""
    names = draw(st.lists(st.sampled_from(SEALED_TABLES), min_size=1, max_size=2, unique=True))
    out = {}
    for name in names:
        schema, id_col = SCHEMAS[name], TABLES[name][1]
        row = st.fixed_dictionaries({f.name: IDS if f.name == id_col else _value(f)
                                     for f in schema})
        rows = draw(st.lists(row, min_size=min_rows, max_size=7))
        table = pa.Table.from_pylist(rows, schema=schema)
        cut = draw(st.integers(1, 4))
        out[name] = pa.Table.from_batches(table.to_batches(max_chunksize=cut), schema=schema)
    return out


def rehash(tables: dict[str, pa.Table]) -> str:
    return content_sha256(tables)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tabs=tables(), block=st.sampled_from([1, 2, 3, 65_536]))
def test_the_columns_scheme_is_its_definition_over_the_real_schemas(tabs, block):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(content_hash, "BLOCK_ROWS", block)
        got = content_sha256(tabs)
    assert got == reference_hash(tabs, block)
    assert hash_scheme(got) == COLUMNS


@settings(max_examples=60, deadline=None)
@given(tabs=tables(), data=st.data())
def test_chunks_and_the_order_of_distinct_ids_do_not_count(tabs, data):
    """What a compaction may do: other files (chunks), other order of rows with distinct ids."""
    moved = {}
    for name, table in tabs.items():
        ids = table.column(TABLES[name][1]).to_pylist()
        firsts = _first_rows(ids)
        order = data.draw(st.permutations(firsts))  # the first of each id, any order
        moved[name] = table.take(pa.array(order, type=pa.int64())).combine_chunks()
    assert rehash(moved) == rehash(tabs)


def _first_rows(ids: list[Any]) -> list[int]:
    """The rows that count: the first of each id."""
    return sorted({i: n for n, i in reversed(list(enumerate(ids)))}.values())


def _one_row_changed(table: pa.Table, row: int, column: str, value: Any) -> pa.Table:
    rows = table.to_pylist()
    rows[row][column] = value
    return pa.Table.from_pylist(rows, schema=table.schema)


@settings(max_examples=80, deadline=None)
@given(tabs=tables(min_rows=1), data=st.data())
def test_any_changed_field_or_dropped_or_added_row_changes_it(tabs, data):
    name = data.draw(st.sampled_from(sorted(tabs)))
    table, id_col = tabs[name], TABLES[name][1]
    ids = table.column(id_col).to_pylist()
    row = data.draw(st.sampled_from(_first_rows(ids)))  # a row that counts
    field = data.draw(st.sampled_from(table.schema.names))
    old = table.column(field)[row].as_py()
    new = data.draw(IDS if field == id_col else _value(table.schema.field(field)))
    assume(new != old and not (field == id_col and new in ids))
    before = rehash(tabs)
    assert rehash(tabs | {name: _one_row_changed(table, row, field, new)}) != before
    dropped = table.filter(pa.array([i != ids[row] for i in ids]))
    assert rehash(tabs | {name: dropped}) != before
    fresh = data.draw(IDS.filter(lambda i: i not in ids))
    added = pa.concat_tables([table, _one_row_changed(table.slice(row, 1), 0, id_col, fresh)])
    assert rehash(tabs | {name: added}) != before


@settings(max_examples=60, deadline=None)
@given(tabs=tables(min_rows=2), data=st.data())
def test_values_swapped_between_rows_change_it(tabs, data):
    name = data.draw(st.sampled_from(sorted(tabs)))
    table, id_col = tabs[name], TABLES[name][1]
    ids = table.column(id_col).to_pylist()
    firsts = _first_rows(ids)
    assume(len(firsts) >= 2)
    a, b = data.draw(st.lists(st.sampled_from(firsts), min_size=2, max_size=2, unique=True))
    field = data.draw(st.sampled_from([n for n in table.schema.names if n != id_col]))
    va, vb = table.column(field)[a].as_py(), table.column(field)[b].as_py()
    assume(va != vb)
    swapped = _one_row_changed(_one_row_changed(table, a, field, vb), b, field, va)
    assert rehash(tabs | {name: swapped}) != rehash(tabs)


def test_a_later_copy_of_an_id_does_not_count_and_nothing_runs_together():
    rows = [pair("p1", prompt="ab", chosen="c"), pair("p2")]
    base = {"pairs": pa.Table.from_pylist([r.model_dump() for r in rows],
                                          schema=SCHEMAS["pairs"])}
    again = pa.Table.from_pylist([pair("p1", prompt="edited").model_dump()],
                                 schema=SCHEMAS["pairs"])
    assert rehash({"pairs": pa.concat_tables([base["pairs"], again])}) == rehash(base)
    moved = pa.Table.from_pylist([pair("p1", prompt="a", chosen="bc").model_dump(),
                                  rows[1].model_dump()], schema=SCHEMAS["pairs"])
    assert rehash({"pairs": moved}) != rehash(base)  # a byte moved between two fields
    null_position = _one_row_changed(base["pairs"], 0, "chosen_position", None)
    zero_position = _one_row_changed(base["pairs"], 0, "chosen_position", 0)
    assert len({rehash(base), rehash({"pairs": null_position}),
                rehash({"pairs": zero_position})}) == 3
    as_ties = {"ties": SCHEMAS["ties"].empty_table(), "pairs": base["pairs"]}
    assert rehash(as_ties) != rehash(base)  # another table, other names, another hash


# --- from files ------------------------------------------------------------------------------

def test_a_seal_hashes_its_files_rows_and_a_large_partition_as_json_rows(data_dir, tmp_path,
                                                                         monkeypatch):
    rows = [pair(f"p{i:03d}", minute=i % 60, prompt="x" * (i % 7)) for i in range(40)]
    for chunk in (rows[25:], rows[:10], rows[10:25]):
        write_rows(data_dir=data_dir, table="pairs", rows=chunk)
    write_rows(data_dir=data_dir, table="sessions", rows=[session_row("s1@0")])
    listed = {t: live_files(data_dir / t / H12) for t in SEALED_TABLES}
    copies = tmp_path / "copies.parquet"  # later copies of p005..p011, other values: not counted
    pq.write_table(pa.Table.from_pylist([r.model_copy(update={"rule": "edited"}).model_dump()
                                         for r in rows[5:12]], schema=SCHEMAS["pairs"]), copies)
    listed["pairs"] = [*listed["pairs"], copies]
    whole = {t: pa.concat_tables([pq.read_table(f) for f in paths] or [SCHEMAS[t].empty_table()])
             for t, paths in listed.items()}
    counts = {"pairs": 40, "ties": 0, "unpaired": 0, "refusals": 0, "sessions": 1}
    assert files_hash(listed) == (content_sha256(whole), counts)
    assert content_sha256(whole) == content_sha256(whole | {"pairs": whole["pairs"].slice(0, 40)})
    older = tmp_path / "older.parquet"  # a file without a column added since: nulls, as read
    pq.write_table(whole["pairs"].slice(0, 3).drop_columns(["rejected_position"]), older)
    as_read = whole["pairs"].slice(0, 3).set_column(
        whole["pairs"].schema.get_field_index("rejected_position"), "rejected_position",
        pa.nulls(3, pa.int64()))
    assert files_hash({"pairs": [older]}) == (content_sha256({"pairs": as_read}), {"pairs": 3})
    monkeypatch.setattr(content_hash, "ONE_READ_BYTES", 1000)
    big = files_hash(listed)
    assert big == json_rows_hash({t: table.to_batches() for t, table in whole.items()})
    assert hash_scheme(big[0]) == JSON_ROWS and big[1] == counts
    assert content_sha256(whole, like=big[0]) == big[0]
    assert columns_hash({"pairs": SCHEMAS["pairs"].empty_table()})[1] == {"pairs": 0}


# --- manifests of both schemes -----------------------------------------------------------------

def _sealed(data_dir: Path) -> None:
    write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}", minute=i) for i in range(5)])
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p9", minute=9)])
    write_rows(data_dir=data_dir, table="sessions", rows=[session_row("s1@0")])
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(600), 1, 0))
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=timedelta(minutes=30)) == [H12]


def _as_old_seal(data_dir: Path) -> str:
    """Rewrite the seal as the versions before ``cols1`` wrote it: the JSON rows hash."""
    [row] = sealed_partitions(data_dir)
    old = json_rows_hash({t: read_table(data_dir=data_dir, table=t, partitions=[H12])
                          .to_batches() for t in SEALED_TABLES})[0]
    path = data_dir / "manifest" / f"{H12}.parquet"
    pq.write_table(manifest_table(row.model_copy(update={"sha256": old})), path)
    assert pq.read_schema(path).equals(MANIFEST_SCHEMA)
    return old


@pytest.mark.parametrize("scheme", [COLUMNS, JSON_ROWS])
def test_a_manifest_of_either_scheme_verifies_and_a_tampered_partition_fails(data_dir, scheme):
    _sealed(data_dir)
    stored = (_as_old_seal(data_dir) if scheme == JSON_ROWS
              else sealed_partitions(data_dir)[0].sha256)
    assert hash_scheme(stored) == scheme
    assert (len(stored), stored[:6] == f"{COLUMNS}:") == ((64, False) if scheme == JSON_ROWS
                                                          else (70, True))
    [row] = sealed_partitions(data_dir)
    content = read_sealed(data_dir, row)
    assert content.intact and content.sha256 == stored
    # a compaction moves the rows into one file and keeps the stored hash, in its scheme
    compact_after_flush(data_dir=data_dir, sealed=[H12], written={}, max_files=32,
                        grace=timedelta(0))
    [row] = sealed_partitions(data_dir)
    assert len(live_files(data_dir / "pairs" / H12)) == 1 and row.sha256 == stored
    assert read_sealed(data_dir, row).intact
    _tamper_merged(data_dir)
    content = read_sealed(data_dir, row)
    assert not content.intact and hash_scheme(content.sha256) == scheme


def _tamper_merged(data_dir: Path) -> None:
    [path] = live_files(data_dir / "pairs" / H12)
    rows = pq.read_table(path).to_pylist()
    rows[3]["confidence"] = rows[3]["confidence"] / 2 + 0.01
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)


def test_a_reseal_after_late_rows_moves_an_old_manifest_to_the_current_scheme(data_dir):
    _sealed(data_dir)
    old = _as_old_seal(data_dir)
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p7", minute=7)])  # late: reseals
    [row] = sealed_partitions(data_dir)
    assert hash_scheme(row.sha256) == COLUMNS and row.n_pairs == 7 and row.sha256 != old
    assert read_sealed(data_dir, row).intact

