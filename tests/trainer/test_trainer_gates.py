"""Comparisons from votes, the length policy and balancing, and the gates that refuse."""

from __future__ import annotations

import logging
import math
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_fixtures import BASE, build_data_dir, make_pair, tiny_backbone, tiny_config

from prefstream.storage.catalog import connect_readonly, ensure_catalog
from prefstream.storage.files import init_data_dir, sealed_partitions, write_rows
from prefstream.trainer.comparisons import aggregate_comparisons, aggregate_one, precision_by_votes
from prefstream.trainer.data import normalize_text, temporal_split
from prefstream.trainer.fit import log_progress
from prefstream.trainer.gates import (
    calibration_gate,
    fallback_eval,
    loud_drops,
    probe_gate,
    training_weights,
)
from prefstream.trainer.lengths import (
    BUCKETS,
    bucket_of,
    fit_answers,
    fit_pairs,
    length_balance_weights,
)


def vote(i: int, first_wins: bool, confidence: float = 0.8, prompt: str = "q") -> dict:
    a, b = "answer A", "answer B"
    return {"pair_id": f"p{i}", "prompt": prompt, "chosen": a if first_wins else b,
            "rejected": b if first_wins else a, "confidence": confidence, "user_id": f"u{i}",
            "chosen_response_id": "ra" if first_wins else "rb",
            "rejected_response_id": "rb" if first_wins else "ra"}


# --- comparisons --------------------------------------------------------------------------------

def test_two_votes_to_one_is_the_majority_with_the_votes_reliability() -> None:
    agg = aggregate_one([vote(0, True), vote(1, False, 0.95), vote(2, True, 0.65)])
    assert (agg["chosen"], agg["rejected"]) == ("answer A", "answer B")
    assert (agg["votes"], agg["votes_for"], agg["votes_against"], agg["users"]) == (3, 2, 1, 3)
    r = (0.8 + 0.95 + 0.65) / 3
    assert agg["confidence"] == pytest.approx(r)  # margin 1: sigmoid(logit(r)) = r
    assert agg["pair_id"] == "p0" and not agg["tied"]  # the surest vote of the majority
    sure = aggregate_one([vote(i, True) for i in range(3)])
    assert sure["confidence"] == pytest.approx(1 / (1 + (0.2 / 0.8) ** 3))
    assert sure["weight"] == pytest.approx(2 * sure["confidence"] - 1)


def test_a_tie_is_counted_and_not_trained_on() -> None:
    votes = [vote(0, True), vote(1, False), vote(2, True, prompt="other")]
    kept, report = aggregate_comparisons(votes)
    assert [k["prompt"] for k in kept] == ["other"]
    assert report == {"gate": "aggregate", "in": 3, "kept": 1, "dropped": 2, "merged": 0,
                      "comparisons": 2, "contradicted": 1, "tied": 1}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0), st.sampled_from(["q1", "q2"])),
                min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_votes_in_any_order_give_the_same_aggregate(raw: list, rnd) -> None:
    votes = [vote(i, first, conf, prompt) for i, (first, conf, prompt) in enumerate(raw)]
    shuffled = list(votes)
    rnd.shuffle(shuffled)
    one, report_one = aggregate_comparisons(votes)
    two, report_two = aggregate_comparisons(shuffled)
    assert report_one == report_two
    assert {a["comparison_id"]: a for a in one} == {a["comparison_id"]: a for a in two}
    assert all(a["votes_for"] > a["votes_against"] for a in one)
    assert report_one["in"] == report_one["kept"] + report_one["merged"] + report_one["dropped"]


def test_precision_by_vote_count() -> None:
    aggs = [{"votes": 1, "ok": True}, {"votes": 1, "ok": False}, {"votes": 3, "ok": True},
            {"votes": 7, "ok": True}, {"votes": 2, "ok": None}]
    out = precision_by_votes(aggs, lambda a: a["ok"], buckets=(1, 2, 3))
    assert out == {"1": {"n": 2, "precision": 0.5}, "2": {"n": 0, "precision": None},
                   "3+": {"n": 2, "precision": 1.0}, "all": {"n": 4, "precision": 0.75}}


