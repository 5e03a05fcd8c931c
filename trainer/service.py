"""One training cycle (``run_once``) and the polling service (``serve``).

A cycle: lock the registry, recover what a killed run left, read the manifest. When partitions
were sealed since the last version: split by time (``data.temporal_split``), read the pairs of
those sealed partitions only, gate them, train, evaluate, audit, save a version, promote it when
every gate passes. Unsealed partitions are never read: only manifest rows name what is read.

Crash safety: a cycle starts with ``registry.recover`` (a killed run's temp folders removed, its
staged promotion finished), so a run killed at any point costs only its own work. A stop request
(SIGTERM) is honoured between stages and training steps, before any version is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from prefstream.errors import PrefstreamError
from prefstream.schemas.manifest import ManifestRow
from prefstream.storage.files import live_files, sealed_partitions
from prefstream.storage.verify import read_sealed
from prefstream.streams.metrics import Metrics
from prefstream.streams.metrics import serve as serve_metrics
from prefstream.trainer import Interrupted
from prefstream.trainer.augment import padding_pairs
from prefstream.trainer.config import TrainConfig
from prefstream.trainer.control import Control, stop_on_signals
from prefstream.trainer.data import (
    PairDict,
    Report,
    Split,
    drop_eval_groups,
    integrity_refusal,
    length_bias,
    temporal_split,
    within_split,
)
from prefstream.trainer.evaluate import calibration_audit, evaluate, reward_hacking_probes
from prefstream.trainer.fit import Setup, fit, setup
from prefstream.trainer.gates import (
    calibration_gate,
    fallback_eval,
    loud_drops,
    probe_gate,
    text_gates,
    training_weights,
)
from prefstream.trainer.lengths import fit_pairs
from prefstream.trainer.model import load
from prefstream.trainer.registry import (
    current_version,
    json_default,
    latest_metadata,
    next_version,
    recover,
    registry_lock,
    save_version,
    version_path,
)

log = logging.getLogger(__name__)


@dataclass
class CycleResult:
    """What one cycle did and why; ``summary()`` is what the metadata and the CLI show.

    ``trained`` is False when the cycle stopped before training (too few sealed partitions or
    pairs); then no version is saved and ``reasons`` says why. ``partitions`` maps a role
    (train, gap, eval; or sealed when there was no split) to name, sha256 and pair count.
    """

    trained: bool = False
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)
    version: str | None = None
    cutoff: datetime | None = None
    partitions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counts: dict[str, list[Report]] = field(default_factory=dict)
    length_bias: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    #: sealed partitions not used: rows that no longer hash to the manifest's sha256
    refused_partitions: list[Report] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lengths: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field (datetimes as ISO strings)."""
        result: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self),
                                                       default=json_default))
        return result


@dataclass
class Prepared:
    train: list[PairDict]
    eval: list[PairDict]
    counts: dict[str, list[Report]]
    #: sealed partitions left out because their rows no longer match their manifest hash
    refused: list[Report] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def run_once(data_dir: Path, config: TrainConfig, *,
             should_stop: Callable[[], bool] = lambda: False,
             pause_at: Collection[str] = ()) -> CycleResult | None:
    """One cycle; None when no partition was sealed since the newest version was made.
    ``Interrupted`` when ``should_stop()`` turned true before the version was written."""
    started = time.perf_counter()
    control = Control(should_stop, frozenset(pause_at))
    with registry_lock(data_dir):
        recover(data_dir)
        manifest = sealed_partitions(data_dir)
        if not has_new_partitions(manifest, latest_metadata(data_dir)):
            return None
        return _cycle(data_dir, config, manifest, control, started)


def has_new_partitions(manifest: Sequence[ManifestRow], last: dict[str, Any] | None) -> bool:
    if not manifest:
        return False
    if last is None:
        return True
    return (manifest[-1].partition > last["seen_through"]
            or len(manifest) > last["n_sealed"])


