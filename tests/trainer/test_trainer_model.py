"""Tokens, collator, batches, head selection and the training loop on a tiny real BERT."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from trainer_fixtures import make_pair, tiny_config

from prefstream.trainer.config import TrainConfig, default_backbone
from prefstream.trainer.fit import fit, linear_schedule, setup
from prefstream.trainer.model import (
    attach_tokens,
    collate_pairs,
    encode,
    head_parameter_names,
    length_grouped_batches,
    n_tokens,
    pad_batch,
    resolve_device,
)


def test_default_backbone_is_the_packaged_minilm() -> None:
    path = default_backbone()
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()


def test_config_reads_the_environment_and_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFSTREAM_TRAIN_MAX_LENGTH", "128")
    monkeypatch.setenv("PREFSTREAM_TRAIN_BATCH_SIZE", "4")
    config = TrainConfig()
    assert (config.max_length, config.batch_size, config.min_calibration_agreement) == (128, 4,
                                                                                        0.7)
    with pytest.raises(ValueError):
        TrainConfig(epochs=0, head_epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(device="tpu")


def test_pad_batch_pads_to_the_longest_of_the_batch_only() -> None:
    batch = pad_batch([([1, 2, 3], [0, 0, 1]), ([4], [0])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert "token_type_ids" not in pad_batch([([1], None)], pad_id=0)


def test_collator_stacks_chosen_then_rejected_with_margins() -> None:
    pairs = [{"chosen_enc": ([1, 2], None), "rejected_enc": ([3], None), "confidence": 0.9},
             {"chosen_enc": ([4], None), "rejected_enc": ([5, 6, 7], None), "confidence": 0.5}]
    batch, margin = collate_pairs(pairs, pad_id=0, margin_coef=1.0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [4, 0, 0], [3, 0, 0], [5, 6, 7]]
    assert margin is not None and margin.tolist() == pytest.approx([0.4, 0.0])
    assert collate_pairs(pairs, pad_id=0, margin_coef=0.0)[1] is None


def test_tokens_are_counted_not_truncated() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    long_answer = "word " * 600
    (ids, types), = encode(tokenizer, ["short prompt"], [long_answer])
    assert len(ids) > 600 and types is not None and types[-1] == 1
    pair = attach_tokens(tokenizer, [make_pair(1, prompt="short prompt", chosen=long_answer)
                                      .model_dump()])[0]
    assert n_tokens(pair) == len(ids)


@given(st.lists(st.integers(1, 300), max_size=200), st.integers(1, 16), st.integers(0, 3))
def test_length_grouped_batches_cover_every_index_once(lengths: list[int], size: int,
                                                      seed: int) -> None:
    batches = length_grouped_batches(lengths, size, seed=seed)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= size for b in batches)
    assert batches == length_grouped_batches(lengths, size, seed=seed)


def test_length_grouped_batches_group_similar_lengths() -> None:
    lengths = [10, 500] * 32
    batches = length_grouped_batches(lengths, 8, seed=0)
    assert all(len({lengths[i] for i in b}) == 1 for b in batches)


def test_schedule_warms_up_then_decays() -> None:
    lrs = [linear_schedule(s, 10, 1.0, 2) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] < lrs[2] and min(lrs) >= 0.1


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_fit_lowers_the_loss_and_changes_the_weights() -> None:
    config = tiny_config(epochs=5, head_epochs=1)
    s = setup(config)
    head = head_parameter_names(s.model)
    assert head == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                    "classifier.bias"}
    pairs = attach_tokens(s.tokenizer, [make_pair(i).model_dump() for i in range(48)])
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    result = fit(s, pairs, config)
    assert result.head_steps == 6 and len(result.losses) == 6 + 30
    first, last = sum(result.losses[:6]) / 6, sum(result.losses[-6:]) / 6
    assert last < first * 0.5, result.losses
    after = dict(s.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in head)
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"],
                           after["bert.encoder.layer.0.attention.self.query.weight"])
    summary = result.summary()
    assert summary["final_accuracy"] > 0.9
    assert summary["stages"]["head"]["steps"] == 6
    assert summary["stages"]["end-to-end"]["pairs"] == 240


def test_max_length_beyond_the_backbone_positions_is_refused() -> None:
    from prefstream.trainer import TrainerError

    with pytest.raises(TrainerError, match="exceeds the 128 positions"):
        setup(tiny_config(max_length=256))


def test_fit_stops_between_steps() -> None:
    from prefstream.trainer import Interrupted

    config = tiny_config(epochs=1, head_epochs=0)
    s = setup(config)
    pairs = attach_tokens(s.tokenizer, [make_pair(i).model_dump() for i in range(16)])
    with pytest.raises(Interrupted):
        fit(s, pairs, config, should_stop=lambda: True)
