"""Issue 16, findings 7-9: damaged files, analysts holding the catalog, secrets and redaction.

See docs/storage-safety.md for each protection and its limit.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from factories import at, pair
from helpers.storage import H12, analyst_connected
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_fixtures import build_data_dir, tiny_config

from prefstream.report import write_report
from prefstream.settings import Settings
from prefstream.status import collect, format_text
from prefstream.storage import compact
from prefstream.storage.catalog import CATALOG_NAME, connect_readonly, ensure_catalog
from prefstream.storage.compact import compact_after_flush
from prefstream.storage.files import (
    Watermark,
    init_data_dir,
    live_files,
    read_table,
    seal_ready,
    write_rows,
    write_watermark,
)
from prefstream.storage.quarantine import QUARANTINE_DIR, quarantined
from prefstream.storage.repair import repair_data_dir
from prefstream.streams.broker import EmbeddedBroker
from prefstream.streams.worker.logscrub import scrub
from prefstream.trainer.export import export_preferences
from prefstream.trainer.registry import read_metadata, version_path
from prefstream.trainer.service import run_once

ROOT = Path(__file__).resolve().parents[2]
SECRET_KEY, SASL_PASSWORD = "pseudonym-key-not-for-the-broker", "sasl-password-not-for-it"


def damage_files(folder: Path) -> tuple[Path, Path]:
    """A truncated copy of a good file and a file of garbage, both named as the writer names."""
    good = live_files(folder)[0]
    truncated = good.with_name("part-20240501T120000000000-trunc000.parquet")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = good.with_name("part-20240501T120000000001-junk0000.parquet")
    garbage.write_bytes(b"not parquet at all " * 50)
    return truncated, garbage


# --- finding 7: damaged files ----------------------------------------------------------------

def test_readers_skip_a_damaged_file_and_the_worker_moves_it_to_quarantine(data_dir, caplog):
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1"), pair("p2", minute=1)])
    truncated, garbage = damage_files(data_dir / "pairs" / H12)
    kept = {p: p.read_bytes() for p in (truncated, garbage)}
    with caplog.at_level(logging.WARNING):
        assert sorted(read_table(data_dir=data_dir, table="pairs").column("pair_id").to_pylist()
                      ) == ["p1", "p2"]
        assert collect(data_dir)["rows"]["pairs"] == 2  # status reads the live files
    assert {str(truncated), str(garbage)} <= {m.split(": ")[0].removeprefix("skipping damaged "
                                              "file ") for m in caplog.messages}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        moved = repair_data_dir(data_dir)  # what the worker does when it starts
    assert sorted(p.name for p in moved) == sorted([truncated.name, garbage.name])
    assert len([m for m in caplog.messages if m.startswith("quarantined")]) == 2
    for source, content in kept.items():  # moved aside under its own path, never deleted
        target = data_dir / QUARANTINE_DIR / source.relative_to(data_dir)
        assert not source.exists() and target.read_bytes() == content
        assert "ArrowInvalid" in target.with_name(target.name + ".reason").read_text()
    assert repair_data_dir(data_dir) == []  # said once
    ensure_catalog(data_dir)
    con = connect_readonly(data_dir)
    try:
        assert con.execute("SELECT count(*) FROM pairs").fetchone() == (2,)
    finally:
        con.close()
    report = collect(data_dir)
    assert report["quarantined"] == [str(p.relative_to(data_dir)) for p in quarantined(data_dir)]
    assert "quarantine   2 damaged file(s)" in format_text(report)


def test_a_compaction_quarantines_a_damaged_file_instead_of_failing(data_dir):
    for i in range(3):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}", minute=i)])
    truncated, _ = damage_files(data_dir / "pairs" / H12)
    [merged] = compact_after_flush(data_dir=data_dir, sealed=[H12], written={}, max_files=32,
                                   grace=timedelta(0))
    assert pq.read_table(merged).num_rows == 3 and len(quarantined(data_dir)) == 2
    assert (data_dir / QUARANTINE_DIR / truncated.relative_to(data_dir)).exists()


def test_stale_temporary_files_of_a_killed_seal_are_removed(data_dir):
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")])
    old, fresh = data_dir / "manifest" / ".dead0001.parquet.tmp", data_dir / "manifest" / (
        ".live0001.parquet.tmp")
    in_partition = data_dir / "pairs" / H12 / "g000000" / ".dead0002.parquet.tmp"
    for path in (old, fresh, in_partition):
        path.write_bytes(b"PAR1 half a file")
    an_hour_ago = datetime.now(timezone.utc).timestamp() - 3600
    for path in (old, in_partition):
        os.utime(path, (an_hour_ago, an_hour_ago))
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(600), 0, 0))
    assert seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=timedelta(minutes=30)) == [H12]
    assert not old.exists() and fresh.exists()  # a live writer's file is never pulled
    repair_data_dir(data_dir)
    assert not in_partition.exists() and fresh.exists()


@pytest.mark.slow
def test_the_trainer_refuses_a_sealed_partition_rewritten_after_its_seal(tmp_path, umask_022):
    data_dir = build_data_dir(tmp_path / "data", sealed_hours=4, unsealed=False)
    [path] = live_files(data_dir / "pairs" / "2024-05-01T01")
    rows = pq.read_table(path).to_pylist()[2:]  # two rows dropped, the others turned around
    for row in rows:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    pq.write_table(pq.read_table(path).schema.empty_table().from_pylist(
        rows, schema=pq.read_schema(path)), path)
    result = run_once(data_dir, tiny_config(epochs=1, probe_answers=2))
    assert result is not None and result.trained
    [refused] = result.refused_partitions
    assert refused["partition"] == "2024-05-01T01" and refused["found_sha256"] != refused[
        "expected_sha256"]
    metadata = read_metadata(data_dir, result.version)
    assert metadata["refused_partitions"] == [refused]
    assert any(r.startswith("refused 2024-05-01T01") for r in metadata["reasons"])
    train_in = metadata["counts"]["train"][0]["in"]
    assert train_in == 16 * 2  # the two other training partitions: 3 train hours, 1 refused
    # finding 9: what the trainer and an export write is owner-only whatever the umask
    model = version_path(data_dir, result.version)
    assert {stat.S_IMODE(p.stat().st_mode) for p in [model, *model.rglob("*")]
            if p.is_dir()} == {0o700}
    assert {stat.S_IMODE(p.stat().st_mode) for p in model.rglob("*") if p.is_file()} == {0o600}
    export_preferences(data_dir, tmp_path / "out" / "pairs.jsonl")
    assert stat.S_IMODE((tmp_path / "out" / "pairs.jsonl").stat().st_mode) == 0o600
    ensure_catalog(data_dir)
    page = write_report(data_dir, tmp_path / "out" / "report.html")
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / CATALOG_NAME).stat().st_mode) == 0o600


# --- finding 8: analysts and the catalog -----------------------------------------------------

HOLD_READ_WRITE = r"""
import sys, duckdb
con = duckdb.connect(sys.argv[1])  # an analyst's default, read-write connection
con.execute("CREATE TABLE mine AS SELECT 42 AS x")  # writes a WAL next to the catalog
print("ready", flush=True)
sys.stdin.readline()
con.close()
"""


READ_ONLY_COUNT = r"""
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)  # as ``duckdb -readonly`` does
print(con.execute("SELECT count(*) FROM pairs").fetchone()[0])
"""


def test_a_read_write_analyst_locks_out_neither_readers_nor_the_worker(data_dir):
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")])
    ensure_catalog(data_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_READ_WRITE,
                               str(data_dir / CATALOG_NAME)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        # the worker's next flush puts a fresh catalog in place: readers of any kind get in
        compact_after_flush(data_dir=data_dir, sealed=[], written={}, max_files=32,
                            grace=timedelta(0))
        other = subprocess.run([sys.executable, "-c", READ_ONLY_COUNT,
                                CATALOG_NAME], capture_output=True, text=True, cwd=data_dir)
        assert other.stdout.strip() == "1", other.stderr
        assert ensure_catalog(data_dir)  # the worker's refresh never waits for it either
    finally:
        holder.communicate("\n", timeout=30)
    assert [p.name for p in quarantined(data_dir)] == [f"{CATALOG_NAME}.wal"]  # kept aside
    holder = subprocess.Popen([sys.executable, "-c", HOLD_READ_WRITE,
                               str(data_dir / CATALOG_NAME)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:  # with no worker running, the product's own readers put the fresh copy in place
        assert holder.stdout.readline().strip() == "ready"
        con = connect_readonly(data_dir)
        try:
            assert con.execute("SELECT count(*) FROM pairs").fetchone() == (1,)
        finally:
            con.close()
    finally:
        holder.communicate("\n", timeout=30)
    con = duckdb.connect(str(data_dir / CATALOG_NAME))  # read-write again, once both closed
    con.close()


def test_a_held_catalog_holds_back_compaction_no_longer_than_the_bound(data_dir):
    for i in range(3):
        write_rows(data_dir=data_dir, table="pairs", rows=[pair(f"p{i}", minute=i)])
    with analyst_connected(data_dir):
        assert compact_after_flush(data_dir=data_dir, sealed=[H12], written={}, max_files=32,
                                   grace=timedelta(0)) == []  # within the bound: it waits
        marker = data_dir / compact.MARKERS_DIR / compact.BUSY_SINCE
        held_since = datetime.now(timezone.utc).timestamp() - compact.READER_WAIT.total_seconds()
        os.utime(marker, (held_since, held_since))  # as if held since READER_WAIT ago
        [merged] = compact_after_flush(data_dir=data_dir, sealed=[], written={}, max_files=32,
                                       grace=timedelta(0))
        assert merged.parent.name == "g000001" and pq.read_table(merged).num_rows == 3
    assert not marker.exists() or compact.readers_allow(data_dir, compact.READER_WAIT)


# --- finding 9: secrets and redaction --------------------------------------------------------

def test_the_embedded_broker_gets_no_secret_in_its_environment(monkeypatch):
    monkeypatch.setenv("PREFSTREAM_PSEUDONYM_KEY", SECRET_KEY)
    monkeypatch.setenv("PREFSTREAM_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    with EmbeddedBroker() as broker:
        environ = Path(f"/proc/{broker._proc.pid}/environ").read_bytes()
    names = {v.split(b"=", 1)[0].decode() for v in environ.split(b"\0") if v}
    assert SECRET_KEY.encode() not in environ and SASL_PASSWORD.encode() not in environ
    assert "RUST_LOG" in names and not any(n.startswith("PREFSTREAM_") for n in names)


SHAPES = [  # how libraries put a text into a log line
    lambda t: json.dumps({"prompt": t, "position": 1}),
    lambda t: json.dumps(json.dumps({"session_id": "s", "response_text": t})),
    lambda t: json.dumps(json.dumps(json.dumps({"chosen": t}))),
    lambda t: repr({"edited_text": t, "n": 2}),
    lambda t: f"send: k={b's-1'!r} v={json.dumps({'prompt': t}).encode()!r} t=None",
    lambda t: f"Impression(prompt={t!r}, position=0)",
    lambda t: f"1 validation error\n  input_value={t!r}, input_type=str]",
]


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(), st.sampled_from(range(len(SHAPES))))
def test_a_scrubbed_log_line_tells_nothing_of_the_text(a, b, shape):
    line = SHAPES[shape]
    assert scrub(line(a)) == scrub(line(b))


def test_scrubbing_keeps_the_rest_of_the_line():
    assert scrub("send: topic='t' k=b'\"s-1\"' v=b'{\"prompt\": \"hi\"}' partition=0") == (
        "send: topic='t' k=<withheld> v=<withheld> partition=0")
    assert scrub('{"prompt": "a\\"b", "session_id": "s-1"}') == (
        '{"prompt": <withheld>, "session_id": "s-1"}')
    assert scrub("flushed 12 pairs to 2024-05-01T12") == "flushed 12 pairs to 2024-05-01T12"


# --- one real worker: DEBUG logging under redact, a damaged file and a killed seal's leftovers -

@pytest.mark.broker
def test_a_worker_with_debug_logs_under_redact_starts_past_damage_and_logs_no_text(
        tmp_path, broker):
    from prefstream.sim.demo import (
        _demo_overrides,
        end_offsets,
        produce,
        scrape,
        stop,
        traffic_end,
        wait_until_drained,
    )
    from prefstream.sim.traffic import TrafficConfig, generate_traffic
    from prefstream.streams.broker import free_port

    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p-old")])
    truncated, garbage = damage_files(data_dir / "pairs" / H12)
    leftover = data_dir / "manifest" / ".dead0003.parquet.tmp"
    leftover.write_bytes(b"PAR1")
    os.utime(leftover, (0, 0))
    settings = Settings(data_dir=data_dir, kafka_bootstrap=broker.bootstrap,
                        metrics_port=free_port(), text_storage="redact",
                        pseudonym_key=SECRET_KEY, **_demo_overrides())
    traffic = generate_traffic(TrafficConfig(n_events=200, seed=3, end=traffic_end(
        datetime.now(timezone.utc), settings)))
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefstream.cli", "worker", "--loglevel", "debug"],
            env={**os.environ, **settings.as_env(), "PYTHONPATH": str(ROOT)}, stdout=fh,
            stderr=subprocess.STDOUT)
    try:
        produce(settings, traffic)
        wait_until_drained(settings, end_offsets(settings), worker, 120)
        metrics = scrape(settings)
    finally:
        stop(worker)
    log = log_path.read_text(errors="replace")
    texts = {e[f] for e in (json.loads(v) for _, v in traffic.messages if v.startswith(b"{")
                            and v.endswith(b"}")) if isinstance(e, dict)
             for f in ("prompt", "response_text", "edited_text") if isinstance(e.get(f), str)}
    assert len(texts) > 50 and "[DEBUG]" in log and "send: topic=" in log
    assert [t for t in texts if t in log] == []
    said = [line for line in log.splitlines() if "quarantined damaged file" in line]
    assert len(said) == 2 and {truncated.name, garbage.name} == {
        line.split(" -> ")[0].rsplit("/", 1)[1] for line in said}  # each file once
    assert metrics["prefstream_files_quarantined"] == 2.0
    assert not leftover.exists() and len(quarantined(data_dir)) == 2
    assert "quarantine   2 damaged file(s)" in format_text(collect(data_dir))


def test_a_damaged_manifest_version_is_skipped_then_quarantined(data_dir, caplog):
    from prefstream.storage.files import manifest_versions, reseal, sealed_partitions

    write_rows(data_dir=data_dir, table="pairs", rows=[pair("p1")])
    write_watermark(data_dir=data_dir, mark=Watermark(0, at(600), 0, 0))
    seal_ready(data_dir=data_dir, n_kafka_partitions=1, gap=timedelta(minutes=30))
    reseal(data_dir=data_dir, partition=H12)
    newest = manifest_versions(data_dir)[H12][-1]
    newest.write_bytes(newest.read_bytes()[:30])
    with caplog.at_level(logging.WARNING):
        [row] = sealed_partitions(data_dir)  # the previous version answers
    assert row.n_pairs == 1 and str(newest) in caplog.text
    assert [p.name for p in repair_data_dir(data_dir)] == [newest.name]
    assert [p.name for p in manifest_versions(data_dir)[H12]] == [f"{H12}.parquet"]
