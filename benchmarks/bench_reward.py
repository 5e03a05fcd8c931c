"""The reward model's goals on the dev files: label precision by votes, held-out and
length-matched accuracy, the length-only baseline, probes (docs/reward-model.md).

    python benchmarks/bench_reward.py [--hh-source ../shared/data/hh-rlhf-harmless-dev.jsonl.gz]
        [--alpaca-source ../shared/data/alpacaeval-gpt4-judged-dev.jsonl.gz]
        [--hh-events 30000] [--alpaca-events 57000] [--train-cap 1100] [--eval-cap 400]
        [--alpaca-train-cap 1200] [--alpaca-eval-cap 500] [--augment 0.3] [--only hh|alpaca]
        [--out benchmarks/results/reward.json]

``--only`` re-runs one source and keeps the other's figures in ``--out``.

For each source: ``prefstream simulate`` (embedded broker and worker; the source's held-out
prompts, never simulated, become the evaluation set), then the trainer's own gates on every
stored pair (``trainer.gates.text_gates``: confidence, per-user cap, aggregation into
comparisons, near duplicates) and its own ``fit``. No evaluation prompt is ever trained on: the
simulator holds those prompts out of the traffic. Measured:

- label precision against the simulator's truth: every stored pair, the first copy of each
  (prompt, chosen, rejected) (the old exact dedupe), and the aggregated comparisons by vote count;
- HH-RLHF: the model trained on the implicit comparisons against the same trainer on the explicit
  (human) labels of the same prompts, both scored on the held-out human labels;
- AlpacaEval: the default length balancing against none, scored on the held-out judged pairs
  (accuracy, length-matched accuracy within 10%, by length bucket, length-only baseline);
- the reward-hacking probes of every model, and whether the promotion gate would pass it.

Training is economical on purpose (CPU): at most ``--train-cap`` comparisons (a seeded sample),
one epoch after half a head-only epoch, the default max_length; evaluation on at most
``--eval-cap`` held-out pairs plus every length-matched one. Results are written after each
stage, so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import LoadMonitor, command_line, machine_info, now_iso, write_result  # noqa: E402

from prefstream.sim.traffic import prefers  # noqa: E402
from prefstream.simulate import TRUTH_FILE, holdout_path, read_truth  # noqa: E402
from prefstream.storage.files import sealed_partitions  # noqa: E402
from prefstream.trainer.augment import padding_pairs  # noqa: E402
from prefstream.trainer.comparisons import precision_by_votes  # noqa: E402
from prefstream.trainer.config import TrainConfig  # noqa: E402
from prefstream.trainer.data import dedupe_exact, is_length_matched, min_confidence  # noqa: E402
from prefstream.trainer.evaluate import (  # noqa: E402
    load_explicit_labels,
    pair_metrics,
    reward_hacking_probes,
    score_pairs,
)
from prefstream.trainer.gates import probe_gate, text_gates, training_weights  # noqa: E402
from prefstream.trainer.lengths import Template, _ids, fit_pairs, prompt_budget  # noqa: E402
from prefstream.trainer.service import read_pairs  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
log = logging.getLogger("bench_reward")


def simulate(source: Path, events: int, data_dir: Path, timeout_s: float) -> dict[str, Any]:
    """``prefstream simulate --json`` into ``data_dir``; its summary."""
    cmd = [sys.executable, "-m", "prefstream.cli", "simulate", "--source", str(source),
           "--events", str(events), "--data-dir", str(data_dir), "--json"]
    log.info("$ %s", " ".join(cmd))
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                          env={**os.environ, "TQDM_DISABLE": "1"}, timeout=timeout_s)
    summary: dict[str, Any] = json.loads(done.stdout)
    summary["exit_code"] = done.returncode
    return summary


def percentiles(values: list[int]) -> dict[str, int]:
    xs = sorted(values)
    out = {f"p{k}": xs[min(len(xs) - 1, k * len(xs) // 100)] for k in (50, 75, 90, 95, 99)}
    return {**out, "max": xs[-1]}


def token_lengths(path: Path, sizes: tuple[int, ...] = (128, 256, 384, 512)) -> dict[str, Any]:
    """Token lengths of a dev file under the default backbone's tokenizer, and the share of its
    pairs each max_length keeps whole, or keeps with the prompt cut from its start."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TrainConfig(
        _env_prefix="PREFSTREAM_BENCH_UNUSED_").backbone_path())
    rows = load_explicit_labels(path)
    template = Template.of(tokenizer)
    prompts = [len(x) for x in _ids(tokenizer, [r["prompt"] for r in rows])]
    answers = [max(len(c), len(r)) for c, r in zip(
        _ids(tokenizer, [r["chosen"] for r in rows]),
        _ids(tokenizer, [r["rejected"] for r in rows]), strict=True)]
    total = [p + a + template.n_special for p, a in zip(prompts, answers, strict=True)]
    n = len(rows)
    return {"n": n, "prompt": percentiles(prompts), "longer_answer": percentiles(answers),
            "total": percentiles(total), "by_max_length": {
                str(m): {"whole": round(sum(t <= m for t in total) / n, 4),
                         "kept_with_prompt_cut": round(sum(
                             prompt_budget(template, p, a, m) is not None
                             for p, a in zip(prompts, answers, strict=True)) / n, 4)}
                for m in sizes}}