def test_the_comparisons_view_matches_the_trainer(tmp_path: Path) -> None:
    init_data_dir(tmp_path)
    a, b = "tea: steep it three minutes.", "tea: boil it an hour."
    rows = [make_pair(i, prompt="how do I make tea?", chosen=a if i != 2 else b,
                      rejected=b if i != 2 else a, confidence=c, user=f"u{i}")
            for i, c in enumerate((0.7, 0.9, 0.95))]
    rows.append(make_pair(9, prompt="lone?", confidence=0.6))
    write_rows(data_dir=tmp_path, table="pairs", rows=rows)
    ensure_catalog(tmp_path)
    con = connect_readonly(tmp_path)
    try:
        got = con.execute("SELECT prompt, votes, votes_a, votes_b, confidence, majority, "
                          "contradicted FROM comparisons ORDER BY prompt").fetchall()
    finally:
        con.close()
    mine = {p["prompt"]: p for p in aggregate_comparisons([r.model_dump() for r in rows])[0]}
    tea = got[0]
    assert tea[:4] == ("how do I make tea?", 3, 1, 2) and tea[5] == "b" and tea[6] is True
    # answer_b (the larger text) is "tea: steep..." which won 2 to 1
    assert mine["how do I make tea?"]["chosen"] == a
    assert tea[4] == pytest.approx(mine["how do I make tea?"]["confidence"])
    assert got[1][1:] == (1, 0, 1, pytest.approx(0.6), "b", False)


# --- length ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_backbone())


def test_long_prompts_lose_their_start_and_answers_stay_whole(tokenizer) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    pairs = [{"prompt": words, "chosen": "good answer here", "rejected": "bad"},
             {"prompt": "short?", "chosen": "x " * 80, "rejected": "y"}]
    kept, report = fit_pairs(tokenizer, pairs, 40)
    assert report == {"gate": "too_long", "in": 2, "kept": 1, "dropped": 1, "truncated": 1}
    ids, types = kept[0]["chosen_enc"]
    assert len(ids) == 40 and tokenizer.decode(ids).endswith("w59 [SEP] good answer here [SEP]")
    assert "w0 " not in tokenizer.decode(ids)
    tail = tokenizer.decode(ids[1:ids.index(tokenizer.sep_token_id)])
    assert tokenizer(tail, "good answer here")["input_ids"] == ids
    assert tokenizer(tail, "good answer here")["token_type_ids"] == types
    # both sides lose the same prompt tokens; nothing is cut from a pair that fits
    assert kept[0]["rejected_enc"][0][:ids.index(tokenizer.sep_token_id)] == \
        ids[:ids.index(tokenizer.sep_token_id)]
    whole, report = fit_pairs(tokenizer, pairs[:1], 200)
    assert report["truncated"] == 0 and whole[0]["chosen_enc"][0] == \
        tokenizer(words, "good answer here")["input_ids"]
    encoded, cut = fit_answers(tokenizer, "short?", ["x " * 80, "fine"], 40)
    assert cut == 1 and [len(e[0]) for e in encoded] == [40, 6]


def test_length_buckets_and_balance_weights() -> None:
    def pair(c: int, r: int) -> dict:
        return {"chosen": "c" * c, "rejected": "r" * r}

    assert [bucket_of(pair(100, n)) for n in (95, 80, 50, 10)] == [n for n, _ in BUCKETS]
    pairs = [pair(100, 50)] * 3 + [pair(50, 100), pair(100, 95), pair(7, 7)]
    w = length_balance_weights(pairs)
    assert w == [pytest.approx(4 / 6)] * 3 + [pytest.approx(2.0), 1.0, 1.0]
    weighted = training_weights([{**p, "weight": 0.5} for p in pairs], confidence=True,
                                length_balance="bucket")
    assert weighted[3]["train_weight"] == pytest.approx(1.0)
    plain = training_weights(pairs, confidence=False, length_balance="none")
    assert [p["train_weight"] for p in plain] == [1.0] * 6


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(1, 200)), max_size=40))
def test_balance_keeps_each_buckets_weight_and_evens_its_sides(lengths: list) -> None:
    pairs = [{"chosen": "c" * a, "rejected": "r" * b} for a, b in lengths]
    w = length_balance_weights(pairs)
    for name, _ in BUCKETS:
        idx = [i for i, p in enumerate(pairs) if bucket_of(p) == name]
        assert math.fsum(w[i] for i in idx) == pytest.approx(len(idx))
        longer = math.fsum(w[i] for i in idx if lengths[i][0] > lengths[i][1])
        shorter = math.fsum(w[i] for i in idx if lengths[i][0] < lengths[i][1])
        if longer and shorter:
            assert longer == pytest.approx(shorter)


# --- gates ---------------------------------------------------------------------------------

def test_no_explicit_labels_no_promotion_unless_opted_in(caplog) -> None:
    audit = {"passed": None, "reason": "no explicit labels configured", "n": 0}
    refused = calibration_gate(audit, allow_unaudited=False)
    assert refused["passed"] is False and "allow_unaudited" in refused["reason"]
    with caplog.at_level(logging.WARNING, logger="prefstream.trainer.gates"):
        allowed = calibration_gate(audit, allow_unaudited=True)
    assert allowed["passed"] is True and allowed["unaudited"] is True
    assert "WITHOUT A CALIBRATION AUDIT" in caplog.text
    audited = {"passed": False, "agreement": 0.5}
    assert calibration_gate(audited, allow_unaudited=True) is audited


