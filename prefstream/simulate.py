"""``prefstream simulate``: simulated feedback traffic into Kafka, with its ground truth on disk.

One generator (:func:`prefstream.sim.traffic.generate_traffic`), two content sources: the built-in
synthetic texts, or a preference JSONL file (``--source``; prompt/chosen/rejected rows or HH-RLHF
dialogues). The run's ground truth (every answer's latent quality, the traffic config and the
generator's counts) goes to a JSON file (``--truth``, default ``<data-dir>/simulation-truth.json``)
and the source rows held out of the traffic go next to it as explicit-label JSONL
(``<truth stem>.holdout.jsonl``), so ``prefstream evaluate`` can score the pairs and audit a
reward model later.

Without a Kafka bootstrap the embedded broker is started, and then a worker has to run in this
process's lifetime: ``--run-worker`` is implied. With ``--run-worker`` the traffic is produced
first and a worker subprocess started after it, which consumes the traffic into the data dir;
the command waits until it drained (the same functions as ``prefstream demo``), then prints the
funnel read back from DuckDB.

The simulator cannot lie about what was stored: ``balanced`` is true only when every produced
event is accounted for (accepted, duplicate, dead-lettered or late) *and* the stored late events
exceed the injected ones by at most ``late_tolerance`` (otherwise the exit code is 1); excess late
events are a WARNING with counts. A worker's idle clock follows the wall clock (after
``PREFSTREAM_IDLE_S`` without events), which would make traffic timed hours ago late: the worker
starts only after the last event is in the log, so its clock moves by event times until then.
With ``--bootstrap`` and no ``--run-worker`` (someone else's worker), a watermark in the data dir
that is already past the traffic's first event makes the command refuse before producing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefstream.args import settings_from
from prefstream.errors import ConfigError
from prefstream.settings import Settings
from prefstream.sim.content import write_labels
from prefstream.sim.demo import (
    _demo_overrides,
    agreement,
    end_offsets,
    funnel,
    print_summary,
    produce,
    start_worker,
    stop,
    traffic_end,
    wait_until_drained,
)
from prefstream.sim.traffic import Traffic, TrafficConfig, generate_traffic
from prefstream.storage.catalog import ensure_catalog
from prefstream.storage.files import read_watermarks
from prefstream.streams.worker.run import broker_for, prepare
from prefstream.streams.worker.topics import ensure_topics

log = logging.getLogger(__name__)

TRUTH_FILE = "simulation-truth.json"
TRUTH_FORMAT = "prefstream-simulation-truth/1"
ENV_PREFIX = "PREFSTREAM_SIMULATE_"
SETTINGS_NAMES = ("kafka_bootstrap", "data_dir")
LATE_TOLERANCE_MIN = 20  # stored late events beyond the injected ones a run may show...
LATE_TOLERANCE_SHARE = 0.01  # ...or this share of the produced events, whichever is larger


class SimulateConfig(BaseSettings):
    """What to simulate; each field reads ``PREFSTREAM_SIMULATE_<FIELD>``, flags override."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    source: Path | None = Field(None, description="Preference JSONL (.gz ok): prompt/chosen/"
                                "rejected or HH-RLHF chosen/rejected dialogues; unset = the "
                                "built-in synthetic texts.")
    events: int = Field(5000, ge=1, description="Events to produce (bad input included).")
    seed: int = Field(0, description="Seed of the traffic and of the holdout split.")
    hours: int = Field(24, ge=2, le=24 * 30, description="Event-time span, so partitions seal.")
    prefer_prob: float = Field(0.8, ge=0, le=1, description="How often the simulated user "
                               "prefers the truly chosen answer of a source row.")
    holdout: float = Field(0.2, ge=0, lt=1, description="Share of the source's prompts never "
                           "simulated, written as explicit labels.")
    truth: Path | None = Field(None, description="Ground-truth JSON; unset = "
                               f"<data-dir>/{TRUTH_FILE}.")
    run_worker: bool = Field(False, description="Also run a worker until the traffic is stored.")
    timeout_s: float = Field(900.0, gt=0, description="Give up waiting for the worker after this.")

    def traffic(self, end: datetime) -> TrafficConfig:
        return TrafficConfig(n_events=self.events, seed=self.seed, end=end, hours=self.hours,
                             source=self.source, prefer_prob=self.prefer_prob,
                             holdout=self.holdout)


def holdout_path(truth: Path) -> Path:
    """Where the held-out explicit labels of a truth file live (next to it)."""
    return truth.with_name(f"{truth.stem}.holdout.jsonl")


