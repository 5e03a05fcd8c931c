"""``prefstream evaluate``: how good one simulated run's pairs are, scored against its truth.

Reads the truth file that ``prefstream simulate`` wrote and the ``pairs`` view of the data dir.
Reports pair precision (share of scored pairs whose chosen answer is truly the better one)
overall and per rule, yield (pairs per 1,000 produced events), the precision/yield curve across
confidence thresholds, and refusal counts by reason. With ``--train`` it runs one trainer cycle
(temporal split: the model learns only from the implicit pairs of older sealed partitions) and
reports the calibration audit's agreement with the held-out explicit labels of the source. A
synthetic run has no held-out rows: the truth of evaluation-window pairs stands in for them, as
in ``prefstream demo``.

The scoring is pure functions over rows (:func:`score_pairs`, :func:`precision`,
:func:`precision_by_rule`, :func:`threshold_curve`); reading and training are thin wrappers.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from prefstream.args import settings_from
from prefstream.errors import ConfigError
from prefstream.sim.demo import funnel, print_summary
from prefstream.sim.traffic import prefers
from prefstream.simulate import TRUTH_FILE, read_truth
from prefstream.storage.catalog import CATALOG_NAME, connect_readonly
from prefstream.streams.core.pairing import RuleConfig

#: confidence thresholds of the curve: 0.50, 0.55, ..., 0.95
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
EPS = 1e-9  # a stored 0.55 counts at threshold 0.55 whatever float rounding did


class Scored(NamedTuple):
    """One stored pair against the truth: ``correct`` is None when the truth is unknown."""

    rule: str
    confidence: float
    correct: bool | None


def score_pairs(rows: Iterable[Mapping[str, Any]], quality: Mapping[str, float]) -> list[Scored]:
    """Score pair rows (``rule``, ``confidence``, ``chosen_response_id``,
    ``rejected_response_id``) with the simulator's answer qualities."""
    truth = dict(quality)
    return [Scored(r["rule"], float(r["confidence"]),
                   prefers(truth, r["chosen_response_id"], r["rejected_response_id"]))
            for r in rows]


def precision(scored: Sequence[Scored]) -> dict[str, Any]:
    """Pairs, how many have a known truth, how many of those are right, and their share."""
    known = [s.correct for s in scored if s.correct is not None]
    right = sum(known)
    return {"pairs": len(scored), "scored": len(known), "correct": right,
            "precision": round(right / len(known), 4) if known else None}


def precision_by_rule(scored: Sequence[Scored]) -> dict[str, dict[str, Any]]:
    """:func:`precision` per rule (the highest-confidence rule of each pair), rules sorted."""
    by_rule: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        by_rule[s.rule].append(s)
    return {rule: precision(rows) for rule, rows in sorted(by_rule.items())}


def per_1000(count: int, events: int) -> float | None:
    """``count`` per 1,000 events (None without events)."""
    return round(1000 * count / events, 2) if events > 0 else None


def threshold_curve(scored: Sequence[Scored], events: int,
                    thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, Any]]:
    """For each threshold: the pairs kept at confidence >= it, their precision and yield.

    Kept pairs never grow as the threshold rises (the curve is monotonic in kept pairs).
    """
    points = []
    for t in sorted(thresholds):
        kept = [s for s in scored if s.confidence >= t - EPS]
        points.append({"threshold": t, **precision(kept), "per_1000_events":
                       per_1000(len(kept), events)})
    return points


def evaluate_run(data_dir: Path, truth: Mapping[str, Any]) -> dict[str, Any]:
    """Precision, yield, curve and refusals of the pairs stored in ``data_dir``."""
    events = int(truth["events_produced"])
    scored = score_pairs(read_pair_rows(data_dir), truth["quality"])
    stored = funnel(data_dir)
    default = RuleConfig().min_confidence
    at_default = [s for s in scored if s.confidence >= default - EPS]
    by_rule = precision_by_rule(at_default)
    for row in by_rule.values():
        row["per_1000_events"] = per_1000(row["pairs"], events)
    config = truth["config"]
    return {
        "simulation": {"source": config.get("source") or "synthetic", "seed": config["seed"],
                       "prefer_prob": config.get("prefer_prob") if config.get("source") else None,
                       "events_produced": events},
        "default_threshold": default,
        **precision(at_default),
        "per_1000_events": per_1000(len(at_default), events),
        "by_rule": by_rule,
        "curve": threshold_curve(scored, events),
        "comparisons_by_votes": comparisons_precision(data_dir, truth["quality"]),
        "refusals_by_reason": stored["refusals_by_reason"],
        "ties": stored["ties"], "unpaired": stored["unpaired"], "sessions": stored["sessions"],
        "partitions_sealed": stored["partitions_sealed"],
    }


