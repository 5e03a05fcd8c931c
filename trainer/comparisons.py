"""Comparisons, not copies: the votes of many sessions on one comparison, aggregated.

A comparison is one prompt and an unordered pair of answers (exact texts). Every stored pair of
it is one vote for one direction, and every vote counts once: the majority by count is the
label, and a tie in votes is not trained on. The votes' own confidences say how reliable a vote
is: the comparison's confidence is ``sigmoid(margin * logit(r))`` where ``margin`` is the
difference in votes and ``r`` the mean confidence of its votes clipped to [0.5, 0.99] (the
probability that the majority is right if the votes were independent and each as reliable as
``r``). Three agreeing votes at 0.8 give 0.985, 2 to 1 gives 0.8, one vote its own confidence.

Counting, not summing each vote's log-odds, is measured (``docs/reward-model.md``): the rules'
confidences rank rules by design intent, not by measured precision, and a log-odds sum let one
0.95 thumbs vote outvote two agreeing 0.7 copies, which lowered label precision from 0.915 to
0.835 on the HH-RLHF simulation. The same arithmetic is the ``comparisons`` view of the catalog
(``storage/comparisons.py``), so analysts see what the trainer used, contradictions included.

Counts are integers and the mean uses ``math.fsum`` (exactly rounded), so votes in any order
give the same aggregate.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

PairDict = dict[str, Any]
Report = dict[str, Any]
CLIP_LOW, CLIP_HIGH = 0.5, 0.99


def reliability(confidences: Sequence[float]) -> float:
    """Mean vote confidence clipped to [CLIP_LOW, CLIP_HIGH]."""
    mean = math.fsum(confidences) / len(confidences)
    return min(max(mean, CLIP_LOW), CLIP_HIGH)


def comparison_key(pair: PairDict) -> tuple[str, str, str]:
    """(prompt, first answer, second answer) with the answers in sorted order."""
    a, b = sorted((pair["chosen"], pair["rejected"]))
    return pair["prompt"], a, b


def comparison_id(key: tuple[str, str, str]) -> str:
    """A stable id of a comparison (16 hex digits of sha256 over its three texts)."""
    digest = hashlib.sha256("\x00".join(key).encode("utf-8")).hexdigest()
    return digest[:16]


def aggregate_one(votes: Sequence[PairDict]) -> PairDict:
    """The aggregate of the votes of one comparison (same key for every vote).

    The returned pair is the representative vote of the majority direction (the highest
    confidence, then the largest pair id: a total order, so independent of vote order) with
    ``confidence`` replaced by the comparison's, and the vote counts added.
    """
    key = comparison_key(votes[0])
    n_first = sum(1 for v in votes if v["chosen"] == key[1])
    n_second = len(votes) - n_first
    first_wins = n_first > n_second
    majority = [v for v in votes if (v["chosen"] == key[1]) == first_wins]
    rep = max(majority, key=lambda v: (v["confidence"], str(v.get("pair_id", ""))))
    r = reliability([float(v["confidence"]) for v in votes])
    log_odds = abs(n_first - n_second) * math.log(r / (1.0 - r))
    confidence = 1.0 / (1.0 + math.exp(-log_odds))
    return {
        **rep, "comparison_id": comparison_id(key), "confidence": confidence,
        "log_odds": log_odds, "votes": len(votes), "votes_for": len(majority),
        "votes_against": len(votes) - len(majority),
        "users": len({v.get("user_id") for v in votes}),
        "tied": n_first == n_second, "weight": 2.0 * confidence - 1.0,
    }


def group_votes(pairs: Iterable[PairDict]) -> dict[tuple[str, str, str], list[PairDict]]:
    """Votes by comparison key, keys in order of first appearance."""
    groups: dict[tuple[str, str, str], list[PairDict]] = defaultdict(list)
    for p in pairs:
        groups[comparison_key(p)].append(p)
    return groups


def aggregate_comparisons(pairs: Sequence[PairDict]) -> tuple[list[PairDict], Report]:
    """One training example per comparison (ties left out); the gate report counts the votes
    (``in``), the comparisons kept, the votes merged into them, the contradicted comparisons and
    the votes of tied ones (``dropped``: nothing to learn from a tie)."""
    aggregates = [aggregate_one(votes) for votes in group_votes(pairs).values()]
    kept = [a for a in aggregates if not a["tied"]]
    tied_votes = sum(a["votes"] for a in aggregates if a["tied"])
    return kept, {
        "gate": "aggregate", "in": len(pairs), "kept": len(kept), "dropped": tied_votes,
        "merged": sum(a["votes"] for a in kept) - len(kept),
        "comparisons": len(aggregates),
        "contradicted": sum(1 for a in aggregates if a["votes_against"] > 0),
        "tied": len(aggregates) - len(kept),
    }


def precision_by_votes(aggregates: Sequence[PairDict],
                       truth: Callable[[PairDict], bool | None],
                       buckets: Sequence[int] = (1, 2, 3, 4, 5)) -> dict[str, dict[str, Any]]:
    """Label precision of aggregates against a truth (True: the majority's chosen is the
    better answer; None: unknown) by vote count; the last bucket holds that many or more."""
    top = buckets[-1]
    rows: dict[str, list[bool]] = {(str(b) if b < top else f"{top}+"): [] for b in buckets}
    for a in aggregates:
        right = truth(a)
        if right is not None:
            n = a["votes"]
            rows[str(n) if n < top else f"{top}+"].append(right)
    everything = [r for flags in rows.values() for r in flags]
    out = {k: {"n": len(v), "precision": sum(v) / len(v) if v else None} for k, v in rows.items()}
    out["all"] = {"n": len(everything),
                  "precision": sum(everything) / len(everything) if everything else None}
    return out
