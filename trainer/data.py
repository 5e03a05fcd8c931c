"""Which pairs the trainer may learn from: temporal + grouped split and quality gates.

Pure functions over manifest rows and pair dicts (rows of the ``pairs`` table): no I/O, no clock.
Every gate returns ``(kept, report)`` where report is ``{"gate", "in", "kept", "dropped"}``, so
the counts after each gate go into the version's metadata. Gates keep the input order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefstream.schemas.manifest import ManifestRow

PairDict = dict[str, Any]
Report = dict[str, Any]
Gated = tuple[list[PairDict], Report]
SHINGLE = 5  # characters per shingle in near-duplicate detection


@dataclass(frozen=True)
class Split:
    """Manifest rows per role; training partitions all end at or before ``cutoff``."""

    train: list[ManifestRow]
    gap: list[ManifestRow]
    eval: list[ManifestRow]
    cutoff: datetime

    def names(self, role: str) -> list[str]:
        return [row.partition for row in getattr(self, role)]


def temporal_split(manifest: Sequence[ManifestRow], *, eval_window: int, gap: int
                   ) -> Split | None:
    """Newest ``eval_window`` sealed partitions evaluate, ``gap`` before them are skipped, the
    rest train. None when fewer than ``eval_window + gap + 1`` partitions are sealed.

    The cutoff is the start of the first held-back partition; a training partition must end at or
    before it, which also holds for multi-hour partitions.
    """
    rows = sorted(manifest, key=lambda r: r.partition)
    held = eval_window + gap
    if len(rows) <= held:
        return None
    cutoff = rows[-held].start
    train = [r for r in rows[:-held] if r.end <= cutoff]
    return Split(train=train, gap=rows[-held:len(rows) - eval_window], eval=rows[-eval_window:],
                 cutoff=cutoff)


def integrity_refusal(partition: str, expected: str, found: str) -> Report | None:
    """None when a sealed partition's rows hash to its manifest's sha256 (``expected``); else
    the record of its refusal, kept in the version's metadata."""
    if found == expected:
        return None
    return {"partition": partition, "expected_sha256": expected, "found_sha256": found,
            "reason": "content does not match the manifest's sha256 (files altered, damaged "
                      "or quarantined since the seal)"}


def normalize_text(text: str) -> str:
    """Lowercase words joined by single spaces (punctuation, ``_`` and whitespace are
    separators). Coarser than the pairing rules' ``normalize_prompt``: prompts the rules see as
    equal always share a group here."""
    return " ".join(w.casefold() for w in re.split(r"[\W_]+", text.lower()) if w)


def _report(gate: str, before: Sequence[Any], kept: Sequence[Any]) -> Report:
    return {"gate": gate, "in": len(before), "kept": len(kept), "dropped": len(before) - len(kept)}


def within_split(pairs: Sequence[PairDict], partitions: Iterable[str], cutoff: datetime | None
                 ) -> Gated:
    """Rows of the given partitions (and, for training, with event time before the cutoff)."""
    names = set(partitions)
    kept = [p for p in pairs if p["partition"] in names
            and (cutoff is None or p["event_time"] < cutoff)]
    return kept, _report("split", pairs, kept)


def drop_eval_groups(train: Sequence[PairDict], eval_pairs: Sequence[PairDict]) -> Gated:
    """Grouped split: no normalized prompt of the evaluation window is trained on."""
    groups = {normalize_text(p["prompt"]) for p in eval_pairs}
    kept = [p for p in train if normalize_text(p["prompt"]) not in groups]
    return kept, _report("eval_prompt_group", train, kept)


def min_confidence(pairs: Sequence[PairDict], threshold: float) -> Gated:
    kept = [p for p in pairs if p["confidence"] >= threshold]
    return kept, _report("min_confidence", pairs, kept)


