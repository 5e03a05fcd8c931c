"""``prefstream report``: one self-contained HTML page with the plots people look at.

Everything is read through a read-only DuckDB connection to the catalog, so the worker and the
trainer never wait on it. Charts are inline SVG, styles are inline, and a
Content-Security-Policy forbids scripts, fonts and any network fetch: the file can be mailed or
archived as it is. Empty data gives a "no data yet" panel per plot, never an error.

The numbers come from ``prefstream.report_data``, the charts from ``prefstream.charts``; this
module lays out the page's panels and writes the file.
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefstream.charts import (
    COLORS,
    GATE,
    REF,
    Ref,
    Series,
    esc,
    fmt_pct,
    hbar,
    histogram,
    lines,
    no_data,
)
from prefstream.datadir import check_data_dir, check_writable, default_data_dir
from prefstream.report_data import CONF_BINS, TOTALS, collect
from prefstream.trainer.config import TrainConfig

__all__ = ["CSP", "collect", "hbar", "histogram", "lines", "no_data", "register", "render",
           "run_report", "write_report"]

DATA_DIR_ENV = "PREFSTREAM_DATA_DIR"


def _get(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


# ---------------------------------------------------------------- the page

def _hour(partition: str) -> str:
    return f"{partition[5:10]} {partition[11:13]}h"


def _funnel_panels(d: dict[str, Any]) -> list[str]:
    t, rows = d["totals"], d["funnel"]
    stages = [("events accepted", t["events"]), ("sessions", t["sessions"]),
              ("candidates", t["candidates"]), ("pairs", t["pairs"])]
    why = "no session has closed yet (the worker writes sessions as they close)"
    if not any(v for _, v in stages):
        totals = no_data("funnel-totals", "Funnel: events to pairs", why)
    else:
        ratio = f"{t['pairs'] / t['candidates']:.0%}" if t["candidates"] else "n/a"
        totals = hbar("funnel-totals", "Funnel: events to pairs",
                      [(n, v, f"{v:,}") for n, v in stages], xlabel="count (all partitions)",
                      ylabel="stage", caption=f"Pairs per candidate comparison: {ratio}. "
                      f"Dead letters: {t['dead_letters']:,}; late events: {t['late_events']:,}.")
    if not rows:
        return [totals, no_data("funnel-hourly", "Funnel per hour", why)]
    series = [(name, [r[i + 1] for r in rows], COLORS[i], "")
              for i, name in enumerate(("events", "sessions", "candidates", "pairs"))]
    hourly = lines("funnel-hourly", "Funnel per hour", [_hour(r[0]) for r in rows], series,
                   xlabel="event-time partition (UTC)", ylabel="count per partition (log)",
                   log=True, caption="From the funnel view; a session counts in the hour of its "
                   "last event. A falling pairs line under steady events means the rules refuse "
                   "more.")
    return [totals, hourly]


def _share_rows(rows: Sequence[tuple[str, int]]) -> list[tuple[str, float, str]]:
    total = sum(n for _, n in rows) or 1
    return [(str(k), n, f"{n:,} ({n / total:.0%})") for k, n in rows]


def _count_panels(d: dict[str, Any]) -> list[str]:
    rules = (hbar("pairs-by-rule", "Pairs by rule", _share_rows([r[:2] for r in d["rules"]]),
                  xlabel="pairs", ylabel="rule", caption="Each pair counts under its "
                  "highest-confidence rule.") if d["rules"] else
             no_data("pairs-by-rule", "Pairs by rule", "no pair stored yet"))
    refusals = (hbar("refusal-reasons", "Refusal reasons", _share_rows(d["refusals"]),
                     xlabel="refused candidates", ylabel="reason", caption="Candidate "
                     "comparisons the rules declined, and why.") if d["refusals"] else
                no_data("refusal-reasons", "Refusal reasons", "no refusal stored yet"))
    return [rules, refusals]


def _quality_panels(d: dict[str, Any]) -> list[str]:
    conf, (edges, diffs), (n, share) = d["confidence"], d["length_diff"], d["length_all"]
    if not n:
        return [no_data(pid, title, "no pair stored yet") for pid, title in (
            ("confidence", "Pair confidence"), ("length-bias", "Length bias: chosen is longer"),
            ("length-diff", "Length difference, chosen minus rejected"))]
    min_conf = _threshold(d["models"], "config.min_confidence", "min_confidence")
    rows = [("all pairs", share, f"{share:.0%} of {n:,}")] + [
        (str(rule), s, f"{s:.0%} of {k:,}") for rule, k, s in d["rules"]]
    return [
        histogram("confidence", "Pair confidence", [i / CONF_BINS for i in range(CONF_BINS + 1)],
                  conf, xlabel="confidence", ylabel="pairs", fmt=lambda v: f"{v:g}",
                  refs=[(min_conf, f"trainer min_confidence {min_conf:g}", GATE)],
                  caption="Pairs left of the line are dropped by the trainer's first gate."),
        hbar("length-bias", "Length bias: chosen is longer", rows, xmax=1, fmt=fmt_pct,
             refs=[(0.5, "no bias", REF)], xlabel="share of pairs whose chosen answer is longer",
             ylabel="rule", caption="A length-only scorer gets about this share right; far "
             "from 50% means answer length alone predicts the label."),
        histogram("length-diff", "Length difference, chosen minus rejected", edges, diffs,
                  xlabel="len(chosen) - len(rejected), characters", ylabel="pairs",
                  refs=[(0, "equal", REF)], caption="Outer bars hold the 2% largest "
                  "differences. Mass right of 0: longer answers win."),
    ]


def _threshold(models: list[dict[str, Any]], path: str, field: str) -> float:
    """The newest version's setting, else the trainer's default."""
    found = [v for m in models if (v := _get(m, path)) is not None]
    return float(found[-1]) if found else float(TrainConfig.model_fields[field].default)


MODEL_PLOTS = (("model-accuracy", "Reward model: held-out accuracy"),
               ("model-calibration", "Calibration audit: agreement with explicit labels"),
               ("model-probes", "Reward-hacking probes"))


def _model_panels(d: dict[str, Any]) -> list[str]:
    ms = d["models"]
    if not ms:
        return [no_data(pid, title, "no model version yet (run `prefstream trainer`)")
                for pid, title in MODEL_PLOTS]
    cats = [m["version"] + ("*" if m["current"] else "") for m in ms]
    col = lambda path: [_get(m, path) for m in ms]  # noqa: E731
    gate = _threshold(ms, "gates.calibration.threshold", "min_calibration_agreement")
    specs: list[tuple[list[Series], list[Ref], str, str]] = [
        ([("held-out", col("metrics.eval.accuracy"), COLORS[0], ""),
          ("length-matched", col("metrics.eval.length_matched.accuracy"), COLORS[2], ""),
          ("no-regression bar", col("gates.no_regression.current_accuracy"), GATE, "5 4"),
          ("length-only scorer", col("length_bias.eval.share_chosen_longer"), REF, "2 3")],
         [(0.5, "chance", REF)], "accuracy on held-out pairs", "Promotion needs held-out "
         "accuracy at or above the no-regression bar (the current model on the same window)."),
        ([("agreement", col("gates.calibration.agreement"), COLORS[1], "")],
         [(gate, f"promotion gate >= {gate:.2f}", GATE)], "agreement", "Below the gate line a "
         "version is not promoted; a version without a point had no explicit labels."),
        ([("perturbed answer scored higher", col("metrics.probes.overall_rate"), COLORS[3], "")],
         [], "share of probes", "Padding, filler, repetition, flattery: lower is better."),
    ]
    return [lines(pid, title, cats, series, unit=True, refs=refs, ylabel=ylabel,
                  xlabel="model version (* = current)", caption=caption)
            if any(v is not None for s in series for v in s[1])
            else no_data(pid, title, *_why_missing(pid, ms))
            for (pid, title), (series, refs, ylabel, caption) in zip(MODEL_PLOTS, specs,
                                                                      strict=True)]


def _why_missing(pid: str, models: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """Why a model panel is empty although versions exist, and its headline: for the
    calibration audit, "audit skipped" and the newest version's reason, not "no data yet"."""
    reason = _get(models[-1], "gates.calibration.reason") if pid == "model-calibration" else None
    if reason:
        return (f"for {models[-1]['version']}: {reason} (--explicit-labels)", "audit skipped")
    return "no version has this metric yet", "no data yet"


