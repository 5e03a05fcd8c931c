"""The ``reward`` section of docs/benchmarks.md, from ``benchmarks/results/reward.json``
(written by ``benchmarks/bench_reward.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Result = dict[str, Any]
Table = Callable[[Sequence[str], Sequence[Sequence[Any]]], list[str]]
PADDING = ("whitespace_padding", "filler", "repetition", "flattery", "longer_but_emptier")


def _get(d: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _models(r: Result) -> list[tuple[str, Result]]:
    out = []
    for source, names in (("hh", ("implicit", "explicit", "implicit_augmented",
                                  "implicit_drop_long")),
                          ("alpaca", ("balance_bucket", "balance_none"))):
        for name in names:
            model = _get(r, f"{source}.{name}")
            if model:
                out.append((f"{source} {model['name']}", model))
    return out


def goals(r: Result) -> list[tuple[Any, ...]]:
    """(goal, measured, n, met) rows; None where the run has no figure for a goal."""
    lm = _get(r, "alpaca.balance_bucket.heldout.length_matched") or {}
    imp, exp = _get(r, "hh.implicit.heldout") or {}, _get(r, "hh.explicit.heldout") or {}
    prec = _get(r, "hh.train_precision") or {}
    rows: list[tuple[Any, ...]] = [
        ("AlpacaEval length-matched accuracy, implicit pairs, default trainer >= 0.60",
         lm.get("accuracy"), lm.get("n"), _met(lm.get("accuracy"), 0.60)),
        ("HH-RLHF held-out accuracy: implicit pairs >= explicit labels of the same prompts",
         f"{_f(imp.get('accuracy'))} vs {_f(exp.get('accuracy'))}", imp.get("n"),
         _met(imp.get("accuracy"), exp.get("accuracy"))),
        ("HH-RLHF training-label precision (aggregated comparisons) >= 0.88",
         prec.get("precision"), prec.get("n"), _met(prec.get("precision"), 0.88)),
    ]
    for name, model in _models(r):
        gate = model.get("probe_gate", {})
        worst = max((v for v in gate.get("rates", {}).values()), default=None)
        rows.append((f"{name}: padding probes raise the reward in <= 20% (else not promoted)",
                     worst, _get(model, "probes.n_answers"), gate.get("passed")))
    return rows


def _commands(r: Result) -> list[str]:
    runs = r.get("commands") or [r.get("command")]
    return [c for c in (runs.values() if isinstance(runs, dict) else runs) if c]


def _met(value: Any, bound: Any) -> bool | None:
    return None if value is None or bound is None else value >= bound


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def reward_section(r: Result, table: Table) -> list[str]:
    lines = ["Goals (docs/reward-model.md), prompts split so no evaluation prompt is trained on:",
             ""]
    lines += table(("goal", "measured", "n", "met"), goals(r))
    lines += ["", "Training-label precision against the simulator's truth:", ""]
    rows = []
    for source in ("hh", "alpaca"):
        lp = _get(r, f"{source}.label_precision")
        if not lp:
            continue
        rows.append((source, "every stored pair", lp["stored_pairs"]["n"],
                     lp["stored_pairs"]["precision"]))
        rows.append((source, "first copy of each (old exact dedupe)", lp["first_copies"]["n"],
                     lp["first_copies"]["precision"]))
        for votes, x in lp["comparisons"].items():
            rows.append((source, f"comparisons, {votes} votes", x["n"], x["precision"]))
    lines += table(("source", "labels", "n", "precision"), rows)
    lines += ["", "Held-out pairs (never simulated): accuracy against the length-only baseline "
              "(the longer answer wins) on the same rows:", ""]
    rows = []
    for name, m in _models(r):
        h = m["heldout"]
        rows.append((name, h["n"], h["accuracy"], h["length_only_accuracy"],
                     h["length_matched"]["accuracy"], h["length_matched"]["length_only"],
                     h["length_matched"]["n"], h["reward_length_corr"],
                     m["train_lengths"]["truncated"], m["train_lengths"]["dropped"]))
    lines += table(("model", "n", "accuracy", "length-only", "length-matched",
                    "length-only (matched)", "n matched", "reward-length corr.",
                    "train truncated", "train dropped"), rows)
    lines += ["", "Accuracy by relative length difference (model / length-only):", ""]
    buckets = ("<=10%", "10-30%", "30-60%", ">60%")
    rows = [(name, *(f"{_f(b.get('accuracy'))} / {_f(b.get('length_only'))} (n={b.get('n')})"
                     for b in (m["heldout"]["by_length_bucket"].get(k, {}) for k in buckets)))
            for name, m in _models(r)]
    lines += table(("model", *buckets), rows)
    lines += ["", "Reward-hacking probes: share of held-out answers whose reward rises:", ""]
    rows = [(name, *(_get(m, f"probes.probes.{p}.rate") for p in PADDING),
             m.get("probe_gate", {}).get("passed")) for name, m in _models(r)]
    lines += table(("model", *PADDING, "gate passed"), rows)
    trained = [(name, _get(m, "train.steps"), _get(m, "train.final_loss"),
                _get(m, "train.pairs_per_s"), m.get("wall_s")) for name, m in _models(r)]
    lines += ["", "Training runs (one epoch after half a head-only epoch):", ""]
    lines += table(("model", "steps", "final loss", "pairs/s", "wall s"), trained)
    lengths = r.get("token_lengths", {})
    if lengths:
        sizes = sorted({int(m) for x in lengths.values() for m in x["by_max_length"]})
        lines += ["", "Token lengths of the dev files (prompt + longer answer, default "
                  "tokenizer) and the share of pairs each max_length keeps whole / keeps with "
                  "the prompt cut from its start:", ""]
        rows = [(name, x["n"], x["total"]["p50"], x["total"]["p95"], x["total"]["p99"],
                 *(f"{x['by_max_length'][str(m)]['whole']:.1%} / "
                   f"{x['by_max_length'][str(m)]['kept_with_prompt_cut']:.1%}" for m in sizes))
                for name, x in lengths.items()]
        lines += table(("file", "pairs", "p50", "p95", "p99", *map(str, sizes)), rows)
    cfg = r.get("config", {})
    lines += ["", f"Trainer defaults: max_length {cfg.get('max_length')}, length_balance "
              f"{cfg.get('length_balance')}, confidence_weighting "
              f"{cfg.get('confidence_weighting')}; {len(_commands(r))} run(s), all below."]
    return lines
