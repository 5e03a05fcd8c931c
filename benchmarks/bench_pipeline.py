"""Throughput, freshness and memory of the stream worker, against baselines, in one run.

    python benchmarks/bench_pipeline.py [--events 100000] [--out benchmarks/results/pipeline.json]

All contenders read the same pre-produced topic on one embedded Tansu broker, one after the
other, each in its own consumer group:

* ``aiokafka``: raw consume + ``json.loads`` in this process (the Python ceiling);
* ``faust_naive`` / ``faust_take``: a Faust agent that only parses JSON, per event / take(5000);
* ``prefstream``: the real worker (validate, sessionize, pair, store Parquet, commit), timed by
  polling its metrics endpoint from its first to its last message.

Freshness replays the synthetic traffic in real time (time compressed) and measures, per session,
the wall time from its last event being sent to its row being queryable in DuckDB. Memory is the
worker's resident set with N sessions open at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefstream.demo import scrape  # noqa: E402
from prefstream.settings import Settings  # noqa: E402
from storage.catalog import connect_readonly  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.producer import FeedbackProducer  # noqa: E402
from streams.run import prepare  # noqa: E402
from streams.traffic import TrafficConfig, generate_traffic  # noqa: E402

PARTITIONS = 4


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    producer = FeedbackProducer(bootstrap, topic=topic, max_block_ms=30_000,
                                batch_size=256 * 1024, linger_ms=20)
    started = time.perf_counter()
    for key, value in tqdm(messages, desc=f"produce {topic}", unit="ev", leave=False, disable=None):
        producer.send_raw(key, value)
    producer.flush(timeout_s=300)
    producer.close()
    return len(messages) / (time.perf_counter() - started)


async def aiokafka_rate(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="bench-aiokafka",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    seen, first = 0, 0.0
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                first = first or time.perf_counter()
                for record in records:
                    try:
                        json.loads(record.value)
                    except ValueError:
                        pass
                seen += len(records)
    finally:
        await consumer.stop()
    return n / (time.perf_counter() - first)


def faust_rate(bootstrap: str, topic: str, n: int, mode: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "naive_faust.py"),
                                 bootstrap, topic, str(n), mode, str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        try:
            proc.wait(timeout=600)
        finally:
            proc.kill()
        result = json.loads(out.read_text())
    return n / (result["last"] - result["first"])


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "prefstream.cli", "worker",
                                 "--loglevel", "warning"], env={**os.environ, **settings.as_env()},
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)


def events_seen(settings: Settings) -> float:
    return sum(v for k, v in scrape(settings).items() if k.startswith("prefstream_events_total"))


def prefstream_rate(settings: Settings, n: int, log: Path) -> dict[str, float]:
    prepare(settings)
    worker = start_worker(settings, log)
    first = last = 0.0
    try:
        with tqdm(total=n, desc="prefstream worker", unit="ev", leave=False, disable=None) as bar:
            while True:
                seen = events_seen(settings)
                now = time.perf_counter()
                if seen and not first:
                    first = now
                bar.update(int(seen) - bar.n)
                if seen >= n:
                    last = now
                    break
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited; see {log}")
                time.sleep(0.02)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    return {"events_per_s": n / (last - first), "seconds": last - first}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


Planned = list[tuple[float, bytes, bytes, str]]


def compressed(seconds: float, rate: float, seed: int = 1) -> tuple[Planned, float]:
    """Synthetic traffic of 2 hours squeezed into ``seconds``: (send offset s, key, value, sid)
    and the compression factor."""
    end = datetime(2030, 1, 1, 2, tzinfo=timezone.utc)
    traffic = generate_traffic(TrafficConfig(n_events=int(seconds * rate), seed=seed, end=end,
                                             hours=2))
    start, factor = end - timedelta(hours=2), 7200.0 / seconds
    out = []
    for key, value in traffic.messages:
        try:
            event = json.loads(value)
            offset = (datetime.fromisoformat(event["ts"]) - start).total_seconds() / factor
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            offset = out[-1][0] if out else 0.0
            out.append((offset, key, value, ""))
            continue
        out.append((offset, key, value, event["session_id"]))
    return sorted(out, key=lambda m: m[0]), factor


def freshness(settings: Settings, seconds: float, rate: float, log: Path) -> dict[str, Any]:
    plan, factor = compressed(seconds, rate)
    settings = settings.model_copy(update={
        "gap_s": 1800 / factor, "grace_s": 300 / factor, "idle_s": 2.0, "tick_interval_s": 0.5,
        "flush_interval_s": 1.0})
    prepare(settings)
    worker = start_worker(settings, log)
    time.sleep(8)  # let the worker join its group before the clock starts
    producer = FeedbackProducer(str(settings.kafka_bootstrap), topic=settings.events_topic)
    t0, last_sent, first_seen = time.time() + 1, {}, {}
    for offset, key, value, sid in tqdm(plan, desc="real-time replay", unit="ev", leave=False,
                                        disable=None):
        wait = t0 + offset - time.time()
        if wait > 0:
            time.sleep(wait)
        producer.send_raw(key, _retimed(value, t0 + offset))
        if sid:
            last_sent[sid] = time.time()
        if len(last_sent) % 50 == 0:
            _poll(settings.data_dir, first_seen)
    producer.flush()
    producer.close()
    deadline = time.time() + settings.gap_s + settings.idle_s + 30
    while time.time() < deadline and len(first_seen) < len(last_sent):
        _poll(settings.data_dir, first_seen)
        time.sleep(0.2)
    worker.terminate()
    worker.wait(timeout=60)
    lags = sorted(first_seen[s] - last_sent[s] for s in first_seen
                  if s in last_sent and first_seen[s] >= last_sent[s])
    return {"sessions": len(lags), "p50_s": _pct(lags, 50), "p95_s": _pct(lags, 95),
            "gap_s": settings.gap_s, "grace_s": settings.grace_s,
            "flush_interval_s": settings.flush_interval_s, "time_compression": factor}


def _retimed(value: bytes, wall: float) -> bytes:
    """Event time = the moment it is sent (producers stamp events as they happen)."""
    try:
        event = json.loads(value)
        event["ts"] = datetime.fromtimestamp(wall, tz=timezone.utc).isoformat()
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return value
    return json.dumps(event).encode()


def _poll(data_dir: Path, first_seen: dict[str, float]) -> None:
    try:
        con = connect_readonly(data_dir)
        ids = con.execute("SELECT DISTINCT session_id FROM sessions").fetchall()
        con.close()
    except Exception:  # the catalog is being rewritten at start-up: try again next poll
        return
    now = time.time()
    for (sid,) in ids:
        first_seen.setdefault(sid, now)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3) \
        if len(values) > 1 else round(values[0], 3)


def memory(settings: Settings, n_sessions: int, log: Path) -> dict[str, float]:
    settings = settings.model_copy(update={"gap_s": 24 * 3600.0, "max_session_duration_s":
                                           48 * 3600.0, "flush_max_events": 20_000})
    prepare(settings)
    worker = start_worker(settings, log)
    time.sleep(8)
    base = rss_mb(worker.pid)
    now = datetime.now(timezone.utc).isoformat()
    producer = FeedbackProducer(str(settings.kafka_bootstrap), topic=settings.events_topic,
                                max_block_ms=30_000, linger_ms=20)
    for i in tqdm(range(n_sessions), desc="open sessions", unit="s", leave=False, disable=None):
        sid = f"mem-{i:07d}"
        producer.send_raw(sid.encode(), json.dumps({
            "type": "impression", "event_id": f"e{i}", "session_id": sid, "user_id": f"u{i % 5000}",
            "request_id": f"r{i}", "ts": now, "response_id": f"a{i}", "prompt": "How do I sort "
            "a dict by value?", "response_text": "Use sorted(d.items(), key=lambda kv: kv[1]).",
            "position": 0, "model_version": "m1"}).encode())
    producer.flush(timeout_s=300)
    producer.close()
    while events_seen(settings) < n_sessions:
        time.sleep(0.5)
    time.sleep(3)
    open_now = sum(v for k, v in scrape(settings).items()
                   if k.startswith("prefstream_sessions_open"))
    peak = rss_mb(worker.pid)
    worker.terminate()
    worker.wait(timeout=60)
    return {"open_sessions": open_now, "rss_idle_mb": round(base, 1), "rss_mb": round(peak, 1),
            "bytes_per_session": round((peak - base) * 1024 * 1024 / max(open_now, 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--open-sessions", type=int, default=100_000)
    parser.add_argument("--freshness-seconds", type=float, default=40.0)
    parser.add_argument("--freshness-rate", type=float, default=500.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pipeline.json")
    parser.add_argument("--stages", default="throughput,freshness,memory",
                        help="comma-separated subset of throughput,freshness,memory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    results: dict[str, Any] = {"machine": machine(), "events": args.events}
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        base = Settings(kafka_bootstrap=broker.bootstrap, partitions=PARTITIONS,
                        rebalance_timeout_s=2.0, metrics_port=free_port())
        topic_settings = base.model_copy(update={"data_dir": work / "through",
                                                 "events_topic": "bench-events"})
        prepare(topic_settings)
        traffic = generate_traffic(TrafficConfig(n_events=args.events, seed=0,
                                                 end=datetime(2030, 1, 1, tzinfo=timezone.utc)))
        n = len(traffic.messages)
        stage("produce")
        results["producer_events_per_s"] = round(produce(broker.bootstrap, "bench-events",
                                                         traffic.messages))
        stage("aiokafka")
        results["aiokafka_events_per_s"] = round(asyncio.run(
            aiokafka_rate(broker.bootstrap, "bench-events", n)))
        stage("faust per event")
        results["faust_naive_events_per_s"] = round(faust_rate(broker.bootstrap, "bench-events",
                                                               n, "event"))
        stage("faust take(5000)")
        results["faust_take_events_per_s"] = round(faust_rate(broker.bootstrap, "bench-events",
                                                              n, "take"))
        stage("prefstream worker")
        full = prefstream_rate(topic_settings.model_copy(update={"app_id": "bench-full"}), n,
                               work / "worker-throughput.log")
        results["prefstream_events_per_s"] = round(full["events_per_s"])
        results["ratio_vs_faust_naive"] = round(
            full["events_per_s"] / results["faust_naive_events_per_s"], 3)
        results["ratio_vs_faust_take"] = round(
            full["events_per_s"] / results["faust_take_events_per_s"], 3)
        results["ratio_vs_aiokafka"] = round(
            full["events_per_s"] / results["aiokafka_events_per_s"], 3)
        if "freshness" not in args.stages:
            return finish(args, results)
        stage("freshness")
        results["freshness"] = freshness(
            base.model_copy(update={"data_dir": work / "fresh", "events_topic": "bench-fresh",
                                    "app_id": "bench-fresh", "metrics_port": free_port()}),
            args.freshness_seconds, args.freshness_rate, work / "worker-fresh.log")
        if "memory" not in args.stages:
            return finish(args, results)
        stage("memory")
        results["memory"] = memory(
            base.model_copy(update={"data_dir": work / "mem", "events_topic": "bench-mem",
                                    "app_id": "bench-mem", "metrics_port": free_port()}),
            args.open_sessions, work / "worker-mem.log")
    finish(args, results)


def finish(args: argparse.Namespace, results: dict[str, Any]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def stage(name: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {name}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "when": datetime.now(timezone.utc).isoformat()}


if __name__ == "__main__":
    main()
