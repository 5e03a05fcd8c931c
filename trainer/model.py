"""Backbone + scalar head, token ids, dynamic padding and length-grouped batches.

Where the reward is read: ``AutoModelForSequenceClassification`` with ``num_labels=1``. For
BERT-style encoders (the default all-MiniLM-L6-v2) that head pools the first token: the [CLS]
hidden state -> the pretrained pooler (dense + tanh) -> linear -> one scalar. We keep it on
purpose: [CLS] attends over the whole prompt + answer, the pooler starts pretrained, and every
saved version is a stock Hugging Face model that loads with ``from_pretrained``. Decoder
backbones read the last non-pad token instead, which needs ``pad_token_id`` in the config
(set here for every backbone).

Dropout is switched off: Bradley-Terry gradients on a few thousand noisy pairs are noisy enough,
and a reward model should score the same text the same way in training and in serving.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefstream.trainer.loss import pair_margin

#: token ids of prompt + answer, and token type ids where the backbone uses them
Encoded = tuple[list[int], list[int] | None]
PairDict = dict[str, Any]


def load(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A scalar reward model and its tokenizer from a backbone or a saved version."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    config = AutoConfig.from_pretrained(path, num_labels=1)
    for name, value in config.to_dict().items():
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    return model, tokenizer


def head_parameter_names(model: PreTrainedModel) -> set[str]:
    """The scalar head: parameters outside the backbone, plus the backbone's pooler."""
    prefix = model.base_model_prefix + "."
    return {n for n, _ in model.named_parameters() if not n.startswith(prefix) or ".pooler." in n}


def encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str]
           ) -> list[Encoded]:
    """Token ids of (prompt, answer) text pairs with special tokens; never truncated."""
    if not prompts:
        return []
    enc = tokenizer(list(prompts), list(answers), truncation=False, verbose=False)
    types = enc.get("token_type_ids") if "token_type_ids" in tokenizer.model_input_names else None
    return [(ids, types[i] if types else None) for i, ids in enumerate(enc["input_ids"])]


def attach_tokens(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PairDict]
                  ) -> list[PairDict]:
    """Copies of the pairs with ``chosen_enc`` and ``rejected_enc`` (tokenized once, reused by
    the length gate, every epoch and the evaluation)."""
    prompts = [p["prompt"] for p in pairs]
    chosen = encode(tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = encode(tokenizer, prompts, [p["rejected"] for p in pairs])
    return [{**p, "chosen_enc": c, "rejected_enc": r}
            for p, c, r in zip(pairs, chosen, rejected, strict=True)]


def n_tokens(pair: PairDict) -> int:
    """Padded width of a pair: its longer side."""
    return max(len(pair["chosen_enc"][0]), len(pair["rejected_enc"][0]))


def pad_batch(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of this batch (dynamic padding, never to max_length)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, _) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if encoded[0][1] is not None:
        types = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (_, tt) in enumerate(encoded):
            types[row, : len(tt or ())] = torch.tensor(tt or [], dtype=torch.long)
        batch["token_type_ids"] = types
    return batch


def collate_pairs(pairs: Sequence[PairDict], *, pad_id: int, margin_coef: float
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Model inputs with the chosen answers first then the rejected ones (one forward pass),
    and the per-pair margins (None when margins are off)."""
    batch = pad_batch([p["chosen_enc"] for p in pairs] + [p["rejected_enc"] for p in pairs],
                      pad_id)
    if not margin_coef:
        return batch, None
    margin = torch.tensor([pair_margin(p["confidence"], margin_coef) for p in pairs])
    return batch, margin


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int
                           ) -> list[list[int]]:
    """Shuffled batches of indices with similar lengths: shuffle, sort within blocks of 50
    batches by length, cut, shuffle the batches (Hugging Face's LengthGroupedSampler idea)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    block = batch_size * 50
    batches = []
    for start in range(0, len(order), block):
        chunk = sorted(order[start:start + block], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on cuda only; CPU runs in float32 (bf16 on CPU is slower, not faster)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def forward_rewards(model: PreTrainedModel, batch: dict[str, torch.Tensor],
                    device: torch.device) -> torch.Tensor:
    """One scalar reward per row of the batch, in float32."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(device):
        return model(**inputs).logits.squeeze(-1).float()


@torch.inference_mode()
def score_encoded(model: PreTrainedModel, encoded: Sequence[Encoded], *, pad_id: int,
                  device: torch.device, batch_size: int) -> list[float]:
    """Rewards of token sequences, batched shortest first (least padding), in input order."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    scores = [0.0] * len(encoded)
    for idx in _chunks(order, batch_size):
        batch = pad_batch([encoded[i] for i in idx], pad_id)
        for i, value in zip(idx, forward_rewards(model, batch, device).tolist(), strict=True):
            scores[i] = value
    return scores


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