def _cycle(data_dir: Path, config: TrainConfig, manifest: list[ManifestRow],
           control: Control, started: float) -> CycleResult:
    split = temporal_split(manifest, eval_window=config.eval_window_partitions,
                           gap=config.gap_partitions)
    if split is None:
        need = config.eval_window_partitions + config.gap_partitions + 1
        return CycleResult(reasons=[f"too few sealed partitions for a temporal split: "
                                    f"{len(manifest)} sealed, need {need}"],
                           partitions=_partition_info(sealed=manifest), wall_s=_since(started))
    s = setup(config)
    control.check("load")
    data = prepare(data_dir, split, config, s.tokenizer)
    result = CycleResult(cutoff=split.cutoff, counts=data.counts, warnings=data.warnings,
                         lengths=_length_counts(data.counts, config.max_length),
                         partitions=_partition_info(train=split.train, gap=split.gap,
                                                    eval=split.eval),
                         length_bias={"train": length_bias(data.train),
                                      "eval": length_bias(data.eval)},
                         refused_partitions=data.refused)
    result.reasons += [f"refused {r['partition']}: {r['reason']}" for r in data.refused]
    if len(data.train) < config.min_train_pairs or len(data.eval) < config.min_eval_pairs:
        result.reasons.append(f"too few pairs after the gates: {len(data.train)} train (need "
                              f"{config.min_train_pairs}), {len(data.eval)} eval (need "
                              f"{config.min_eval_pairs})")
    else:
        _train_and_audit(data_dir, config, s, data, result, control)
    result.wall_s = _since(started)
    if result.trained:
        control.check("save")
        _save(data_dir, config, s, result, manifest, data, control)
    return result


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def read_pairs(data_dir: Path, rows: Sequence[ManifestRow],
               refused: list[Report] | None = None) -> list[PairDict]:
    """Pairs of the given manifest rows (sealed partitions), oldest first. A partition whose
    rows no longer hash to its manifest's sha256 is left out, logged and added to ``refused``
    (``docs/storage-safety.md``)."""
    pairs: list[PairDict] = []
    for row in rows:
        content = read_sealed(data_dir, row)
        refusal = integrity_refusal(row.partition, row.sha256, content.sha256)
        if refusal is None:
            pairs += content.tables["pairs"].to_pylist()
            continue
        log.warning("refusing sealed partition %s: %s", row.partition, refusal["reason"])
        if refused is not None:
            refused.append(refusal)
    for row in rows:
        listed = {f for f in row.files if f.startswith("pairs/")}
        present = {str(f.relative_to(data_dir))
                   for f in live_files(data_dir / "pairs" / row.partition)}
        if present != listed:
            log.warning("sealed partition %s: pairs files differ from its manifest row (%d "
                        "listed, %d present)", row.partition, len(listed), len(present))
    return sorted(pairs, key=lambda p: (p["partition"], p["event_time"], p["pair_id"]))


def prepare(data_dir: Path, split: Split, config: TrainConfig,
            tokenizer: PreTrainedTokenizerBase) -> Prepared:
    """Train and eval pairs of a split after every gate, with the counts after each gate.

    When the evaluation window holds fewer than ``min_eval_pairs`` after its gates, prompt
    groups of the training partitions are held out for evaluation instead
    (``gates.fallback_eval``), and a warning says so."""
    refused: list[Report] = []
    rows = read_pairs(data_dir, split.train + split.eval, refused)
    train, in_train = within_split(rows, split.names("train"), split.cutoff)
    eval_pairs, in_eval = within_split(rows, split.names("eval"), None)
    train, grouped = drop_eval_groups(train, eval_pairs)
    train, train_gates = _gate(train, config, tokenizer, augment=config.augment_padding)
    eval_pairs, eval_gates = _gate(eval_pairs, config, tokenizer)
    counts = {"train": [in_train, grouped, *train_gates], "eval": [in_eval, *eval_gates]}
    warnings = loud_drops("train", counts["train"][1:]) + loud_drops("eval", counts["eval"][1:])
    if len(eval_pairs) < config.min_eval_pairs and train:
        thin = len(eval_pairs)
        train, eval_pairs, moved = fallback_eval(train, eval_pairs,
                                                 share=config.fallback_eval_share)
        counts["train"].append(moved)
        msg = (f"evaluation window held {thin} pairs (need {config.min_eval_pairs}): held out "
               f"{moved['to_eval']} comparisons of {moved['groups']} prompt groups of the "
               f"training partitions ({config.fallback_eval_share:.0%} of groups by hash) "
               f"for evaluation instead")
        log.warning("%s", msg)
        warnings.append(msg)
    train = training_weights(train, confidence=config.confidence_weighting,
                             length_balance=config.length_balance)
    return Prepared(train, eval_pairs, counts, refused=refused, warnings=warnings)


