"""The content hash of a sealed partition: a hash of its rows, not of the files holding them, so a
compaction that moves rows between files keeps it (``docs/storage-safety.md``, "Content hash").

Two schemes; a stored hash names its own, and every check recomputes in the stored one:

* ``cols1:<64 hex>`` (:data:`COLUMNS`, written by every seal since): per table, the first row of
  each id in id order, cut into blocks of :data:`BLOCK_ROWS` rows, each block fed to one SHA-256
  column by column in a fixed byte form (:func:`_feed_array`). Computed from Arrow buffers, with
  no Python object per row.
* ``<64 hex>`` without a prefix (:data:`JSON_ROWS`, manifests written before): the SHA-256 of
  each row's canonical JSON, in the same order (:func:`json_rows_hash`). Kept so those
  manifests keep verifying.

Both read the rows of a partition's files one batch at a time for the ids; the column scheme then
holds the rows of :data:`PASS_BYTES` at most (more rows take more passes over the files).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from prefstream.storage.tables import TABLES, arrow_schema

#: the scheme of hashes written by earlier versions: no prefix, 64 hex digits
JSON_ROWS = "json-rows"
#: the scheme seals write now, named by its prefix in the stored value
COLUMNS = "cols1"
_PREFIX = f"{COLUMNS}:"

#: rows per block of the column scheme: part of its definition (the hash depends on it), so a
#: fixed number, never a setting
BLOCK_ROWS = 65_536
#: rows per record batch when reading a partition's files
HASH_READ_ROWS = 4096
#: a seal holds about this many bytes of rows (as Parquet's uncompressed sizes count them) at once;
#: a larger partition is hashed in several passes over its files, whole blocks each
PASS_BYTES = 256 * 2**20

Batches = Callable[[], Iterator[pa.RecordBatch]]


def hash_scheme(stored: str) -> str:
    """The scheme a stored hash was made with."""
    return COLUMNS if stored.startswith(_PREFIX) else JSON_ROWS


def content_sha256(tables: Mapping[str, pa.Table], like: str | None = None) -> str:
    """Hash of the rows of ``tables`` (a partition's sealed tables, in the order given), in the
    scheme of the stored hash ``like`` (the current scheme without one)."""
    if like is not None and hash_scheme(like) == JSON_ROWS:
        return json_rows_hash({t: rows.to_batches(max_chunksize=HASH_READ_ROWS)
                               for t, rows in tables.items()})[0]
    return columns_hash({t: (lambda rows=rows: iter(rows.to_batches()), rows.schema)
                         for t, rows in tables.items()})[0]


def files_hash(listed: Mapping[str, Sequence[Path]]) -> tuple[str, dict[str, int]]:
    """The current scheme's hash of the rows of each table's files (in file order, as a seal
    lists them), and the rows per table (the first of each id counts)."""
    sources = {}
    for table, paths in listed.items():
        schema = arrow_schema(TABLES[table][0])
        sources[table] = (lambda t=table, p=paths: file_batches(t, p), schema)
    sizes = {t: _uncompressed_bytes(paths) for t, paths in listed.items()}
    return columns_hash(sources, sizes)


def file_batches(table: str, files: Sequence[Path]) -> Iterator[pa.RecordBatch]:
    """The rows of a table's files as record batches of its schema, in file order."""
    if not files:
        return iter(())
    scan = ds.dataset([str(f) for f in files], schema=arrow_schema(TABLES[table][0]),
                      format="parquet")
    return iter(scan.to_batches(batch_size=HASH_READ_ROWS, use_threads=False))


def _uncompressed_bytes(files: Sequence[Path]) -> int:
    total = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return total


# --- the column scheme -------------------------------------------------------------------------

def columns_hash(sources: Mapping[str, tuple[Batches, pa.Schema]],
                 sizes: Mapping[str, int] | None = None) -> tuple[str, dict[str, int]]:
    """``cols1:`` hash of tables given as a way to read their batches (once for the ids, once
    per pass for the rows) and their schema; ``sizes``: each table's bytes, to plan passes
    (none: one pass). Also the rows per table (the first of each id counts)."""
    digest = hashlib.sha256()
    counts = {}
    for table, (batches, schema) in sources.items():
        id_col = TABLES[table][1]
        total = 0 if sizes is None else sizes.get(table, 0)
        if total <= PASS_BYTES:  # one read: the rows, then the chosen ones among them
            whole = pa.Table.from_batches(list(batches()), schema=schema)
            chosen = _first_of_each_id(whole.column(id_col).chunks)
            passes: Iterable[pa.Table] = [whole.take(chosen)]
        else:  # one read for the ids, then one per pass
            chosen = _first_of_each_id(b.column(id_col) for b in batches())
            passes = _ordered_rows(batches, schema, chosen, _pass_rows(total, len(chosen)))
        counts[table] = len(chosen)
        _feed_str(digest, table)
        digest.update(struct.pack("<QQ", len(chosen), len(schema)))
        for field in schema:
            _feed_str(digest, field.name)
            _feed_str(digest, str(_canonical_type(field.type)))
        for rows in passes:
            for start in range(0, rows.num_rows, BLOCK_ROWS):
                for column in rows.slice(start, BLOCK_ROWS).columns:
                    _feed_array(digest, column.combine_chunks())
    return _PREFIX + digest.hexdigest(), counts


def _first_of_each_id(id_chunks: Iterable[pa.Array]) -> np.ndarray:
    """Read positions of the first row of each id (in read order), in id order (code points)."""
    ids = list(id_chunks)
    if not ids:
        return np.empty(0, dtype=np.int64)
    keyed = pa.table({"id": pa.chunked_array(ids, type=pa.string()),
                      "at": pa.array(np.arange(sum(len(i) for i in ids), dtype=np.int64))})
    ordered = keyed.sort_by([("id", "ascending"), ("at", "ascending")])
    sorted_ids = ordered.column("id").combine_chunks()
    first = np.ones(len(sorted_ids), dtype=bool)
    if len(sorted_ids) > 1:
        first[1:] = ~np.asarray(pc.equal(sorted_ids[1:], sorted_ids[:-1]))
    return ordered.column("at").to_numpy()[first]


def _pass_rows(total_bytes: int, n_rows: int) -> int:
    """Rows per pass: whole blocks, as many as :data:`PASS_BYTES` holds (at least one)."""
    if n_rows == 0:
        return 1
    per_row = total_bytes / n_rows
    return max(1, int(PASS_BYTES / per_row) // BLOCK_ROWS) * BLOCK_ROWS


def _ordered_rows(batches: Batches, schema: pa.Schema, chosen: np.ndarray,
                  pass_rows: int) -> Iterator[pa.Table]:
    """The chosen rows, in their order, as tables of ``pass_rows`` rows (the last shorter), each
    taken in a pass over the batches."""
    if len(chosen) == 0:
        return
    rank = np.full(int(chosen.max()) + 1, -1, dtype=np.int64)
    rank[chosen] = np.arange(len(chosen))
    for lo in range(0, len(chosen), pass_rows):
        picked, ranks, at = [], [], 0
        for batch in batches():
            mine = rank[at:at + batch.num_rows]
            keep = np.flatnonzero((mine >= lo) & (mine < lo + pass_rows))
            at += batch.num_rows
            if len(keep):
                picked.append(batch.take(pa.array(keep)))
                ranks.append(mine[keep])
        rows = pa.Table.from_batches(picked, schema=schema)
        yield rows.take(pa.array(np.argsort(np.concatenate(ranks), kind="stable")))


def _canonical_type(kind: pa.DataType) -> pa.DataType:
    """Timestamps are hashed as µs since the epoch, UTC, whatever unit they were read in."""
    if pa.types.is_timestamp(kind):
        return pa.timestamp("us", tz="UTC")
    if pa.types.is_list(kind):
        return pa.list_(_canonical_type(kind.value_type))
    return kind


def _feed_str(digest: Any, text: str) -> None:
    raw = text.encode()
    digest.update(struct.pack("<Q", len(raw)))
    digest.update(raw)


_NUMBERS = {pa.int64(): "<i8", pa.float64(): "<f8"}


def _feed_array(digest: Any, array: pa.Array) -> None:
    """One column of a block: a byte per value (1 valid, 0 null), then by type: strings their
    byte lengths (int64) and bytes; lists their lengths (int64) and their values as an array of
    their own; numbers, booleans and timestamps (µs) 8 bytes each, little-endian (a null counts
    as 0 or ""). With the block's row count and the schema before it, the bytes decode back to
    the values: two different blocks never feed the same bytes."""
    n = len(array)
    if array.null_count:
        digest.update(array.is_valid().to_numpy(zero_copy_only=False).tobytes())
    else:
        digest.update(b"\x01" * n)
    kind = array.type
    if pa.types.is_string(kind):
        _feed_strings(digest, pc.fill_null(array, ""))
    elif pa.types.is_list(kind):
        lengths = pc.fill_null(pc.list_value_length(array), 0)
        digest.update(lengths.to_numpy(zero_copy_only=False).astype("<i8").tobytes())
        _feed_array(digest, pc.list_flatten(array))
    elif pa.types.is_timestamp(kind):
        micros = array.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        digest.update(pc.fill_null(micros, 0).to_numpy().astype("<i8").tobytes())
    elif pa.types.is_boolean(kind):
        values = pc.fill_null(array, False).to_numpy(zero_copy_only=False)
        digest.update(values.astype("<i8").tobytes())
    elif kind in _NUMBERS:
        values = pc.fill_null(array, 0).to_numpy()
        digest.update(values.astype(_NUMBERS[kind]).tobytes())
    else:
        raise TypeError(f"no content hash for a column of type {kind}")


def _feed_strings(digest: Any, array: pa.Array) -> None:
    """Lengths then bytes of a string array without nulls, read from its buffers."""
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype="<i4", count=len(array) + 1,
                            offset=array.offset * 4)
    digest.update(np.diff(offsets).astype("<i8").tobytes())
    if data_buf is not None:
        digest.update(memoryview(data_buf)[offsets[0]:offsets[-1]])


# --- the JSON rows scheme (manifests written before ``cols1``) ---------------------------------

def json_rows_hash(batches: Mapping[str, Iterable[pa.RecordBatch]]
                   ) -> tuple[str, dict[str, int]]:
    """The hash of manifests written before :data:`COLUMNS`: per table, in the given order, its
    name and then the SHA-256 of every row's canonical JSON, in id order (the first row of each
    id); also the rows per table. Tables given as record batches, read one at a time."""
    digest = hashlib.sha256()
    counts = {}
    for table, stream in batches.items():
        id_col = TABLES[table][1]
        ids: list[pa.Array] = []
        digests = bytearray()
        for batch in stream:
            ids.append(batch.column(id_col))
            for row in batch.to_pylist():
                digests += hashlib.sha256(_CANONICAL_JSON.encode(row).encode()).digest()
        digest.update(f"table {table}\n".encode())
        counts[table] = 0
        if not ids:
            continue
        first = _first_of_each_id(ids)
        rows = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 32)
        digest.update(rows[first].tobytes())
        counts[table] = len(first)
    return digest.hexdigest(), counts


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"no canonical JSON for {type(value).__name__}")


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, default=_json_value)
