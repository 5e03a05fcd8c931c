"""``prefstream score --pairs FILE``: a version judged on a user's own labelled pairs.

Reads a JSONL (optionally .gz) of prompt/chosen/rejected objects or HH-RLHF chosen/rejected
dialogues (``trainer.evaluate.load_explicit_labels``), fits every pair to the version's
``max_length`` by the training policy (``trainer/lengths.py``: the prompt loses its start,
answers stay whole, a pair whose answer alone does not fit is dropped and counted), scores both
answers in batches, and reports accuracy, length-matched accuracy, accuracy by length bucket
next to the length-only baseline on the same rows, and the reward-length correlation:
RewardBench style, on the user's data.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from prefstream.trainer.evaluate import load_explicit_labels, pair_metrics, score_pairs
from prefstream.trainer.lengths import fit_pairs
from prefstream.trainer.scoring import RewardModel

KEYS = ("accuracy", "length_only_accuracy", "length_matched", "by_length_bucket",
        "reward_length_corr", "mean_margin", "loss", "reward")


def _lines(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def read_pairs_file(path: Path) -> list[dict[str, Any]]:
    """The file's pairs (``TrainerError`` naming the first bad line)."""
    return load_explicit_labels(path)


def score_file(model: RewardModel, path: Path, rows: list[dict[str, Any]], *,
               tolerance: float = 0.1) -> dict[str, Any]:
    """The report of one labelled file (read by :func:`read_pairs_file`) under one version."""
    fitted, lengths = fit_pairs(model.tokenizer, rows, model.max_length)
    r_c, r_r = score_pairs(model.model, model.tokenizer, fitted, device=model.device,
                           batch_size=model.batch_size)
    metrics = pair_metrics(r_c, r_r, fitted, tolerance=tolerance)
    return {"file": str(path), "version": model.version, "max_length": model.max_length,
            "rows": _lines(path), "not_a_pair": _lines(path) - len(rows),
            "scored": len(fitted), "truncated": lengths["truncated"],
            "dropped": lengths["dropped"], "length_match_tolerance": tolerance,
            **{k: metrics[k] for k in KEYS}}


def format_report(report: dict[str, Any]) -> str:
    """A few aligned lines for people (``--json`` prints the whole report)."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    lm = report["length_matched"]
    lines = [f"{report['file']}: {report['scored']} of {report['rows']} rows scored with "
             f"{report['version']} (max_length {report['max_length']}: {report['truncated']} "
             f"prompts truncated, {report['dropped']} pairs dropped, {report['not_a_pair']} "
             "rows not a pair)",
             f"accuracy {f(report['accuracy'])}   length-only baseline "
             f"{f(report['length_only_accuracy'])}   reward-length correlation "
             f"{f(report['reward_length_corr'])}",
             f"length-matched (within {report['length_match_tolerance']:.0%}): accuracy "
             f"{f(lm['accuracy'])}, length-only {f(lm['length_only'])}, n={lm['n']}",
             f"{'length difference':<20}{'n':>7}{'accuracy':>10}{'length-only':>13}"]
    lines += [f"{name:<20}{b['n']:>7}{f(b['accuracy']):>10}{f(b['length_only']):>13}"
              for name, b in report["by_length_bucket"].items()]
    return "\n".join(lines)
