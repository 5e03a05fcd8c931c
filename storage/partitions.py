"""Partition naming: a pure function of event time, the writer's stamp of each row's partition;
names inside a partition folder."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TypeVar

from pydantic import BaseModel

# the event-time naming is the rows' own (their ``partition`` field): kept with the records
from prefstream.schemas.records import (  # noqa: F401  (re-exported)
    PARTITION_FORMAT,
    UNSTAMPED,
    construct_valid,
    partition_bounds,
    partition_for,
)

Row = TypeVar("Row", bound=BaseModel)


def stamp(rows: Iterable[Row], partition: str) -> list[Row]:
    """The rows with their storage ``partition`` set: the writer decides where rows are stored
    (a session's rows: :func:`partition_for` its last event), the core that builds them does
    not.

    What ``row.model_copy(update={"partition": partition})`` makes, built directly (every row of
    every closed session passes here): the fields in their order, ``partition`` among the fields
    set. A row with extra fields or private attributes (none of ``schemas.records``) is copied.
    """
    out = []
    for row in rows:
        if row.__pydantic_extra__ is not None or row.__pydantic_private__ is not None:
            out.append(row.model_copy(update={"partition": partition}))
            continue
        values = {**row.__dict__, "partition": partition}  # the key keeps its place
        out.append(construct_valid(type(row), values, {*row.__pydantic_fields_set__, "partition"}))
    return out

# --- inside a partition folder: generations -----------------------------------------------------
#
# ``<table>/<partition>/current`` is a symlink to the generation folder readers use,
# ``g<NNNNNN>/``, holding ``part-<stamp>-<token>.parquet`` (rows of one flush) and at most one
# ``compact-<stamp>-<token>.parquet`` (the rows of the previous generation, merged). A partition
# folder without ``current`` holds its files itself (written before generations existed).

CURRENT = "current"
#: a table's folder of zero-row schema files (not a partition)
SCHEMA_DIR = "_schema"
PART_PREFIX = "part-"
COMPACT_PREFIX = "compact-"
_GENERATION = re.compile(r"^g([0-9]{6})$")


def generation_dir(number: int) -> str:
    return f"g{number:06d}"


def generation_number(name: str) -> int | None:
    """``g000003`` -> 3; None for any other name."""
    match = _GENERATION.match(name)
    return int(match.group(1)) if match else None


_STAMP_FORMAT = "%Y%m%dT%H%M%S%f"
_STAMP = re.compile(r"^(?:part|compact)-([0-9]{8}T[0-9]{12})-")


def file_name(*, compacted: bool, at: datetime, token: str) -> str:
    """Name of a data file: its kind, UTC time (so names sort in write order) and a token."""
    prefix = COMPACT_PREFIX if compacted else PART_PREFIX
    return f"{prefix}{at.astimezone(timezone.utc):{_STAMP_FORMAT}}-{token}.parquet"


def stamp_of(name: str) -> datetime | None:
    """The time in a name made by :func:`file_name`; None for other names."""
    match = _STAMP.match(name)
    if match is None:
        return None
    return datetime.strptime(match.group(1), _STAMP_FORMAT).replace(tzinfo=timezone.utc)