def truth_of(quality: dict[str, float]) -> Any:
    return lambda p: prefers(quality, p["chosen_response_id"], p["rejected_response_id"])


def share_right(pairs: list[dict[str, Any]], truth: Any) -> dict[str, Any]:
    known = [t for t in map(truth, pairs) if t is not None]
    return {"n": len(known), "precision": round(sum(known) / len(known), 4) if known else None}


def label_precision(pairs: list[dict[str, Any]], config: TrainConfig, truth: Any
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Precision of every pair, of first copies, and of the aggregated comparisons."""
    confident, _ = min_confidence(pairs, config.min_confidence)
    first, _ = dedupe_exact(confident)
    comparisons, reports = text_gates(pairs, min_conf=config.min_confidence,
                                      near_dup=config.near_dup_threshold,
                                      user_cap=config.per_user_cap or None)
    both_ways = len(first) - len({(p["prompt"], *sorted((p["chosen"], p["rejected"])))
                                  for p in first})
    return comparisons, {
        "stored_pairs": share_right(pairs, truth),
        "first_copies": {**share_right(first, truth), "comparisons_in_both_directions": both_ways},
        "comparisons": precision_by_votes(comparisons, truth),
        "gates": reports,
    }


def train_and_score(name: str, train: list[dict[str, Any]], eval_pairs: list[dict[str, Any]],
                    config: TrainConfig, *, drop_cut: bool = False) -> dict[str, Any]:
    """Fit one model on ``train`` (already gated), score the held-out pairs, run the probes.
    ``drop_cut``: leave out the training pairs whose prompt had to be cut (the old policy of
    dropping long pairs, for comparison)."""
    from prefstream.trainer.fit import fit, setup

    started = time.perf_counter()
    s = setup(config)
    if config.augment_padding:
        train = train + padding_pairs(train, config.augment_padding, seed=config.seed)
    fitted_train, train_len = fit_pairs(s.tokenizer, train, config.max_length)
    if drop_cut:
        fitted_train = [p for p in fitted_train if not p["prompt_cut"]]
        train_len = {**train_len, "kept": len(fitted_train), "truncated": 0,
                     "dropped": len(train) - len(fitted_train)}
    weighted = training_weights(fitted_train, confidence=config.confidence_weighting,
                                length_balance=config.length_balance)
    log.info("%s: training on %d pairs", name, len(weighted))
    result = fit(s, weighted, config)
    fitted_eval, eval_len = fit_pairs(s.tokenizer, eval_pairs, config.max_length)
    r_c, r_r = score_pairs(s.model, s.tokenizer, fitted_eval, device=s.device,
                           batch_size=2 * config.batch_size)
    metrics = pair_metrics(r_c, r_r, fitted_eval, tolerance=config.length_match_tolerance)
    probes = reward_hacking_probes(s.model, s.tokenizer, fitted_eval, config, device=s.device)
    return {"name": name, "train": result.summary(), "train_lengths": train_len,
            "eval_lengths": eval_len, "heldout": metrics, "probes": probes,
            "probe_gate": probe_gate(probes, config.max_probe_raise),
            "wall_s": round(time.perf_counter() - started, 1)}


def sample(rows: list[dict[str, Any]], cap: int, seed: int) -> list[dict[str, Any]]:
    if len(rows) <= cap:
        return list(rows)
    return random.Random(seed).sample(rows, cap)


def eval_set(rows: list[dict[str, Any]], cap: int, seed: int, tolerance: float
             ) -> list[dict[str, Any]]:
    """A seeded sample of ``cap`` held-out pairs plus every length-matched one."""
    picked = sample(rows, cap, seed)
    chosen = {id(r) for r in picked}
    return picked + [r for r in rows if id(r) not in chosen and is_length_matched(r, tolerance)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.started = args, time.perf_counter()
        self.result: dict[str, Any] = {"benchmark": "reward", "started": now_iso(),
                                       "machine": machine_info()}
        if args.only and args.out.exists():  # one source re-run: keep the other's figures
            self.result = {**json.loads(args.out.read_text()), **self.result}
        runs = self.result.get("commands", [])
        runs = list(runs.values()) if isinstance(runs, dict) else runs
        self.result["commands"] = [*runs, command_line(__file__, sys.argv[1:])]
        self.result["command"] = " && ".join(self.result["commands"])

    def save(self) -> None:
        self.result["wall_s"] = round(time.perf_counter() - self.started, 1)
        write_result(self.args.out, self.result)

    def source(self, key: str, path: Path, events: int, tmp: Path) -> tuple[Any, ...]:
        data_dir = Path(getattr(self.args, f"{key}_dir") or tmp / key)
        section = self.result.setdefault(key, {})
        if getattr(self.args, f"{key}_dir") is None:
            section["simulate"] = simulate(path, events, data_dir, 1800)
        else:
            section["simulate"] = f"reused {data_dir}"
        truth_path = data_dir / TRUTH_FILE
        quality = read_truth(truth_path)["quality"]
        pairs = read_pairs(data_dir, sealed_partitions(data_dir))
        holdout = load_explicit_labels(holdout_path(truth_path))
        return pairs, truth_of(quality), holdout

    def run_hh(self, tmp: Path, config: TrainConfig) -> None:
        a = self.args
        pairs, truth, holdout = self.source("hh", a.hh_source, a.hh_events, tmp)
        comparisons, precision = label_precision(pairs, config, truth)
        self.result["hh"]["label_precision"] = precision
        self.save()
        train = sample(comparisons, a.hh_train_cap or a.train_cap, a.seed)
        prompts = {p["prompt"] for p in train}
        explicit = [r for r in load_explicit_labels(a.hh_source) if r["prompt"] in prompts]
        held = eval_set(holdout, a.eval_cap, a.seed, config.length_match_tolerance)
        self.result["hh"]["train_precision"] = share_right(train, truth)
        runs = [("implicit", train, config), ("explicit", explicit, config)]
        if a.augment:
            runs.append(("implicit_augmented", train,
                         config.model_copy(update={"augment_padding": a.augment})))
        runs.append(("implicit_drop_long", train, config))
        for name, rows, cfg in runs:
            if name in a.skip:
                continue
            self.result["hh"][name] = train_and_score(name, rows, held, cfg,
                                                      drop_cut=name == "implicit_drop_long")
            self.save()

    def run_alpaca(self, tmp: Path, config: TrainConfig) -> None:
        a = self.args
        pairs, truth, holdout = self.source("alpaca", a.alpaca_source, a.alpaca_events, tmp)
        comparisons, precision = label_precision(pairs, config, truth)
        self.result["alpaca"]["label_precision"] = precision
        train = sample(comparisons, a.alpaca_train_cap or a.train_cap, a.seed)
        held = eval_set(holdout, a.alpaca_eval_cap or a.eval_cap, a.seed,
                        config.length_match_tolerance)
        self.result["alpaca"]["train_precision"] = share_right(train, truth)
        self.save()
        for balance in a.balances:
            cfg = config.model_copy(update={"length_balance": balance})
            self.result["alpaca"][f"balance_{balance}"] = train_and_score(
                f"length_balance={balance}", train, held, cfg)
            self.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hh-source", type=Path, default=DATA / "hh-rlhf-harmless-dev.jsonl.gz")
    parser.add_argument("--alpaca-source", type=Path,
                        default=DATA / "alpacaeval-gpt4-judged-dev.jsonl.gz")
    parser.add_argument("--hh-events", type=int, default=30000)
    parser.add_argument("--alpaca-events", type=int, default=57000)
    parser.add_argument("--hh-dir", default=None, help="reuse a simulated data dir")
    parser.add_argument("--alpaca-dir", default=None, help="reuse a simulated data dir")
    parser.add_argument("--only", choices=("hh", "alpaca"), default=None)
    parser.add_argument("--balances", nargs="+", default=["none", "bucket"])
    parser.add_argument("--augment", type=float, default=0.3, help="also train an HH model "
                        "with this share of padding counter-examples (trainer/augment.py)")
    parser.add_argument("--skip", nargs="*", default=[], help="HH models not to (re)train: "
                        "implicit, explicit, implicit_drop_long")
    parser.add_argument("--train-cap", type=int, default=1100)
    parser.add_argument("--eval-cap", type=int, default=400)
    parser.add_argument("--hh-train-cap", type=int, default=None)
    parser.add_argument("--alpaca-train-cap", type=int, default=1200)
    parser.add_argument("--alpaca-eval-cap", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/reward.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    overrides = {"max_length": args.max_length} if args.max_length else {}
    config = TrainConfig(_env_prefix="PREFSTREAM_BENCH_UNUSED_", device="cpu", **overrides)
    bench = Bench(args)
    bench.result["config"] = config.model_dump(mode="json")
    bench.result["token_lengths"] = {p.name: token_lengths(p)
                                     for p in (args.hh_source, args.alpaca_source)}
    bench.save()
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp, LoadMonitor() as load:
        if args.only in (None, "hh"):
            bench.run_hh(Path(tmp), config)
        if args.only in (None, "alpaca"):
            bench.run_alpaca(Path(tmp), config)
        bench.result["load"] = load.summary()
    bench.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
