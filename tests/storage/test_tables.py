"""Rows to Arrow (``storage.tables.to_arrow``): read from each row's ``__dict__``, the same table
as from ``model_dump``, for every stored table's model."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from factories import pair, session_row
from hypothesis import given, settings
from hypothesis import strategies as st

from prefstream.storage.tables import TABLES, arrow_schema, to_arrow


def _value(kind: pa.DataType) -> st.SearchStrategy[Any]:
    if pa.types.is_string(kind):
        return st.text(max_size=5)
    if pa.types.is_list(kind):
        return st.lists(st.text(max_size=3), max_size=3).map(tuple)
    if pa.types.is_timestamp(kind):
        return st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.sampled_from(
            [timezone.utc, timezone.max, timezone.min]))
    if kind == pa.float64():
        return st.floats(allow_nan=False)
    if kind == pa.bool_():
        return st.booleans()
    return st.integers(-2**63, 2**63 - 1)


@st.composite
def rows(draw: st.DrawFn) -> tuple[str, list[Any]]:
    table = draw(st.sampled_from(sorted(TABLES)))
    model = TABLES[table][0]
    fields = {f.name: st.one_of(st.none(), _value(f.type)) for f in arrow_schema(model)}
    made = draw(st.lists(st.fixed_dictionaries(fields), max_size=4))
    return table, [model.model_construct(**values) for values in made]


@settings(max_examples=80, deadline=None)
@given(case=rows())
def test_rows_convert_as_their_model_dump_does(case) -> None:
    table, built = case
    model = TABLES[table][0]
    want = pa.Table.from_pylist([r.model_dump() for r in built], schema=arrow_schema(model))
    assert to_arrow(model, built).equals(want)


def test_validated_rows_convert_as_their_model_dump_does() -> None:
    for table, built in (("pairs", [pair("p1"), pair("p2", chosen_position=None)]),
                         ("sessions", [session_row("s1@0")])):
        model = TABLES[table][0]
        want = pa.Table.from_pylist([r.model_dump() for r in built], schema=arrow_schema(model))
        assert to_arrow(model, built).equals(want)
        assert to_arrow(model, built).column(TABLES[table][1]).to_pylist() == [
            getattr(r, TABLES[table][1]) for r in built]
