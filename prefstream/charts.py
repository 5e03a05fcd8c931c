"""Inline SVG charts for ``prefstream report``: horizontal bars, histograms and lines over
categories, each a ``<figure>`` with its title, axes, reference lines and caption, and the "no
data yet" panel. Pure string building: no I/O, no scripts, every text escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

W, H = 600, 330
COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9")
GATE, REF = "#D55E00", "#555555"
MAX_ROWS = 14
Series = tuple[str, Sequence[float | None], str, str]  # name, values, colour, stroke-dasharray
Ref = tuple[float, str, str]  # value, label, colour


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def fmt_num(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:.3g}"


def fmt_pct(v: float) -> str:
    return f"{v:.0%}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    raw = max(hi - lo, 1e-9) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.floor(lo / step + 1e-9)
    return [round(i * step, 10) for i in range(first, math.ceil(hi / step - 1e-9) + 1)]


def _figure(pid: str, title: str, body: str, caption: str, *, empty: bool = False) -> str:
    flag = "true" if empty else "false"
    return (f'<figure class="plot" id="plot-{pid}" data-plot="{pid}" data-empty="{flag}">'
            f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">'
            f'<text class="title" x="{W / 2}" y="22">{esc(title)}</text>{body}</svg>'
            + (f"<figcaption>{esc(caption)}</figcaption>" if caption else "") + "</figure>")


def no_data(pid: str, title: str, why: str, headline: str = "no data yet") -> str:
    body = (f'<rect class="frame" x="20" y="40" width="{W - 40}" height="{H - 60}" rx="8"/>'
            f'<text class="nodata" x="{W / 2}" y="{H / 2}">{esc(headline)}</text>'
            f'<text class="why" x="{W / 2}" y="{H / 2 + 24}">{esc(why)}</text>')
    return _figure(pid, title, body, "", empty=True)


def _labels(xlabel: str, ylabel: str, box: tuple[float, float, float, float]) -> str:
    x0, x1, y0, y1 = box
    return (f'<text class="axis-label" x="{(x0 + x1) / 2}" y="{H - 8}">{esc(xlabel)}</text>'
            f'<text class="axis-label" transform="translate(14 {(y0 + y1) / 2}) rotate(-90)">'
            f"{esc(ylabel)}</text>")


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
                   f'<text class="ref-label{anchor}" fill="{color}" {at}>{esc(label)}</text>')
    return "".join(out)


def hbar(pid: str, title: str, rows: Sequence[tuple[str, float, str]], *, xlabel: str,
         ylabel: str, caption: str, xmax: float | None = None, refs: Sequence[Ref] = (),
         fmt: Callable[[float], str] = fmt_num) -> str:
    """Horizontal bars: one (label, value, value text) per row, largest first."""
    rows = list(rows)[:MAX_ROWS]
    x0 = 30 + 6.6 * min(max(len(r[0]) for r in rows), 28)
    box = (x0, W - 84.0, 40.0, H - 50.0)
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0] if xmax == 1 else nice_ticks(0, max(r[1] for r in rows))
    sx = lambda v: x0 + (box[1] - x0) * v / (ticks[-1] or 1)  # noqa: E731
    band = (box[3] - box[2]) / len(rows)
    bars = "".join(
        f'<text class="tick end" x="{x0 - 6}" y="{box[2] + band * (i + 0.5) + 4:.1f}">'
        f'{esc(label[:28])}</text><rect class="mark" fill="{COLORS[0]}" x="{x0}" '
        f'y="{box[2] + band * (i + 0.15):.1f}" width="{max(sx(v) - x0, 1):.1f}" '
        f'height="{band * 0.7:.1f}"><title>{esc(label)}: {esc(text)}</title></rect>'
        f'<text class="value" x="{sx(v) + 4:.1f}" y="{box[2] + band * (i + 0.5) + 4:.1f}">'
        f"{esc(text)}</text>" for i, (label, v, text) in enumerate(rows))
    body = (_vgrid(ticks, sx, box[2], box[3], fmt) + bars
            + _refs(refs, sx, box, vertical=True) + _labels(xlabel, ylabel, box))
    return _figure(pid, title, body, caption)


def histogram(pid: str, title: str, edges: Sequence[float], counts: Sequence[int], *,
              xlabel: str, ylabel: str, caption: str, refs: Sequence[Ref] = (),
              fmt: Callable[[float], str] = fmt_num) -> str:
    box = (64.0, W - 20.0, 40.0, H - 50.0)
    yt = nice_ticks(0, max(counts))
    sx = lambda v: box[0] + (box[1] - box[0]) * (v - edges[0]) / (edges[-1] - edges[0])  # noqa: E731
    sy = lambda v: box[3] - (box[3] - box[2]) * v / yt[-1]  # noqa: E731
    bars = "".join(
        f'<rect class="mark" fill="{COLORS[0]}" x="{sx(a) + 0.5:.1f}" y="{sy(c):.1f}" '
        f'width="{max(sx(b) - sx(a) - 1, 1):.1f}" height="{box[3] - sy(c):.1f}">'
        f"<title>[{fmt(a)}, {fmt(b)}): {c:,}</title></rect>"
        for a, b, c in zip(edges, edges[1:], counts, strict=False) if c)
    xt = [t for t in nice_ticks(edges[0], edges[-1], 6) if edges[0] <= t <= edges[-1]]
    body = (_hgrid(yt, sy, box[0], box[1], fmt_num) + _vgrid(xt, sx, box[3], box[3], fmt) + bars
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
          else nice_ticks(0, top))
    t = (lambda v: math.log10(v) if v >= 1 else -0.5) if log else (lambda v: v)  # noqa: E731
    lo, hi = (-0.5, t(yt[-1]) or 1) if log else (0, yt[-1])
    sy = lambda v: box[3] - (box[3] - box[2]) * (t(v) - lo) / (hi - lo)  # noqa: E731
    step = (box[1] - box[0] - 20) / max(len(cats) - 1, 1)
    sx = lambda i: box[0] + 10 + step * i if len(cats) > 1 else (box[0] + box[1]) / 2  # noqa: E731
    every = max(1, math.ceil(len(cats) / 7))
    xt = "".join(f'<text class="tick" x="{sx(i):.1f}" y="{box[3] + 16}">{esc(c)}</text>'
                 for i, c in enumerate(cats) if i % every == 0)
    grid = _hgrid(yt, sy, box[0], box[1], fmt_pct if unit else fmt_num)
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
                       f'r="{radius}"><title>{esc(name)}: {v:.3g}</title></circle>'
                       for x, y, v in pts)
    return out


def _legend(series: Sequence[Series]) -> str:
    out, x = [], 64.0
    for name, _, color, dash in series:
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line class="key" stroke="{color}"{dashed} x1="{x}" x2="{x + 18}" y1="40" '
                   f'y2="40"/><text class="legend" x="{x + 22}" y="44">{esc(name)}</text>')
        x += 34 + 6.4 * len(name)
    return "".join(out)
