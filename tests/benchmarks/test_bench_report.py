"""benchmarks/report.py on real benchmark output, and the benchmarks' own moving parts.

The queries benchmark and the memory stage of the pipeline benchmark run for real at tiny sizes
(real files, real DuckDB, a real broker and worker); the other stages and the quality and trainer
benchmarks take minutes, so their checked-in JSON stands in for them (the freshness replay's
schedule is tested directly).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
CHECKED_IN = BENCH / "results"
sys.path.insert(0, str(BENCH))  # the scripts import their sibling modules by name

import bench_pipeline  # noqa: E402
import bench_queries  # noqa: E402
import freshness_memory  # noqa: E402
import report  # noqa: E402
import scale_out  # noqa: E402
from workers import Deadline, StageError  # noqa: E402

from prefstream.sim.traffic import TrafficConfig, generate_traffic  # noqa: E402


def checked_in(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((CHECKED_IN / f"{name}.json").read_text())
    return result


def section(markdown: str, title: str) -> str:
    """The text of one ``## title`` section."""
    start = markdown.index(f"## {title}")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end > 0 else None]


def test_table_aligns_numbers_and_formats_cells() -> None:
    lines = report.table(("name", "n", "share"), [("a|b", 12345, 0.12345), ("c", 7, None)])
    assert lines == ["| name | n | share |", "| --- | ---: | --- |",
                     "| a\\|b | 12,345 | 0.123 |", "| c | 7 | n/a |"]


