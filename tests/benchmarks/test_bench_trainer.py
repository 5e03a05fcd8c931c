"""Smoke test of benchmarks/bench_trainer.py: its pure parts, and a very small run on the tiny
backbone. The prefstream half always runs; the TRL half is skipped when ``trl`` is not installed
(it is an optional benchmark dependency)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from trainer_fixtures import tiny_backbone

from prefstream.trainer.data import normalize_text

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_trainer.py"
TOPICS = ("tea", "rust", "paris", "tax", "yoga", "bread", "sql", "mars", "jazz", "chess")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_trainer"] = module
    spec.loader.exec_module(module)
    return module


def dialogue(prompt: str, answer: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


def write_hh(path: Path, n: int, *, long_every: int = 5) -> Path:
    """HH-style dialogue rows with learnable answers; every ``long_every``-th one has a long
    chosen answer (over 64 tokens), and one row breaks the pair contract (identical answers)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"question {i} about {topic}?"
        chosen = f"good helpful correct answer about {topic}."
        if i % long_every == long_every - 1:
            chosen += " and more detail" * 30
        rows.append({"chosen": dialogue(prompt, chosen),
                     "rejected": dialogue(prompt, f"bad wrong useless answer about {topic}.")})
    rows.append({"chosen": dialogue("same?", "same."), "rejected": dialogue("same?", "same.")})
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_load_and_split(bench, tmp_path):
    pairs, counts = bench.load_pairs(write_hh(tmp_path / "hh.jsonl.gz", 40))
    assert counts == {"rows": 41, "skipped_rows": 1, "pairs": 40}
    assert pairs[0]["prompt"].endswith("\n\nAssistant:") and pairs[0]["chosen"].startswith("good")
    # a reworded copy of a prompt must not leak into the held-out set
    pairs.append({**pairs[0], "prompt": pairs[0]["prompt"].upper()})
    train, held, info = bench.split_pairs(pairs, 30, 5, seed=3)
    assert (train, held) == bench.split_pairs(pairs, 30, 5, seed=3)[:2]
    assert len(train) == 30 and len(held) == 5 and info["held_out"] == 5
    groups = {normalize_text(p["prompt"]) for p in train}
    assert not any(normalize_text(p["prompt"]) in groups for p in held)
    assert len(bench.split_pairs(pairs, 30, 0, seed=3)[1]) == 11 - info[
        "remaining_sharing_a_train_prompt"]
    with pytest.raises(SystemExit):
        bench.split_pairs(pairs, len(pairs), 5, seed=0)


def test_input_formats_and_held_out_subset(bench):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone())
    ids, types = bench.encode_trl(tok, "\n\nHuman: hi\n\nAssistant:", "hello there")
    assert types is None and ids[0] == tok.cls_token_id and ids[-2:] == [tok.sep_token_id] * 2
    ids_p, types_p = bench.encode_prefstream(tok, "\n\nHuman: hi\n\nAssistant:", "hello there")
    assert len(ids_p) == len(ids) and types_p[-1] == 1  # same length here, different layout
    short = {"prompt": "q?", "chosen": "yes.", "rejected": "no."}
    long = {**short, "chosen": "word " * 80}
    fits, excluded = bench.scored_subset(tok, [short, long], max_length=64)
    assert fits == [short] and excluded == 1
    assert bench.digest([short]) != bench.digest([long])


def test_paired_comparison(bench):
    assert bench.mcnemar([1, 1, 0, 0], [1, 0, 0, 0]) == {
        "only_first_right": 1, "only_second_right": 0, "both_right": 1, "p_value": 1.0}
    assert bench.mcnemar([1] * 10, [0] * 10)["p_value"] == pytest.approx(2 / 1024)
    assert bench.mcnemar([0, 1], [0, 1])["p_value"] == 1.0


def small_args(tmp_path: Path, only: str) -> list[str]:
    data = write_hh(tmp_path / "hh.jsonl.gz", 48)
    return ["--data", str(data), "--backbone", str(tiny_backbone()), "--pairs", "24",
            "--eval-pairs", "12", "--max-length", "64", "--batch-size", "8", "--lr", "3e-3",
            "--only", only, "--in-process", "--out", str(tmp_path / "out.json")]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_prefstream_half_runs(bench, tmp_path):
    result = bench.main(small_args(tmp_path, "prefstream"))
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["runs"].keys() == {"prefstream_head0", "prefstream_default"}
    assert saved["comparison"] == {} and saved["data"]["train_pairs"] == 24
    assert saved["machine"]["cpu_count"] and saved["machine"]["versions"]["torch"]
    head0, default = saved["runs"]["prefstream_head0"], saved["runs"]["prefstream_default"]
    assert head0["schedule"]["head_steps"] == 0 and default["schedule"]["head_steps"] > 0
    for run in (head0, default):
        assert 0 < run["dropped_too_long"] < 24  # the long answers, dropped and counted
        assert run["dropped_too_long_counted"]["dropped"] == run["dropped_too_long"]
        assert run["pairs_processed"] == run["trained_pairs"] and run["pairs_per_s"] > 0
        held = run["heldout"]["prefstream"]
        assert held["n"] == saved["data"]["heldout_scored"] > 0 and 0 <= held["accuracy"] <= 1
        assert "correct" not in held
    assert result["runs"].keys() == saved["runs"].keys()


@pytest.mark.filterwarnings("ignore")
def test_trl_half_runs(bench, tmp_path):
    pytest.importorskip("trl", exc_type=ImportError)  # absent or not importable: skip
    saved = bench.main(small_args(tmp_path, "both"))
    trl, head0 = saved["runs"]["trl"], saved["runs"]["prefstream_head0"]
    assert trl["encoding_matches_trl_dataset"] is True
    assert trl["dropped_too_long"] == head0["dropped_too_long"] > 0  # TRL's silent drops, counted
    assert trl["heldout"]["trl"]["n"] == head0["heldout"]["prefstream"]["n"]
    comparison = saved["comparison"]["prefstream_head0"]
    assert comparison["pairs_per_s_ratio"] > 0 and "met" in comparison["goal"]