def test_probe_gate_refuses_above_its_threshold() -> None:
    probes = {"probes": {"filler": {"rate": 0.25}, "flattery": {"rate": 0.1},
                         "whitespace_padding": {"rate": None}}}
    refused = probe_gate(probes, 0.2)
    assert refused["passed"] is False and refused["failed"] == ["filler"]
    assert "filler raises the reward of 25% of answers > 20%" in refused["reason"]
    assert probe_gate(probes, 0.25)["passed"] is True
    assert probe_gate({"probes": {}}, 0.2)["passed"] is False


def test_a_gate_removing_more_than_half_warns_with_counts(caplog) -> None:
    reports = [{"gate": "eval_prompt_group", "in": 5554, "kept": 96, "dropped": 5458},
               {"gate": "aggregate", "in": 100, "kept": 30, "dropped": 2, "merged": 68},
               {"gate": "near_duplicate", "in": 10, "kept": 5, "dropped": 5}]
    with caplog.at_level(logging.WARNING, logger="prefstream.trainer.gates"):
        warned = loud_drops("train", reports)
    assert warned == ["train gate eval_prompt_group removed 5458 of 5554 pairs (98%), kept 96"]
    assert warned[0] in caplog.text


def test_a_thin_eval_window_falls_back_to_older_held_out_groups(tmp_path: Path, tokenizer) -> None:
    from prefstream.trainer.service import prepare

    data_dir = build_data_dir(tmp_path / "data", sealed_hours=4, unsealed=False)
    split = temporal_split(sealed_partitions(data_dir), eval_window=1, gap=1)
    assert split is not None
    config = tiny_config(min_eval_pairs=20, fallback_eval_share=0.3)
    data = prepare(data_dir, split, config, tokenizer)
    moved = data.counts["train"][-1]
    assert moved["gate"] == "eval_fallback" and moved["to_eval"] > 0
    assert len(data.eval) == 16 + moved["to_eval"] and len(data.train) == moved["kept"]
    assert any("evaluation window held 16 pairs" in w for w in data.warnings)
    train_groups = {normalize_text(p["prompt"]) for p in data.train}
    assert not train_groups & {normalize_text(p["prompt"]) for p in data.eval}
    newest_train = max(p["event_time"] for p in data.train)
    assert all(p["event_time"] <= newest_train or p["partition"] in split.names("eval")
               for p in data.eval)
    assert all(p["event_time"] < split.cutoff for p in data.eval
               if p["partition"] not in split.names("eval"))
    assert "train_weight" in data.train[0]


def test_fallback_moves_whole_groups_from_training_only() -> None:
    train = [make_pair(i, prompt=f"topic {i % 9}?").model_dump() for i in range(90)]
    eval_pairs = [make_pair(500, prompt="newest?", minute=5).model_dump()]
    kept, evaluated, report = fallback_eval(train, eval_pairs, share=0.5)
    assert evaluated[0] is eval_pairs[0] and len(kept) + len(evaluated) == 91
    assert not {p["prompt"] for p in kept} & {p["prompt"] for p in evaluated}
    assert report["groups"] == len({p["prompt"] for p in evaluated[1:]})
    assert BASE + timedelta(hours=1) > max(p["event_time"] for p in evaluated)


def test_progress_line_names_step_rate_loss_and_time_left(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="prefstream.trainer.fit"):
        line = log_progress("end-to-end", 50, 200, 800, 100.0, [0.7, 0.5])
    assert line == "train end-to-end: step 50/200, 8.0 pairs/s, loss 0.6000, 5m00s left"
    assert line in caplog.text


def test_padding_counter_examples_prefer_the_answer_itself() -> None:
    from prefstream.trainer.augment import padding_pairs
    from prefstream.trainer.evaluate import PROBES

    pairs = [{"prompt": f"q{i}", "chosen": f"Answer {i}. It works.", "rejected": "no",
              "pair_id": f"p{i}", "confidence": 0.8} for i in range(200)]
    extra = padding_pairs(pairs, 0.5, seed=3)
    assert 60 < len(extra) < 140 and extra == padding_pairs(pairs, 0.5, seed=3)
    for e in extra:
        original = next(p for p in pairs if p["prompt"] == e["prompt"])
        assert e["chosen"] == original["chosen"] and e["rejected"].startswith(e["chosen"])
        assert len(e["rejected"]) > len(e["chosen"]) and e["rule"] == "augment_padding"
        # the probes' own texts are never trained on
        assert not any(e["rejected"] == probe(e["chosen"]) for probe in PROBES.values())
    assert padding_pairs(pairs, 0.0, seed=3) == []