def truth_record(config: TrafficConfig, traffic: Traffic, holdout: Path | None) -> dict[str, Any]:
    """The ground truth of one run as a JSON-serialisable dict."""
    return {
        "format": TRUTH_FORMAT,
        "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "events_produced": len(traffic.messages),
        "counts": traffic.counts,
        "bad_reasons": traffic.bad_reasons,
        "skipped_source_rows": traffic.skipped,
        "holdout_labels": holdout.name if holdout is not None else None,
        "n_holdout": len(traffic.holdout),
        "quality": traffic.quality,
    }


def write_truth(path: Path, config: TrafficConfig, traffic: Traffic) -> dict[str, Any]:
    """Write the truth JSON and, when rows were held out, the explicit labels next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = holdout_path(path) if traffic.holdout else None
    if labels is not None:
        write_labels(labels, traffic.holdout)
    record = truth_record(config, traffic, labels)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return record


def read_truth(path: Path) -> dict[str, Any]:
    """A truth file written by :func:`write_truth`."""
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read simulation truth {path}: {exc}") from exc
    if record.get("format") != TRUTH_FORMAT:
        raise ConfigError(f"{path} is not a simulation truth file ({TRUTH_FORMAT})")
    return record


def simulate_config(args: argparse.Namespace) -> SimulateConfig:
    """Environment variables overridden by the flags given on the command line."""
    return SimulateConfig(**{k: v for k, v in vars(args).items()
                             if k in SimulateConfig.model_fields and v is not None})


def run_simulate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    sim = simulate_config(args)
    settings = settings_from(args, SETTINGS_NAMES, **_demo_overrides())
    run_worker = sim.run_worker or not settings.kafka_bootstrap
    if run_worker and not sim.run_worker:
        log.info("no Kafka bootstrap: embedded broker, so a worker runs too (--run-worker)")
    end = traffic_end(datetime.now(timezone.utc), settings)
    if not run_worker:
        refuse_if_late(Path(settings.data_dir), end - timedelta(hours=sim.hours))
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    traffic, summary = _generate(sim, settings, end)
    if run_worker:
        summary.update(_with_worker(settings, traffic, sim.timeout_s))
    else:
        _produce_only(settings, traffic)
    summary["seconds"] = round(time.monotonic() - started, 1)
    print_summary(summary, as_json=args.json)
    return 0 if summary.get("balanced", True) else 1


def _generate(sim: SimulateConfig, settings: Settings, end: datetime
              ) -> tuple[Traffic, dict[str, Any]]:
    """Generate the traffic, write its truth; the traffic and the first part of the summary."""
    config = sim.traffic(end)
    log.info("generating %d events (%s)", config.n_events, config.source or "synthetic texts")
    traffic = generate_traffic(config)
    truth = sim.truth or Path(settings.data_dir) / TRUTH_FILE
    record = write_truth(truth, config, traffic)
    return traffic, _summary(config, traffic, truth, record)


def refuse_if_late(data_dir: Path, first: datetime) -> None:
    """``ConfigError`` when a worker's watermark in ``data_dir`` already passed ``first``: a
    live worker would store the whole run as late events."""
    marks = read_watermarks(data_dir) if data_dir.is_dir() else {}
    ahead = {p: m.watermark for p, m in marks.items() if m.watermark > first}
    if ahead:
        p, mark = max(ahead.items(), key=lambda kv: kv[1])
        raise ConfigError(
            f"the worker's watermark of partition {p} ({mark.isoformat()}) is past the "
            f"traffic's first event ({first.isoformat()}): every event would be stored as late. "
            "Stop that worker and run simulate with --run-worker on a fresh --data-dir, or "
            "produce first and start the worker after")
    if not marks:
        log.warning("no worker watermark in %s: if a worker is already running on the topic, "
                    "its idle clock follows the wall clock and this traffic (from %s) will be "
                    "stored as late; start the worker after this command", data_dir,
                    first.isoformat())


def late_check(produced: int, injected: int, stored: int) -> dict[str, Any]:
    """Whether the stored late events are explained by the injected ones (within tolerance)."""
    tolerance = max(LATE_TOLERANCE_MIN, round(LATE_TOLERANCE_SHARE * produced))
    excess = stored - injected
    ok = excess <= tolerance
    if excess > tolerance // 2:
        log.warning("%d events stored as late, %d injected: %d more than injected (tolerance "
                    "%d)%s", stored, injected, excess, tolerance,
                    "" if ok else ": events were lost to lateness, the run is not balanced")
    return {"stored": stored, "injected": injected, "excess": excess, "tolerance": tolerance,
            "ok": ok}


def _summary(config: TrafficConfig, traffic: Traffic, truth: Path, record: dict[str, Any]
             ) -> dict[str, Any]:
    counts = traffic.counts
    source = {k: counts.get(f"source_{k}", 0)
              for k in ("rows", "valid", "skipped", "holdout", "simulated", "passes")}
    return {
        "traffic": {"seed": config.seed, "events": config.n_events, "hours": config.hours,
                    "end": config.end.isoformat(), "source": str(config.source or "synthetic"),
                    "prefer_prob": config.prefer_prob if config.source else None},
        "events_produced": len(traffic.messages),
        "generator": {k: counts[k] for k in ("valid", "duplicates", "bad", "late", "sessions",
                                             "requests", "responses")},
        "source_rows": {**source, "skipped_by_reason": traffic.skipped} if config.source else {},
        "truth": str(truth),
        "holdout_labels": (str(truth.with_name(record["holdout_labels"]))
                           if record["holdout_labels"] else None),
    }


def _with_worker(settings: Settings, traffic: Traffic, timeout_s: float) -> dict[str, Any]:
    """Start a worker, produce, wait until drained, read the funnel back.

    The traffic is produced before the worker starts: an idle worker's watermark follows the
    wall clock, and traffic timed hours ago would be late wherever a producer stall (or the
    worker's first tick) let the idle clock in between.
    """
    data_dir = Path(settings.data_dir)
    if read_watermarks(data_dir):
        log.warning("%s already holds a run: its rows are counted too", data_dir)
    with broker_for(settings, log_path=data_dir / "broker.log") as settings:
        prepare(settings)
        produce(settings, traffic)
        worker = start_worker(settings, data_dir / "worker.log")
        try:
            wait_until_drained(settings, end_offsets(settings), worker, timeout_s)
        finally:
            stop(worker)
    ensure_catalog(data_dir)
    out = {**funnel(data_dir), "ground_truth": agreement(data_dir, traffic)}
    out["late_check"] = late_check(len(traffic.messages), traffic.counts["late"], out["late"])
    accounted = len(traffic.messages) == (out["events_accepted"] + out["duplicates_ignored"]
                                          + out["dead_lettered"] + out["late"])
    out["balanced"] = accounted and out["late_check"]["ok"]
    return out


def _produce_only(settings: Settings, traffic: Traffic) -> None:
    with broker_for(settings) as settings:
        ensure_topics(settings)
        produce(settings, traffic)
    log.info("produced %d events to %s (%s)", len(traffic.messages), settings.kafka_bootstrap,
             settings.events_topic)


def register(subparsers: Any) -> None:
    """Add ``prefstream simulate``."""
    p = subparsers.add_parser("simulate", help="simulated traffic (synthetic or from a "
                              "preference file) with its ground truth; optionally a worker")
    flag = _flag_adder(p)
    flag("--source", "source", type=Path, metavar="PATH")
    flag("--events", "events", type=int, metavar="N")
    flag("--seed", "seed", type=int, metavar="S")
    flag("--hours", "hours", type=int, metavar="H")
    flag("--prefer-prob", "prefer_prob", type=float, metavar="P")
    flag("--holdout", "holdout", type=float, metavar="F")
    flag("--truth", "truth", type=Path, metavar="PATH")
    flag("--timeout", "timeout_s", type=float, metavar="SECONDS")
    p.add_argument("--run-worker", action="store_const", const=True, default=None,
                   help=f"{_help('run_worker')} [env: {ENV_PREFIX}RUN_WORKER]")
    p.add_argument("--bootstrap", dest="kafka_bootstrap", metavar="HOST:PORT",
                   help="Kafka bootstrap servers; unset = the embedded broker (implies "
                        "--run-worker) [env: PREFSTREAM_KAFKA_BOOTSTRAP]")
    data_dir = Settings.model_fields["data_dir"].default
    p.add_argument("--data-dir", dest="data_dir", metavar="D",
                   help="data dir of the worker and of the truth file "
                        f"[env: PREFSTREAM_DATA_DIR] [default: {data_dir}]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_simulate)


def _flag_adder(p: argparse.ArgumentParser) -> Any:
    def add(flag: str, name: str, **kwargs: Any) -> None:
        default = SimulateConfig.model_fields[name].default
        shown = "" if default is None else f" [default: {default}]"
        p.add_argument(flag, dest=name, default=None, help=f"{_help(name)} "
                       f"[env: {ENV_PREFIX}{name.upper()}]{shown}", **kwargs)
    return add


def _help(name: str) -> str:
    return SimulateConfig.model_fields[name].description or ""
