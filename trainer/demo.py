"""The trainer step of ``prefstream demo``: one cycle on the demo's sealed partitions.

The traffic generator knows every answer's true quality, so it stands in for human raters: pairs
of the evaluation window whose truth is known become the explicit labels of the calibration audit
(chosen = the truly better answer). The audit then checks the model against the truth, not
against the noisy implicit signal it learned from. ``PREFSTREAM_TRAIN_*`` variables still win
over the demo's defaults.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from prefstream.storage.files import sealed_partitions
from prefstream.trainer.config import ENV_PREFIX, TrainConfig
from prefstream.trainer.data import temporal_split
from prefstream.trainer.service import CycleResult, read_pairs, run_once

log = logging.getLogger(__name__)

#: A demo trains on a few hundred pairs in a minute: no such model clears the reward-hacking
#: probes at the service's 0.2 (docs/reward-model.md), so the demo, and only the demo, promotes
#: whatever the probes say, with a warning; the probes are still measured and recorded.
DEMO_DEFAULTS: dict[str, Any] = {"max_length": 128, "epochs": 2, "head_epochs": 0.5,
                                 "max_probe_raise": 1.0}
LABELS_FILE = "demo-explicit-labels.jsonl"


class HasQuality(Protocol):
    quality: dict[str, float]


def train_after_demo(data_dir: Path, traffic: HasQuality, *,
                     should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run one cycle with ground-truth calibration labels; a short summary for printing.
    ``Interrupted`` when ``should_stop()`` turns true before a version is written."""
    unset = {k: v for k, v in DEMO_DEFAULTS.items() if f"{ENV_PREFIX}{k.upper()}" not in os.environ}
    config = TrainConfig(**unset)
    if config.max_probe_raise >= 1.0:
        log.warning("demo: the reward-hacking gate is off for this toy model (max_probe_raise "
                    "1.0; the trainer service refuses above %.1f); its probe rates are recorded",
                    TrainConfig().max_probe_raise)
    labels = write_truth_labels(data_dir, traffic.quality, config)
    if labels is not None:
        config = config.model_copy(update={"explicit_labels": labels})
    result = run_once(data_dir, config, should_stop=should_stop)
    return {"status": "no new sealed partitions"} if result is None else brief(result)


def write_truth_labels(data_dir: Path, quality: dict[str, float], config: TrainConfig
                       ) -> Path | None:
    """Evaluation-window pairs with a known better answer, as explicit-label JSONL."""
    split = temporal_split(sealed_partitions(data_dir), eval_window=config.eval_window_partitions,
                           gap=config.gap_partitions)
    if split is None:
        return None
    rows = []
    for p in read_pairs(data_dir, split.eval):
        a, b = quality.get(p["chosen_response_id"]), quality.get(p["rejected_response_id"])
        if a is not None and b is not None and a != b:
            better, worse = (p["chosen"], p["rejected"]) if a > b else (p["rejected"], p["chosen"])
            rows.append({"prompt": p["prompt"], "chosen": better, "rejected": worse})
    if not rows:
        return None
    path = data_dir / LABELS_FILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def brief(result: CycleResult) -> dict[str, Any]:
    """The numbers a demo shows: what was trained on, how good it is, whether it was promoted."""
    metrics, gates = result.metrics, result.gates
    counts = {role: reports[-1]["kept"] for role, reports in result.counts.items() if reports}
    return {
        "version": result.version, "trained": result.trained, "promoted": result.promoted,
        "reasons": "; ".join(result.reasons),
        "partitions": {role: len(rows) for role, rows in result.partitions.items()},
        "pairs_after_gates": counts,
        "heldout_accuracy": metrics.get("eval", {}).get("accuracy"),
        "length_matched_accuracy": metrics.get("eval", {}).get("length_matched", {}).get(
            "accuracy"),
        "calibration_agreement": gates.get("calibration", {}).get("agreement"),
        "probe_raise_rate": metrics.get("probes", {}).get("overall_rate"),
        "reward_hacking_gate": gates.get("reward_hacking", {}).get("reason"),
        "train_pairs_per_s": metrics.get("train", {}).get("pairs_per_s"),
        "wall_s": result.wall_s,
    }
