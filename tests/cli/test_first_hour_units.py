"""The pieces behind the first hour, on real files without a broker: the catalog a DuckDB 1.x
client opens and a copy reads, the funnel's sealed flag, ``models/current`` as a link with a
model card, dead-letter causes, status wording, the report's model panels, JSON logs, the
transformers head report, bootstrap addresses and ``make demo``'s output."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest
from factories import at, pair, session_row
from hypothesis import given
from hypothesis import strategies as st

from prefstream.logs import JsonFormatter, NewHeadReport, faust_logging_config
from prefstream.report import _model_panels
from prefstream.settings import check_host_port
from prefstream.status import dead_letter_cause, format_text
from prefstream.storage.catalog import (
    CATALOG_NAME,
    STORAGE_NUMBER,
    connect_readonly,
    ensure_catalog,
    storage_number,
)
from prefstream.storage.files import (
    Watermark,
    init_data_dir,
    seal_ready,
    write_rows,
    write_watermark,
)
from prefstream.trainer.card import model_card
from prefstream.trainer.registry import current_version, promote, recover, save_version

ROOT = Path(__file__).resolve().parents[2]
H12, H13 = "2024-05-01T12", "2024-05-01T13"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Hour 12 sealed, hour 13 still filling: a pair and a session in each."""
    path = tmp_path / "data"
    init_data_dir(path)
    write_rows(data_dir=path, table="pairs", rows=[pair("p1"), pair("p2", minute=60)])
    write_rows(data_dir=path, table="sessions",
               rows=[session_row("s1@0"), session_row("s2@0", minute=60)])
    write_watermark(data_dir=path, mark=Watermark(0, at(95), 0, 0))
    assert seal_ready(data_dir=path, n_kafka_partitions=1, gap=timedelta(minutes=30)) == [H12]
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    duck = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or "duckdb"
    return subprocess.run([duck, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# --- the catalog ------------------------------------------------------------------------------

def test_a_duckdb_1x_client_opens_the_catalog_and_sees_the_funnel_flag(data_dir: Path) -> None:
    assert ensure_catalog(data_dir)
    assert storage_number(data_dir / CATALOG_NAME) == STORAGE_NUMBER
    version = cli("--version", cwd=data_dir).stdout
    assert version.startswith("v1."), version
    out = cli("-readonly", "-csv", "-noheader", CATALOG_NAME,
              "SELECT partition, sealed, pairs FROM funnel ORDER BY 1", cwd=data_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{H12},true,1", f"{H13},false,1"]


def test_a_catalog_in_duckdb_2_storage_is_rewritten_for_1x(data_dir: Path) -> None:
    con = duckdb.connect(str(data_dir / CATALOG_NAME))  # the default: the newest format
    con.execute("CREATE VIEW stale AS SELECT 1")
    con.close()
    newest = storage_number(data_dir / CATALOG_NAME)
    assert ensure_catalog(data_dir)
    assert storage_number(data_dir / CATALOG_NAME) == STORAGE_NUMBER
    if newest != STORAGE_NUMBER:  # DuckDB >= 1.2 writes a newer number by default
        assert cli("-readonly", CATALOG_NAME, "SELECT 1", cwd=data_dir).returncode == 0


def test_a_copied_data_dir_reads_its_own_files(data_dir: Path, tmp_path: Path) -> None:
    assert ensure_catalog(data_dir)
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy, symlinks=True)
    write_rows(data_dir=copy, table="pairs", rows=[pair("p3", minute=61)])
    count = "SELECT count(*) FROM pairs"
    for folder, expected in ((data_dir, 2), (copy, 3)):
        con = connect_readonly(folder)
        assert con.execute(count).fetchone() == (expected,)
        con.close()
        assert cli("-readonly", "-csv", "-noheader", CATALOG_NAME, count,
                   cwd=folder).stdout.strip() == str(expected)


# --- models/current and the model card ---------------------------------------------------------

class Saved:
    def save_pretrained(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{}")


META = {"version": "v0001", "backbone": "tiny", "created_at": "2024-05-01T15:00:00+00:00",
        "promoted": True, "cutoff": "2024-05-01T10:00:00+00:00", "n_train": 40, "n_eval": 10,
        "partitions": {"train": [{"partition": H12, "sha256": "ab" * 32}],
                       "eval": [{"partition": H13, "sha256": "cd" * 32}]},
        "gates": {"calibration": {"passed": True, "agreement": 0.8, "reason": "0.800 >= 0.7"}},
        "metrics": {"eval": {"accuracy": 0.7, "length_matched": {"accuracy": 0.65}}},
        "config": {"max_length": 128}}


def test_current_is_a_link_switched_atomically(tmp_path: Path) -> None:
    for n in (1, 2):
        save_version(tmp_path, f"v000{n}", model=Saved(), tokenizer=Saved(),
                     metadata={**META, "version": f"v000{n}"}, promote=n == 1)
    current = tmp_path / "models" / "current"
    assert current.is_symlink() and Path(current.readlink()) == Path("v0001")
    assert (current / "config.json").exists() and current_version(tmp_path) == "v0001"
    promote(tmp_path, "v0002")
    assert Path(current.readlink()) == Path("v0002") and current_version(tmp_path) == "v0002"
    assert not list((tmp_path / "models").glob(".current*"))
    card = (tmp_path / "models" / "v0001" / "README.md").read_text()
    assert card == model_card({**META, "version": "v0001"})


def test_a_current_text_file_of_older_releases_becomes_a_link(tmp_path: Path) -> None:
    save_version(tmp_path, "v0001", model=Saved(), tokenizer=Saved(), metadata=META)
    (tmp_path / "models" / "current").write_text("v0001\n")
    assert current_version(tmp_path) == "v0001"
    assert "linked current to v0001" in recover(tmp_path)
    assert (tmp_path / "models" / "current").is_symlink()


def test_the_model_card_names_data_versions_gates_metrics_and_input() -> None:
    card = model_card(META)
    for text in (H12, "ab" * 32, H13, "calibration", "0.800 >= 0.7", "0.700", "0.650",
                 "text pair", "from_pretrained"):
        assert text in card, text


# --- status, dead letters, report ---------------------------------------------------------------

@pytest.mark.parametrize(("reason", "cause"), [
    ("<root>: Invalid JSON: expected value at line 1 column 1", "Invalid JSON"),
    ("<root>: Input tag 'x' found using 'type' does not match any of the expected tags: 'a'",
     "Input tag N found using N does not match any of the expected tags"),
    ("impression.position: Input should be greater than or equal to 0", "impression.position"),
    ("ts: 2024-05-01T12:00:00+00:00 is in the future of arrival", "ts"),
    ("message of 300000 bytes over max_message_bytes", "message of N bytes over max_message_bytes"),
])
def test_dead_letter_causes(reason: str, cause: str) -> None:
    assert dead_letter_cause(reason) == cause


@given(st.text(max_size=200))
def test_no_cause_is_root(reason: str) -> None:
    assert not dead_letter_cause(f"<root>: {reason}").startswith("<root>")


def test_status_says_ends_in_for_an_hour_still_ahead() -> None:
    def report(age_s: float) -> str:
        unsealed = {"partition": H13, "age_s": age_s, "low_watermark_past_end_s": None,
                    "rows": {"pairs": 1}}
        return format_text({
            "data_dir": "d", "partitions": {
                "total": 1, "sealed": 0, "unsealed": 1, "oldest_sealed": None,
                "newest_sealed": None, "last_sealed_at": None, "low_watermark": None,
                "unsealed_partitions": [unsealed]},
            "rows": {}, "kafka_partitions": [], "dead_letters": {"total": 0, "by_kind": {}},
            "late_events": 0, "models": {"versions": 0, "current": None, "latest": None}})
    assert "ends in 49m 00s, still filling" in report(-49 * 60)
    assert "ended 49m 00s ago" in report(49 * 60)


def test_report_says_the_audit_was_skipped_and_shows_both_accuracy_points() -> None:
    skipped = {"version": "v0001", "current": True, "gates": {"calibration": {
        "passed": None, "reason": "no explicit labels configured", "n": 0}},
        "metrics": {"eval": {"accuracy": 0.7, "length_matched": {"accuracy": 0.7}}}}
    accuracy, calibration, _ = _model_panels({"models": [skipped]})
    assert "audit skipped" in calibration
    assert "for v0001: no explicit labels configured" in calibration
    assert "no data yet" not in calibration
    held, matched = (float(r) for r in
                     re.findall(r'<circle class="mark"[^>]* r="([0-9.]+)"', accuracy)[:2])
    assert held > matched  # the held-out point rings the equal length-matched one


# --- logs, settings, make -------------------------------------------------------------------

def test_json_logs_are_one_object_a_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("x.y", logging.ERROR, __file__, 1, "a %s\nb", ("z",),
                                   sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "x.y", "a z\nb")
    assert "ValueError: bad" in entry["exc"] and entry["ts"].endswith("+00:00")
    assert faust_logging_config("text", "info") is None
    assert faust_logging_config("json", "info")["root"]["level"] == "INFO"


REPORT = ("\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m from: /m\n"
          "Key               | Status  | \n------------------+---------+-\n"
          "classifier.weight | {s} | \nclassifier.bias   | {s} | \n\nNotes:\n- MISSING: new")


@pytest.mark.parametrize(("status", "kept"), [("\x1b[31mMISSING\x1b[0m", False),
                                              ("UNEXPECTED", True)])
def test_the_new_head_report_becomes_one_info_line(status: str, kept: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1,
                               REPORT.format(s=status), (), None)
    with caplog.at_level(logging.INFO):
        assert NewHeadReport().filter(record) is kept
    assert kept or "new reward head initialised (classifier.weight, classifier.bias)" in \
        caplog.text


@given(st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True), st.integers(1, 65535))
def test_host_port_accepts_every_valid_address(host: str, port: int) -> None:
    check_host_port(f"{host}:{port}")


@pytest.mark.parametrize("server", ["host:abc", "host", ":9092", "h:0", "h:65536", "h:-1"])
def test_host_port_refuses(server: str) -> None:
    with pytest.raises(ValueError):
        check_host_port(server)


def test_make_demo_prints_only_what_prefstream_prints() -> None:
    """``make demo ARGS=...`` echoes no command line (``install`` taken as done: ``-o``)."""
    bin_dir = Path(sys.executable).parent
    made = subprocess.run(["make", "--no-print-directory", "-o", "install", "-o",
                           f"{bin_dir}/prefstream", "demo", "ARGS=--help", f"BIN={bin_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("usage: prefstream demo"), made.stdout[:200]


def test_the_embedded_broker_prefers_the_kafka_port_when_free() -> None:
    import socket

    from prefstream.streams.broker import free_port, preferred_port

    port = free_port()
    assert preferred_port(port) == port
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        assert preferred_port(port) != port
