"""The manifest row typed (``schemas.manifest.ManifestRow``) over an unchanged on-disk format:
files written in the format of earlier versions read into the model, the model writes them back
value for value, and a file whose row is not a manifest row falls back like a damaged one."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefstream.schemas.manifest import SEALED_TABLES, ManifestRow
from prefstream.storage.files import init_data_dir, sealed_partitions
from prefstream.storage.seals import MANIFEST_SCHEMA, manifest_table, read_manifest_row

T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


def old_format(partition: str = "2024-05-01T12", **fields: object) -> dict[str, object]:
    """A manifest row as earlier versions wrote it: a dict in ``MANIFEST_SCHEMA``."""
    return {"partition": partition, "start": T0, "end": T0 + timedelta(hours=1),
            "sealed_at": T0 + timedelta(hours=2), "watermark": T0 + timedelta(hours=1, minutes=31),
            "files": ["pairs/2024-05-01T12/current/part-1.parquet"], "n_pairs": 3, "n_ties": 0,
            "n_unpaired": 1, "n_refusals": 2, "n_sessions": 1, "sha256": "ab" * 32} | fields


def test_the_model_is_the_on_disk_schema_field_for_field() -> None:
    assert list(ManifestRow.model_fields) == MANIFEST_SCHEMA.names
    assert [f"n_{t}" for t in SEALED_TABLES] == [n for n in MANIFEST_SCHEMA.names
                                                 if n.startswith("n_")]


def test_a_manifest_file_of_an_earlier_version_reads_and_writes_back_the_same(
        tmp_path: Path) -> None:
    init_data_dir(tmp_path)
    path = tmp_path / "manifest" / "2024-05-01T12.parquet"
    written = pa.Table.from_pylist([old_format()], schema=MANIFEST_SCHEMA)
    pq.write_table(written, path)
    [row] = sealed_partitions(tmp_path)
    assert (row.partition, row.n_pairs, row.n_rows("refusals"), row.files) == (
        "2024-05-01T12", 3, 2, ("pairs/2024-05-01T12/current/part-1.parquet",))
    assert row.watermark == T0 + timedelta(hours=1, minutes=31)
    assert manifest_table(row).equals(written)
    with pytest.raises(KeyError, match="not a sealed table"):
        row.n_rows("dead_letters")


@given(n=st.integers(0, 2**40), sha=st.text("0123456789abcdef", min_size=64, max_size=64),
       files=st.lists(st.text(min_size=1, max_size=30), max_size=4))
def test_a_row_round_trips_through_its_table(n: int, sha: str, files: list[str]) -> None:
    row = ManifestRow.model_validate(old_format(n_sessions=n, sha256=sha, files=files))
    assert ManifestRow.model_validate(manifest_table(row).to_pylist()[0]) == row


def test_a_version_whose_row_is_not_a_manifest_row_falls_back_to_the_previous(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    init_data_dir(tmp_path)
    folder = tmp_path / "manifest"
    pq.write_table(pa.Table.from_pylist([old_format()], schema=MANIFEST_SCHEMA),
                   folder / "2024-05-01T12.parquet")
    pq.write_table(pa.Table.from_pylist([old_format(n_pairs=None, sha256=None)],
                                        schema=MANIFEST_SCHEMA),
                   folder / "2024-05-01T12.v000001.parquet")
    with caplog.at_level(logging.WARNING):
        [row] = sealed_partitions(tmp_path)
    assert row.n_pairs == 3 and "v000001" in caplog.text
    with pytest.raises(ValueError):
        read_manifest_row(folder / "2024-05-01T12.v000001.parquet")
