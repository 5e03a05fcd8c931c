"""``prefstream demo``: the whole product on one machine, end to end.

Starts the embedded broker, a worker process, produces the built-in synthetic traffic, waits until
every session closed and its rows are stored, then prints the funnel read back from DuckDB and
how many stored pairs agree with the generator's ground truth. Finally one trainer cycle runs on
the sealed partitions (unless ``--no-train``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prefstream.datadir import DEFAULT_DATA_DIR, HINT, check_writable
from prefstream.errors import PrefstreamError, StorageError
from prefstream.settings import Settings
from prefstream.sim.interrupt import STOP_DEADLINE_S, stop_by_deadline
from prefstream.sim.traffic import Traffic, TrafficConfig, generate_traffic, prefers
from prefstream.status import dead_letter_cause
from prefstream.storage.catalog import connect_readonly, ensure_catalog
from prefstream.storage.files import Watermark, read_watermarks
from prefstream.streams.broker import ends_with_parent, free_port
from prefstream.streams.producer import FeedbackProducer
from prefstream.streams.worker.run import OWNER_ONLY_UMASK, broker_for, prepare

#: demo timing: seconds instead of production minutes so the run ends quickly
DEMO_ENV = {
    "PREFSTREAM_IDLE_S": "2",
    "PREFSTREAM_TICK_INTERVAL_S": "1",
    "PREFSTREAM_FLUSH_INTERVAL_S": "1",
    "PREFSTREAM_REBALANCE_TIMEOUT_S": "3",
    # Tansu answers a new member's first JoinGroup only after about half the session timeout
    # (measured: 23 s with the default 45 s, 3 s with 6 s); heartbeats still go every second
    "PREFSTREAM_SESSION_TIMEOUT_S": "6",
}


#: marks a data dir the demo made: a later demo may replace it, nobody else's data
DEMO_MARK = ".prefstream-demo"


def fresh_demo_dir(data_dir: Path) -> None:
    """Make room for a demo run: a previous demo's data dir is removed (its broker is gone,
    so its offsets and state would not match the new run's); a folder holding anything else
    is refused (:class:`StorageError`, exit 2), never touched."""
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        return
    if not (data_dir / DEMO_MARK).exists():
        raise StorageError(f"{data_dir} already holds data the demo did not write: give the "
                           f"demo an empty or new folder {HINT}")
    print(f"demo: replacing the previous demo's data in {data_dir}", file=sys.stderr)
    shutil.rmtree(data_dir)


def traffic_end(now: datetime, settings: Settings) -> datetime:
    """Latest event time such that every demo partition can seal once input goes idle."""
    hours = settings.partition_hours
    settle = now - timedelta(seconds=settings.gap_s + settings.grace_s) - timedelta(hours=hours)
    floored = settle.replace(minute=0, second=0, microsecond=0)
    return floored - timedelta(hours=floored.hour % hours, seconds=1)


def start_worker(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """The worker in its own session: a Ctrl-C reaches the demo alone, which stops it."""
    env = {**os.environ, **settings.as_env()}  # settings already hold the demo timings
    loglevel = os.environ.get("PREFSTREAM_DEMO_WORKER_LOGLEVEL", "warning")
    cmd = [sys.executable, "-m", "prefstream.cli", "worker", "--loglevel", loglevel]
    with open(log_path, "ab") as log_file:
        # a demo killed outright stops its worker too (SIGTERM: a clean stop, its last batch
        # replayed by the next run's worker if any)
        return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=ends_with_parent(signal.SIGTERM))


def produce(settings: Settings, traffic: Traffic) -> None:
    producer = FeedbackProducer(str(settings.kafka_bootstrap), topic=settings.events_topic,
                                max_block_ms=10_000, security=settings.kafka_security())
    try:
        for key, value in tqdm(traffic.messages, desc="producing", unit="ev", file=sys.stderr,
                               leave=False):
            producer.send_raw(key, value)
        producer.flush()
    finally:
        producer.close(timeout_s=1)
    if producer.failed:
        raise PrefstreamError(f"{producer.failed} events could not be sent: {producer.errors[:3]}")


def end_offsets(settings: Settings) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             enable_auto_commit=False,  # no group: nothing to commit
                             **settings.kafka_client_config())
    try:
        tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def wait_until_drained(settings: Settings, targets: dict[int, int], worker: subprocess.Popen[bytes],
                       timeout_s: float) -> None:
    """Until every partition's flushes cover ``targets``, no session is open and every
    watermark has gone idle past the moment of this call (so all partitions that can seal have).
    """
    deadline = time.monotonic() + timeout_s
    idle_mark = datetime.now(timezone.utc) - timedelta(seconds=settings.grace_s)
    with tqdm(total=sum(targets.values()), desc="stored", unit="ev", file=sys.stderr,
              leave=False) as bar:
        while True:
            marks = read_watermarks(settings.data_dir)
            done = {p: min(targets[p], marks[p].applied_offset + 1) if p in marks else 0
                    for p in targets}
            bar.update(sum(done.values()) - bar.n)
            if drained(marks, targets, idle_mark):
                return
            if worker.poll() is not None:
                raise PrefstreamError(f"worker exited with {worker.returncode}; see its log")
            if time.monotonic() > deadline:
                raise PrefstreamError(f"worker did not drain in {timeout_s:.0f}s")
            time.sleep(0.5)


def drained(marks: dict[int, Watermark], targets: dict[int, int], idle_mark: datetime) -> bool:
    """Every partition's flushes cover ``targets``, no session is open, and its watermark is
    idle past ``idle_mark`` (the ticks that move it come after every event in the log)."""
    return all(
        p in marks and marks[p].applied_offset + 1 >= targets[p]
        and marks[p].open_sessions == 0 and marks[p].watermark >= idle_mark
        for p in targets
    )


def scrape(settings: Settings) -> dict[str, float]:
    """The worker's /metrics as ``{'name{labels}': value}`` (empty if it is not serving)."""
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples = (line.rsplit(" ", 1) for line in text.splitlines()
               if line.strip() and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def stop(worker: subprocess.Popen[bytes], *, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s`` (a few seconds when the user interrupted)."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def funnel(data_dir: Path) -> dict[str, Any]:
    """Counts read back from the DuckDB views (the same numbers an analyst gets)."""
    con = connect_readonly(data_dir)
    try:
        one = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
        by = lambda sql: dict(con.execute(sql).fetchall())  # noqa: E731
        return {
            "events_accepted": int(one("SELECT coalesce(sum(n_events), 0) FROM sessions")),
            "duplicates_ignored": int(one("SELECT coalesce(sum(n_duplicates), 0) FROM sessions")),
            "dead_lettered": one("SELECT count(*) FROM dead_letters"),
            "late": one("SELECT count(*) FROM late_events"),
            "sessions": one("SELECT count(*) FROM sessions"),
            "candidates": int(one("SELECT coalesce(sum(n_candidates), 0) FROM sessions")),
            "pairs": one("SELECT count(*) FROM pairs"),
            "pairs_by_rule": by("SELECT rule, count(*) FROM pairs GROUP BY 1 ORDER BY 2 DESC"),
            "ties": one("SELECT count(*) FROM ties"),
            "unpaired": one("SELECT count(*) FROM unpaired"),
            "refusals_by_reason": by(
                "SELECT reason, count(*) FROM refusals GROUP BY 1 ORDER BY 2 DESC"),
            "partitions": one("SELECT count(*) FROM partitions"),
            "partitions_sealed": one("SELECT count(*) FROM partitions WHERE sealed"),
            "dead_letter_reasons": _causes(by(
                "SELECT reason, count(*) FROM dead_letters GROUP BY 1")),
        }
    finally:
        con.close()


def _causes(reasons: dict[str, int]) -> dict[str, int]:
    """Dead-letter counts by cause (``prefstream status`` groups them the same way)."""
    causes: dict[str, int] = {}
    for reason, n in reasons.items():
        causes[dead_letter_cause(reason)] = causes.get(dead_letter_cause(reason), 0) + n
    return dict(sorted(causes.items(), key=lambda c: (-c[1], c[0])))


def agreement(data_dir: Path, traffic: Traffic) -> dict[str, Any]:
    """Share of stored pairs whose chosen answer has the higher latent quality."""
    con = connect_readonly(data_dir)
    try:
        rows = con.execute(
            "SELECT rule, chosen_response_id, rejected_response_id FROM pairs").fetchall()
    finally:
        con.close()
    by_rule: dict[str, list[int]] = {}
    for rule, chosen, rejected in rows:
        verdict = prefers(traffic.quality, chosen, rejected)
        if verdict is not None:
            by_rule.setdefault(rule, []).append(int(verdict))
    scored = [v for vs in by_rule.values() for v in vs]
    return {
        "pairs_scored": len(scored),
        "agree": sum(scored),
        "precision": round(sum(scored) / len(scored), 4) if scored else None,
        "precision_by_rule": {r: round(sum(v) / len(v), 4) for r, v in sorted(by_rule.items())},
    }


def run_demo(args: argparse.Namespace) -> int:
    """The demo; Ctrl-C stops it within seconds in any phase (``KeyboardInterrupt``, exit 130
    in ``main``; by force at the deadline of ``sim.interrupt`` if a library swallowed it) and
    promotes nothing."""
    with stop_by_deadline(f"prefstream demo: interrupted (stopped by force: still running "
                          f"{STOP_DEADLINE_S:.0f} s after Ctrl-C)"):
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    os.umask(OWNER_ONLY_UMASK)  # logs, catalog and models in the data dir: owner-only
    data_dir = Path(args.data_dir)
    check_writable(data_dir, needed_by="prefstream demo")
    fresh_demo_dir(data_dir)
    settings = Settings(**{"data_dir": data_dir, "metrics_port": free_port(),
                           **_demo_overrides()})
    end = traffic_end(datetime.now(timezone.utc), settings)
    traffic = generate_traffic(TrafficConfig(n_events=args.events, seed=args.seed, end=end))
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (data_dir / DEMO_MARK).touch()
    print(f"demo: data in {data_dir.resolve()}", file=sys.stderr, flush=True)
    worker_metrics = _ingest(settings, traffic, args.timeout)
    ensure_catalog(data_dir)
    summary = {"traffic": {"seed": args.seed, "events": args.events, "end": end.isoformat()},
               "events_produced": len(traffic.messages), **funnel(data_dir),
               "generator": {k: traffic.counts[k] for k in ("valid", "duplicates", "bad", "late")},
               "ground_truth": agreement(data_dir, traffic),
               "worker_metrics": {k: v for k, v in worker_metrics.items()
                                  if k.startswith(("prefstream_events_total",
                                                   "prefstream_pairs_total"))},
               "ingest_seconds": round(time.monotonic() - started, 1)}
    summary["balanced"] = summary["events_produced"] == (
        summary["events_accepted"] + summary["duplicates_ignored"] + summary["dead_lettered"]
        + summary["late"])
    if not args.no_train:
        summary["training"] = _train(data_dir, traffic)
    print_summary(summary, as_json=args.json)
    print(next_steps(data_dir), file=sys.stderr)
    return 0 if summary["balanced"] else 1


def _ingest(settings: Settings, traffic: Traffic, timeout_s: float) -> dict[str, float]:
    """Broker, worker, traffic, until stored; the worker's metrics at the end."""
    data_dir = settings.data_dir
    with broker_for(settings, log_path=data_dir / "broker.log") as settings:
        prepare(settings)
        worker = start_worker(settings, data_dir / "worker.log")
        patience = 30.0
        try:
            produce(settings, traffic)
            targets = end_offsets(settings)
            wait_until_drained(settings, targets, worker, timeout_s)
            return scrape(settings)
        except KeyboardInterrupt:
            patience = 3.0  # the user is waiting: the worker's state need not survive
            raise
        finally:
            stop(worker, timeout_s=patience)


def next_steps(data_dir: Path) -> str:
    """What to try after the demo, with this data dir (every command's default when it is
    ``prefstream-data``)."""
    flag = "" if data_dir == DEFAULT_DATA_DIR else f" --data-dir {data_dir}"
    return "\n".join([
        f"demo: data in {data_dir.resolve()} (docs/first-hour.md). Next:",
        f"  prefstream status{flag}                 # partitions, rows, models",
        f"  cd {data_dir} && duckdb -readonly prefstream.duckdb "
        '"SELECT rule, count(*) FROM pairs GROUP BY 1"',
        f"  prefstream score{flag} --prompt 'How do I reverse a list?' --answer 'reversed(xs)'",
        f"  prefstream report{flag}                 # HTML plots",
    ])


def _demo_overrides() -> dict[str, Any]:
    return {k.removeprefix("PREFSTREAM_").lower(): v for k, v in DEMO_ENV.items()}


def _train(data_dir: Path, traffic: Traffic) -> dict[str, Any]:
    """One trainer cycle; Ctrl-C (SIGINT) or SIGTERM stops it at the next training step with
    nothing written, then ends the demo as an interrupt."""
    try:
        from prefstream.trainer import Interrupted
        from prefstream.trainer.control import stop_on_signals
        from prefstream.trainer.demo import train_after_demo
    except ImportError as exc:
        return {"skipped": f"trainer unavailable: {exc}"}
    with stop_on_signals() as stop:
        try:
            result = train_after_demo(data_dir, traffic, should_stop=stop.is_set)
        except Interrupted:
            raise KeyboardInterrupt from None
    if stop.is_set():  # a version was already being registered: it stands, the demo stops
        raise KeyboardInterrupt
    return result


def print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<28} {v}")
        else:
            print(f"{key:<30} {value}")