def test_queries_benchmark_runs_and_renders(tmp_path: Path) -> None:
    out = tmp_path / "queries.json"
    assert bench_queries.main(["--pairs", "4801", "--days", "1", "--repeat", "1",
                               "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["pairs"], result["sessions"], result["partitions"]) == (4801, 2400, 24)
    queries = result["queries"]
    assert queries["pairs_by_rule"]["rows"] == len(bench_queries.RULES)
    assert queries["funnel_by_hour"]["rows"] == 24
    assert queries["pairs_one_day_by_hour_and_rule"]["rows"] == 24 * len(bench_queries.RULES)
    assert result["machine"]["cpu_count"] and result["started"]

    text = section(report.render({"queries": result}), "Analyst queries")
    assert "4,801 pairs and 2,400 sessions in 24 hour partitions" in text
    for name, q in queries.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert report._cell(q["view_s"]) in row and report.ratio(q["view_over_raw"]) in row


@pytest.mark.broker
def test_pipeline_memory_stage_runs_and_renders(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    code = bench_pipeline.main(["--stages", "memory", "--open-sessions", "300",
                                "--stage-timeout", "90", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["errors"] == {}
    memory = result["memory"]
    assert memory["open_sessions"] == 300 and memory["rss_mb"] > memory["rss_idle_mb"] > 0
    assert memory["peak_mb"] >= memory["rss_mb"]

    text = section(report.render({"pipeline": result}),
                   "Stream worker: throughput, freshness, memory")
    row = next(line for line in text.splitlines() if line.startswith("| 300 |"))
    assert f"| {report._cell(memory['rss_mb'])} |" in row
    assert "Throughput" not in text and "Freshness" not in text  # stages that did not run
    assert "--stages memory --open-sessions 300" in text  # the command is on record


def test_checked_in_results_render_with_reused_and_missing_sections() -> None:
    trainer, quality, pipeline = checked_in("trainer"), checked_in("quality"), checked_in(
        "pipeline")
    text = report.render({"trainer": trainer, "quality": quality, "pipeline": pipeline},
                         reused=["trainer"], generated="2030-01-01T00:00:00+00:00")
    assert text.startswith("# Benchmarks\n\nGenerated 2030-01-01T00:00:00+00:00")
    trl = section(text, "Trainer against TRL's RewardTrainer")
    assert "**Reused**" in trl and "| trl | 820 |" in trl
    assert "**Reused**" not in section(text, "Pair quality and held-out agreement")
    assert "No `queries.json` yet" in section(text, "Analyst queries")
    evaluate = quality["evaluate"]
    pairs = section(text, "Pair quality and held-out agreement")
    assert f"| precision at confidence >= {evaluate['default_threshold']} | " \
           f"{report._cell(evaluate['precision'])} |" in pairs
    agreement = evaluate["training"]["heldout_agreement"]
    assert f"held-out explicit labels | {report._cell(agreement)} |" in pairs
    stream = section(text, "Stream worker: throughput, freshness, memory")
    throughput, fresh = pipeline["throughput"], pipeline["freshness"]
    assert f"| {report._cell(throughput['prefstream_events_per_s'])} | x1 |" in stream
    assert f"| {report.ratio(throughput['ratios']['aiokafka'])} |" in stream
    assert f"| all with pairs | {fresh['n']} | {report._cell(fresh['p50_s'])} |" in stream
    # the wait the rules impose is told apart from the worker's own delay
    by_gap_beyond = fresh["closed_by_gap"]["p95_s"] - fresh["gap_s"] - fresh["grace_s"]
    assert f"the gap plus the grace ({fresh['gap_s'] + fresh['grace_s']:.2f} s)" in stream
    assert f" and {by_gap_beyond:.2f} s (flush interval" in stream


def test_soak_renders_its_memory_curve_and_verdict() -> None:
    soak = checked_in("soak")
    text = section(report.render({"soak": soak}), "Soak: one worker at steady load")
    windows = [line for line in text.splitlines() if re.match(r"\| \d+-\d+ \|", line)]
    last = max(s["t_s"] for s in soak["samples"])
    assert len(windows) == int(last // 300) + 1  # one row per 5 minutes, none empty
    first = [s["rss_mb"] for s in soak["samples"] if s["t_s"] < 300]
    assert windows[0].startswith(f"| 0-5 | {report._cell(min(first))} |")
    assert f"- verdict: {'OK' if soak['verdict']['ok'] else 'NOT OK'}" in text
    assert f"{soak['final']['dead_letters']:,} dead letters" in text


def test_a_failed_stage_is_shown_with_its_reason() -> None:
    failed = {"errors": {"freshness": "freshness: no result after the stage's limit of 5 s\n"
                         "worker log ..."}, "command": "python benchmarks/bench_pipeline.py"}
    text = report.render({"pipeline": failed})
    assert "**Stage `freshness` failed**: freshness: no result after the stage's limit of 5 s" \
        in text


def test_replay_plan_keeps_malformed_and_late_messages_in_place() -> None:
    """Regression: messages were scheduled at their own timestamps, and the generator's
    far-future bad events put the end of the replay an hour away."""
    end, seconds = datetime(2030, 1, 1, 2, tzinfo=timezone.utc), 10.0
    traffic = generate_traffic(TrafficConfig(n_events=600, seed=3, end=end, hours=2,
                                             bad_share=0.2, late_share=0.05))
    factor = 7200 / seconds
    plan = freshness_memory.replay_plan(traffic, end - timedelta(hours=2), factor)
    assert len(plan) == len(traffic.messages) and "bad:future_ts" in traffic.labels
    times = [s.at for s in plan]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= seconds
    for send, label in zip(plan, traffic.labels, strict=True):
        if label.startswith("bad:"):
            assert send.event_at is None and freshness_memory.retimed(send, 1e9) == send.value
        elif label == "late":  # hours before its session: still late after compression
            assert send.event_at < send.at and not send.session_id
        else:
            stamped = json.loads(freshness_memory.retimed(send, 1e9))["ts"]
            assert datetime.fromisoformat(stamped).timestamp() == pytest.approx(
                1e9 + send.event_at, abs=1e-3)


def test_deadline_fails_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="limit of 0 s .* still waiting for the pairs"):
        Deadline("freshness", 0).check("the pairs")
    log = tmp_path / "worker.log"
    log.write_text("starting\nboom: cannot bind\n")
    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    worker.wait(timeout=30)
    deadline = Deadline("memory", 60)
    deadline.watch(worker, log)
    with pytest.raises(StageError, match="(?s)worker exited with 3 .*boom: cannot bind"):
        deadline.check("open sessions")
    # several workers: any one of them exiting fails the stage, with its own log
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        scaled = Deadline("throughput", 60)
        scaled.watch(alive, tmp_path / "alive.log")
        scaled.check("the first event")  # the one watched runs: no failure
        scaled.watch(worker, log, add=True)
        with pytest.raises(StageError, match="(?s)worker exited with 3 .*boom: cannot bind"):
            scaled.check("the first event")
        scaled.watch(alive, tmp_path / "alive.log")  # without add: watches this one only
        scaled.check("the first event")
    finally:
        alive.kill()
        alive.wait(timeout=30)


def test_scale_out_is_rendered_against_one_worker_and_the_naive_agent() -> None:
    pipeline = checked_in("pipeline")
    throughput = pipeline["throughput"]
    throughput["scale_out"] = {"workers": 2, "events_per_s": 5012, "seconds": 20.15,
                               "outcomes": {}, "of_one_worker": 1.458, "of_faust_naive": 0.719}
    stream = section(report.render({"pipeline": pipeline}),
                     "Stream worker: throughput, freshness, memory")
    assert ("Scale-out: 2 worker processes in one consumer group, sharing the 4 partitions on "
            "the same machine, stored the same events at 5,012 events/s (20.15 s): x1.46 of "
            "one worker, x0.719 of the naive per-event agent.") in stream
    throughput["scale_out"] |= {"formed_group": True, "of_one_worker_by_round": [1.458],
                                "one_worker": {"events_per_s": 3438, "seconds": 29.4}}
    stream = section(report.render({"pipeline": pipeline}),
                     "Stream worker: throughput, freshness, memory")
    assert ("(20.15 s): x1.46 of one worker timed the same way, x0.719 of the naive per-event "
            "agent. One worker timed the same way stored 3,438 events/s (29.4 s). Each run "
            "starts its workers on a fresh topic, waits until the group is formed") in stream
    del throughput["scale_out"]
    assert "Scale-out" not in report.render({"pipeline": pipeline})


def test_paused_processes_spend_no_cpu_until_continued() -> None:
    """The scale-out stage pauses its workers while it produces the traffic."""
    import workers

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with scale_out.paused([busy.pid]):
            before = workers.cpu_seconds([busy.pid])[busy.pid]
            time.sleep(0.5)
            assert workers.cpu_seconds([busy.pid])[busy.pid] == before
        time.sleep(0.5)
        assert workers.cpu_seconds([busy.pid])[busy.pid] > before  # continued
    finally:
        busy.kill()
        busy.wait(timeout=30)
    # a paused worker sends no heartbeat: the session timeout outlasts the pause with a margin
    assert scale_out.session_timeout_for(50_000, 11_000) == pytest.approx(3 * 50_000 / 11_000)
    assert scale_out.session_timeout_for(1_000, 11_000) == scale_out.MIN_SESSION_TIMEOUT_S


@pytest.mark.broker
def test_scale_out_times_two_workers_on_a_formed_group(tmp_path: Path, broker: Any) -> None:
    """The stage for real at a tiny size: the group forms (each worker consumes a probe), the
    traffic is produced while they are paused, and the run ends once every event is stored."""
    from datetime import datetime, timezone

    from prefstream.settings import Settings
    from prefstream.sim.demo import traffic_end
    from prefstream.streams.broker import free_port

    settings = Settings(kafka_bootstrap=broker.bootstrap, partitions=4, metrics_port=free_port(),
                        rebalance_timeout_s=2.0, session_timeout_s=12.0,
                        data_dir=tmp_path / "data", events_topic="bench-scale-test",
                        app_id="bench-scale-test", pipeline_process=False)
    end = traffic_end(datetime.now(timezone.utc), settings)
    messages = generate_traffic(TrafficConfig(n_events=600, seed=0, end=end)).messages
    run = scale_out.formed_group_rate(settings, messages, 2, tmp_path / "worker.log",
                                      Deadline("throughput", 120))
    counted = run["outcomes"]  # the traffic and at least one probe per partition
    assert sum(counted.values()) >= len(messages) + settings.partitions
    assert counted["accepted"] > len(messages) / 2
    assert run["events_per_s"] > 0 and run["cpu_us_per_event"]["agent"] > 0


def test_reward_results_render_goals_precision_lengths_and_probes() -> None:
    result = checked_in("reward")
    text = section(report.render({"reward": result}), "Reward model: comparisons, length, probes")
    hh, alpaca = result["hh"], result["alpaca"]
    lm = alpaca["balance_bucket"]["heldout"]["length_matched"]
    assert (f"| AlpacaEval length-matched accuracy, implicit pairs, default trainer >= 0.60 | "
            f"{report._cell(lm['accuracy'])} | {lm['n']} |") in text
    votes = hh["label_precision"]["comparisons"]["all"]
    assert f"| hh | comparisons, all votes | {votes['n']:,} | {report._cell(votes['precision'])}" \
        in text
    implicit = hh["implicit"]["heldout"]
    assert (f"| hh implicit | {implicit['n']} | {report._cell(implicit['accuracy'])} | "
            f"{report._cell(implicit['length_only_accuracy'])} |") in text
    for model in ("hh explicit", "alpaca length_balance=bucket", "alpaca length_balance=none"):
        assert f"| {model} |" in text
    assert "| hh-rlhf-harmless-dev.jsonl.gz | 1,595 |" in text



def test_cpu_per_event_counts_the_worker_and_its_pipeline_process_apart() -> None:
    """The throughput stage's CPU split: the first process of a tree is the worker's own, its
    descendants the pipeline process (a busy child here stands in for it)."""
    import os
    import time

    import workers

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started
        tree = workers.process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        before = workers.cpu_seconds(tree)
        sum(i * i for i in range(3_000_000))  # CPU spent here, in the "worker"
        time.sleep(0.5)
        after = workers.cpu_seconds(tree)
    finally:
        child.kill()
        child.wait(timeout=30)
    per_event = workers.cpu_per_event([tree], [before], [after], 1000)
    assert per_event["agent"] > 0 and per_event["pipeline"] > 0
    line = report._cpu({"agent": 61.5, "pipeline": 120.0})
    assert "61.5 µs in the Faust agent's process" in line and "120 µs in the pipeline" in line
    assert report._cpu(None) == ""


def test_rounds_report_the_median_round_and_every_round() -> None:
    runs = [{"events_per_s": r} for r in (9_000.0, 7_000.0, 11_000.0)]
    assert bench_pipeline.median_run(runs) == {"events_per_s": 9_000.0}
    assert bench_pipeline.median_run([3.0, 1.0]) == 1.0  # the lower middle of an even number
    pipeline = checked_in("pipeline")
    throughput = pipeline["throughput"]
    throughput.update(n_rounds=3, rounds={"faust_naive": [10_100, 9_000, 10_500],
                                          "pipeline_process": [10_300, 9_900, 11_000]})
    throughput["pipeline_process"]["of_faust_naive_by_round"] = [1.02, 1.1, 1.048]
    stream = section(report.render({"pipeline": pipeline}),
                     "Stream worker: throughput, freshness, memory")
    assert ("Each figure is the median of 3 rounds; a round runs every contender once, back to "
            "back, so they meet the same machine load. Events/s by round: naive per-event agent "
            "10,100, 9,000, 10,500; worker with its pipeline process 10,300, 9,900, 11,000. The "
            "pipeline process against the naive per-event agent of the same round: x1.02, x1.1, "
            "x1.05.") in stream
    throughput["n_rounds"] = 1
    assert "median of" not in report.render({"pipeline": pipeline})
