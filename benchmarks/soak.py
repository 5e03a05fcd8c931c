"""Soak: one worker under steady load for a long time; memory, lag and dead letters over time.

    python benchmarks/soak.py [--minutes 30] [--rate 200] [--interval 10]
                              [--out benchmarks/results/soak.json]

An embedded broker, a ``prefstream worker`` process and a producer thread sending the synthetic
traffic (``prefstream.sim.traffic``: bad, late and duplicate messages included) at about ``--rate``
messages per second. Traffic comes in chunks of one minute of wall time, each ``HOURS`` of the
generator's event time compressed into that minute and moved onto the wall clock
(``freshness_memory.replay_plan``); the worker's gap and grace are compressed alike, so
sessions close and storage partitions seal as they would in production. Every ``--interval``
seconds a sample records the worker's resident memory (``/proc``), the durable lag (end offsets
minus the offsets the worker made durable, over all partitions), the worker's own lag gauge,
dead letters, late events, pairs and open sessions (its metrics endpoint).

Verdict, on the samples after ``--warmup-minutes``: memory flat (least-squares slope at most
``--max-slope-mb`` MiB per 10 minutes; judged from 5 minutes of steady samples on), lag
bounded (never above ``--max-lag`` messages), every malformed message dead-lettered once the
worker drained the topic, and no send failed. Tansu
reports a partition's end as the first offset of its last batch plus one, so lags read low by
up to one producer batch.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freshness_memory import HOURS, Send, replay_plan, retimed  # noqa: E402
from machine import LoadMonitor, command_line, machine_info, now_iso, write_result  # noqa: E402
from workers import Deadline, memory_mb, start_worker, stop_worker  # noqa: E402

from prefstream.settings import Settings  # noqa: E402
from prefstream.sim.demo import scrape  # noqa: E402
from prefstream.sim.traffic import TrafficConfig, generate_traffic  # noqa: E402
from prefstream.storage.files import read_watermarks  # noqa: E402
from prefstream.streams.broker import EmbeddedBroker, free_port  # noqa: E402
from prefstream.streams.producer import FeedbackProducer  # noqa: E402
from prefstream.streams.worker.run import prepare  # noqa: E402

CHUNK_S = 60.0  # wall seconds per generated chunk of traffic
#: a shorter steady window gives a slope but no memory verdict: one allocator step (pyarrow,
#: a compaction) over two minutes reads as a steep trend
MIN_STEADY_S = 300.0
FACTOR = HOURS * 3600 / CHUNK_S  # event-time compression


@dataclass(frozen=True)
class Sample:
    t_s: float
    rss_mb: float
    lag: int  # end offsets minus durable offsets, all partitions
    lag_gauge: int  # the worker's prefstream_lag_messages, summed (as of its last flush)
    sent: int
    send_failed: int
    bad_sent: int
    dead_letters: int
    late: int
    accepted: int
    pairs: int
    sessions_open: int


class Feeder:
    """Two threads: one generates the next chunks of traffic, one sends them on schedule."""

    def __init__(self, settings: Settings, rate: float, seed: int) -> None:
        self.rate, self.seed = rate, seed
        self.producer = FeedbackProducer(str(settings.kafka_bootstrap),
                                         topic=settings.events_topic, max_block_ms=5000)
        self.bad_sent = 0
        self.behind_s = 0.0  # the most the sender fell behind its schedule
        self.error: BaseException | None = None
        self._plans: queue.Queue[list[tuple[Send, bool]]] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(fn,), daemon=True)
                         for fn in (self._generate, self._send)]

    def start(self) -> Feeder:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        if self._stop.is_set() and not any(t.is_alive() for t in self._threads):
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.producer.flush(timeout_s=60)
        self.producer.close()

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # the sampler reports it and ends the run
            self.error = exc
            self._stop.set()

    def _generate(self) -> None:
        for k in itertools.count():
            end = datetime(2030, 1, 1, HOURS, tzinfo=timezone.utc)  # remapped onto the wall clock
            traffic = generate_traffic(TrafficConfig(
                n_events=round(self.rate * CHUNK_S), seed=self.seed + k, end=end, hours=HOURS))
            plan = replay_plan(traffic, end - timedelta(hours=HOURS), FACTOR)
            chunk = [(send, label.startswith("bad:"))
                     for send, label in zip(plan, traffic.labels, strict=True)]
            while not self._stop.is_set():
                try:
                    self._plans.put(chunk, timeout=1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set():
                return

    def _send(self) -> None:
        t0 = time.time() + 1.0
        while not self._stop.is_set():
            chunk = self._plans.get()
            for send, bad in chunk:
                wait = t0 + send.at - time.time()
                if wait > 0:
                    if self._stop.wait(wait):
                        return
                else:
                    self.behind_s = max(self.behind_s, -wait)
                self.producer.send_raw(send.key, retimed(send, t0))
                self.bad_sent += bad
            t0 += CHUNK_S  # the next chunk's minute


class Sampler:
    """Reads the worker's memory, metrics, durable offsets and the topic's end offsets."""

    def __init__(self, settings: Settings, pid: int, feeder: Feeder) -> None:
        self.settings, self.pid, self.feeder = settings, pid, feeder
        self.started = time.monotonic()
        self.consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
        self.tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]

    def close(self) -> None:
        self.consumer.close()

    def ends(self) -> dict[int, int]:
        return {tp.partition: end for tp, end in self.consumer.end_offsets(self.tps).items()}

    def lag(self, ends: dict[int, int] | None = None) -> int:
        """Messages up to ``ends`` (now: the partitions' ends) not yet durable."""
        marks = read_watermarks(self.settings.data_dir)
        durable = {p: m.applied_offset + 1 for p, m in marks.items()}
        return sum(max(0, end - durable.get(p, 0)) for p, end in (ends or self.ends()).items())

    def sample(self) -> Sample:
        m = scrape(self.settings)
        producer = self.feeder.producer
        return Sample(
            t_s=round(time.monotonic() - self.started, 1), rss_mb=memory_mb(self.pid)["rss_mb"],
            lag=self.lag(), lag_gauge=family(m, "prefstream_lag_messages"), sent=producer.sent,
            send_failed=producer.failed, bad_sent=self.feeder.bad_sent,
            dead_letters=outcome(m, "dead_letter"), late=outcome(m, "late"),
            accepted=outcome(m, "accepted"), pairs=family(m, "prefstream_pairs_total"),
            sessions_open=family(m, "prefstream_sessions_open"))


def family(metrics: dict[str, float], name: str) -> int:
    """Sum of a metric family's samples (``name`` and ``name{...}``)."""
    return int(sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{")))


def outcome(metrics: dict[str, float], name: str) -> int:
    return int(metrics.get(f'prefstream_events_total{{outcome="{name}"}}', 0))


def slope_per_10min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, value)`` points, per 10 minutes."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 600


def verdict(samples: list[Sample], final: Sample, args: argparse.Namespace) -> dict[str, Any]:
    steady = [s for s in samples if s.t_s >= args.warmup_minutes * 60] or samples
    slope = slope_per_10min([(s.t_s, s.rss_mb) for s in steady])
    max_lag = max(s.lag for s in steady)
    judged = slope is not None and steady[-1].t_s - steady[0].t_s >= MIN_STEADY_S
    checks: dict[str, bool | None] = {
        "memory_flat": (slope <= args.max_slope_mb) if judged and slope is not None else None,
        "lag_bounded": max_lag <= args.max_lag,
        "every_bad_message_dead_lettered": final.dead_letters == final.bad_sent,
        "no_send_failed": final.send_failed == 0,
    }
    rss = [s.rss_mb for s in steady]
    return {
        "ok": all(v is not False for v in checks.values()), **checks,
        "rss_slope_mb_per_10min": None if slope is None else round(slope, 2),
        "rss_mb_min_mean_max": [min(rss), round(sum(rss) / len(rss), 1), max(rss)],
        "lag_max": max_lag, "lag_mean": round(sum(s.lag for s in steady) / len(steady), 1),
        "lag_slope_per_10min": _round(slope_per_10min([(s.t_s, s.lag) for s in steady])),
        "sessions_open_max": max(s.sessions_open for s in steady),
        "steady_samples": len(steady),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


COLUMNS = ("t_s", "rss_mb", "lag", "lag_gauge", "sent", "dead_letters", "late", "pairs",
           "sessions_open")


def print_row(sample: Sample | None) -> None:
    if sample is None:
        print("  ".join(f"{c:>13}" for c in COLUMNS), flush=True)
        return
    values = asdict(sample)
    print("  ".join(f"{values[c]:>13}" for c in COLUMNS), flush=True)


def wait_drained(sampler: Sampler, timeout_s: float) -> bool:
    """Until everything sent is durable (the worker's own later ticks aside)."""
    ends = sampler.ends()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sampler.lag(ends) == 0:
            return True
        time.sleep(1)
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="load duration [30]")
    p.add_argument("--rate", type=float, default=200.0, help="messages per second [200]")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples [10]")
    p.add_argument("--warmup-minutes", type=float, default=None,
                   help="samples left out of the verdict [min(5, minutes / 3)]")
    p.add_argument("--max-slope-mb", type=float, default=5.0,
                   help="most RSS growth per 10 minutes that counts as flat [5 MiB]")
    p.add_argument("--max-lag", type=int, default=None,
                   help="most durable lag, messages [15 s of traffic]")
    p.add_argument("--partitions", type=int, default=4, help="events topic partitions [4]")
    p.add_argument("--seed", type=int, default=0, help="traffic seed [0]")
    p.add_argument("--data-dir", type=Path, default=None, help="worker data dir [a temp dir]")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json",
                   help="result JSON; the samples go to the same name with .csv")
    args = p.parse_args(argv)
    if args.warmup_minutes is None:
        args.warmup_minutes = min(5.0, args.minutes / 3)
    if args.max_lag is None:
        args.max_lag = int(15 * args.rate)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prefstream-soak-") as tmp:
        work = Path(tmp)
        data_dir = args.data_dir or work / "data"
        with LoadMonitor() as load, EmbeddedBroker(log_path=work / "broker.log") as broker:
            started = now_iso()
            defaults = Settings()
            settings = Settings(
                kafka_bootstrap=broker.bootstrap, data_dir=data_dir, app_id="soak",
                events_topic="soak-events", dead_letter_topic="soak-dlq", late_topic="soak-late",
                partitions=args.partitions, metrics_port=free_port(),
                gap_s=defaults.gap_s / FACTOR, grace_s=defaults.grace_s / FACTOR,
                # the default (60 s) gives a session timeout over Faust's request timeout
                rebalance_timeout_s=10.0)
            samples, final, drained = run(settings, args, work / "worker.log")
        result = {
            "started": started, "date": now_iso(), "command": command_line(__file__, argv),
            "config": {**{k: (str(v) if isinstance(v, Path) else v)
                          for k, v in vars(args).items()},
                       "time_compression": FACTOR, "gap_s": settings.gap_s,
                       "grace_s": settings.grace_s},
            "machine": machine_info(), "load": load.summary(), "drained": drained,
            "final": asdict(final), "verdict": verdict(samples, final, args),
            "samples": [asdict(s) for s in samples],
        }
    write_result(args.out, result)
    write_csv(args.out.with_suffix(".csv"), samples)
    print_verdict(result)
    return 0 if result["verdict"]["ok"] else 1


def run(settings: Settings, args: argparse.Namespace, log: Path
        ) -> tuple[list[Sample], Sample, bool]:
    prepare(settings)
    deadline = Deadline("soak", args.minutes * 60 + 600)
    worker = start_worker(settings, log, deadline)
    feeder = Feeder(settings, args.rate, args.seed)
    sampler = Sampler(settings, worker.pid, feeder)
    samples: list[Sample] = []
    try:
        feeder.start()
        print_row(None)
        stop_at = time.monotonic() + args.minutes * 60
        while time.monotonic() < stop_at:
            time.sleep(min(args.interval, max(0.0, stop_at - time.monotonic())))
            deadline.check("the next sample")
            if feeder.error is not None:
                raise RuntimeError(f"the producer failed: {feeder.error!r}") from feeder.error
            samples.append(sampler.sample())
            print_row(samples[-1])
        feeder.stop()
        drained = wait_drained(sampler, timeout_s=120)
        time.sleep(2 * settings.flush_interval_s)  # the last flush's counters
        final = sampler.sample()
    finally:
        feeder.stop()
        sampler.close()
        stop_worker(worker)
    if feeder.behind_s > 5:
        print(f"warning: the producer fell {feeder.behind_s:.1f} s behind its schedule")
    return samples, final, drained


def write_csv(path: Path, samples: list[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([f.name for f in fields(Sample)])
        writer.writerows([list(asdict(s).values()) for s in samples])


MEMORY_WORDS = {True: "flat", False: "GROWING",
                None: f"no verdict (under {MIN_STEADY_S / 60:.0f} min of steady samples)"}


def print_verdict(result: dict[str, Any]) -> None:
    v, f = result["verdict"], result["final"]
    print(f"\nafter {v['steady_samples']} steady samples "
          f"(warm-up {result['config']['warmup_minutes']:g} min):")
    print(f"  memory   RSS {v['rss_mb_min_mean_max'][0]:.0f}-{v['rss_mb_min_mean_max'][2]:.0f} "
          f"MiB, slope {v['rss_slope_mb_per_10min']} MiB per 10 min "
          f"-> {MEMORY_WORDS[v['memory_flat']]}")
    print(f"  lag      max {v['lag_max']}, mean {v['lag_mean']} messages "
          f"-> {'bounded' if v['lag_bounded'] else 'TOO HIGH'}")
    print(f"  dead     {f['dead_letters']} dead letters for {f['bad_sent']} malformed messages "
          f"sent (drained: {result['drained']}), {f['late']} late, {f['pairs']} pairs")
    print(f"  sends    {f['sent']} sent, {f['send_failed']} failed")
    print(f"  load     {result['load']['load1_mean']} mean 1-min load average "
          f"on {result['machine']['cpu_count']} CPUs")
    print("verdict:", "OK" if v["ok"] else "NOT OK")


if __name__ == "__main__":
    raise SystemExit(main())