def _gate(pairs: list[PairDict], config: TrainConfig, tokenizer: PreTrainedTokenizerBase,
          augment: float = 0.0) -> tuple[list[PairDict], list[Report]]:
    kept, reports = text_gates(pairs, min_conf=config.min_confidence,
                               near_dup=config.near_dup_threshold,
                               user_cap=config.per_user_cap or None)
    if augment:
        kept = kept + padding_pairs(kept, augment, seed=config.seed)
    kept, too_long = fit_pairs(tokenizer, kept, config.max_length)
    return kept, [*reports, too_long]


def _length_counts(counts: dict[str, list[Report]], max_length: int) -> dict[str, Any]:
    """Pairs whose prompt was cut from its start, and pairs dropped as too long, per role."""
    out: dict[str, Any] = {"max_length": max_length, "policy": "prompt truncated from its "
                           "start; answers whole or the pair is dropped"}
    for role, reports in counts.items():
        r = next((r for r in reports if r["gate"] == "too_long"), None)
        out[role] = {"truncated": r["truncated"] if r else 0, "dropped": r["dropped"] if r else 0}
    return out


def _partition_info(**roles: list[ManifestRow]) -> dict[str, list[dict[str, Any]]]:
    """Name, content hash and pair count of each partition, per role."""
    return {role: [{"partition": r.partition, "sha256": r.sha256, "n_pairs": r.n_pairs}
                   for r in rows] for role, rows in roles.items()}


def _train_and_audit(data_dir: Path, config: TrainConfig, s: Setup, data: Prepared,
                     result: CycleResult, control: Control) -> None:
    fitted = fit(s, data.train, config, control.before_step)
    result.trained = True
    held_out = evaluate(s.model, s.tokenizer, data.eval, device=s.device, config=config)
    control.check("audit")
    probes = reward_hacking_probes(s.model, s.tokenizer, data.eval, config, device=s.device)
    result.metrics = {"train": fitted.summary(), "eval": held_out, "probes": probes}
    audit = calibration_audit(s.model, s.tokenizer, config, device=s.device)
    result.lengths["calibration"] = {"truncated": audit.get("truncated", 0),
                                     "dropped": audit.get("too_long", 0)}
    result.gates = {
        "calibration": calibration_gate(audit, allow_unaudited=config.allow_unaudited),
        "reward_hacking": probe_gate(probes, config.max_probe_raise),
        "no_regression": _no_regression(data_dir, config, data.eval, held_out["accuracy"], s),
    }
    result.promoted = all(g["passed"] is not False for g in result.gates.values())
    result.reasons += [f"{name}: {g['reason']}" for name, g in result.gates.items()]


