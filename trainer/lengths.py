"""Length: one truncation policy for training and scoring, length buckets, length balancing.

**Truncation.** A pair whose prompt + longer answer exceeds ``max_length`` tokens keeps both
answers whole and loses the *start* of its prompt (the end, the latest turn of a dialogue, is
what the answers reply to). Both sides of a pair lose the same prompt tokens, so the model
compares the answers in the same context. When even ``MIN_PROMPT_TOKENS`` of prompt (or the
whole prompt, if shorter) do not fit next to the longer answer, the pair is dropped and
counted: cutting an answer would train on a text nobody judged. Scoring one answer uses the
same rule, and cuts the answer's end only as a last resort (with a warning), since it must
answer (``trainer/scoring.py``). See ``docs/reward-model.md`` for the measured token lengths.

**Buckets.** A pair's relative length difference ``|len(c) - len(r)| / max(len(c), len(r))`` in
characters falls in one of ``BUCKETS``; the first is "length-matched" (within 10%).

**Balancing.** ``length_balance_weights`` reweights pairs so that within each bucket the pairs
whose chosen answer is longer and those whose chosen answer is shorter carry equal total weight
(the bucket's total is unchanged): the length of an answer then predicts nothing in training.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

PairDict = dict[str, Any]
Encoded = tuple[list[int], list[int] | None]
MIN_PROMPT_TOKENS = 16
#: (name, upper bound of the relative length difference); the last bound includes 1.0
BUCKETS: tuple[tuple[str, float], ...] = (("<=10%", 0.10), ("10-30%", 0.30), ("30-60%", 0.60),
                                          (">60%", 1.0))


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    out: list[list[int]] = tokenizer(list(texts), add_special_tokens=False, truncation=False,
                                     verbose=False)["input_ids"]
    return out


@dataclass(frozen=True)
class Template:
    """Where a tokenizer puts its special tokens around a (prompt, answer) pair, read off the
    encoding of a probe pair (transformers 5 has no ``build_inputs_with_special_tokens``)."""

    parts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # before, between, after
    part_types: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None
    types: tuple[int, int]  # token type of the prompt, of the answer

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> Template:
        a, b = _ids(tokenizer, ["a"])[0], _ids(tokenizer, ["b"])[0]
        enc = tokenizer("a", "b")
        ids: list[int] = enc["input_ids"]
        i = next(k for k in range(len(ids)) if ids[k:k + len(a)] == a)
        j = next(k for k in range(i + len(a), len(ids)) if ids[k:k + len(b)] == b)
        cuts = ((0, i), (i + len(a), j), (j + len(b), len(ids)))
        tt = enc.get("token_type_ids") if "token_type_ids" in tokenizer.model_input_names else None
        return cls(parts=tuple(tuple(ids[x:y]) for x, y in cuts),  # type: ignore[arg-type]
                   part_types=(tuple(tuple(tt[x:y]) for x, y in cuts)  # type: ignore[arg-type]
                               if tt else None),
                   types=(tt[i], tt[j]) if tt else (0, 0))

    @property
    def n_special(self) -> int:
        return sum(len(p) for p in self.parts)

    def build(self, prompt: list[int], answer: list[int]) -> Encoded:
        before, between, after = self.parts
        ids = [*before, *prompt, *between, *answer, *after]
        if self.part_types is None:
            return ids, None
        tb, tm, ta = self.part_types
        types = [*tb, *[self.types[0]] * len(prompt), *tm, *[self.types[1]] * len(answer), *ta]
        return ids, types


def prompt_budget(template: Template, n_prompt: int, n_answer: int, max_length: int
                  ) -> int | None:
    """Prompt tokens that fit beside an answer of ``n_answer`` tokens (all of them when the
    pair fits), or None when fewer than the minimum would."""
    room = max_length - template.n_special - n_answer
    if room >= n_prompt:
        return n_prompt
    return room if room >= min(n_prompt, MIN_PROMPT_TOKENS) else None


def fit_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PairDict], max_length: int
              ) -> tuple[list[PairDict], dict[str, Any]]:
    """Copies of the pairs that fit, with ``chosen_enc``/``rejected_enc`` (truncated prompts
    marked ``prompt_cut`` tokens) and the report ``{"gate": "too_long", in, kept, dropped,
    truncated}``."""
    prompts = _ids(tokenizer, [p["prompt"] for p in pairs])
    chosen = _ids(tokenizer, [p["chosen"] for p in pairs])
    rejected = _ids(tokenizer, [p["rejected"] for p in pairs])
    template = Template.of(tokenizer)
    kept, truncated = [], 0
    for p, pr, c, r in zip(pairs, prompts, chosen, rejected, strict=True):
        budget = prompt_budget(template, len(pr), max(len(c), len(r)), max_length)
        if budget is None:
            continue
        cut = len(pr) - budget
        truncated += cut > 0
        tail = pr[cut:]
        kept.append({**p, "chosen_enc": template.build(tail, c),
                     "rejected_enc": template.build(tail, r), "prompt_cut": cut})
    return kept, {"gate": "too_long", "in": len(pairs), "kept": len(kept),
                  "dropped": len(pairs) - len(kept), "truncated": truncated}


def fit_answers(tokenizer: PreTrainedTokenizerBase, prompt: str, answers: Sequence[str],
                max_length: int) -> tuple[list[Encoded], int]:
    """Each (prompt, answer) within ``max_length`` by the same policy; an answer too long even
    for the minimum prompt is cut at its end. Returns the encodings and how many answers were
    cut (the caller warns)."""
    template = Template.of(tokenizer)
    pr = _ids(tokenizer, [prompt])[0]
    out, cut_answers = [], 0
    for a in _ids(tokenizer, list(answers)):
        budget = prompt_budget(template, len(pr), len(a), max_length)
        if budget is None:
            budget = min(len(pr), MIN_PROMPT_TOKENS)
            room = max_length - template.n_special - budget
            a, cut_answers = a[:max(room, 1)], cut_answers + 1
        out.append(template.build(pr[len(pr) - budget:], a))
    return out, cut_answers


def relative_difference(pair: PairDict) -> float:
    """``|len(chosen) - len(rejected)| / max(...)`` in characters (0 for two empty texts)."""
    a, b = len(pair["chosen"]), len(pair["rejected"])
    return abs(a - b) / max(a, b) if max(a, b) else 0.0


def bucket_of(pair: PairDict) -> str:
    d = relative_difference(pair)
    return next(name for name, bound in BUCKETS if d <= bound)


def length_only_right(pair: PairDict) -> bool:
    """The length-only baseline: the longer answer wins (equal lengths count as wrong)."""
    return len(pair["chosen"]) > len(pair["rejected"])


def length_balance_weights(pairs: Sequence[PairDict]) -> list[float]:
    """Per-pair multipliers (see the module docstring); 1.0 where a bucket has pairs on one side
    only (nothing to balance against) and for pairs of equal length."""
    sides: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        if len(p["chosen"]) != len(p["rejected"]):
            sides[(bucket_of(p), length_only_right(p))].append(i)
    weights = [1.0] * len(pairs)
    for name, _ in BUCKETS:
        longer, shorter = sides.get((name, True), []), sides.get((name, False), [])
        if not longer or not shorter:
            continue
        total = len(longer) + len(shorter)
        for group in (longer, shorter):
            for i in group:
                weights[i] = total / (2 * len(group))
    return weights
