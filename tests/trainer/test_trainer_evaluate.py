"""Metrics on literal rewards, probe perturbations, explicit-label parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from prefstream.trainer import TrainerError
from prefstream.trainer.evaluate import PROBES, first_sentence, load_explicit_labels, pair_metrics


def p(chosen: str, rejected: str, rule: str) -> dict[str, str]:
    return {"prompt": "q", "chosen": chosen, "rejected": rejected, "rule": rule}


def test_pair_metrics_on_literal_rewards() -> None:
    pairs = [p("a" * 10, "b" * 10, "thumbs"), p("a" * 10, "b" * 50, "thumbs"),
             p("a" * 9, "b" * 10, "edit")]
    m = pair_metrics([2.0, 0.0, 1.0], [1.0, 1.0, 1.0], pairs, tolerance=0.2)
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(1 / 3)
    assert m["mean_margin"] == pytest.approx(0.0)
    expected_loss = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log(2)) / 3
    assert m["loss"] == pytest.approx(expected_loss)
    assert m["reward"] == pytest.approx({"mean": 1.0, "std": math.sqrt(1 / 3), "min": 0.0,
                                         "max": 2.0})
    # the length-only baseline on the same rows: the chosen answer is never the longer one
    assert m["length_matched"] == {"n": 2, "accuracy": 0.5, "length_only": 0.0}
    assert m["length_only_accuracy"] == 0.0
    assert m["by_length_bucket"] == {
        "<=10%": {"n": 2, "accuracy": 0.5, "length_only": 0.0},
        "10-30%": {"n": 0, "accuracy": None, "length_only": None},
        "30-60%": {"n": 0, "accuracy": None, "length_only": None},
        ">60%": {"n": 1, "accuracy": 0.0, "length_only": 0.0}}
    assert m["per_rule"] == {"edit": {"n": 1, "accuracy": 0.0},
                             "thumbs": {"n": 2, "accuracy": 0.5}}
    assert m["reward_length_corr"] is not None


def test_pair_metrics_of_nothing() -> None:
    m = pair_metrics([], [], [], tolerance=0.2)
    assert m["accuracy"] is None and m["loss"] is None and m["reward"]["mean"] is None


def test_first_sentence() -> None:
    assert first_sentence("Paris is the capital. It is big.") == "Paris is the capital."
    assert first_sentence("no end mark") == "no end mark"
    assert first_sentence("  Why? Because.") == "Why?"


def test_probes_add_no_information() -> None:
    answer = "Boil water first. Then add the tea."
    for kind, perturb in PROBES.items():
        probed = perturb(answer)
        assert probed != answer and len(probed) > len(answer), kind
    assert PROBES["flattery"](answer).endswith("I hope this helps!")
    assert PROBES["repetition"](answer).count("Boil water first.") == 4
    assert "Then add the tea" not in PROBES["longer_but_emptier"](answer)


def test_explicit_labels_are_parsed_and_bad_lines_named(tmp_path: Path) -> None:
    good = tmp_path / "labels.jsonl"
    good.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n')
    assert load_explicit_labels(good) == [{"prompt": "q", "chosen": "a", "rejected": "b",
                                           "rule": "explicit"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    with pytest.raises(TrainerError, match="bad.jsonl:2"):
        load_explicit_labels(bad)


def test_hh_dialogue_labels_are_split_at_the_final_assistant_turn(tmp_path):
    import gzip
    import json

    from prefstream.trainer.evaluate import load_explicit_labels

    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected":
         "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: a\n\nAssistant: same", "rejected":
         "\n\nHuman: a\n\nAssistant: same"},                       # identical: refused
        {"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y",
         "rejected": "\n\nHuman: a\n\nAssistant: z\n\nHuman: b\n\nAssistant: y"},  # differ earlier
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    assert load_explicit_labels(path) == [{
        "prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "hello there",
        "rejected": "go away", "rule": "explicit"}]
