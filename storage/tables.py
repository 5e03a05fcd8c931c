"""The stored tables: their row models, id columns and Arrow schemas (derived from ``schemas/``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import types
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

# tables whose partitions follow the event-time watermark and get sealed: defined with the
# manifest row that counts them
from prefstream.schemas.manifest import SEALED_TABLES  # noqa: F401  (re-exported)
from prefstream.schemas.records import (
    DeadLetter,
    LateEvent,
    Pair,
    Refusal,
    SessionSummary,
    Tie,
    UnpairedRow,
)

#: table name -> (row model, id column used for idempotent writes and deduplicated views)
TABLES: dict[str, tuple[type[BaseModel], str]] = {
    "pairs": (Pair, "pair_id"),
    "ties": (Tie, "tie_id"),
    "unpaired": (UnpairedRow, "row_id"),
    "refusals": (Refusal, "refusal_id"),
    "sessions": (SessionSummary, "session_key"),
    "dead_letters": (DeadLetter, "dead_letter_id"),
    "late_events": (LateEvent, "late_id"),
}
#: side tables partitioned by arrival hour
SIDE_TABLES = ("dead_letters", "late_events")

_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    datetime: pa.timestamp("us", tz="UTC"),
}


def _arrow_type(annotation: Any) -> pa.DataType:
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _arrow_type(args[0])
    if origin in (tuple, list) and args:
        return pa.list_(_arrow_type(args[0]))
    if origin is typing.Literal:
        return pa.string()
    raise TypeError(f"no Arrow type for {annotation!r}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """Arrow schema of a row model: one column per field, in declaration order."""
    return pa.schema(
        [pa.field(name, _arrow_type(f.annotation)) for name, f in model.model_fields.items()]
    )


def memory_pool() -> str:
    """pyarrow's memory pool in this process (``prefstream`` makes it jemalloc; see
    ``prefstream/cli.py``)."""
    return pa.default_memory_pool().backend_name


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_memory() -> None:
    """Hand memory freed after large work (a seal reads an hour's ids and row digests, a merge
    whole row groups) back to the system: pyarrow's pool and glibc's heap keep freed blocks for
    reuse, so without this a long-running worker's resident size steps up at each hour's seal."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def warm_up() -> None:
    """Pay pyarrow's first conversion from Python objects now: it imports pandas (when
    installed), which takes about a second; a worker calls this before it consumes, so its
    first flush does not stall the stream."""
    for model, _ in TABLES.values():
        to_arrow(model, [])


def to_arrow(model: type[BaseModel], rows: list[BaseModel]) -> pa.Table:
    """Rows to an Arrow table with the model's schema (timestamps normalised to UTC). A row's
    ``__dict__`` holds its field values as ``model_dump`` returns them for these flat models
    (no nested models, serializers or computed fields), without building a dict per row."""
    return pa.Table.from_pylist([r.__dict__ for r in rows], schema=arrow_schema(model))
