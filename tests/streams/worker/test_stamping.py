"""The writer stamps each row's storage partition from the row's own time: a session's rows the
hour of its last event, a dead letter or late event its arrival hour, both floored to
``rules.partition_hours``; the core builds rows without one (``storage.partitions.stamp``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from factories import T0, event
from pydantic import BaseModel

from prefstream.schemas.records import Pair
from prefstream.settings import Settings
from prefstream.storage.files import init_data_dir, read_table, write_rows
from prefstream.storage.partitions import stamp
from prefstream.streams.worker.pipeline import replay

T0_MS = int(T0.timestamp() * 1000)


def record(offset: int, ev: BaseModel, arrival_ms: int) -> tuple[int, int, bytes, bytes, int]:
    return 0, offset, ev.session_id.encode(), ev.model_dump_json().encode(), arrival_ms  # type: ignore[attr-defined]


def test_session_rows_go_to_their_last_event_hour_and_side_rows_to_their_arrival(
        tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, partitions=1, metrics_port=0,
                        gap_s=3 * 3600, rules={"partition_hours": 2})
    init_data_dir(tmp_path)
    arrival = T0_MS + 2 * 3_600_000 + 5_000  # 14:00:05
    records = [record(0, event("impression", minute=0), arrival),
               record(1, event("edit", minute=125, edited_text="x"), arrival),
               (0, 2, b"s1", b"{not json", T0_MS + 5 * 3_600_000)]  # arrives 17:00
    replay(settings, records, final_tick_ms=T0_MS + 48 * 3_600_000)
    parts = {t: {r["partition"] for r in read_table(data_dir=tmp_path, table=t).to_pylist()}
             for t in ("pairs", "sessions", "dead_letters")}
    # the session ends at 14:05: partition 14 (floored to 2 h) although it started at 12:00
    assert parts == {"pairs": {"2024-05-01T14"}, "sessions": {"2024-05-01T14"},
                     "dead_letters": {"2024-05-01T16"}}


def test_stamp_sets_only_the_partition_and_unstamped_rows_are_refused(tmp_path: Path) -> None:
    row = Pair(pair_id="p", rule="edit", rules=("edit",), confidence=0.8, propensity_weight=1.0,
               prompt="q", chosen="a", rejected="b", session_id="s", user_id="u",
               request_id="r", rejected_request_id="r", chosen_response_id="x",
               rejected_response_id="y", chosen_model="m", rejected_model="m",
               chosen_position=0, rejected_position=1, event_time=T0, session_start=T0,
               session_end=T0 + timedelta(minutes=5))
    [stamped] = stamp([row], "2024-05-01T12")
    assert stamped.partition == "2024-05-01T12"
    assert stamped.model_dump(exclude={"partition"}) == row.model_dump(exclude={"partition"})
    init_data_dir(tmp_path)
    with pytest.raises(ValueError, match="without a storage partition"):
        write_rows(data_dir=tmp_path, table="pairs", rows=[row])
    assert not [p for p in (tmp_path / "pairs").iterdir() if p.name != "_schema"]