def _no_regression(data_dir: Path, config: TrainConfig, eval_pairs: list[PairDict],
                   accuracy: float, s: Setup) -> dict[str, Any]:
    """The current model, scored on the same held-out window (it never trained on it: its
    training partitions all precede its own, older, evaluation window)."""
    current = current_version(data_dir)
    if current is None:
        return {"passed": True, "reason": "no current model", "current": None}
    model, tokenizer = load(version_path(data_dir, current))
    pairs, _ = fit_pairs(tokenizer, eval_pairs, config.max_length)
    theirs = evaluate(model.to(s.device), tokenizer, pairs, device=s.device, config=config)
    passed = theirs["accuracy"] is None or accuracy >= theirs["accuracy"]
    verdict = ">=" if passed else "<"
    return {"passed": passed, "current": current, "accuracy": accuracy,
            "current_accuracy": theirs["accuracy"], "n": len(pairs),
            "reason": f"held-out accuracy {accuracy:.3f} {verdict} {current}'s "
                      f"{theirs['accuracy']}"}


def _save(data_dir: Path, config: TrainConfig, s: Setup, result: CycleResult,
          manifest: list[ManifestRow], data: Prepared, control: Control) -> None:
    result.version = next_version(data_dir)
    metadata = {
        **result.summary(), "created_at": datetime.now(timezone.utc),
        "config": config.model_dump(mode="json"), "backbone": str(s.backbone),
        "n_train": len(data.train), "n_eval": len(data.eval),
        "seen_through": manifest[-1].partition, "n_sealed": len(manifest),
    }
    save_version(data_dir, result.version, model=s.model, tokenizer=s.tokenizer,
                 metadata=metadata, promote=result.promoted, pause=control.pause)


def serve(data_dir: Path, config: TrainConfig, *, pause_at: Collection[str] = ()) -> None:
    """Poll the manifest every ``poll_interval_s`` and run a cycle when it changed. SIGTERM or
    SIGINT stops cleanly: between polls at once, during a cycle at its next stage boundary or
    training step (no version is written after a stop request)."""
    stats = Metrics()
    with stop_on_signals() as stop:
        server = (serve_metrics(stats.render, host=config.metrics_host, port=config.metrics_port)
                  if config.metrics_port else None)
        try:
            seen: tuple[str, int] | None = None
            while not stop.is_set():
                manifest = sealed_partitions(data_dir)
                stats.set("prefstream_trainer_sealed_partitions", len(manifest))
                state = (manifest[-1].partition, len(manifest)) if manifest else None
                if state != seen and not _poll(data_dir, config, stop, stats, pause_at):
                    break
                seen = state
                stop.wait(config.poll_interval_s)
        finally:
            if server is not None:
                server.shutdown()
    log.info("trainer service stopped")


def _poll(data_dir: Path, config: TrainConfig, stop: threading.Event,
          stats: Metrics | None = None, pause_at: Collection[str] = ()) -> bool:
    """One cycle inside the service; False when it was interrupted."""
    stats = stats or Metrics()
    try:
        result = run_once(data_dir, config, should_stop=stop.is_set, pause_at=pause_at)
    except Interrupted as exc:
        log.warning("%s", exc)
        stats.inc("prefstream_trainer_runs_total", outcome="interrupted")
        return False
    except PrefstreamError as exc:
        log.error("training cycle failed: %s", exc)
        stats.inc("prefstream_trainer_runs_total", outcome="failed")
        return True
    if result is not None:
        log.info("training cycle: %s", json.dumps(result.summary()))
        record_cycle(stats, result.summary())
    return True


def record_cycle(stats: Metrics, summary: dict[str, Any]) -> None:
    """Counters and gauges of one finished cycle, for the trainer's /metrics."""
    outcome = "promoted" if summary.get("promoted") else (
        "refused" if summary.get("trained") else "skipped")
    stats.inc("prefstream_trainer_runs_total", outcome=outcome)
    stats.set("prefstream_trainer_last_run_seconds", float(summary.get("wall_s") or 0.0))
    evaluation = (summary.get("metrics") or {}).get("eval") or {}
    if isinstance(evaluation.get("accuracy"), (int, float)):
        stats.set("prefstream_trainer_heldout_accuracy", evaluation["accuracy"])
    calibration = (summary.get("gates") or {}).get("calibration") or {}
    if isinstance(calibration.get("agreement"), (int, float)):
        stats.set("prefstream_trainer_calibration_agreement", calibration["agreement"])
