"""Serve the current reward model: ``score`` one answer, ``rerank`` best-of-N.

Inputs longer than the version's ``max_length`` follow the training policy
(``trainer/lengths.py``): the prompt loses its start, the answer stays whole; an answer too long
even for that is cut at its end with a warning (scoring must answer, but the warning says the
reward saw less than the text).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefstream.trainer.lengths import fit_answers
from prefstream.trainer.model import load, resolve_device, score_encoded
from prefstream.trainer.registry import read_metadata, version_path

log = logging.getLogger(__name__)


@dataclass
class RewardModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    version: str
    max_length: int
    device: torch.device
    batch_size: int = 32

    @classmethod
    def load(cls, data_dir: Path, *, version: str | None = None, device: str = "auto"
             ) -> RewardModel:
        """The promoted version (or a named one); ``TrainerError`` when there is none."""
        path = version_path(data_dir, version)
        metadata = read_metadata(data_dir, path.name)
        model, tokenizer = load(path)
        dev = resolve_device(device)
        model.to(dev).eval()
        return cls(model, tokenizer, path.name, int(metadata["config"]["max_length"]), dev)

    def score(self, prompt: str, answer: str) -> float:
        """Scalar reward of one answer to a prompt (higher is better)."""
        return self.score_many(prompt, [answer])[0]

    def score_many(self, prompt: str, answers: Sequence[str]) -> list[float]:
        """Rewards of several answers to one prompt, in input order."""
        encoded, cut = fit_answers(self.tokenizer, prompt, answers, self.max_length)
        if cut:
            log.warning("%d of %d answers longer than max_length %d were cut at their end for "
                        "scoring", cut, len(answers), self.max_length)
        return score_encoded(self.model, encoded, pad_id=self.tokenizer.pad_token_id,
                             device=self.device, batch_size=self.batch_size)

    def rerank(self, prompt: str, answers: Sequence[str]) -> list[tuple[str, float]]:
        """``(answer, reward)`` best first; equal rewards keep the input order."""
        scored = zip(answers, self.score_many(prompt, answers), strict=True)
        return sorted(scored, key=lambda pair: -pair[1])
