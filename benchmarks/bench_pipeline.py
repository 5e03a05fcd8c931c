"""Throughput, freshness and memory of the stream worker, against baselines, in one run.

    python benchmarks/bench_pipeline.py [--events 100000] [--open-sessions 100000]
        [--stages throughput,freshness,memory] [--out benchmarks/results/pipeline.json]

All stages share one embedded Tansu broker; each has its own topic, consumer groups and data dir.

* ``throughput``: every contender reads the same pre-produced topic, one after the other:
  ``aiokafka`` (raw consume + ``json.loads`` in this process, the Python ceiling),
  ``faust_naive`` / ``faust_take`` (a Faust agent that only parses JSON, per event /
  ``take(5000)``), and ``prefstream``: the real worker (validate, sessionize, pair, store Parquet,
  commit), timed from its first event to the moment every partition's rows are durable; then the
  same worker with its pipeline in a child process (``pipeline_process``), and ``--scale-workers``
  single-process workers sharing the partitions.
* ``freshness`` (``freshness_memory.py``): synthetic traffic replayed in real time, time
  compressed; per session, the wall time from sending its last event to its pairs being
  queryable in DuckDB.
* ``memory`` (``freshness_memory.py``): the worker's resident memory with N sessions open at once.

A stage that fails or runs past ``--stage-timeout`` is recorded under ``errors`` with the reason
(the others still run) and the exit code is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freshness_memory import freshness, memory  # noqa: E402
from machine import (  # noqa: E402
    LoadMonitor,
    command_line,
    elapsed_since,
    machine_info,
    now_iso,
    write_result,
)
from scale_out import formed_group_rate, session_timeout_for  # noqa: E402
from workers import (  # noqa: E402
    Deadline,
    StageError,
    cpu_seconds,
    durable,
    metric_sum,
    process_tree,
    produce,
    settled_outcomes,
    start_worker,
    stop_worker,
    timed_run,
)

from prefstream.settings import Settings  # noqa: E402
from prefstream.sim.demo import end_offsets, traffic_end  # noqa: E402
from prefstream.sim.traffic import TrafficConfig, generate_traffic  # noqa: E402
from prefstream.streams.broker import EmbeddedBroker, free_port  # noqa: E402
from prefstream.streams.worker.run import prepare  # noqa: E402

PARTITIONS = 4
STAGES = ("throughput", "freshness", "memory")


async def aiokafka_rate(bootstrap: str, topic: str, n: int, deadline: Deadline) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="bench-aiokafka",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    seen, first = 0, 0.0
    try:
        while seen < n:
            deadline.check(f"aiokafka to read {n} messages (read {seen})")
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


def faust_rate(bootstrap: str, topic: str, n: int, mode: str, deadline: Deadline) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "faust.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "naive_faust.py"),
                                     bootstrap, topic, str(n), mode, str(out)],
                                    stdout=fh, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            proc.wait(timeout=deadline.remaining())
        except subprocess.TimeoutExpired:
            raise StageError(f"throughput: the naive Faust agent ({mode}) did not read {n} "
                             f"messages within the stage's limit") from None
        finally:
            stop_worker(proc)
        if not out.exists():
            tail = log.read_text(errors="replace").splitlines()[-5:]
            raise StageError(f"throughput: the naive Faust agent ({mode}) exited with "
                             f"{proc.returncode} without a result:\n  " + "\n  ".join(tail))
        result = json.loads(out.read_text())
    return n / (result["last"] - result["first"])


def prefstream_rate(settings: Settings, n: int, log: Path, deadline: Deadline
                    ) -> dict[str, Any]:
    """Events/s of the worker from its first event to every partition's rows being durable."""
    prepare(settings)
    ends = end_offsets(settings)
    proc = start_worker(settings, log, deadline)
    try:
        with tqdm(total=n, desc="prefstream worker", unit="ev", leave=False, disable=None) as bar:
            while not metric_sum(settings, "prefstream_events_total"):
                deadline.check("the worker's first event")
                time.sleep(0.02)
            first = time.perf_counter()
            tree = process_tree(proc.pid)  # the worker and its pipeline process
            cpu_first = cpu_seconds(tree)
            while not durable(settings, ends, bar):
                deadline.check(f"the worker to store all {n} events")
                time.sleep(0.02)
            last, cpu_last = time.perf_counter(), cpu_seconds(tree)
        counted = settled_outcomes([settings], n)
    finally:
        stop_worker(proc)
    return timed_run("throughput", n, last - first, counted, [tree], [cpu_first], [cpu_last])