def _tiles(d: dict[str, Any]) -> str:
    t = d["totals"]
    current = next((m["version"] for m in d["models"] if m["current"]), "none")
    names = {"events": "events accepted", "unpaired": "unpaired (KTO rows)"}
    items = [(f"{t[k]:,}", names.get(k, k.replace("_", " "))) for k in TOTALS[:9]] + [
        (f"{t['sealed']:,} / {t['partitions']:,}", "partitions sealed"),
        (f"{len(d['models'])}", "model versions"), (current, "current model")]
    return "".join(f'<div class="tile"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                   for v, k in items)


def _models_table(models: list[dict[str, Any]]) -> str:
    if not models:
        return ""
    f = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    rows = "".join(
        f"<tr><td>{esc(m['version'])}</td><td>{esc(str(m.get('created_at', ''))[:16])}</td>"
        f"<td>{'yes' if m['promoted'] else 'no'}{' (current)' if m['current'] else ''}</td>"
        f"<td class=n>{m.get('n_train', '')}</td><td class=n>{m.get('n_eval', '')}</td>"
        f"<td class=n>{f(_get(m, 'metrics.eval.accuracy'))}</td>"
        f"<td class=n>{f(_get(m, 'gates.calibration.agreement'))}</td>"
        f"<td>{esc('; '.join(m.get('reasons') or []))}</td></tr>" for m in reversed(models))
    return ("<table><thead><tr><th>version</th><th>created (UTC)</th><th>promoted</th>"
            "<th>train pairs</th><th>eval pairs</th><th>held-out acc.</th><th>calibration</th>"
            f"<th>reasons</th></tr></thead><tbody>{rows}</tbody></table>")


CSS = """
body{margin:0;background:#f4f5f7;color:#1d2330;
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1280px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px}.meta{color:#5a6272;margin:0}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(130px,1fr));gap:10px;margin-top:16px}
.tile{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:8px 12px}
.tile b{display:block;font-size:20px}.tile span{color:#5a6272;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px}
figure.plot{margin:0;background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:6px}
figure svg{width:100%;height:auto;display:block}
figcaption{color:#5a6272;font-size:12px;padding:0 10px 6px}
svg text{font-family:inherit;font-size:12px;fill:#1d2330}
.title{font-size:15px;font-weight:600;text-anchor:middle}
.axis-label{fill:#5a6272;text-anchor:middle}.tick{font-size:11px;fill:#5a6272;text-anchor:middle}
.end{text-anchor:end}.value,.legend,.ref-label{font-size:11px}.ref-label{font-weight:600}
.value,.ref-label{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
.gl{stroke:#e6e8ec}.ref{stroke-width:2;stroke-dasharray:6 4}.key{stroke-width:3}
polyline.mark{stroke-width:2.5}
.frame{fill:#fafbfc;stroke:#d5d9e0;stroke-dasharray:4 4}
.nodata{font-size:22px;font-weight:600;fill:#8a93a3;text-anchor:middle}
.why{fill:#8a93a3;text-anchor:middle}
table{border-collapse:collapse;background:#fff;width:100%;margin-top:16px;font-size:13px}
th,td{border-bottom:1px solid #e1e4ea;padding:6px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
"""
#: no scripts, fonts, frames or fetches of any kind: only the inline styles
CSP = "default-src 'none'; style-src 'unsafe-inline'"


def render(d: dict[str, Any]) -> str:
    """The whole page from :func:`collect`'s numbers (pure)."""
    grid = lambda figs: f'<div class="grid">{"".join(figs)}</div>'  # noqa: E731
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>prefstream report</title><style>{CSS}</style></head><body><main>"
        f"<h1>prefstream report</h1><p class=meta>{esc(d['data_dir'])} &middot; generated "
        f"{esc(d['generated_at'])}</p><section class=tiles>{_tiles(d)}</section>"
        f"<h2>Stream</h2>{grid(_funnel_panels(d) + _count_panels(d))}"
        f"<h2>Pairs</h2>{grid(_quality_panels(d))}"
        f"<h2>Reward model</h2>{grid(_model_panels(d))}{_models_table(d['models'])}"
        "</main></body></html>\n")


def write_report(data_dir: Path, out: Path) -> Path:
    """Collect, render and write atomically (readers never see half a page)."""
    page = render(collect(data_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.chmod(0o600)  # the page quotes prompts and answers: owner-only whatever the umask
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def register(subparsers: Any) -> None:
    """Add ``report`` to the ``prefstream`` script."""
    p = subparsers.add_parser("report", help="write a self-contained HTML page of plots: funnel, "
                              "rules, refusals, confidence, length bias, model versions")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help=f"data dir to report on [env: {DATA_DIR_ENV}] [default: prefstream-data]")
    p.add_argument("--out", type=Path, default=None,
                   help="HTML file to write [default: <data-dir>/report.html]")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    out = args.out or args.data_dir / "report.html"
    check_data_dir(args.data_dir)
    check_writable(out.parent, needed_by="prefstream report (--out)")
    print(write_report(args.data_dir, out))
    return 0
