"""``setup()`` then ``fit()``: a head-only stage, then end-to-end fine-tuning.

Stage 1 freezes the backbone and trains the new scalar head (and the pooler) at ``head_lr``, so
the randomly initialised head does not send large, meaningless gradients into pretrained weights.
Stage 2 trains everything at ``lr`` with linear warmup and linear decay. Each step: collate
(chosen then rejected, dynamic padding), one forward pass, Bradley-Terry loss, clip, step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefstream.trainer import Interrupted, TrainerError
from prefstream.trainer.config import TrainConfig
from prefstream.trainer.loss import bradley_terry_loss, pair_accuracy
from prefstream.trainer.model import (
    PairDict,
    collate_pairs,
    forward_rewards,
    head_parameter_names,
    length_grouped_batches,
    load,
    n_tokens,
    resolve_device,
)

log = logging.getLogger(__name__)
MAX_GRAD_NORM = 1.0


@dataclass
class Setup:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    backbone: Path


@dataclass
class FitResult:
    """Per-step training loss and accuracy of both stages (head steps first)."""

    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    head_steps: int = 0
    pairs_seen: int = 0
    wall_s: float = 0.0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        tail = max(len(self.losses) // 10, 1)  # last 10% of steps: the loss the model ended at
        return {
            "steps": len(self.losses), "head_steps": self.head_steps,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": sum(self.losses[-tail:]) / tail if self.losses else None,
            "final_accuracy": sum(self.accuracies[-tail:]) / tail if self.losses else None,
            "wall_s": round(self.wall_s, 3),
            "pairs_per_s": self.pairs_seen / self.wall_s if self.wall_s else None,
            "stages": self.stages,
        }


def setup(config: TrainConfig) -> Setup:
    """Backbone with a fresh scalar head (seeded), its tokenizer, and the device, ready to fit."""
    torch.manual_seed(config.seed)
    backbone = config.backbone_path()
    model, tokenizer = load(backbone)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.max_length > positions:
        raise TrainerError(f"max_length {config.max_length} exceeds the {positions} positions "
                           f"of {backbone}")
    device = resolve_device(config.device)
    log.info("backbone %s on %s", backbone, device)
    return Setup(model.to(device), tokenizer, device, backbone)


def fit(s: Setup, pairs: Sequence[PairDict], config: TrainConfig,
        should_stop: Callable[[], bool] = lambda: False) -> FitResult:
    """Train on tokenized pairs (see ``model.attach_tokens``); raises ``Interrupted`` when
    ``should_stop()`` turns true between two steps."""
    result = FitResult()
    start = time.perf_counter()
    lengths = [n_tokens(p) for p in pairs]
    head = _epochs_of_batches(lengths, config, config.head_epochs, seed=config.seed)
    full = _epochs_of_batches(lengths, config, config.epochs, seed=config.seed + 1_000)
    warmup = int(config.warmup_ratio * len(full))
    _stage("head", s, pairs, head, config, result, should_stop,
           trainable=head_parameter_names(s.model), lr=lambda step: config.head_lr)
    result.head_steps = len(result.losses)
    _stage("end-to-end", s, pairs, full, config, result, should_stop, trainable=None,
           lr=lambda step: linear_schedule(step, len(full), config.lr, warmup))
    result.wall_s = time.perf_counter() - start
    s.model.eval()
    return result


def linear_schedule(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then linear decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    remaining = (total - step) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * remaining)


def _epochs_of_batches(lengths: list[int], config: TrainConfig, epochs: float, *, seed: int
                       ) -> list[list[int]]:
    """Length-grouped batches for a (possibly fractional) number of epochs."""
    batches: list[list[int]] = []
    for epoch in range(math.ceil(epochs)):
        batches += length_grouped_batches(lengths, config.batch_size, seed=seed + epoch)
    per_epoch = math.ceil(len(lengths) / config.batch_size)
    return batches[: round(epochs * per_epoch)]


def _stage(name: str, s: Setup, pairs: Sequence[PairDict], batches: list[list[int]],
           config: TrainConfig, result: FitResult, should_stop: Callable[[], bool], *,
           trainable: set[str] | None, lr: Callable[[int], float]) -> None:
    params = []
    for pname, param in s.model.named_parameters():
        param.requires_grad_(trainable is None or pname in trainable)
        if param.requires_grad:
            params.append(param)
    if not batches:
        return
    started, seen = time.perf_counter(), result.pairs_seen
    optimizer = torch.optim.AdamW(params, lr=lr(0), weight_decay=0.0)
    s.model.train()
    bar = tqdm(batches, desc=f"train {name}", unit="step", disable=None, mininterval=1.0)
    for step, idx in enumerate(bar):
        if should_stop():
            raise Interrupted(f"stop requested during the {name} stage, step {step}")
        for group in optimizer.param_groups:
            group["lr"] = lr(step)
        loss, acc = _step(s, [pairs[i] for i in idx], optimizer, params, config)
        result.losses.append(loss)
        result.accuracies.append(acc)
        result.pairs_seen += len(idx)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}", lr=f"{lr(step):.1e}", refresh=False)
        if bar.disable and (step + 1) % config.log_every_steps == 0:
            log_progress(name, step + 1, len(batches), result.pairs_seen - seen,
                         time.perf_counter() - started, result.losses[-config.log_every_steps:])
    wall = time.perf_counter() - started
    pairs = result.pairs_seen - seen
    result.stages[name] = {"steps": len(batches), "pairs": pairs, "wall_s": round(wall, 3),
                           "pairs_per_s": round(pairs / wall, 3)}
    log.info("%s stage: %d steps, %.1f pairs/s, last loss %.4f", name, len(batches),
             pairs / wall, result.losses[-1])


def log_progress(stage: str, step: int, total: int, pairs: int, wall_s: float,
                 losses: Sequence[float]) -> str:
    """One progress line (logged and returned) for runs without a terminal: step, pairs/s,
    mean loss of the last steps, and the time left at this pace."""
    rate = pairs / wall_s if wall_s > 0 else 0.0
    left = wall_s / step * (total - step) if step else 0.0
    line = (f"train {stage}: step {step}/{total}, {rate:.1f} pairs/s, loss "
            f"{sum(losses) / max(len(losses), 1):.4f}, {_clock(left)} left")
    log.info("%s", line)
    return line


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _step(s: Setup, batch_pairs: list[PairDict], optimizer: torch.optim.Optimizer,
          params: list[torch.nn.Parameter], config: TrainConfig) -> tuple[float, float]:
    batch, margin = collate_pairs(batch_pairs, pad_id=s.tokenizer.pad_token_id,
                                  margin_coef=config.margin_coef)
    rewards = forward_rewards(s.model, batch, s.device)
    r_chosen, r_rejected = rewards[: len(batch_pairs)], rewards[len(batch_pairs):]
    margin = margin.to(s.device) if margin is not None else None
    weights = torch.tensor([float(p.get("train_weight", 1.0)) for p in batch_pairs],
                           device=s.device)
    loss = bradley_terry_loss(r_chosen, r_rejected, margin, config.center_rewards_coef, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    return loss.item(), pair_accuracy(r_chosen.detach(), r_rejected.detach())