def dedupe_exact(pairs: Sequence[PairDict]) -> Gated:
    """One pair per exact (prompt, chosen, rejected); the first one is kept."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for p in pairs:
        key = (p["prompt"], p["chosen"], p["rejected"])
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept, _report("exact_duplicate", pairs, kept)


def shingles(text: str) -> frozenset[str]:
    """Character 5-grams of the normalized text (the whole text when shorter)."""
    t = normalize_text(text)
    return frozenset(t[i:i + SHINGLE] for i in range(max(len(t) - SHINGLE + 1, 1)))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def dedupe_near(pairs: Sequence[PairDict], threshold: float) -> Gated:
    """Drop a pair when an earlier one of the same normalized prompt has chosen and rejected
    texts each at least ``threshold`` similar (Jaccard of 5-gram shingles). Blocking by prompt
    keeps this linear in the number of prompt groups; reworded prompts are not merged."""
    seen: dict[str, list[tuple[frozenset[str], frozenset[str]]]] = defaultdict(list)
    kept = []
    for p in pairs:
        sig = (shingles(p["chosen"]), shingles(p["rejected"]))
        group = seen[normalize_text(p["prompt"])]
        if any(jaccard(sig[0], c) >= threshold and jaccard(sig[1], r) >= threshold
               for c, r in group):
            continue
        group.append(sig)
        kept.append(p)
    return kept, _report("near_duplicate", pairs, kept)


def cap_per_user(pairs: Sequence[PairDict], cap: int | None) -> Gated:
    """At most ``cap`` pairs per user, highest confidence first (earlier pairs win ties)."""
    if cap is None:
        return list(pairs), _report("per_user_cap", pairs, pairs)
    ranked = sorted(range(len(pairs)), key=lambda i: -pairs[i]["confidence"])
    taken: dict[str, int] = defaultdict(int)
    keep: set[int] = set()
    for i in ranked:
        user = pairs[i]["user_id"]
        if taken[user] < cap:
            taken[user] += 1
            keep.add(i)
    kept = [p for i, p in enumerate(pairs) if i in keep]
    return kept, _report("per_user_cap", pairs, kept)


def drop_too_long(pairs: Sequence[PairDict], n_tokens: Callable[[PairDict], int],
                  max_length: int) -> Gated:
    """Pairs whose longer side (prompt + answer, in tokens) exceeds ``max_length`` are dropped
    and counted: truncating would train on answers the user never judged."""
    kept = [p for p in pairs if n_tokens(p) <= max_length]
    return kept, _report("too_long", pairs, kept)


def quality_gates(pairs: Sequence[PairDict], *, min_conf: float, near_dup: float,
                  user_cap: int | None) -> tuple[list[PairDict], list[Report]]:
    """The text-only gates in order: confidence, exact, near duplicates, per-user cap."""
    kept, by_confidence = min_confidence(pairs, min_conf)
    kept, exact = dedupe_exact(kept)
    kept, near = dedupe_near(kept, near_dup)
    kept, capped = cap_per_user(kept, user_cap)
    return kept, [by_confidence, exact, near, capped]


def is_length_matched(pair: PairDict, tolerance: float) -> bool:
    """Chosen and rejected lengths (characters) differ by at most ``tolerance`` of the longer."""
    a, b = len(pair["chosen"]), len(pair["rejected"])
    return abs(a - b) <= tolerance * max(a, b)


def length_bias(pairs: Sequence[PairDict]) -> dict[str, float]:
    """How often the chosen answer is longer: a length-only scorer's accuracy is about this."""
    n = max(len(pairs), 1)
    return {
        "n": len(pairs),
        "share_chosen_longer": sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / n,
        "share_equal_length": sum(len(p["chosen"]) == len(p["rejected"]) for p in pairs) / n,
        "mean_chars_chosen": sum(len(p["chosen"]) for p in pairs) / n,
        "mean_chars_rejected": sum(len(p["rejected"]) for p in pairs) / n,
    }
