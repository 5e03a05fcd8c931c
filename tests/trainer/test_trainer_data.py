"""Temporal + grouped split and quality gates: pure functions, literal inputs and properties."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from prefstream.schemas.manifest import ManifestRow
from prefstream.streams.core.pairing import normalize_prompt
from prefstream.trainer.data import (
    cap_per_user,
    dedupe_exact,
    dedupe_near,
    drop_eval_groups,
    drop_too_long,
    is_length_matched,
    length_bias,
    min_confidence,
    normalize_text,
    quality_gates,
    temporal_split,
    within_split,
)

BASE = datetime(2024, 1, 1, tzinfo=timezone.utc)


def manifest_row(hour: int, hours: int = 1) -> ManifestRow:
    start = BASE + timedelta(hours=hour)
    end = start + timedelta(hours=hours)
    return ManifestRow(partition=start.strftime("%Y-%m-%dT%H"), start=start, end=end,
                       sealed_at=end, watermark=end, files=(), n_pairs=1, n_ties=0,
                       n_unpaired=0, n_refusals=0, n_sessions=1, sha256=f"h{hour}")


def pair(prompt: str = "p", chosen: str = "good", rejected: str = "bad", *, user: str = "u",
         confidence: float = 0.9, hour: int = 0, minute: int = 0) -> dict[str, Any]:
    ts = BASE + timedelta(hours=hour, minutes=minute)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "user_id": user,
            "confidence": confidence, "event_time": ts, "partition": ts.strftime("%Y-%m-%dT%H"),
            "rule": "thumbs"}


# -- temporal split -----------------------------------------------------------------------------

def test_split_holds_out_the_newest_window_after_a_gap() -> None:
    manifest = [manifest_row(h) for h in (0, 1, 2, 3, 5)]
    split = temporal_split(manifest, eval_window=2, gap=1)
    assert split is not None
    assert split.names("train") == ["2024-01-01T00", "2024-01-01T01"]
    assert split.names("gap") == ["2024-01-01T02"]
    assert split.names("eval") == ["2024-01-01T03", "2024-01-01T05"]
    assert split.cutoff == BASE + timedelta(hours=2)


def test_split_without_gap_cuts_at_the_eval_window() -> None:
    split = temporal_split([manifest_row(h) for h in range(3)], eval_window=1, gap=0)
    assert split is not None and split.gap == [] and split.cutoff == BASE + timedelta(hours=2)


def test_too_few_partitions_give_no_split() -> None:
    assert temporal_split([manifest_row(h) for h in range(3)], eval_window=2, gap=1) is None
    assert temporal_split([], eval_window=1, gap=0) is None


def test_split_sorts_its_input() -> None:
    split = temporal_split([manifest_row(h) for h in (4, 0, 2)], eval_window=1, gap=0)
    assert split is not None and split.names("eval") == ["2024-01-01T04"]


@settings(max_examples=150, deadline=None)
@given(
    hours=st.sets(st.integers(0, 300), min_size=0, max_size=30),
    eval_window=st.integers(1, 4),
    gap=st.integers(0, 3),
    rows=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 59), st.sampled_from(
        ["Hi!", "hi", "How to cook?", "how to COOK", "tax", "Tax?", "new"])), max_size=60),
)
def test_no_training_row_is_newer_than_the_cutoff_or_shares_an_eval_prompt_group(
        hours: set[int], eval_window: int, gap: int, rows: list[tuple[int, int, str]]) -> None:
    ordered = sorted(hours)
    manifest = [manifest_row(h) for h in ordered]
    split = temporal_split(manifest, eval_window=eval_window, gap=gap)
    if split is None:
        assert len(manifest) <= eval_window + gap
        return
    assert split.train and all(r.end <= split.cutoff for r in split.train)
    assert all(r.start >= split.cutoff for r in split.gap + split.eval)
    assert split.eval == manifest[-eval_window:]
    pairs = [pair(prompt, hour=ordered[i % len(ordered)], minute=m) for i, m, prompt in rows]
    train, _ = within_split(pairs, split.names("train"), split.cutoff)
    evaluation, _ = within_split(pairs, split.names("eval"), None)
    train, _ = drop_eval_groups(train, evaluation)
    eval_groups = {normalize_text(p["prompt"]) for p in evaluation}
    for p in train:
        assert p["partition"] in split.names("train") and p["event_time"] < split.cutoff
        assert normalize_text(p["prompt"]) not in eval_groups
    assert all(p["partition"] in split.names("eval") for p in evaluation)


def test_within_split_drops_rows_at_or_after_the_cutoff() -> None:
    rows = [pair(hour=0), pair(hour=1), pair(hour=5)]
    kept, report = within_split(rows, ["2024-01-01T00", "2024-01-01T01"],
                                BASE + timedelta(hours=1))
    assert kept == rows[:1]
    assert report == {"gate": "split", "in": 3, "kept": 1, "dropped": 2}


def test_grouped_split_uses_normalized_prompts() -> None:
    train = [pair("How do I cook rice?"), pair("how do i cook   RICE"), pair("other")]
    kept, report = drop_eval_groups(train, [pair("How do I cook rice")])
    assert [p["prompt"] for p in kept] == ["other"] and report["dropped"] == 2


@given(st.text())
def test_normalize_text_is_coarser_than_the_pairing_rules(text: str) -> None:
    # so prompts that normalize_prompt maps together always share a prompt group here
    assert normalize_text(normalize_prompt(text)) == normalize_text(text)


# -- quality gates ------------------------------------------------------------------------------

def test_min_confidence() -> None:
    kept, report = min_confidence([pair(confidence=0.4), pair(confidence=0.6)], 0.5)
    assert [p["confidence"] for p in kept] == [0.6] and report["dropped"] == 1


def test_exact_dedupe_keeps_the_first() -> None:
    rows = [pair(user="a"), pair(user="b"), pair(chosen="other")]
    kept, report = dedupe_exact(rows)
    assert [p["user_id"] for p in kept] == ["a", "u"] and report["dropped"] == 1


def test_near_dedupe_within_a_prompt_group() -> None:
    long_c = "Boil the rice for twelve minutes, then let it rest covered for five minutes."
    long_r = "Rice is a grain. It grows in fields and people eat it in many countries."
    rows = [
        pair("Cook rice?", long_c, long_r),
        pair("cook RICE", long_c + "!", long_r.replace("countries.", "countries!")),  # near dup
        pair("cook rice", "Fry it.", long_r),  # different chosen: kept
        pair("Other prompt", long_c, long_r),  # other group: kept
    ]
    kept, report = dedupe_near(rows, 0.9)
    assert kept == [rows[0], rows[2], rows[3]] and report["dropped"] == 1


def test_per_user_cap_prefers_confident_pairs_and_keeps_order() -> None:
    rows = [pair(user="a", confidence=c) for c in (0.6, 0.9, 0.7)] + [pair(user="b")]
    kept, report = cap_per_user(rows, 2)
    assert kept == [rows[1], rows[2], rows[3]] and report["dropped"] == 1
    assert cap_per_user(rows, None)[0] == rows


def test_too_long_pairs_are_dropped_and_counted() -> None:
    rows = [pair(chosen="x" * n) for n in (3, 10, 4)]
    kept, report = drop_too_long(rows, lambda p: len(p["chosen"]), 4)
    assert [len(p["chosen"]) for p in kept] == [3, 4] and report["dropped"] == 1


def test_quality_gates_report_every_gate_in_order() -> None:
    rows = [pair(confidence=0.3), pair(), pair(), pair("q2")]
    kept, reports = quality_gates(rows, min_conf=0.5, near_dup=0.9, user_cap=None)
    assert [r["gate"] for r in reports] == ["min_confidence", "exact_duplicate",
                                             "near_duplicate", "per_user_cap"]
    assert [r["kept"] for r in reports] == [3, 2, 2, 2] and len(kept) == 2


users = st.sampled_from(["a", "b", "c"])
texts = st.sampled_from(["good", "Good!", "bad", "bad answer", "meh"])
pairs_strategy = st.lists(st.builds(lambda u, c, r, conf, pr: pair(pr, c, r, user=u,
                                                                   confidence=conf),
                                    users, texts, texts, st.floats(0, 1),
                                    st.sampled_from(["p", "P?", "q"])), max_size=40)


@given(pairs_strategy, st.integers(1, 5))
def test_cap_property(rows: list[dict[str, Any]], cap: int) -> None:
    kept, report = cap_per_user(rows, cap)
    assert all(n <= cap for n in Counter(p["user_id"] for p in kept).values())
    assert report["kept"] + report["dropped"] == len(rows)
    assert [p for p in rows if any(p is k for k in kept)] == kept  # order kept


@given(pairs_strategy)
def test_dedupe_properties(rows: list[dict[str, Any]]) -> None:
    exact, _ = dedupe_exact(rows)
    keys = [(p["prompt"], p["chosen"], p["rejected"]) for p in exact]
    assert len(keys) == len(set(keys)) and set(keys) == {(p["prompt"], p["chosen"],
                                                           p["rejected"]) for p in rows}
    near, _ = dedupe_near(exact, 1.0)
    norm = [(normalize_text(p["prompt"]), normalize_text(p["chosen"]),
             normalize_text(p["rejected"])) for p in near]
    assert len(norm) == len(set(norm))
    assert dedupe_near(near, 1.0)[0] == near  # idempotent


def test_length_bias_and_length_match() -> None:
    rows = [pair(chosen="aaaa", rejected="aa"), pair(chosen="aa", rejected="aa"),
            pair(chosen="a", rejected="aaaaa")]
    bias = length_bias(rows)
    assert bias["share_chosen_longer"] == 1 / 3 and bias["share_equal_length"] == 1 / 3
    assert length_bias([])["n"] == 0
    assert is_length_matched(pair(chosen="a" * 10, rejected="a" * 8), 0.2)
    assert not is_length_matched(pair(chosen="a" * 10, rejected="a" * 7), 0.2)
