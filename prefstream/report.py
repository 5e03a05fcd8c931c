"""``prefstream report``: one self-contained HTML page with the plots people look at.

Everything is read through a read-only DuckDB connection to the catalog, so the worker and the
trainer never wait on it. Charts are inline SVG drawn here, styles are inline, and a
Content-Security-Policy forbids scripts, fonts and any network fetch: the file can be mailed or
archived as it is. Empty data gives a "no data yet" panel per plot, never an error.

Its size (~530 lines) is one query and one SVG panel per plot, each short and independent;
splitting them would only spread one page's layout over files.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from prefstream.datadir import check_data_dir, check_writable, default_data_dir
from prefstream.errors import PrefstreamError
from prefstream.storage.catalog import CATALOG_NAME, MODELS_VIEW_SQL, connect_readonly
from prefstream.trainer.config import TrainConfig

DATA_DIR_ENV = "PREFSTREAM_DATA_DIR"
W, H = 600, 330
COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9")
GATE, REF = "#D55E00", "#555555"
CONF_BINS, DIFF_SIDE, MAX_ROWS = 40, 15, 14
Series = tuple[str, Sequence[float | None], str, str]  # name, values, colour, stroke-dasharray
Ref = tuple[float, str, str]  # value, label, colour

PAIRS_SQL = """CREATE TEMP TABLE p AS
    SELECT rule, confidence, length(chosen) AS lc, length(rejected) AS lr FROM pairs"""
TOTALS_SQL = """SELECT
    (SELECT coalesce(sum(n_events), 0) FROM sessions), (SELECT count(*) FROM sessions),
    (SELECT coalesce(sum(n_candidates), 0) FROM sessions), (SELECT count(*) FROM p),
    (SELECT count(*) FROM ties), (SELECT count(*) FROM unpaired), (SELECT count(*) FROM refusals),
    (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM late_events),
    (SELECT count(*) FILTER (WHERE sealed) FROM partitions), (SELECT count(*) FROM partitions)"""
TOTALS = ("events", "sessions", "candidates", "pairs", "ties", "unpaired", "refusals",
          "dead_letters", "late_events", "sealed", "partitions")
DIFF_SQL = """SELECT least(greatest(floor((lc - lr) / $w + $k + 0.5), 0), 2 * $k)::INT, count(*)
    FROM p GROUP BY 1"""


# ---------------------------------------------------------------- reading (DuckDB, read-only)

def collect(data_dir: Path) -> dict[str, Any]:
    """Every number the page shows, read from the catalog's views."""
    con = _connect(data_dir)
    try:
        con.execute(PAIRS_SQL)
        return {
            "data_dir": str(data_dir.resolve()),
            "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "totals": dict(zip(TOTALS, con.execute(TOTALS_SQL).fetchone() or (), strict=True)),
            "funnel": con.execute("SELECT partition, events, sessions, candidates, pairs "
                                  "FROM funnel ORDER BY partition").fetchall(),
            "rules": con.execute("SELECT rule, count(*), avg((lc > lr)::INT) FROM p "
                                 "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall(),
            "length_all": con.execute("SELECT count(*), avg((lc > lr)::INT) FROM p").fetchone(),
            "refusals": con.execute("SELECT reason, count(*) FROM refusals "
                                    "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall(),
            "confidence": _bins(con, f"SELECT least(floor(confidence * {CONF_BINS}), "
                                     f"{CONF_BINS - 1})::INT, count(*) FROM p GROUP BY 1",
                                CONF_BINS),
            "length_diff": _length_diff(con),
            "models": _models(con, data_dir),
        }
    except duckdb.Error as exc:
        raise PrefstreamError(f"cannot read {data_dir / CATALOG_NAME}: {exc}") from exc
    finally:
        con.close()


def _connect(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """Read-only; retried briefly because a starting worker holds the file while it (re)creates
    the views."""
    if not (data_dir / CATALOG_NAME).exists():
        raise PrefstreamError(f"no catalog at {data_dir / CATALOG_NAME}: start a worker (or "
                              "`prefstream demo`) on this data dir first")
    for _ in range(20):
        try:
            return connect_readonly(data_dir)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            error = exc
            time.sleep(0.25)
    raise PrefstreamError(f"cannot open {data_dir / CATALOG_NAME} read-only: {error}")


def _bins(con: duckdb.DuckDBPyConnection, sql: str, n: int, **params: Any) -> list[int]:
    counts = [0] * n
    for b, c in con.execute(sql, params or None).fetchall():
        counts[b] = c
    return counts


def _length_diff(con: duckdb.DuckDBPyConnection) -> tuple[list[float], list[int]]:
    """Histogram of len(chosen) - len(rejected): symmetric, 0 in the middle bin, the 2% widest
    differences folded into the outer bars."""
    q = (con.execute("SELECT quantile_cont(abs(lc - lr), 0.98) FROM p").fetchone() or (None,))[0]
    w = max(1, math.ceil((q or 0) / (DIFF_SIDE + 0.5)))
    edges = [(i - DIFF_SIDE - 0.5) * w for i in range(2 * DIFF_SIDE + 2)]
    return edges, _bins(con, DIFF_SQL, 2 * DIFF_SIDE + 1, w=w, k=DIFF_SIDE)


def _models(con: duckdb.DuckDBPyConnection, data_dir: Path) -> list[dict[str, Any]]:
    """Model versions from the ``models`` view; from its definition when the catalog lacks it
    (a catalog written by an older version, before the catalog defined the view)."""
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    source = ("models" if "models" in views
              else f"({MODELS_VIEW_SQL.format(root=data_dir.resolve())})")
    rows = con.execute(f"SELECT version, promoted, is_current, metadata FROM {source}").fetchall()
    found = [{**json.loads(m), "version": v, "promoted": bool(p), "current": bool(c)}
             for v, p, c, m in rows if v]
    return sorted(found, key=lambda m: int(m["version"][1:]))


def _get(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


# ---------------------------------------------------------------- SVG charts

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:.3g}"


def _pct(v: float) -> str:
    return f"{v:.0%}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    raw = max(hi - lo, 1e-9) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.floor(lo / step + 1e-9)
    return [round(i * step, 10) for i in range(first, math.ceil(hi / step - 1e-9) + 1)]


def _figure(pid: str, title: str, body: str, caption: str, *, empty: bool = False) -> str:
    flag = "true" if empty else "false"
    return (f'<figure class="plot" id="plot-{pid}" data-plot="{pid}" data-empty="{flag}">'
            f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{_e(title)}">'
            f'<text class="title" x="{W / 2}" y="22">{_e(title)}</text>{body}</svg>'
            + (f"<figcaption>{_e(caption)}</figcaption>" if caption else "") + "</figure>")


def no_data(pid: str, title: str, why: str, headline: str = "no data yet") -> str:
    body = (f'<rect class="frame" x="20" y="40" width="{W - 40}" height="{H - 60}" rx="8"/>'
            f'<text class="nodata" x="{W / 2}" y="{H / 2}">{_e(headline)}</text>'
            f'<text class="why" x="{W / 2}" y="{H / 2 + 24}">{_e(why)}</text>')
    return _figure(pid, title, body, "", empty=True)


def _labels(xlabel: str, ylabel: str, box: tuple[float, float, float, float]) -> str:
    x0, x1, y0, y1 = box
    return (f'<text class="axis-label" x="{(x0 + x1) / 2}" y="{H - 8}">{_e(xlabel)}</text>'
            f'<text class="axis-label" transform="translate(14 {(y0 + y1) / 2}) rotate(-90)">'
            f"{_e(ylabel)}</text>")


def _vgrid(ticks: Sequence[float], sx: Callable[[float], float], y0: float, y1: float,
           fmt: Callable[[float], str]) -> str:
    return "".join(f'<line class="gl" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{y0}" y2="{y1}"/>'
                   f'<text class="tick" x="{sx(t):.1f}" y="{y1 + 16}">{fmt(t)}</text>'
                   for t in ticks)


def _hgrid(ticks: Sequence[float], sy: Callable[[float], float], x0: float, x1: float,
           fmt: Callable[[float], str]) -> str:
    return "".join(f'<line class="gl" x1="{x0}" x2="{x1}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
                   f'<text class="tick end" x="{x0 - 6}" y="{sy(t) + 4:.1f}">{fmt(t)}</text>'
                   for t in ticks)


def _refs(refs: Sequence[Ref], scale: Callable[[float], float], box: tuple[float, ...],
          *, vertical: bool) -> str:
    x0, x1, y0, y1 = box
    out = []
    for value, label, color in refs:
        p = scale(value)
        line = (f'x1="{p:.1f}" x2="{p:.1f}" y1="{y0 - 4}" y2="{y1}"' if vertical
                else f'x1="{x0}" x2="{x1}" y1="{p:.1f}" y2="{p:.1f}"')
        at = f'x="{p + 4:.1f}" y="{y0 + 8}"' if vertical else f'x="{x1 - 4}" y="{p - 5:.1f}"'
        anchor = "" if vertical else " end"
        out.append(f'<line class="ref" stroke="{color}" {line}/>'
                   f'<text class="ref-label{anchor}" fill="{color}" {at}>{_e(label)}</text>')
    return "".join(out)


def hbar(pid: str, title: str, rows: Sequence[tuple[str, float, str]], *, xlabel: str,
         ylabel: str, caption: str, xmax: float | None = None, refs: Sequence[Ref] = (),
         fmt: Callable[[float], str] = _num) -> str:
    """Horizontal bars: one (label, value, value text) per row, largest first."""
    rows = list(rows)[:MAX_ROWS]
    x0 = 30 + 6.6 * min(max(len(r[0]) for r in rows), 28)
    box = (x0, W - 84.0, 40.0, H - 50.0)
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0] if xmax == 1 else _ticks(0, max(r[1] for r in rows))
    sx = lambda v: x0 + (box[1] - x0) * v / (ticks[-1] or 1)  # noqa: E731
    band = (box[3] - box[2]) / len(rows)
    bars = "".join(
        f'<text class="tick end" x="{x0 - 6}" y="{box[2] + band * (i + 0.5) + 4:.1f}">'
        f'{_e(label[:28])}</text><rect class="mark" fill="{COLORS[0]}" x="{x0}" '
        f'y="{box[2] + band * (i + 0.15):.1f}" width="{max(sx(v) - x0, 1):.1f}" '
        f'height="{band * 0.7:.1f}"><title>{_e(label)}: {_e(text)}</title></rect>'
        f'<text class="value" x="{sx(v) + 4:.1f}" y="{box[2] + band * (i + 0.5) + 4:.1f}">'
        f"{_e(text)}</text>" for i, (label, v, text) in enumerate(rows))
    body = (_vgrid(ticks, sx, box[2], box[3], fmt) + bars
            + _refs(refs, sx, box, vertical=True) + _labels(xlabel, ylabel, box))
    return _figure(pid, title, body, caption)


def histogram(pid: str, title: str, edges: Sequence[float], counts: Sequence[int], *,
              xlabel: str, ylabel: str, caption: str, refs: Sequence[Ref] = (),
              fmt: Callable[[float], str] = _num) -> str:
    box = (64.0, W - 20.0, 40.0, H - 50.0)
    yt = _ticks(0, max(counts))
    sx = lambda v: box[0] + (box[1] - box[0]) * (v - edges[0]) / (edges[-1] - edges[0])  # noqa: E731
    sy = lambda v: box[3] - (box[3] - box[2]) * v / yt[-1]  # noqa: E731
    bars = "".join(
        f'<rect class="mark" fill="{COLORS[0]}" x="{sx(a) + 0.5:.1f}" y="{sy(c):.1f}" '
        f'width="{max(sx(b) - sx(a) - 1, 1):.1f}" height="{box[3] - sy(c):.1f}">'
        f"<title>[{fmt(a)}, {fmt(b)}): {c:,}</title></rect>"
        for a, b, c in zip(edges, edges[1:], counts, strict=False) if c)
    xt = [t for t in _ticks(edges[0], edges[-1], 6) if edges[0] <= t <= edges[-1]]
    body = (_hgrid(yt, sy, box[0], box[1], _num) + _vgrid(xt, sx, box[3], box[3], fmt) + bars
            + _refs(refs, sx, box, vertical=True) + _labels(xlabel, ylabel, box))
    return _figure(pid, title, body, caption)


def lines(pid: str, title: str, cats: Sequence[str], series: Sequence[Series], *, xlabel: str,
          ylabel: str, caption: str, unit: bool = False, log: bool = False,
          refs: Sequence[Ref] = ()) -> str:
    """Lines over categories (hours, versions); ``unit``: a 0..1 axis; ``log``: decades, with 0
    drawn at the bottom."""
    box = (64.0, W - 20.0, 58.0, H - 50.0)
    top = max((v for _, vs, _, _ in series for v in vs if v is not None), default=1.0) or 1.0
    yt = ([0, 0.25, 0.5, 0.75, 1] if unit else
          [10.0 ** k for k in range(math.ceil(math.log10(max(top, 1))) + 1)] if log
          else _ticks(0, top))
    t = (lambda v: math.log10(v) if v >= 1 else -0.5) if log else (lambda v: v)  # noqa: E731
    lo, hi = (-0.5, t(yt[-1]) or 1) if log else (0, yt[-1])
    sy = lambda v: box[3] - (box[3] - box[2]) * (t(v) - lo) / (hi - lo)  # noqa: E731
    step = (box[1] - box[0] - 20) / max(len(cats) - 1, 1)
    sx = lambda i: box[0] + 10 + step * i if len(cats) > 1 else (box[0] + box[1]) / 2  # noqa: E731
    every = max(1, math.ceil(len(cats) / 7))
    xt = "".join(f'<text class="tick" x="{sx(i):.1f}" y="{box[3] + 16}">{_e(c)}</text>'
                 for i, c in enumerate(cats) if i % every == 0)
    grid = _hgrid(yt, sy, box[0], box[1], _pct if unit else _num)
    if log:
        grid += f'<text class="tick end" x="{box[0] - 6}" y="{sy(0) + 4:.1f}">0</text>'
    body = (grid + xt + "".join(_series(s, sx, sy, len(cats) <= 60, radius=max(2.5, 6.0 - 1.5 * i))
                   for i, s in enumerate(series))
            + _legend(series) + _refs(refs, sy, box, vertical=False)
            + _labels(xlabel, ylabel, box))
    return _figure(pid, title, body, caption)


def _series(s: Series, sx: Callable[[int], float], sy: Callable[[float], float],
            dots: bool, radius: float = 3.5) -> str:
    """A line with dots; a larger ``radius`` for earlier series, so a point drawn first stays
    visible as a ring around an equal point drawn over it."""
    name, values, color, dash = s
    pts = [(sx(i), sy(v), v) for i, v in enumerate(values) if v is not None]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    out = (f'<polyline class="mark" fill="none" stroke="{color}"{dashed} points="{line}"/>'
           if len(pts) > 1 else "")
    if dots or len(pts) == 1:
        out += "".join(f'<circle class="mark" fill="{color}" cx="{x:.1f}" cy="{y:.1f}" '
                       f'r="{radius}"><title>{_e(name)}: {v:.3g}</title></circle>'
                       for x, y, v in pts)
    return out


def _legend(series: Sequence[Series]) -> str:
    out, x = [], 64.0
    for name, _, color, dash in series:
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line class="key" stroke="{color}"{dashed} x1="{x}" x2="{x + 18}" y1="40" '
                   f'y2="40"/><text class="legend" x="{x + 22}" y="44">{_e(name)}</text>')
        x += 34 + 6.4 * len(name)
    return "".join(out)


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
        hbar("length-bias", "Length bias: chosen is longer", rows, xmax=1, fmt=_pct,
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
    return "".join(f'<div class="tile"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                   for v, k in items)


def _models_table(models: list[dict[str, Any]]) -> str:
    if not models:
        return ""
    f = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    rows = "".join(
        f"<tr><td>{_e(m['version'])}</td><td>{_e(str(m.get('created_at', ''))[:16])}</td>"
        f"<td>{'yes' if m['promoted'] else 'no'}{' (current)' if m['current'] else ''}</td>"
        f"<td class=n>{m.get('n_train', '')}</td><td class=n>{m.get('n_eval', '')}</td>"
        f"<td class=n>{f(_get(m, 'metrics.eval.accuracy'))}</td>"
        f"<td class=n>{f(_get(m, 'gates.calibration.agreement'))}</td>"
        f"<td>{_e('; '.join(m.get('reasons') or []))}</td></tr>" for m in reversed(models))
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
        f"<h1>prefstream report</h1><p class=meta>{_e(d['data_dir'])} &middot; generated "
        f"{_e(d['generated_at'])}</p><section class=tiles>{_tiles(d)}</section>"
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
