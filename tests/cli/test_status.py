"""``prefstream status`` on real data dirs built with the storage functions.

The data dir below: pairs and sessions in 12:00 and 13:00 (12:00 sealed), two Kafka partitions
with watermarks, dead letters and late events, and two model versions (v0001 promoted).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from factories import at, pair, session_row

from prefstream.cli import main
from prefstream.schemas.records import DeadLetter, LateEvent
from prefstream.status import collect, format_text
from prefstream.storage.catalog import CATALOG_NAME, ensure_catalog
from prefstream.storage.files import (
    Watermark,
    init_data_dir,
    live_files,
    seal_ready,
    write_rows,
    write_watermark,
)
from prefstream.storage.partitions import partition_for
from prefstream.trainer.registry import promote, save_version

H12, H13 = "2024-05-01T12", "2024-05-01T13"
NOW = at(180)  # 15:00, two hours after 13:00 ended


class _Saveable:
    def save_pretrained(self, save_directory: str | Path) -> None:
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "weights.bin").write_bytes(b"w")


def _metadata(version: str, *, promoted: bool, accuracy: float) -> dict[str, Any]:
    return {
        "version": version, "created_at": at(150), "promoted": promoted, "cutoff": at(0),
        "n_train": 40, "n_eval": 10, "reasons": [f"calibration: agreement {accuracy}"],
        "metrics": {"eval": {"accuracy": accuracy, "mean_margin": 0.4,
                             "length_matched": {"n": 6, "accuracy": accuracy - 0.1}},
                    "probes": {"overall_rate": 0.25}},
        "gates": {"calibration": {"passed": promoted, "agreement": accuracy}},
    }


def dead_letter(offset: int, reason: str, *, kafka_partition: int = 0) -> DeadLetter:
    return DeadLetter(dead_letter_id=f"prefstream-events[{kafka_partition}]@{offset}",
                      topic="prefstream-events", kafka_partition=kafka_partition, offset=offset,
                      reason=reason, raw="{", received_at=at(61), partition=partition_for(at(61)))


def late_event(offset: int, *, kafka_partition: int = 1) -> LateEvent:
    return LateEvent(late_id=f"prefstream-events[{kafka_partition}]@{offset}", event_id="e9",
                     session_id="s9", event_type="copy", ts=at(1), watermark=at(60),
                     kafka_partition=kafka_partition, offset=offset, raw="{}",
                     received_at=at(62), partition=partition_for(at(62)))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    init_data_dir(d)
    pairs = [pair("p1", minute=0), pair("p2", minute=10), pair("p3", minute=70)]
    write_rows(data_dir=d, table="pairs", rows=pairs)
    write_rows(data_dir=d, table="pairs", rows=pairs[:1])  # a redelivered batch: counted once
    sessions = [session_row("s1@0", minute=0), session_row("s2@0", minute=5, kafka_partition=1),
                session_row("s3@0", minute=75, kafka_partition=1)]
    write_rows(data_dir=d, table="sessions", rows=sessions)
    write_rows(data_dir=d, table="dead_letters", rows=[
        dead_letter(3, "ts: 2030-01-01T00:00:00+00:00 is in the future of arrival x"),
        dead_letter(4, "ts: 2031-01-01T00:00:00+00:00 is in the future of arrival y"),
        dead_letter(5, "message of 300000 bytes over max_message_bytes", kafka_partition=1),
    ])
    write_rows(data_dir=d, table="late_events", rows=[late_event(9)])
    write_watermark(data_dir=d, mark=Watermark(0, at(100), applied_offset=41, open_sessions=2))
    write_watermark(data_dir=d, mark=Watermark(1, at(95), applied_offset=17, open_sessions=0))
    assert seal_ready(data_dir=d, n_kafka_partitions=2, gap=timedelta(minutes=30)) == [H12]
    for version, promoted, accuracy in (("v0001", True, 0.8), ("v0002", False, 0.6)):
        save_version(d, version, model=_Saveable(), tokenizer=_Saveable(),
                     metadata=_metadata(version, promoted=promoted, accuracy=accuracy))
    promote(d, "v0001")
    return d


def test_report_covers_partitions_rows_watermarks_and_models(data_dir: Path) -> None:
    r = collect(data_dir, now=NOW)
    p = r["partitions"]
    assert (p["total"], p["sealed"], p["unsealed"]) == (2, 1, 1)
    assert (p["oldest_sealed"], p["newest_sealed"], p["partition_hours"]) == (H12, H12, 1)
    assert p["low_watermark"] == at(95)
    [u] = p["unsealed_partitions"]
    assert u["partition"] == H13 and (u["start"], u["end"]) == (at(60), at(120))
    assert u["age_s"] == 3600.0  # 13:00's hour ended at 14:00, an hour before NOW
    assert u["low_watermark_past_end_s"] == -25 * 60  # sealing waits for end + gap
    assert u["rows"] == {"pairs": 1, "ties": 0, "unpaired": 0, "refusals": 0, "sessions": 1}
    assert r["rows"] == {"pairs": 3, "ties": 0, "unpaired": 0, "refusals": 0, "sessions": 3,
                         "dead_letters": 3, "late_events": 1}
    assert r["kafka_partitions"] == [
        {"kafka_partition": 0, "watermark": at(100), "applied_offset": 41, "open_sessions": 2,
         "closed_sessions": 1, "dead_letters": 2, "late_events": 0},
        {"kafka_partition": 1, "watermark": at(95), "applied_offset": 17, "open_sessions": 0,
         "closed_sessions": 2, "dead_letters": 1, "late_events": 1},
    ]
    assert r["dead_letters"] == {"total": 3, "by_kind": {
        "ts": 2, "message of N bytes over max_message_bytes": 1}}
    assert r["late_events"] == 1
    models = r["models"]
    assert models["versions"] == 2 and models["current_version"] == "v0001"
    assert models["current"]["version"] == "v0001" and models["current"]["is_current"]
    latest = models["latest"]
    assert (latest["version"], latest["promoted"], latest["is_current"]) == ("v0002", False, False)
    assert latest["heldout_accuracy"] == 0.6 and latest["calibration_agreement"] == 0.6
    assert latest["length_matched_accuracy"] == pytest.approx(0.5)
    assert (latest["probe_raise_rate"], latest["n_train"], latest["n_eval"]) == (0.25, 40, 10)


def test_cli_json_and_text(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--data-dir", str(data_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"]["pairs"] == 3 and out["partitions"]["unsealed"] == 1
    assert out["models"]["current"]["version"] == "v0001"
    assert main(["status", "--data-dir", str(data_dir)]) == 0
    text = capsys.readouterr().out
    for expected in ("2 (1 sealed, 1 unsealed)", f"unsealed {H13}", "pairs 3, ties 0",
                     "p0   watermark 2024-05-01T13:40:00+00:00, offset 41, open sessions 2",
                     "dead letters 3 (ts 2, message of N bytes over max_message_bytes 1)",
                     "late events  1", "current  v0001 (promoted", "latest   v0002 (not promoted",
                     "calibration: agreement 0.6"):
        assert expected in text, expected


def test_data_dir_from_the_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PREFSTREAM_DATA_DIR", str(data_dir))
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_dir"] == str(data_dir.resolve())


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_not_a_data_dir_exits_2_with_a_clear_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str) -> None:
    target = tmp_path / "nope"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    assert main(["status", "--data-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"{target} is not a prefstream data dir" in err
    assert ("no such folder" if make != "empty" else "no manifest, watermarks folder") in err


def test_a_fresh_data_dir_reports_nothing_yet(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "d")
    r = collect(tmp_path / "d", now=NOW)
    assert r["partitions"]["total"] == 0 and r["partitions"]["low_watermark"] is None
    assert set(r["rows"].values()) == {0}
    assert r["kafka_partitions"] == [] and r["dead_letters"] == {"total": 0, "by_kind": {}}
    assert r["models"] == {"versions": 0, "current_version": None, "current": None,
                           "latest": None}
    assert "no watermark files yet" in format_text(r)


def test_status_never_opens_the_catalog(data_dir: Path) -> None:
    """A writer holding prefstream.duckdb does not block status, and status leaves no lock."""
    assert ensure_catalog(data_dir)
    writer = duckdb.connect(str(data_dir / CATALOG_NAME))  # read-write, as the worker at start-up
    try:
        assert collect(data_dir, now=NOW)["rows"]["pairs"] == 3
    finally:
        writer.close()
    assert ensure_catalog(data_dir)  # nothing of status's is holding the file


def test_a_half_written_file_and_model_are_not_counted(data_dir: Path) -> None:
    [good, *_] = live_files(data_dir / "pairs" / H13)
    (good.parent / ".part-dead.parquet.0badc0de.tmp").write_bytes(good.read_bytes()[:50])
    (data_dir / "models" / ".v0003.0badc0de.tmp").mkdir()
    r = collect(data_dir, now=NOW)
    assert r["rows"]["pairs"] == 3 and r["models"]["versions"] == 2
