"""The gates between stored pairs and a promoted model, as pure functions.

Data gates (in order, each with a ``{"gate", "in", "kept", "dropped"}`` report): minimum
confidence, per-user cap, aggregation into comparisons (``trainer/comparisons.py``), near
duplicates, length (``trainer/lengths.py``). A gate that removes more than half of what it got
is a warning with its counts (``loud_drops``). When the evaluation window is too thin,
``fallback_eval`` holds out prompt groups of the training partitions instead (never anything
newer than training) and says so.

Promotion gates (each ``{"passed", "reason", ...}``): the calibration audit (no explicit labels:
not promoted, unless ``allow_unaudited``), the reward-hacking probes (``probe_gate``), no
regression against the current model. See ``docs/reward-model.md``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from prefstream.trainer.comparisons import aggregate_comparisons
from prefstream.trainer.data import cap_per_user, dedupe_near, min_confidence, normalize_text
from prefstream.trainer.lengths import length_balance_weights

log = logging.getLogger(__name__)

PairDict = dict[str, Any]
Report = dict[str, Any]


def text_gates(pairs: Sequence[PairDict], *, min_conf: float, near_dup: float,
               user_cap: int | None) -> tuple[list[PairDict], list[Report]]:
    """Confidence, per-user cap (on votes, so one heavy user cannot outvote the rest),
    aggregation into comparisons, near duplicates (on comparisons)."""
    kept, by_confidence = min_confidence(pairs, min_conf)
    kept, capped = cap_per_user(kept, user_cap)
    kept, aggregated = aggregate_comparisons(kept)
    kept, near = dedupe_near(kept, near_dup)
    return kept, [by_confidence, capped, aggregated, near]


def training_weights(pairs: Sequence[PairDict], *, confidence: bool, length_balance: str
                     ) -> list[PairDict]:
    """Copies with ``train_weight``: the comparison's ``weight`` (2c - 1; 1 when confidence
    weighting is off or the pair is not an aggregate) times its length-balance factor."""
    factors = (length_balance_weights(pairs) if length_balance == "bucket"
               else [1.0] * len(pairs))
    return [{**p, "train_weight": (p.get("weight", 1.0) if confidence else 1.0) * f}
            for p, f in zip(pairs, factors, strict=True)]


def loud_drops(role: str, reports: Sequence[Report]) -> list[str]:
    """A warning (logged and returned) for each gate that removed more than half of its input;
    merging votes into comparisons is not removal (``merged`` is not ``dropped``)."""
    out = []
    for r in reports:
        if r["in"] and r["dropped"] * 2 > r["in"]:
            msg = (f"{role} gate {r['gate']} removed {r['dropped']} of {r['in']} pairs "
                   f"({r['dropped'] / r['in']:.0%}), kept {r['kept']}")
            log.warning("%s", msg)
            out.append(msg)
    return out


def group_hash(prompt: str) -> float:
    """A prompt group's place in [0, 1): sha256 of its normalized text (stable across runs)."""
    digest = hashlib.sha256(normalize_text(prompt).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fallback_eval(train: Sequence[PairDict], eval_pairs: Sequence[PairDict], *, share: float
                  ) -> tuple[list[PairDict], list[PairDict], Report]:
    """Move the training pairs of the prompt groups whose ``group_hash`` is below ``share`` to
    evaluation. They come from the training partitions, so nothing newer than training is
    evaluated on, and a whole group moves, so no evaluation prompt is trained on."""
    held = [p for p in train if group_hash(p["prompt"]) < share]
    kept = [p for p in train if group_hash(p["prompt"]) >= share]
    groups = len({normalize_text(p["prompt"]) for p in held})
    report = {"gate": "eval_fallback", "in": len(train), "kept": len(kept),
              "dropped": len(held), "to_eval": len(held), "groups": groups, "share": share}
    return kept, [*eval_pairs, *held], report


def calibration_gate(audit: dict[str, Any], *, allow_unaudited: bool) -> dict[str, Any]:
    """No explicit labels, no promotion: ``passed`` False, unless the operator opted in."""
    if audit.get("passed") is not None:
        return audit
    if allow_unaudited:
        log.warning("PROMOTING WITHOUT A CALIBRATION AUDIT: no explicit labels configured and "
                    "allow_unaudited is set")
        return {**audit, "passed": True, "unaudited": True,
                "reason": "UNAUDITED: no explicit labels; promoted because allow_unaudited is set"}
    return {**audit, "passed": False, "unaudited": True,
            "reason": "no explicit labels configured: a version is promoted only after the "
                      "calibration audit (set explicit_labels, or allow_unaudited to opt out)"}


def probe_gate(probes: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Passed when no probe raises the reward of more than ``threshold`` of the answers."""
    rates = {k: v["rate"] for k, v in probes.get("probes", {}).items() if v["rate"] is not None}
    if not rates:
        return {"passed": False, "threshold": threshold, "rates": rates,
                "reason": "no probe could be scored (no held-out answer fits max_length)"}
    worst = max(rates, key=lambda k: rates[k])
    over = sorted(k for k, r in rates.items() if r > threshold)
    passed = not over
    verdict = "<=" if passed else ">"
    return {"passed": passed, "threshold": threshold, "rates": rates, "failed": over,
            "reason": f"worst probe {worst} raises the reward of {rates[worst]:.0%} of answers "
                      f"{verdict} {threshold:.0%}"}
