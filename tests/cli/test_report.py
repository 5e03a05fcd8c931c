"""``prefstream report`` on a real data dir, rendered by headless Chromium.

The data dir is written with the storage functions (pairs, sessions, refusals, ties, dead
letters over six hours, four of them sealed) plus three model versions whose ``metadata.json``
has the trainer's format. A probe script is added to a copy of the page (the page itself has
none and its CSP forbids them) to read the laid-out DOM: every plot's SVG, its marks' sizes, and
any resource the page fetched. A screenshot is decoded by hand (zlib) to check the pixels.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from factories import at, pair, session_row

from prefstream import charts, report, report_data
from prefstream.cli import main
from prefstream.schemas.records import DeadLetter, Refusal, Tie
from prefstream.storage.catalog import CATALOG_NAME, ensure_catalog
from prefstream.storage.files import (
    Watermark,
    init_data_dir,
    read_table,
    seal_ready,
    write_rows,
    write_watermark,
)
from prefstream.storage.partitions import partition_for
from prefstream.trainer.config import TrainConfig
from prefstream.trainer.data import length_bias
from prefstream.trainer.registry import METADATA, json_default, models_dir, promote

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def needs_chromium(test: Callable[..., None]) -> Callable[..., None]:
    """A headless Chromium process renders the page: ``slow`` (a process, not in the pure run),
    and skipped where Chromium is not installed."""
    missing = pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; "
        ".ci/run installs it)")
    return pytest.mark.slow(missing(test))


HOURS, SEALED = 6, 4
RULES = (("thumbs", 0.95), ("copy_over_skipped", 0.8), ("edit", 0.75),
         ("click_over_skipped_above", 0.6), ("reformulate_same_intent", 0.53))
REASONS = ("abandoned", "below_last_click", "context_mismatch", "click_without_dwell")
#: plot id -> fewest marks (bars, points or lines) it must draw on this data dir
PLOTS = {"funnel-totals": 4, "funnel-hourly": 4 * HOURS, "pairs-by-rule": len(RULES),
         "refusal-reasons": len(REASONS), "confidence": len(RULES), "length-bias": len(RULES) + 1,
         "length-diff": 5, "model-accuracy": 3 * 3, "model-calibration": 3, "model-probes": 3}
VIEWPORT_W, VIEWPORT_H, SCALE = 1280, 3200, 0.5
PROBE = """<script>
const violations = [];
document.addEventListener('securitypolicyviolation', e => violations.push(e.blockedURI));
window.addEventListener('load', () => {
  const size = el => { const b = el.getBBox(); return [el.tagName, b.width, b.height]; };
  const plots = [...document.querySelectorAll('figure[data-plot]')].map(f => {
    const r = f.getBoundingClientRect(), svg = f.querySelector('svg');
    const s = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return {id: f.dataset.plot, empty: f.dataset.empty, rect: [r.x, r.y, r.width, r.height],
            svg: [s.width, s.height], title: svg && svg.querySelector('.title').textContent,
            axes: [...f.querySelectorAll('.axis-label')].map(t => t.textContent),
            refs: [...f.querySelectorAll('.ref-label, .legend')].map(t => t.textContent),
            marks: [...f.querySelectorAll('.mark')].map(size)};
  });
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({plots, violations, height: document.body.scrollHeight,
    resources: performance.getEntriesByType('resource').map(e => e.name)});
  document.body.append(out);
});
</script>"""


# ---------------------------------------------------------------- a real data dir

def _side_rows(h: int, minute: float) -> dict[str, list[Any]]:
    ts, part = at(minute), partition_for(at(minute))
    refusals = [Refusal(refusal_id=f"r{h}-{i}", reason=REASONS[i % len(REASONS) if i < 6 else 0],
                        rule="copy_over_skipped", session_id=f"s{h}-{i}", user_id="u1",
                        request_id="q1", response_ids="a,b", detail="", event_time=ts,
                        partition=part) for i in range(8)]
    tie = Tie(tie_id=f"t{h}", kind="both_accepted", rule="thumbs", prompt="p", response_a="a",
              response_b="b", response_a_id="a", response_b_id="b", session_id=f"s{h}-0",
              user_id="u1", request_id="q1", event_time=ts, partition=part)
    dead = DeadLetter(dead_letter_id=f"prefstream-events[0]@{h}", topic="prefstream-events",
                      kafka_partition=0, offset=h, reason="invalid json: x", raw="{",
                      received_at=ts, partition=part)
    return {"refusals": refusals, "ties": [tie], "dead_letters": [dead]}


def _hour_rows(h: int) -> dict[str, list[Any]]:
    minute = h * 60.0
    pairs = [pair(f"p{h}-{i}", minute=minute + i % 50, rule=rule, rules=(rule,), confidence=conf,
                  chosen="c" * (40 + (i * 37 + h * 11) % 90), rejected="r" * (60 + (i * 53) % 70),
                  session_id=f"s{h}-{i % 6}", user_id=f"u{i % 4}")
             for i in range(10 + 3 * h) for rule, conf in [RULES[i % len(RULES)]]]
    sessions = [session_row(f"s{h}-{j}@0", minute=minute + 5 * j, n_events=30 + 7 * j + h,
                            n_candidates=4 + j, n_pairs=2 + j % 3) for j in range(6)]
    return {"pairs": pairs, "sessions": sessions, **_side_rows(h, minute)}


def _metadata(version: str, pairs: list[dict[str, Any]], *, accuracy: float, agreement: float,
              bar: float | None) -> dict[str, Any]:
    """A version's metadata in the trainer's format (``trainer.service._save``)."""
    config = TrainConfig(_env_prefix="PREFSTREAM_TEST_UNUSED_")  # type: ignore[call-arg]
    gate = config.min_calibration_agreement
    passed = agreement >= gate and (bar is None or accuracy >= bar)
    calibration = {"passed": agreement >= gate, "agreement": agreement, "threshold": gate,
                   "n": 40, "reason": f"agreement with 40 explicit labels {agreement:.3f}"}
    no_regression = {"passed": bar is None or accuracy >= bar, "current_accuracy": bar,
                     "reason": "no current model" if bar is None else f"{accuracy} vs {bar}"}
    return {
        "trained": True, "promoted": passed, "version": version, "cutoff": at(120),
        "reasons": [calibration["reason"], no_regression["reason"]],
        "length_bias": {"train": length_bias(pairs), "eval": length_bias(pairs[:20])},
        "metrics": {"eval": {"n": 20, "accuracy": accuracy,
                             "length_matched": {"n": 9, "accuracy": accuracy - 0.04}},
                    "probes": {"n_answers": 16, "overall_rate": 0.4 - accuracy / 4}},
        "gates": {"calibration": calibration, "no_regression": no_regression},
        "created_at": at(300), "config": config.model_dump(mode="json"), "backbone": "tiny",
        "n_train": len(pairs) - 20, "n_eval": 20, "seen_through": partition_for(at(180)),
        "n_sealed": SEALED,
    }


def build_data_dir(root: Path) -> Path:
    init_data_dir(root)
    for h in range(HOURS):
        for table, rows in _hour_rows(h).items():
            write_rows(data_dir=root, table=table, rows=rows)
    mark = at(SEALED * 60) + timedelta(minutes=30)
    write_watermark(data_dir=root, mark=Watermark(kafka_partition=0, watermark=mark,
                                                  applied_offset=0, open_sessions=0))
    assert len(seal_ready(data_dir=root, n_kafka_partitions=1, gap=timedelta(minutes=30))) \
        == SEALED
    pairs = read_table(data_dir=root, table="pairs").to_pylist()
    for i, (acc, agree, bar) in enumerate([(0.71, 0.78, None), (0.66, 0.62, 0.71),
                                           (0.75, 0.81, 0.71)]):
        version = f"v{i + 1:04d}"
        meta = _metadata(version, pairs, accuracy=acc, agreement=agree, bar=bar)
        (models_dir(root) / version).mkdir(parents=True)
        (models_dir(root) / version / METADATA).write_text(
            json.dumps(meta, indent=2, default=json_default))
        if meta["promoted"]:
            promote(root, version)
    assert ensure_catalog(root)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_data_dir(tmp_path_factory.mktemp("report") / "data")


@pytest.fixture(scope="module")
def page(data_dir: Path) -> Path:
    assert main(["report", "--data-dir", str(data_dir)]) == 0
    return data_dir / "report.html"


# ---------------------------------------------------------------- headless Chromium

def chromium(*args: str, tmp: Path) -> str:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def probe(page: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The page's laid-out DOM as the probe script saw it after ``load``."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    tmp = tmp_path_factory.mktemp("probe")
    html = page.read_text()
    assert report.CSP in html
    probed = html.replace(report.CSP, report.CSP + "; script-src 'unsafe-inline'")
    probed = probed.replace("<title>", PROBE + "<title>", 1)
    (tmp / "probed.html").write_text(probed)
    dom = chromium(f"--window-size={VIEWPORT_W},{VIEWPORT_H}", "--virtual-time-budget=5000",
                   "--dump-dom", (tmp / "probed.html").as_uri(), tmp=tmp)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, flags=re.S)
    assert found, "the probe did not run: " + dom[-500:]
    result: dict[str, Any] = json.loads(found.group(1).replace("&quot;", '"')
                                        .replace("&lt;", "<").replace("&gt;", ">")
                                        .replace("&amp;", "&"))
    return result


@needs_chromium
def test_every_plot_renders_with_marks(probe: dict[str, Any]) -> None:
    plots = {p["id"]: p for p in probe["plots"]}
    assert set(plots) == set(PLOTS)
    for pid, fewest in PLOTS.items():
        p = plots[pid]
        assert p["empty"] == "false", pid
        assert p["svg"][0] > 300 and p["svg"][1] > 150, (pid, p["svg"])
        assert p["title"] and len(p["axes"]) == 2 and all(p["axes"]), (pid, p["axes"])
        sized = [m for m in p["marks"]
                 if (m[1] > 0 and m[2] > 0) or (m[0] == "polyline" and max(m[1:]) > 0)]
        assert len(sized) == len(p["marks"]) >= fewest, (pid, len(sized), len(p["marks"]))


@needs_chromium
def test_gate_thresholds_are_drawn(probe: dict[str, Any]) -> None:
    labels = {p["id"]: " | ".join(p["refs"]) for p in probe["plots"]}
    assert "promotion gate >= 0.70" in labels["model-calibration"]
    assert "no-regression bar" in labels["model-accuracy"]
    assert "chance" in labels["model-accuracy"]
    assert "min_confidence 0.5" in labels["confidence"]
    assert "no bias" in labels["length-bias"]


@needs_chromium
def test_page_fetches_nothing(probe: dict[str, Any]) -> None:
    assert probe["resources"] == []
    assert probe["violations"] == []


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """RGB rows of an 8-bit, non-interlaced RGB or RGBA PNG (Chromium's screenshots)."""
    data, pos, idat = path.read_bytes(), 8, []
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    assert depth == 8 and ctype in (2, 6) and interlace == 0
    bpp = 3 if ctype == 2 else 4
    raw, stride, prev, rows = zlib.decompress(b"".join(idat)), w * bpp, bytes(w * bpp), []
    for y in range(h):
        start = y * (stride + 1)
        prev = _unfilter(raw[start], bytearray(raw[start + 1:start + 1 + stride]), prev, bpp)
        rows.append(b"".join(prev[i:i + 3] for i in range(0, stride, bpp)))
    return w, h, rows


def _unfilter(kind: int, line: bytearray, prev: bytes, bpp: int) -> bytes:
    for i in range(len(line)) if kind else ():
        a = line[i - bpp] if i >= bpp else 0
        b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
        if kind == 1:
            line[i] = (line[i] + a) & 255
        elif kind == 2:
            line[i] = (line[i] + b) & 255
        elif kind == 3:
            line[i] = (line[i] + ((a + b) >> 1)) & 255
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return bytes(line)


@needs_chromium
def test_screenshot_shows_every_plot(page: Path, probe: dict[str, Any], tmp_path: Path) -> None:
    assert probe["height"] <= VIEWPORT_H, "the page is taller than the screenshot"
    shot = tmp_path / "report.png"
    chromium(f"--window-size={VIEWPORT_W},{VIEWPORT_H}", f"--force-device-scale-factor={SCALE}",
             f"--screenshot={shot}", page.as_uri(), tmp=tmp_path)
    w, h, rows = png_pixels(shot)
    assert (w, h) == (VIEWPORT_W * SCALE, VIEWPORT_H * SCALE)
    page_colors = Counter(px for row in rows for px in _pixels(row))
    assert len(page_colors) > 300, "blank or nearly blank screenshot"
    for p in probe["plots"]:
        x, y, pw, ph = (round(v * SCALE) for v in p["rect"])
        region = Counter(px for row in rows[y:y + ph] for px in _pixels(row[3 * x:3 * (x + pw)]))
        colored = sum(n for px, n in region.items() if max(px) - min(px) > 60)  # marks, not text
        assert len(region) > 40 and colored > 50, (p["id"], len(region), colored)


def _pixels(row: bytes) -> list[bytes]:
    return [row[i:i + 3] for i in range(0, len(row), 3)]


# ---------------------------------------------------------------- without a browser

def test_page_is_self_contained(page: Path) -> None:
    html = page.read_text()
    assert f'content="{report.CSP}"' in html
    for banned in ("<script", "<link", "<img", "<iframe", "src=", "href=", "url(", "@import",
                   "http:", "https:", "//fonts"):
        assert banned not in html, banned
    assert all(f'data-plot="{pid}"' in html for pid in PLOTS)


def test_empty_data_dir_shows_no_data_panels(tmp_path: Path) -> None:
    init_data_dir(tmp_path)
    ensure_catalog(tmp_path)
    out = report.write_report(tmp_path, tmp_path / "r.html")
    html = out.read_text()
    for pid in PLOTS:
        assert re.search(f'data-plot="{pid}" data-empty="true"', html), pid
    assert html.count("no data yet") == len(PLOTS)
    assert ensure_catalog(tmp_path), "the report left the catalog open"


def test_models_are_read_when_the_catalog_lacks_their_view(data_dir: Path,
                                                           tmp_path: Path) -> None:
    copy = shutil.copytree(data_dir, tmp_path / "data")
    ensure_catalog(copy)  # views hold absolute paths: point them at the copy
    con = duckdb.connect(str(copy / CATALOG_NAME))
    con.execute("DROP VIEW models")
    con.close()
    models = report.collect(copy)["models"]
    assert [(m["version"], m["promoted"], m["current"]) for m in models] == [
        ("v0001", True, False), ("v0002", False, False), ("v0003", True, True)]


def test_collect_reads_the_views(data_dir: Path) -> None:
    d = report.collect(data_dir)
    n_pairs = sum(10 + 3 * h for h in range(HOURS))
    assert d["totals"]["pairs"] == n_pairs == sum(d["confidence"]) == sum(d["length_diff"][1])
    assert d["totals"]["sealed"] == SEALED and len(d["funnel"]) == HOURS
    assert {r[0] for r in d["rules"]} == {r for r, _ in RULES}
    assert d["refusals"][0] == ("abandoned", 4 * HOURS)


def test_cli_without_a_catalog_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--data-dir", str(tmp_path)]) == 2
    assert "is not a prefstream data dir" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_a_report_in_progress_never_blocks_the_writer(data_dir: Path, tmp_path: Path) -> None:
    """While the report reads, the worker still writes Parquet and its catalog refresh goes
    through at once (a new catalog file renamed over the one the report holds)."""
    copy = shutil.copytree(data_dir, tmp_path / "data")
    ensure_catalog(copy)
    refresh = ("import sys, time; from pathlib import Path; from prefstream.storage.catalog import "
               "ensure_catalog; t = time.monotonic(); ok = ensure_catalog(Path(sys.argv[1])); "
               "print(ok, time.monotonic() - t)")
    con = report_data.connect(copy)
    try:
        write_rows(data_dir=copy, table="pairs", rows=[pair("late-pair", minute=HOURS * 60)])
        done = subprocess.run([sys.executable, "-c", refresh, str(copy)], capture_output=True,
                              text=True, timeout=60, check=True)
    finally:
        con.close()
    ok, seconds = done.stdout.split()
    assert ok == "True" and float(seconds) < 2, done.stdout
    assert report.collect(copy)["totals"]["pairs"] == sum(10 + 3 * h for h in range(HOURS)) + 1


def test_data_is_escaped() -> None:
    fig = report.hbar("x", "<b>t</b>", [("<script>alert(1)</script>", 1, "<i>1</i>")],
                      xlabel="a&b", ylabel="y", caption="c")
    assert "<script" not in fig and "<i>" not in fig and "<b>" not in fig
    assert "&lt;script&gt;" in fig and "a&amp;b" in fig


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (0, 7), (0, 4868), (-137.5, 142.5), (0, 0.3)])
def test_ticks_cover_the_range_in_round_steps(lo: float, hi: float) -> None:
    ticks = charts.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 8
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1
