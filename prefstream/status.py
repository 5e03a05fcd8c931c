"""``prefstream status --data-dir D [--json]``: what a data dir holds, read without locking anyone.

Partitions, the manifest and the watermark files are read through ``storage.files``; row counts
through an in-memory DuckDB over the live Parquet files (``storage.catalog.live_scan_sql``), so
``prefstream.duckdb`` is never opened: the worker can always rewrite its views and readers are
never blocked. Model versions come from the registry's ``metadata.json`` files.

Exit codes: 0 a report was printed; 2 the folder is not a prefstream data dir.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb

from prefstream.datadir import DATA_DIR_ENV, check_data_dir, default_data_dir
from prefstream.schemas.manifest import ManifestRow
from prefstream.storage.catalog import CATALOG_NAME, live_scan_sql
from prefstream.storage.files import SCHEMA_DIR, Watermark, read_watermarks, sealed_partitions
from prefstream.storage.partitions import partition_bounds
from prefstream.storage.quarantine import quarantined
from prefstream.storage.tables import SEALED_TABLES, SIDE_TABLES, TABLES
from prefstream.trainer.registry import current_version, list_versions, read_metadata

#: what varies inside one cause: quoted values, numbers
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|[0-9]+")


def dead_letter_cause(reason: str) -> str:
    """A dead letter's cause, to group by: the failing field (``ts``, ``impression.position``);
    for an error of the whole message (pydantic's ``<root>``) the first clause of the error
    (``Invalid JSON``); otherwise the reason. Quoted values and numbers become ``N``."""
    first = reason.split(";", 1)[0].strip()
    field, sep, message = first.partition(":")
    if not sep:
        return _VARYING.sub("N", first)
    if field != "<root>":
        return field
    clause = message.strip().split(": ", 1)[0].split(",", 1)[0].strip()
    return _VARYING.sub("N", clause) or "not an event"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="state of a data dir: partitions, rows, watermarks, "
                              "dead letters, models")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help=f"the worker's data dir [env: {DATA_DIR_ENV}] [default: prefstream-data]")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    report = collect(args.data_dir)
    print(json.dumps(report, indent=2, default=str) if args.json else format_text(report))
    return 0


def collect(data_dir: Path, *, now: datetime | None = None) -> dict[str, Any]:
    """The whole report as a JSON-ready dict (datetimes stay datetimes)."""
    check_data_dir(data_dir)
    now = now or datetime.now(timezone.utc)
    marks = read_watermarks(data_dir)
    low = min((m.watermark for m in marks.values()), default=None)
    con = duckdb.connect()  # in memory: prefstream.duckdb is never opened, so never locked
    try:
        counts = {t: dict(_query(con, data_dir, t, "partition, count(*)", "partition"))
                  for t in TABLES}
        per_kafka = {t: dict(_query(con, data_dir, t, "kafka_partition, count(*)",
                                    "kafka_partition")) for t in ("sessions", *SIDE_TABLES)}
        reasons = _query(con, data_dir, "dead_letters", "reason, count(*)", "1")
    finally:
        con.close()
    kinds: dict[str, int] = {}
    for reason, n in reasons:
        kinds[dead_letter_cause(reason)] = kinds.get(dead_letter_cause(reason), 0) + n
    return {
        "data_dir": str(data_dir.resolve()),
        "catalog": (data_dir / CATALOG_NAME).exists(),
        "now": now,
        "partitions": _partitions(data_dir, counts, low, now),
        "rows": {t: sum(counts[t].values()) for t in TABLES},
        "kafka_partitions": _kafka(marks, per_kafka),
        "dead_letters": {"total": sum(counts["dead_letters"].values()),
                         "by_kind": dict(sorted(kinds.items(), key=lambda k: (-k[1], k[0])))},
        "late_events": sum(counts["late_events"].values()),
        "models": _models(data_dir),
        "quarantined": [str(f.relative_to(data_dir)) for f in quarantined(data_dir)],
    }


def _query(con: duckdb.DuckDBPyConnection, data_dir: Path, table: str, select: str,
           group: str) -> list[tuple[Any, ...]]:
    """``SELECT {select} FROM <table, one row per id> GROUP BY {group}``; no files: no rows.
    The live files are listed first (no glob): the worker may compact while this runs."""
    scan = live_scan_sql(data_dir, table)
    if scan is None:
        return []
    sql = f"SELECT {select} FROM ({scan}) GROUP BY {group} ORDER BY 1"
    return con.execute(sql).fetchall()


def _partition_names(data_dir: Path) -> set[str]:
    """Event-time partitions holding files of any sealed table (sealed or not)."""
    return {p.name for t in SEALED_TABLES if (data_dir / t).is_dir()
            for p in (data_dir / t).iterdir() if p.is_dir() and p.name != SCHEMA_DIR}


def _partitions(data_dir: Path, counts: dict[str, dict[str, int]], low: datetime | None,
                now: datetime) -> dict[str, Any]:
    manifest = sealed_partitions(data_dir)
    sealed = {r.partition for r in manifest}
    hours = _partition_hours(manifest)
    unsealed = []
    for name in sorted(_partition_names(data_dir) - sealed):
        start, end = partition_bounds(name, hours=hours)
        unsealed.append({
            "partition": name, "start": start, "end": end,
            "age_s": round((now - end).total_seconds(), 1),
            "low_watermark_past_end_s": None if low is None else (low - end).total_seconds(),
            "rows": {t: counts[t].get(name, 0) for t in SEALED_TABLES},
        })
    return {
        "total": len(sealed) + len(unsealed), "sealed": len(sealed), "unsealed": len(unsealed),
        "partition_hours": hours,
        "oldest_sealed": manifest[0].partition if manifest else None,
        "newest_sealed": manifest[-1].partition if manifest else None,
        "last_sealed_at": max((r.sealed_at for r in manifest), default=None),
        "low_watermark": low, "unsealed_partitions": unsealed,
    }


def _partition_hours(manifest: list[ManifestRow]) -> int:
    """Hours per partition, from a sealed partition's bounds (1, the default, before any seal)."""
    if not manifest:
        return 1
    return int((manifest[-1].end - manifest[-1].start) / timedelta(hours=1))


def _kafka(marks: dict[int, Watermark], per: dict[str, dict[int, int]]) -> list[dict[str, Any]]:
    """Per Kafka partition: watermark, applied offset, open sessions, and what it stored."""
    out = []
    for kp in sorted(set(marks) | {k for v in per.values() for k in v}):
        mark = marks.get(kp)
        out.append({
            "kafka_partition": kp,
            "watermark": mark.watermark if mark else None,
            "applied_offset": mark.applied_offset if mark else None,
            "open_sessions": mark.open_sessions if mark else None,
            "closed_sessions": per["sessions"].get(kp, 0),
            "dead_letters": per["dead_letters"].get(kp, 0),
            "late_events": per["late_events"].get(kp, 0),
        })
    return out


def _model_summary(meta: dict[str, Any], current: str | None) -> dict[str, Any]:
    """The key facts of one version's metadata (the same columns as the ``models`` view)."""
    metrics, gates = meta.get("metrics") or {}, meta.get("gates") or {}
    held_out = metrics.get("eval") or {}
    return {
        "version": meta.get("version"), "created_at": meta.get("created_at"),
        "promoted": meta.get("promoted"), "is_current": meta.get("version") == current,
        "cutoff": meta.get("cutoff"), "n_train": meta.get("n_train"),
        "n_eval": meta.get("n_eval"),
        "heldout_accuracy": held_out.get("accuracy"),
        "length_matched_accuracy": (held_out.get("length_matched") or {}).get("accuracy"),
        "mean_margin": held_out.get("mean_margin"),
        "calibration_agreement": (gates.get("calibration") or {}).get("agreement"),
        "probe_raise_rate": (metrics.get("probes") or {}).get("overall_rate"),
        "reasons": meta.get("reasons", []),
    }


def _models(data_dir: Path) -> dict[str, Any]:
    versions, current = list_versions(data_dir), current_version(data_dir)
    latest = _model_summary(read_metadata(data_dir, versions[-1]), current) if versions else None
    cur = None
    if current is not None and current in versions:
        cur = _model_summary(read_metadata(data_dir, current), current)
    return {"versions": len(versions), "current_version": current, "current": cur,
            "latest": latest}


def _ago(seconds: float) -> str:
    """``3h 05m ago`` / ``in 12m`` from seconds before now."""
    s = abs(int(seconds))
    text = f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"
    return f"{text} ago" if seconds >= 0 else f"in {text}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _model_line(label: str, m: dict[str, Any]) -> str:
    state = "promoted" if m["promoted"] else "not promoted"
    return (f"  {label:<8} {m['version']} ({state}, created {_fmt(m['created_at'])}): "
            f"held-out acc {_fmt(m['heldout_accuracy'])}, length-matched "
            f"{_fmt(m['length_matched_accuracy'])}, calibration "
            f"{_fmt(m['calibration_agreement'])}, probes raise {_fmt(m['probe_raise_rate'])}, "
            f"{m['n_train']} train / {m['n_eval']} eval pairs")


def format_text(r: dict[str, Any]) -> str:
    """The report for a terminal."""
    p, lines = r["partitions"], [f"data dir     {r['data_dir']}"]
    lines.append(f"partitions   {p['total']} ({p['sealed']} sealed, {p['unsealed']} unsealed); "
                 f"sealed {_fmt(p['oldest_sealed'])} .. {_fmt(p['newest_sealed'])}, last sealed "
                 f"at {_fmt(p['last_sealed_at'])}; lowest watermark {_fmt(p['low_watermark'])}")
    for u in p["unsealed_partitions"]:
        past = u["low_watermark_past_end_s"]
        side = "past" if past is not None and past >= 0 else "before"
        wm = "no watermark yet" if past is None else \
            f"lowest watermark {abs(past) / 60:.0f} min {side} its end"
        when = f"ended {_ago(u['age_s'])}" if u["age_s"] >= 0 else \
            f"ends {_ago(u['age_s'])}, still filling"
        lines.append(f"  unsealed {u['partition']}  {when}, {wm}; "
                     + ", ".join(f"{t} {n}" for t, n in u["rows"].items()))
    lines.append("rows         " + ", ".join(f"{t} {n}" for t, n in r["rows"].items()))
    lines.append("kafka        " + ("no watermark files yet" if not r["kafka_partitions"] else ""))
    for k in r["kafka_partitions"]:
        lines.append(f"  p{k['kafka_partition']:<3} watermark {_fmt(k['watermark'])}, offset "
                     f"{_fmt(k['applied_offset'])}, open sessions {_fmt(k['open_sessions'])}, "
                     f"closed {k['closed_sessions']}, dead letters {k['dead_letters']}, "
                     f"late {k['late_events']}")
    kinds = ", ".join(f"{kind} {n}" for kind, n in r["dead_letters"]["by_kind"].items())
    lines.append(f"dead letters {r['dead_letters']['total']}" + (f" ({kinds})" if kinds else ""))
    lines.append(f"late events  {r['late_events']}")
    if r.get("quarantined"):  # storage.quarantine: damaged files the worker set aside
        lines.append(f"quarantine   {len(r['quarantined'])} damaged file(s) set aside, never "
                     f"deleted: {', '.join(r['quarantined'])}")
    models = r["models"]
    lines.append(f"models       {models['versions']} version(s)")
    if models["current"]:
        lines.append(_model_line("current", models["current"]))
    if models["latest"] and not models["latest"]["is_current"]:
        lines.append(_model_line("latest", models["latest"]))
        lines += [f"           {reason}" for reason in models["latest"]["reasons"]]
    return "\n".join(line.rstrip() for line in lines)