def throughput(base: Settings, work: Path, n_events: int, deadline: Deadline,
               scale_workers: int = 0, rounds: int = 1) -> dict[str, Any]:
    """Every contender on the same pre-produced topic, ``rounds`` times in turn (each round
    runs them back to back, so a round's contenders meet the same machine load); each figure
    is the median round's, and ``rounds`` lists every round's events/s."""
    settings = base.model_copy(update={"data_dir": work / "through", "events_topic":
                                       "bench-events", "app_id": "bench-full"})
    prepare(settings)
    # event times end shortly before now, as in the demo: traffic timed in the future of its
    # arrival is dead-lettered, and traffic far in the past makes the generator's "future
    # timestamp" bad events valid, which moves the watermark past every real event
    end = traffic_end(datetime.now(timezone.utc), settings)
    traffic = generate_traffic(TrafficConfig(n_events=n_events, seed=0, end=end))
    n, bootstrap = len(traffic.messages), str(base.kafka_bootstrap)
    out: dict[str, Any] = {"events": n, "n_rounds": rounds}
    stage("throughput: produce")
    out["producer_events_per_s"] = round(produce(bootstrap, "bench-events", traffic.messages))
    stage("throughput: aiokafka")
    out["aiokafka_events_per_s"] = round(asyncio.run(
        aiokafka_rate(bootstrap, "bench-events", n, deadline)))
    runs: dict[str, list[Any]] = {"faust_naive": [], "faust_take": [], "prefstream": [],
                                  "pipeline_process": [], "formed_one": [], "scale_out": []}
    # scale-out: one and then several one-process workers, each run on a formed group
    # (scale_out.py), paused while the traffic is produced: no heartbeat meanwhile
    grouped = settings.model_copy(update={"pipeline_process": False, "session_timeout_s":
                                          session_timeout_for(n, out["producer_events_per_s"])})
    for k in range(rounds):
        name = f"round {k + 1} of {rounds}" if rounds > 1 else ""
        each = settings.model_copy(update={"data_dir": work / f"through-{k}",
                                           "app_id": f"bench-full-{k}"})
        stage(f"throughput: faust per event {name}")
        runs["faust_naive"].append(faust_rate(bootstrap, "bench-events", n, "event", deadline))
        stage(f"throughput: faust take(5000) {name}")
        runs["faust_take"].append(faust_rate(bootstrap, "bench-events", n, "take", deadline))
        stage(f"throughput: prefstream worker {name}")
        runs["prefstream"].append(prefstream_rate(
            each.model_copy(update={"pipeline_process": False}), n,
            work / f"worker-throughput-{k}.log", deadline))
        # the same worker with its pipeline in a child process (pipeline_process)
        stage(f"throughput: prefstream worker, pipeline process {name}")
        runs["pipeline_process"].append(prefstream_rate(each.model_copy(update={
            "data_dir": work / f"through-two-{k}", "app_id": f"bench-two-{k}",
            "pipeline_process": True}), n, work / f"worker-two-process-{k}.log", deadline))
        for workers, key in ((1, "formed_one"), (scale_workers, "scale_out")):
            if scale_workers > 1:
                stage(f"throughput: {workers} prefstream worker(s), formed group {name}")
                runs[key].append(formed_group_rate(grouped.model_copy(update={
                    "data_dir": work / f"through-{key}-{k}", "app_id": f"bench-{key}-{k}",
                    "events_topic": f"bench-{key}-{k}"}), traffic.messages, workers,
                    work / f"worker-{key}-{k}.log", deadline))
    out["rounds"] = {name: [round(_rate(r)) for r in got] for name, got in runs.items() if got}
    naive, take = median_run(runs["faust_naive"]), median_run(runs["faust_take"])
    full = median_run(runs["prefstream"])
    out.update(faust_naive_events_per_s=round(naive), faust_take_events_per_s=round(take),
               prefstream_events_per_s=round(full["events_per_s"]),
               prefstream_seconds=full["seconds"], prefstream_outcomes=full["outcomes"],
               prefstream_cpu_us_per_event=full["cpu_us_per_event"])
    rates = {"faust_naive": naive, "faust_take": take, "aiokafka": out["aiokafka_events_per_s"]}
    out["ratios"] = {name: round(full["events_per_s"] / rate, 3) for name, rate in rates.items()}
    offloaded = median_run(runs["pipeline_process"])
    out["pipeline_process"] = {
        "events_per_s": round(offloaded["events_per_s"]), "seconds": offloaded["seconds"],
        "outcomes": offloaded["outcomes"], "cpu_us_per_event": offloaded["cpu_us_per_event"],
        "of_one_process": round(offloaded["events_per_s"] / full["events_per_s"], 3),
        "of_faust_naive": round(offloaded["events_per_s"] / naive, 3),
        # each round against the naive agent timed just before it (the same machine load)
        "of_faust_naive_by_round": [round(r["events_per_s"] / a, 3) for r, a in
                                    zip(runs["pipeline_process"], runs["faust_naive"],
                                        strict=True)]}
    if runs["scale_out"]:
        scaled, one = median_run(runs["scale_out"]), median_run(runs["formed_one"])
        out["scale_out"] = {
            "workers": scale_workers, "events_per_s": round(scaled["events_per_s"]),
            "seconds": scaled["seconds"], "outcomes": scaled["outcomes"],
            "cpu_us_per_event": scaled["cpu_us_per_event"], "formed_group": True,
            "one_worker": {k: one[k] for k in ("seconds", "outcomes", "cpu_us_per_event")}
            | {"events_per_s": round(one["events_per_s"])},
            "of_one_worker": round(scaled["events_per_s"] / one["events_per_s"], 3),
            "of_faust_naive": round(scaled["events_per_s"] / naive, 3),
            # each round against one worker timed the same way just before it
            "of_one_worker_by_round": [round(r["events_per_s"] / o["events_per_s"], 3) for r, o
                                       in zip(runs["scale_out"], runs["formed_one"],
                                              strict=True)]}
    return out


