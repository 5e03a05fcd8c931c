"""``prefstream evaluate``: pure scoring functions on literal rows, the truth-file contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefstream.errors import ConfigError
from prefstream.evaluate import (
    THRESHOLDS,
    Scored,
    format_text,
    per_1000,
    precision,
    precision_by_rule,
    score_pairs,
    threshold_curve,
)
from prefstream.simulate import read_truth

QUALITY = {"a": 0.9, "b": 0.2, "c": 0.6, "d": 0.6, "a:edit": 0.95}
ROWS = [
    {"rule": "thumbs", "confidence": 0.95, "chosen_response_id": "a", "rejected_response_id": "b"},
    {"rule": "thumbs", "confidence": 0.95, "chosen_response_id": "b", "rejected_response_id": "c"},
    {"rule": "edit", "confidence": 0.75, "chosen_response_id": "a:edit",
     "rejected_response_id": "a"},
    {"rule": "click_over_skipped_above", "confidence": 0.6, "chosen_response_id": "c",
     "rejected_response_id": "b"},
    {"rule": "click_over_skipped_above", "confidence": 0.6, "chosen_response_id": "c",
     "rejected_response_id": "d"},  # equal quality: truth unknown
    {"rule": "reformulate_same_intent", "confidence": 0.53, "chosen_response_id": "b",
     "rejected_response_id": "a"},
    {"rule": "copy_over_skipped", "confidence": 0.8, "chosen_response_id": "x",
     "rejected_response_id": "a"},  # another run's answer: truth unknown
]
SCORED = [
    Scored("thumbs", 0.95, True), Scored("thumbs", 0.95, False), Scored("edit", 0.75, True),
    Scored("click_over_skipped_above", 0.6, True), Scored("click_over_skipped_above", 0.6, None),
    Scored("reformulate_same_intent", 0.53, False), Scored("copy_over_skipped", 0.8, None),
]


def test_score_pairs() -> None:
    assert score_pairs(ROWS, QUALITY) == SCORED
    assert score_pairs([], QUALITY) == []


def test_precision_counts_only_known_truth() -> None:
    assert precision(SCORED) == {"pairs": 7, "scored": 5, "correct": 3, "precision": 0.6}
    assert precision([]) == {"pairs": 0, "scored": 0, "correct": 0, "precision": None}
    unknown = [Scored("edit", 0.7, None)]
    assert precision(unknown) == {"pairs": 1, "scored": 0, "correct": 0, "precision": None}


def test_precision_by_rule() -> None:
    assert precision_by_rule(SCORED) == {
        "click_over_skipped_above": {"pairs": 2, "scored": 1, "correct": 1, "precision": 1.0},
        "copy_over_skipped": {"pairs": 1, "scored": 0, "correct": 0, "precision": None},
        "edit": {"pairs": 1, "scored": 1, "correct": 1, "precision": 1.0},
        "reformulate_same_intent": {"pairs": 1, "scored": 1, "correct": 0, "precision": 0.0},
        "thumbs": {"pairs": 2, "scored": 2, "correct": 1, "precision": 0.5},
    }
    assert list(precision_by_rule(SCORED)) == sorted(precision_by_rule(SCORED))


def test_per_1000() -> None:
    assert per_1000(7, 2000) == 3.5
    assert per_1000(1, 3) == 333.33
    assert per_1000(5, 0) is None


def test_threshold_curve() -> None:
    curve = threshold_curve(SCORED, events=1000, thresholds=(0.8, 0.5, 0.55, 0.6, 0.96))
    assert [p["threshold"] for p in curve] == [0.5, 0.55, 0.6, 0.8, 0.96]
    assert [p["pairs"] for p in curve] == [7, 6, 6, 3, 0]
    assert [p["precision"] for p in curve] == [0.6, 0.75, 0.75, 0.5, None]
    assert [p["per_1000_events"] for p in curve] == [7.0, 6.0, 6.0, 3.0, 0.0]


def test_threshold_is_inclusive_despite_float_rounding() -> None:
    almost = [Scored("x", 0.1 + 0.45, True)]  # 0.5500000000000000444 or 0.5499999999999999
    assert threshold_curve(almost, 10, thresholds=(0.55,))[0]["pairs"] == 1


def test_default_curve_is_monotonic_in_kept_pairs() -> None:
    scored = [Scored("r", c / 100, c % 3 != 0) for c in range(40, 100)]
    curve = threshold_curve(scored, events=500)
    assert [p["threshold"] for p in curve] == list(THRESHOLDS)
    assert THRESHOLDS[0] == 0.5 and THRESHOLDS[-1] == 0.95 and len(THRESHOLDS) == 10
    kept = [p["pairs"] for p in curve]
    assert kept == sorted(kept, reverse=True) and kept[0] == 50 and kept[-1] == 5


def test_format_text_lists_rules_and_curve() -> None:
    summary = {
        "simulation": {"events_produced": 1000}, "default_threshold": 0.5,
        **precision(SCORED), "per_1000_events": 7.0, "by_rule": precision_by_rule(SCORED),
        "curve": threshold_curve(SCORED, 1000), "refusals_by_reason": {"abandoned": 4},
        "training": {"heldout_agreement": 0.71},
    }
    for rule in summary["by_rule"]:
        summary["by_rule"][rule]["per_1000_events"] = 1.0
    text = format_text(summary)
    assert "precision 0.6" in text and "abandoned 4" in text
    assert "training.heldout_agreement" in text and "0.71" in text
    assert all(rule in text for rule in summary["by_rule"])
    assert text.count("\n0.") == len(THRESHOLDS)


def test_read_truth_rejects_other_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_truth(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"quality": {}}))
    with pytest.raises(ConfigError, match="not a simulation truth"):
        read_truth(tmp_path / "other.json")