def read_pair_rows(data_dir: Path) -> list[dict[str, Any]]:
    """Rule, confidence and both response ids of every stored pair."""
    con = connect_readonly(data_dir)
    try:
        cur = con.execute("SELECT rule, confidence, chosen_response_id, rejected_response_id "
                          "FROM pairs")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def comparisons_precision(data_dir: Path, quality: Mapping[str, float]) -> dict[str, Any]:
    """Label precision of the comparisons the trainer would build from every stored pair (votes
    aggregated, ``trainer/comparisons.py``), by vote count, against the truth."""
    from prefstream.trainer.comparisons import aggregate_comparisons, precision_by_votes

    con = connect_readonly(data_dir)
    try:
        cur = con.execute("SELECT pair_id, prompt, chosen, rejected, confidence, user_id, "
                          "chosen_response_id, rejected_response_id FROM pairs")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()
    truth = dict(quality)
    aggregates, _ = aggregate_comparisons(rows)
    return precision_by_votes(aggregates, lambda a: prefers(
        truth, a["chosen_response_id"], a["rejected_response_id"]))


def train_and_audit(data_dir: Path, truth_path: Path, truth: Mapping[str, Any],
                    overrides: Mapping[str, Any]) -> dict[str, Any]:
    """One trainer cycle; its summary plus the calibration audit on the held-out labels."""
    from prefstream.trainer.config import TrainConfig
    from prefstream.trainer.demo import brief, write_truth_labels
    from prefstream.trainer.service import run_once

    config = TrainConfig(**overrides)
    labels = truth_path.with_name(truth["holdout_labels"]) if truth["holdout_labels"] else None
    kind = "held-out source rows"
    if labels is None or not labels.exists():
        labels, kind = write_truth_labels(data_dir, truth["quality"], config), "truth of eval pairs"
    if labels is not None:
        config = TrainConfig(**overrides, explicit_labels=labels)
    result = run_once(data_dir, config)
    if result is None:
        return {"status": "no partition sealed since the newest model version: nothing trained"}
    calibration = result.gates.get("calibration", {})
    return {**brief(result), "explicit_labels": str(labels) if labels else None,
            "explicit_labels_kind": kind if labels else None,
            "heldout_agreement": calibration.get("agreement"),
            "heldout_labels_used": calibration.get("n"),
            "heldout_labels_too_long": calibration.get("too_long"),
            "heldout_labels_truncated": calibration.get("truncated"),
            "max_length": config.max_length}


def run_evaluate(args: argparse.Namespace) -> int:
    data_dir = Path(settings_from(args, ("data_dir",)).data_dir)
    if not (data_dir / CATALOG_NAME).exists():
        raise ConfigError(f"{data_dir} has no {CATALOG_NAME}: not a prefstream data dir")
    truth_path = Path(args.truth) if args.truth else data_dir / TRUTH_FILE
    truth = read_truth(truth_path)
    summary = evaluate_run(data_dir, truth)
    if args.train:
        overrides = {k: v for k, v in (("max_length", args.max_length), ("epochs", args.epochs))
                     if v is not None}
        summary["training"] = train_and_audit(data_dir, truth_path, truth, overrides)
    if args.json:
        print_summary(summary, as_json=True)
    else:
        print(format_text(summary))
    return 0


def format_text(summary: Mapping[str, Any]) -> str:
    """The summary as aligned text tables (``--json`` prints it whole)."""
    lines = [f"{summary['pairs']} pairs ({summary['scored']} with known truth) at confidence >= "
             f"{summary['default_threshold']}: precision {summary['precision']}, "
             f"{summary['per_1000_events']} per 1,000 of "
             f"{summary['simulation']['events_produced']} events produced",
             "", f"{'rule':<28}{'pairs':>7}{'precision':>11}{'per 1k ev':>11}"]
    lines += [f"{rule:<28}{r['pairs']:>7}{r['precision']!s:>11}{r['per_1000_events']!s:>11}"
              for rule, r in summary["by_rule"].items()]
    lines += ["", f"{'threshold':<28}{'pairs':>7}{'precision':>11}{'per 1k ev':>11}"]
    lines += [f"{p['threshold']:<28}{p['pairs']:>7}{p['precision']!s:>11}"
              f"{p['per_1000_events']!s:>11}" for p in summary["curve"]]
    lines += ["", "refusals: " + ", ".join(f"{k} {v}" for k, v in
                                           summary["refusals_by_reason"].items())]
    for key, value in summary.get("training", {}).items():
        lines.append(f"training.{key:<30} {value}")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    """Add ``prefstream evaluate``."""
    p = subparsers.add_parser("evaluate", help="precision and yield of a simulated run's pairs "
                              "against its ground truth; --train: held-out agreement")
    p.add_argument("--data-dir", metavar="D", help="the simulated run's data dir "
                   "[env: PREFSTREAM_DATA_DIR] [default: prefstream-data]")
    p.add_argument("--truth", metavar="PATH", help=f"truth file [default: <data-dir>/{TRUTH_FILE}]")
    p.add_argument("--train", action="store_true", help="run one trainer cycle and report the "
                   "reward model's agreement with the held-out explicit labels")
    p.add_argument("--max-length", type=int, metavar="TOKENS", help="trainer max_length: a "
                   "longer prompt loses its start, a pair whose answer does not fit is dropped "
                   "and counted [env: PREFSTREAM_TRAIN_MAX_LENGTH]")
    p.add_argument("--epochs", type=int, metavar="N", help="end-to-end epochs of the trainer "
                   "[env: PREFSTREAM_TRAIN_EPOCHS]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_evaluate)