def _rate(run: float | dict[str, Any]) -> float:
    return run if isinstance(run, float | int) else float(run["events_per_s"])


def median_run(runs: list[Any]) -> Any:
    """The round whose events/s is the median (the lower middle one of an even number): a
    naive agent's rate itself, or a worker run's result."""
    return sorted(runs, key=_rate)[(len(runs) - 1) // 2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="throughput: events")
    parser.add_argument("--scale-workers", type=int, default=2, help="throughput: also time "
                        "this many worker processes sharing the partitions (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput: run every contender "
                        "this many times in turn and report the median round")
    parser.add_argument("--open-sessions", type=int, default=100_000, help="memory: sessions "
                        "held open at once")
    parser.add_argument("--freshness-seconds", type=float, default=40.0, help="freshness: wall "
                        "seconds the 2 hours of traffic are replayed in")
    parser.add_argument("--freshness-rate", type=float, default=250.0, help="freshness: events/s")
    parser.add_argument("--stage-timeout", type=float, default=600.0, help="seconds a stage may "
                        "take before it fails with the reason (throughput: each round)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pipeline.json")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    started, when = time.perf_counter(), now_iso()
    results: dict[str, Any] = {"benchmark": "pipeline", "command": command_line(__file__, argv),
                               "started": when, "partitions": PARTITIONS,
                               "settings": {k: v for k, v in vars(args).items() if k != "out"},
                               "errors": {}}
    with LoadMonitor() as load, EmbeddedBroker(log_path=work / "broker.log") as broker:
        base = Settings(kafka_bootstrap=broker.bootstrap, partitions=PARTITIONS,
                        rebalance_timeout_s=2.0, metrics_port=free_port(),
                        session_timeout_s=6.0)  # a new worker joins after about half of it
        for name in args.stages:
            stage(name)
            # the throughput stage runs every contender once per round: its limit is per round
            rounds = args.rounds if name == "throughput" else 1
            deadline = Deadline(name, args.stage_timeout * rounds)
            settings = base.model_copy(update={"metrics_port": free_port()})
            try:
                results[name] = run_stage(name, settings, work, args, deadline)
            except StageError as exc:
                results["errors"][name] = str(exc)
                print(f"FAILED {exc}", file=sys.stderr, flush=True)
    results.update(machine=machine_info(), load=load.summary(), wall_s=elapsed_since(started))
    if results["errors"]:
        results["work_dir"] = str(work)  # the workers' and the broker's logs
    else:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.out, results)
    print(json.dumps({k: v for k, v in results.items() if k in (*STAGES, "errors")}, indent=2))
    return 1 if results["errors"] else 0


def run_stage(name: str, settings: Settings, work: Path, args: argparse.Namespace,
              deadline: Deadline) -> dict[str, Any]:
    if name == "throughput":
        return throughput(settings, work, args.events, deadline, args.scale_workers,
                          args.rounds)
    if name == "freshness":
        return freshness(settings.model_copy(update={
            "data_dir": work / "fresh", "events_topic": "bench-fresh", "app_id": "bench-fresh"}),
            args.freshness_seconds, args.freshness_rate, work / "worker-fresh.log", deadline)
    return memory(settings.model_copy(update={
        "data_dir": work / "mem", "events_topic": "bench-mem", "app_id": "bench-mem"}),
        args.open_sessions, work / "worker-mem.log", deadline)


def stage(name: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {name}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
