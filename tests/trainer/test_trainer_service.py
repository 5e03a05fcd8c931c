"""End to end on a tiny real BERT: cycles, registry, promotion and refusal, scoring, export, CLI."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from trainer_fixtures import (
    UNSEALED_MARK,
    add_sealed_hours,
    build_data_dir,
    tiny_backbone,
    tiny_config,
    write_labels,
)

from prefstream.storage.catalog import connect_readonly
from prefstream.storage.files import init_data_dir, sealed_partitions
from prefstream.trainer import Interrupted, TrainerError
from prefstream.trainer.data import temporal_split
from prefstream.trainer.export import export_kto, export_preferences
from prefstream.trainer.registry import (
    current_version,
    list_versions,
    next_version,
    read_metadata,
    recover,
    registry_lock,
    save_version,
    version_path,
)
from prefstream.trainer.scoring import RewardModel
from prefstream.trainer.service import CycleResult, prepare, run_once, serve

pytestmark = pytest.mark.slow

SEALED_HOURS = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CycleResult]:
    """Five sealed hours (3 train, 1 gap, 1 eval) plus one unsealed hour, one promoted cycle."""
    root = tmp_path_factory.mktemp("trained")
    data_dir = build_data_dir(root / "data", sealed_hours=SEALED_HOURS)
    labels = write_labels(root / "labels.jsonl", 12, agree=True)
    result = run_once(data_dir, tiny_config(explicit_labels=labels))
    assert result is not None
    return data_dir, result


def test_a_cycle_trains_and_promotes(trained: tuple[Path, CycleResult]) -> None:
    data_dir, result = trained
    assert result.trained and result.promoted and result.version == "v0001"
    assert current_version(data_dir) == "v0001" and list_versions(data_dir) == ["v0001"]
    assert result.metrics["train"]["final_loss"] < result.metrics["train"]["first_loss"]
    assert result.metrics["eval"]["accuracy"] >= 0.9
    assert result.gates["calibration"]["passed"] and result.gates["calibration"]["n"] == 12
    assert result.gates["no_regression"] == {"passed": True, "reason": "no current model",
                                             "current": None}
    summary = result.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert {"version", "promoted", "reasons", "partitions", "counts", "metrics", "gates",
            "wall_s"} <= set(summary)


def test_metadata_records_split_hashes_counts_config_metrics_and_gates(
        trained: tuple[Path, CycleResult]) -> None:
    data_dir, _ = trained
    meta = read_metadata(data_dir, "v0001")
    manifest = {r.partition: r for r in sealed_partitions(data_dir)}
    assert [p["partition"] for p in meta["partitions"]["train"]] == [
        "2024-05-01T00", "2024-05-01T01", "2024-05-01T02"]
    assert [p["partition"] for p in meta["partitions"]["gap"]] == ["2024-05-01T03"]
    assert [p["partition"] for p in meta["partitions"]["eval"]] == ["2024-05-01T04"]
    for role in ("train", "gap", "eval"):
        for part in meta["partitions"][role]:
            assert part["sha256"] == manifest[part["partition"]].sha256
    assert meta["cutoff"] == "2024-05-01T03:00:00+00:00"
    assert [g["gate"] for g in meta["counts"]["train"]] == [
        "split", "eval_prompt_group", "min_confidence", "per_user_cap", "aggregate",
        "near_duplicate", "too_long"]
    assert meta["counts"]["train"][-1]["kept"] == meta["n_train"] == 48
    assert meta["counts"]["eval"][-1]["kept"] == meta["n_eval"] == 16
    assert meta["config"]["max_length"] == 64 and meta["backbone"] == str(tiny_backbone())
    assert {"loss", "accuracy", "mean_margin", "reward", "length_matched", "per_rule",
            "reward_length_corr", "length_only_accuracy", "by_length_bucket"} <= set(
        meta["metrics"]["eval"])
    assert set(meta["metrics"]["eval"]["length_matched"]) == {"n", "accuracy", "length_only"}
    assert set(meta["metrics"]["probes"]["probes"]) == {
        "whitespace_padding", "filler", "repetition", "flattery", "longer_but_emptier"}
    assert set(meta["gates"]) == {"calibration", "reward_hacking", "no_regression"}
    assert meta["lengths"]["train"] == meta["lengths"]["eval"] == {"truncated": 0, "dropped": 0}
    assert meta["lengths"]["calibration"] == {"truncated": 0, "dropped": 0}
    assert meta["lengths"]["max_length"] == 64 and meta["warnings"] == []
    assert meta["length_bias"]["train"]["share_chosen_longer"] == 1.0
    assert meta["seen_through"] == "2024-05-01T04" and meta["created_at"]


def test_unsealed_partitions_are_never_read(trained: tuple[Path, CycleResult],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, result = trained
    unsealed = "2024-05-01T05"
    assert (data_dir / "pairs" / unsealed).is_dir()
    assert unsealed not in json.dumps(result.summary())
    import prefstream.storage.verify as verify  # the trainer reads sealed partitions through it

    asked: list[str] = []
    real = verify.read_table

    def spy(**kwargs: Any) -> Any:
        asked.extend(kwargs["partitions"])
        return real(**kwargs)

    monkeypatch.setattr(verify, "read_table", spy)
    split = temporal_split(sealed_partitions(data_dir), eval_window=1, gap=1)
    assert split is not None
    from transformers import AutoTokenizer

    data = prepare(data_dir, split, tiny_config(), AutoTokenizer.from_pretrained(tiny_backbone()))
    assert asked and unsealed not in asked and "2024-05-01T03" not in asked  # gap not read
    texts = json.dumps([[p["prompt"], p["chosen"], p["rejected"]] for p in data.train + data.eval])
    assert UNSEALED_MARK not in texts


def test_nothing_new_gives_none(trained: tuple[Path, CycleResult]) -> None:
    assert run_once(trained[0], tiny_config()) is None


def test_models_view(trained: tuple[Path, CycleResult]) -> None:
    con = connect_readonly(trained[0])
    try:
        rows = con.execute("SELECT version, promoted, is_current, n_train, heldout_accuracy, "
                           "train_partitions FROM models").fetchall()
    finally:
        con.close()
    assert rows[0][:4] == ("v0001", True, True, 48) and rows[0][4] >= 0.9
    assert rows[0][5] == ["2024-05-01T00", "2024-05-01T01", "2024-05-01T02"]


def test_score_and_rerank_use_the_promoted_model(trained: tuple[Path, CycleResult]) -> None:
    model = RewardModel.load(trained[0], device="cpu")
    assert model.version == "v0001"
    good, bad = "tea: good helpful correct answer.", "tea: bad wrong useless answer."
    assert model.score("how to brew tea?", good) > model.score("how to brew tea?", bad)
    ranked = model.rerank("how to brew tea?", [bad, good])
    assert [a for a, _ in ranked] == [good, bad] and ranked[0][1] > ranked[1][1]
    long_answer = "good " * 200  # over max_length: scored (truncated with a warning)
    assert isinstance(model.score("q", long_answer), float)


def test_export_writes_trl_and_kto_jsonl_from_sealed_partitions(
        trained: tuple[Path, CycleResult], tmp_path: Path) -> None:
    data_dir, _ = trained
    n = export_preferences(data_dir, tmp_path / "pairs.jsonl", margin_coef=1.0)
    lines = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert n == len(lines) == 16 * SEALED_HOURS
    assert set(lines[0]) == {"prompt", "chosen", "rejected", "margin"}
    assert lines[0]["margin"] == pytest.approx(0.4)
    assert UNSEALED_MARK not in (tmp_path / "pairs.jsonl").read_text()
    assert export_preferences(data_dir, tmp_path / "one.jsonl",
                              partitions=["2024-05-01T00"]) == 16
    assert export_kto(data_dir, tmp_path / "kto.jsonl") == SEALED_HOURS
    kto = json.loads((tmp_path / "kto.jsonl").read_text().splitlines()[0])
    assert set(kto) == {"prompt", "completion", "label"} and kto["label"] is True
    with pytest.raises(TrainerError, match="not sealed"):
        export_preferences(data_dir, tmp_path / "x.jsonl", partitions=["2024-05-01T05"])


def test_a_later_cycle_compares_with_the_current_model(tmp_path: Path) -> None:
    data_dir = build_data_dir(tmp_path / "data", sealed_hours=4, unsealed=False)
    config = tiny_config(epochs=4, allow_unaudited=True)  # the loud opt-in: no labels here
    first = run_once(data_dir, config)
    assert first is not None and first.promoted
    assert first.gates["calibration"]["unaudited"] is True
    assert first.gates["calibration"]["reason"].startswith("UNAUDITED")
    add_sealed_hours(data_dir, range(4, 6), 16)
    second = run_once(data_dir, config)
    assert second is not None and second.version == "v0002"
    gate = second.gates["no_regression"]
    assert gate["current"] == "v0001" and gate["current_accuracy"] is not None
    assert current_version(data_dir) == ("v0002" if second.promoted else "v0001")
    assert read_metadata(data_dir, "v0002")["partitions"]["eval"][0]["partition"] == \
        "2024-05-01T05"


def test_calibration_below_threshold_blocks_promotion(tmp_path: Path) -> None:
    data_dir = build_data_dir(tmp_path / "data", sealed_hours=4, unsealed=False)
    labels = write_labels(tmp_path / "labels.jsonl", 10, agree=False)
    result = run_once(data_dir, tiny_config(explicit_labels=labels))
    assert result is not None and result.trained and not result.promoted
    assert result.gates["calibration"]["passed"] is False
    assert result.gates["calibration"]["agreement"] < 0.7
    assert any(r.startswith("calibration: agreement") for r in result.reasons)
    assert list_versions(data_dir) == ["v0001"] and current_version(data_dir) is None
    assert read_metadata(data_dir, "v0001")["promoted"] is False


def test_without_explicit_labels_a_version_is_registered_not_promoted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also: the cycle's own probes feed the reward-hacking gate (threshold 0 here: any raise
    refuses), and without a terminal training logs a progress line every log_every_steps."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: the progress bar is off
    data_dir = build_data_dir(tmp_path / "data", sealed_hours=4, unsealed=False)
    config = tiny_config(epochs=1, head_epochs=0.5, max_probe_raise=0.0, log_every_steps=1)
    with caplog.at_level(logging.INFO, logger="prefstream.trainer.fit"):
        result = run_once(data_dir, config)
    assert result is not None and result.trained and not result.promoted
    gate = result.gates["calibration"]
    assert gate["passed"] is False and gate["unaudited"] is True
    assert any("no explicit labels configured" in r for r in result.reasons)
    probes = result.gates["reward_hacking"]
    assert probes["passed"] is False and probes["threshold"] == 0.0 and probes["failed"]
    assert any(r.startswith("reward_hacking: worst probe") for r in result.reasons)
    assert list_versions(data_dir) == ["v0001"] and current_version(data_dir) is None
    steps = result.metrics["train"]["steps"] - result.metrics["train"]["head_steps"]
    assert f"train end-to-end: step {steps}/{steps}," in caplog.text
    assert "pairs/s, loss " in caplog.text and " left" in caplog.text


def test_too_few_partitions_or_pairs_train_nothing(tmp_path: Path) -> None:
    data_dir = build_data_dir(tmp_path / "few", sealed_hours=2)
    result = run_once(data_dir, tiny_config())
    assert result is not None and not result.trained and not result.promoted
    assert "too few sealed partitions" in result.reasons[0] and result.wall_s > 0
    assert [p["partition"] for p in result.partitions["sealed"]] == ["2024-05-01T00",
                                                                     "2024-05-01T01"]
    more = build_data_dir(tmp_path / "gated", sealed_hours=3, unsealed=False)
    result = run_once(more, tiny_config(min_confidence=0.95))
    assert result is not None and not result.trained and "too few pairs" in result.reasons[0]
    assert result.counts["train"][2] == {"gate": "min_confidence", "in": 16, "kept": 0,
                                         "dropped": 16}
    assert "train gate min_confidence removed 16 of 16 pairs (100%), kept 0" in result.warnings
    assert list_versions(data_dir) == list_versions(more) == []
    empty = tmp_path / "empty"
    init_data_dir(empty)
    assert run_once(empty, tiny_config()) is None


def test_half_written_versions_are_ignored_and_cleaned(tmp_path: Path) -> None:
    data_dir = build_data_dir(tmp_path / "data", sealed_hours=3, unsealed=False)
    models = data_dir / "models"
    (models / ".v0001.dead.tmp").mkdir(parents=True)
    (models / ".v0001.dead.tmp" / "config.json").write_text("{")
    (models / "v0009").mkdir()  # no metadata: not a version, but its name is never reused
    assert list_versions(data_dir) == [] and next_version(data_dir) == "v0010"
    with pytest.raises(TrainerError, match="not a model version"):
        version_path(data_dir, "../../etc")

    class Killed:
        def save_pretrained(self, path: Path) -> None:
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_text("half")
            raise KeyboardInterrupt

    with pytest.raises(TrainerError, match="v0009 already exists"):  # never written over
        save_version(data_dir, "v0009", model=Killed(), tokenizer=Killed(), metadata={})
    with pytest.raises(KeyboardInterrupt):
        save_version(data_dir, "v0001", model=Killed(), tokenizer=Killed(), metadata={})
    assert not (models / "v0001").exists() and list_versions(data_dir) == []
    with pytest.raises(Interrupted):
        run_once(data_dir, tiny_config(), should_stop=lambda: True)
    assert not (models / ".v0001.dead.tmp").exists() and list_versions(data_dir) == []


def test_one_trainer_per_data_dir(tmp_path: Path) -> None:
    data_dir = build_data_dir(tmp_path / "data", sealed_hours=3, unsealed=False)
    held_by = f"another trainer \\(pid {os.getpid()}\\) holds"
    with registry_lock(data_dir), pytest.raises(TrainerError, match=held_by):
        run_once(data_dir, tiny_config())
    with registry_lock(data_dir):  # released on exit, even after the error
        pass


def test_recover_finishes_a_staged_promotion_and_drops_a_dangling_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    models = data_dir / "models"
    (models / "v0001").mkdir(parents=True)
    (models / "v0001" / "metadata.json").write_text('{"version": "v0001"}')
    (models / ".current.next").write_text("v0002\n")  # killed before v0002 was renamed in
    with registry_lock(data_dir):
        assert recover(data_dir) == ["dropped promotion of missing v0002"]
    assert current_version(data_dir) is None and not (models / ".current.next").exists()
    (models / ".current.next").write_text("v0001\n")  # killed after the rename, before the switch
    with registry_lock(data_dir):
        assert recover(data_dir) == ["promoted v0001"]
        assert recover(data_dir) == []
    assert current_version(data_dir) == "v0001" and not (models / ".current.next").exists()


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    serve(data_dir, tiny_config(poll_interval_s=0.05, metrics_port=0))
    timer.join()
    assert signal.getsignal(signal.SIGTERM) == before


def test_serve_exposes_prometheus_metrics(tmp_path: Path) -> None:
    import urllib.request

    from prefstream.streams.broker import free_port

    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    port, scraped = free_port(), []

    def scrape_then_stop() -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        scraped.append(urllib.request.urlopen(url, timeout=5).read().decode())
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(0.5, scrape_then_stop)
    timer.start()
    serve(data_dir, tiny_config(poll_interval_s=0.05, metrics_port=port))
    timer.join()
    assert "prefstream_trainer_sealed_partitions 0" in scraped[0]


def test_a_finished_cycle_is_recorded_in_the_metrics(trained: tuple[Path, CycleResult]) -> None:
    from prefstream.streams.metrics import Metrics
    from prefstream.trainer.service import record_cycle

    stats = Metrics()
    summary = trained[1].summary()
    record_cycle(stats, summary)
    text = stats.render()
    assert 'prefstream_trainer_runs_total{outcome="promoted"} 1' in text
    accuracy = summary["metrics"]["eval"]["accuracy"]
    assert stats.value("prefstream_trainer_heldout_accuracy") == accuracy


# -- CLI ------------------------------------------------------------------------------------------

def cli(*argv: str) -> int:
    import prefstream.trainer.cli

    parser = argparse.ArgumentParser()
    prefstream.trainer.cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


def test_cli_help_names_every_env_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli("trainer", "--help")
    out = " ".join(capsys.readouterr().out.split())
    for env in ("PREFSTREAM_TRAIN_MAX_LENGTH", "PREFSTREAM_TRAIN_EXPLICIT_LABELS",
                "PREFSTREAM_TRAIN_MIN_CALIBRATION_AGREEMENT", "PREFSTREAM_DATA_DIR"):
        assert f"[env: {env}]" in out


def test_cli_commands(trained: tuple[Path, CycleResult], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = str(trained[0])
    monkeypatch.setenv("PREFSTREAM_TRAIN_BACKBONE", str(tiny_backbone()))
    assert cli("trainer", "--data-dir", data_dir, "--once", "--max-length", "64") == 0
    assert json.loads(capsys.readouterr().out) == {"status": "no new sealed partitions"}
    assert cli("trainer", "--data-dir", data_dir, "--once", "--max-length", "1") == 2
    few = build_data_dir(tmp_path / "few", sealed_hours=1)
    assert cli("trainer", "--data-dir", str(few), "--once") == 3
    assert "too few sealed" in capsys.readouterr().out
    assert cli("score", "--data-dir", data_dir, "--prompt", "q", "--answer", "a") == 0
    assert float(capsys.readouterr().out)
    assert cli("rerank", "--data-dir", data_dir, "--prompt", "q", "bad wrong", "good helpful") == 0
    ranked = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in ranked] == [1, 2] and ranked[0]["answer"] == "good helpful"
    out = tmp_path / "out.jsonl"
    assert cli("export", "--data-dir", data_dir, "--out", str(out), "--format", "kto") == 0
    assert len(out.read_text().splitlines()) == SEALED_HOURS
    assert cli("score", "--data-dir", str(few), "--prompt", "q", "--answer", "a") == 1


def test_demo_step_uses_ground_truth_as_explicit_labels(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefstream.trainer.demo import LABELS_FILE, train_after_demo

    data_dir = build_data_dir(tmp_path / "data", sealed_hours=5, unsealed=False)
    for name, value in {"BACKBONE": tiny_backbone(), "DEVICE": "cpu", "BATCH_SIZE": 8,
                        "LR": 3e-3, "HEAD_LR": 1e-2, "EPOCHS": 4}.items():
        monkeypatch.setenv(f"PREFSTREAM_TRAIN_{name}", str(value))
    truth = {f"a{h * 1000 + i}": 1.0 for h in (3, 4) for i in range(16)}
    truth |= {f"b{h * 1000 + i}": 0.0 for h in (3, 4) for i in range(16)}
    truth["b3000"] = 2.0  # the rejected answer of one pair was truly better

    class Traffic:
        quality = truth

    summary = train_after_demo(data_dir, Traffic())
    labels = [json.loads(x) for x in (data_dir / LABELS_FILE).read_text().splitlines()]
    assert len(labels) == 32 and labels[0]["chosen"].endswith("bad wrong useless answer 3000.")
    assert summary["trained"] and summary["version"] == "v0001"
    assert summary["partitions"] == {"train": 2, "gap": 1, "eval": 2}
    assert summary["pairs_after_gates"] == {"train": 32, "eval": 32}
    assert summary["calibration_agreement"] is not None
    assert json.loads(json.dumps(summary)) == summary


def test_score_pairs_reports_accuracy_lengths_and_what_did_not_fit(
        trained: tuple[Path, CycleResult], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    data_dir = str(trained[0])
    good, bad = "tea: good helpful correct answer {}.", "tea: bad wrong useless answer {}."
    rows = [{"prompt": f"question {i} about tea?", "chosen": good.format(i),
             "rejected": bad.format(i)} for i in range(6)]
    rows += [{"prompt": "reversed?", "chosen": bad.format(7), "rejected": good.format(7)},
             {"prompt": "long " * 80 + "question?", "chosen": good.format(8),
              "rejected": bad.format(8)},                                       # prompt cut
             {"prompt": "q?", "chosen": "good " * 90, "rejected": bad.format(9)}]  # dropped
    plain = tmp_path / "pairs.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("score", "--data-dir", data_dir, "--pairs", str(plain), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["scored"], report["truncated"], report["dropped"]) == (
        9, 8, 1, 1)
    assert report["version"] == "v0001" and report["max_length"] == 64
    assert report["length_only_accuracy"] == pytest.approx(7 / 8)  # only the reversed row
    assert report["accuracy"] >= 0.75 and report["reward_length_corr"] is not None
    assert set(report["by_length_bucket"]) == {"<=10%", "10-30%", "30-60%", ">60%"}
    assert report["length_matched"]["n"] == sum(b["n"] for k, b in
                                                report["by_length_bucket"].items() if k == "<=10%")
    dialogues = tmp_path / "hh.jsonl.gz"
    with gzip.open(dialogues, "wt") as fh:
        for i in range(3):
            fh.write(json.dumps({"chosen": f"\n\nHuman: tea {i}?\n\nAssistant: {good.format(i)}",
                                 "rejected": f"\n\nHuman: tea {i}?\n\nAssistant: "
                                             f"{bad.format(i)}"}) + "\n")
        fh.write(json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: same",
                             "rejected": "\n\nHuman: x\n\nAssistant: same"}) + "\n")
    assert cli("score", "--data-dir", data_dir, "--pairs", str(dialogues)) == 0
    text = capsys.readouterr().out
    assert "3 of 4 rows scored with v0001" in text and "1 rows not a pair" in text
    assert "length-only baseline" in text and "length-matched (within 10%)" in text
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q"}\n')
    for argv, message in ((["--pairs", str(plain), "--prompt", "q"], "without --prompt"),
                          (["--pairs", str(tmp_path / "missing.jsonl")], "no file"),
                          ([], "give --prompt and --answer, or --pairs FILE"),
                          (["--pairs", str(broken)], "broken.jsonl:1")):
        assert cli("score", "--data-dir", data_dir, *argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
