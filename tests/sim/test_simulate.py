"""``prefstream simulate``: its truth file and config, then simulate + evaluate end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from helpers.content import PLAIN_ROWS, write_hh_source

from prefstream.cli import build_parser, main
from prefstream.sim.content import read_source
from prefstream.sim.traffic import TrafficConfig, generate_traffic
from prefstream.simulate import (
    TRUTH_FILE,
    holdout_path,
    late_check,
    read_truth,
    simulate_config,
    write_truth,
)
from prefstream.storage.catalog import connect_readonly

END = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def test_truth_round_trip_with_holdout(tmp_path: Path) -> None:
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in PLAIN_ROWS))
    config = TrafficConfig(n_events=400, end=END, source=source, prefer_prob=0.7, holdout=0.25)
    traffic = generate_traffic(config)
    truth = tmp_path / "out" / TRUTH_FILE
    written = write_truth(truth, config, traffic)
    record = read_truth(truth)
    assert record == written
    assert record["quality"] == traffic.quality
    assert record["events_produced"] == len(traffic.messages)
    assert record["config"]["source"] == str(source) and record["config"]["prefer_prob"] == 0.7
    assert record["config"]["end"] == END.isoformat(sep=" ")
    labels = holdout_path(truth)
    assert labels == truth.parent / "simulation-truth.holdout.jsonl"
    assert record["holdout_labels"] == labels.name and record["n_holdout"] == 5
    assert read_source(labels).pairs == traffic.holdout


def test_synthetic_truth_has_no_holdout(tmp_path: Path) -> None:
    config = TrafficConfig(n_events=300, end=END)
    record = write_truth(tmp_path / "t.json", config, generate_traffic(config))
    assert record["holdout_labels"] is None and record["config"]["source"] is None
    assert not holdout_path(tmp_path / "t.json").exists()


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFSTREAM_SIMULATE_EVENTS", "1234")
    monkeypatch.setenv("PREFSTREAM_SIMULATE_PREFER_PROB", "0.6")
    args = build_parser().parse_args(["simulate", "--prefer-prob", "0.9", "--source", "x.jsonl",
                                      "--run-worker", "--bootstrap", "k:9092"])
    sim = simulate_config(args)
    assert (sim.events, sim.prefer_prob, sim.source, sim.run_worker) == (
        1234, 0.9, Path("x.jsonl"), True)
    assert (sim.hours, sim.holdout, sim.seed) == (24, 0.2, 0)
    assert args.kafka_bootstrap == "k:9092"
    assert simulate_config(build_parser().parse_args(["simulate"])).run_worker is False


def test_bad_flag_values_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--prefer-prob", "1.5", "--data-dir", str(tmp_path)]) == 2
    assert main(["simulate", "--source", str(tmp_path / "missing.jsonl"), "--bootstrap",
                 "127.0.0.1:1", "--data-dir", str(tmp_path)]) == 2
    assert "cannot read source" in capsys.readouterr().err
    assert main(["evaluate", "--data-dir", str(tmp_path)]) == 2


def test_late_events_beyond_the_injected_ones_unbalance_the_run(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="prefstream.simulate"):
        assert late_check(1000, 10, 12)["ok"] and not caplog.text  # reordering: a few more
        lost = late_check(57575, 285, 26477)  # measured: a producer stall, idle clock ahead
    assert lost == {"stored": 26477, "injected": 285, "excess": 26192, "tolerance": 576,
                    "ok": False}
    assert "26477 events stored as late, 285 injected" in caplog.text
    assert "not balanced" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="prefstream.simulate"):
        assert late_check(1000, 10, 25)["ok"]  # above half the tolerance: warned, still ok
    assert "25 events stored as late" in caplog.text


def test_bootstrap_refuses_when_the_worker_is_past_the_traffic(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prefstream.storage.files import Watermark, init_data_dir, write_watermark

    init_data_dir(tmp_path)
    write_watermark(data_dir=tmp_path, mark=Watermark(
        kafka_partition=2, watermark=datetime.now(timezone.utc), applied_offset=5,
        open_sessions=0))
    assert main(["simulate", "--bootstrap", "127.0.0.1:1", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "watermark of partition 2" in err and "every event would be stored as late" in err
    assert not (tmp_path / TRUTH_FILE).exists()  # refused before generating anything


# --- end to end on the embedded broker --------------------------------------------------------


def run_cli(*argv: str, timeout: float = 240) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "prefstream.cli", *argv], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("simulate")
    write_hh_source(root / "hh.jsonl.gz")
    data_dir = root / "data"
    summary = run_cli("simulate", "--run-worker", "--events", "800", "--seed", "2", "--source",
                      str(root / "hh.jsonl.gz"), "--data-dir", str(data_dir), "--json")
    return summary, data_dir


@pytest.mark.broker
def test_simulate_stores_what_it_produced(simulated: tuple[dict[str, Any], Path]) -> None:
    summary, data_dir = simulated
    assert summary["balanced"] and summary["pairs"] > 20 and summary["partitions_sealed"] > 5
    assert summary["late_check"]["ok"]
    assert summary["late_check"]["injected"] == summary["generator"]["late"]
    assert summary["source_rows"]["skipped_by_reason"] == {"dialogue_mismatch": 2}
    assert summary["source_rows"]["holdout"] == 6 and summary["source_rows"]["passes"] > 1
    truth = read_truth(Path(summary["truth"]))
    assert truth["events_produced"] == summary["events_produced"]
    held = read_source(Path(summary["holdout_labels"])).pairs
    assert len(held) == 6 and Path(summary["holdout_labels"]).parent == data_dir
    con = connect_readonly(data_dir)
    try:
        prompts = {p for (p,) in con.execute("SELECT DISTINCT prompt FROM pairs").fetchall()}
    finally:
        con.close()
    assert prompts and prompts.isdisjoint({r.prompt for r in held})


@pytest.mark.broker
def test_evaluate_scores_the_run(simulated: tuple[dict[str, Any], Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    summary, data_dir = simulated
    report = run_cli("evaluate", "--data-dir", str(data_dir), "--json", timeout=60)
    assert report["pairs"] == report["scored"] == summary["pairs"]
    assert report["precision"] == summary["ground_truth"]["precision"]
    assert 0.6 < report["precision"] < 0.95  # the simulated users prefer the chosen 80% of times
    assert report["simulation"]["prefer_prob"] == 0.8
    assert {r: v["pairs"] for r, v in report["by_rule"].items()} == summary["pairs_by_rule"]
    assert report["refusals_by_reason"] == summary["refusals_by_reason"]
    by_votes = report["comparisons_by_votes"]
    assert 0 < by_votes["all"]["n"] < report["pairs"]  # repeated comparisons are merged
    assert by_votes["all"]["n"] == sum(v["n"] for k, v in by_votes.items() if k != "all")
    kept = [p["pairs"] for p in report["curve"]]
    assert kept == sorted(kept, reverse=True) and kept[0] == report["pairs"]
    assert report["per_1000_events"] == round(1000 * report["pairs"]
                                              / summary["events_produced"], 2)
    assert main(["evaluate", "--data-dir", str(data_dir)]) == 0
    assert f"precision {report['precision']}" in capsys.readouterr().out
