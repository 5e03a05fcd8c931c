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

A seal (:func:`files_hash`) reads a partition's rows whole for the column scheme, up to
:data:`ONE_READ_BYTES`; a larger partition is sealed in the JSON rows scheme, which holds only the
ids and a digest per row (``cols1`` of it would need every row in memory at once, or a pass over
its files per slice of ids). Both are checked alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from prefstream.storage.tables import TABLES, arrow_schema

log = logging.getLogger(__name__)

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
#: a seal reads a partition's rows whole (Arrow's bytes) up to this size for the column scheme;
#: beyond it, the JSON rows scheme (slow, but a batch at a time)
ONE_READ_BYTES = 256 * 2**20


def hash_scheme(stored: str) -> str:
    """The scheme a stored hash was made with."""
    return COLUMNS if stored.startswith(_PREFIX) else JSON_ROWS


def content_sha256(tables: Mapping[str, pa.Table], like: str | None = None) -> str:
    """Hash of the rows of ``tables`` (a partition's sealed tables, in the order given), in the
    scheme of the stored hash ``like`` (the current scheme without one)."""
    if like is not None and hash_scheme(like) == JSON_ROWS:
        return json_rows_hash({t: rows.to_batches(max_chunksize=HASH_READ_ROWS)
                               for t, rows in tables.items()})[0]
    return columns_hash(tables)[0]


def files_hash(listed: Mapping[str, Sequence[Path]]) -> tuple[str, dict[str, int]]:
    """The hash a seal stores for the rows of each table's files (in file order, as the seal
    lists them), and the rows per table (the first of each id counts): the current scheme, from
    the rows read whole; the JSON rows scheme when they take more than :data:`ONE_READ_BYTES`
    (it holds the ids and a digest per row only)."""
    read, size = {}, 0
    for table, paths in listed.items():
        batches = []
        for batch in file_batches(table, paths):
            size += batch.nbytes
            if size > ONE_READ_BYTES:
                log.info("rows of more than %d bytes: hashed as JSON rows, a batch at a time",
                         ONE_READ_BYTES)
                return json_rows_hash({t: file_batches(t, p) for t, p in listed.items()})
            batches.append(batch)
        read[table] = pa.Table.from_batches(batches, schema=arrow_schema(TABLES[table][0]))
    return columns_hash(read)


def file_batches(table: str, files: Sequence[Path]) -> Iterator[pa.RecordBatch]:
    """The rows of a table's files as record batches of its schema, in file order. A file in
    that schema (any this version wrote) is read directly, a quarter cheaper than through a
    dataset, which converts the others (columns added since, other types)."""
    schema = arrow_schema(TABLES[table][0])
    for f in files:
        parquet = pq.ParquetFile(f)
        if parquet.schema_arrow.equals(schema):
            yield from parquet.iter_batches(batch_size=HASH_READ_ROWS, use_threads=False)
        else:
            scan = ds.dataset([str(f)], schema=schema, format="parquet")
            yield from scan.to_batches(batch_size=HASH_READ_ROWS, use_threads=False)


# --- the column scheme -------------------------------------------------------------------------

def columns_hash(tables: Mapping[str, pa.Table]) -> tuple[str, dict[str, int]]:
    """``cols1:`` hash of tables, and the rows per table (the first of each id counts). Rows are
    copied in id order one block at a time."""
    digest = hashlib.sha256()
    counts = {}
    for table, rows in tables.items():
        chosen = _first_of_each_id(rows.column(TABLES[table][1]).chunks)
        counts[table] = len(chosen)
        _feed_str(digest, table)
        digest.update(struct.pack("<QQ", len(chosen), len(rows.schema)))
        for field in rows.schema:
            _feed_str(digest, field.name)
            _feed_str(digest, str(_canonical_type(field.type)))
        for start in range(0, len(chosen), BLOCK_ROWS):
            for column in rows.take(chosen[start:start + BLOCK_ROWS]).columns:
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
    if len(array) == 0:  # its offsets buffer may be absent
        return
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
