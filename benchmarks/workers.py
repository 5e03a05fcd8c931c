"""Worker processes for the pipeline benchmark: start, wait with a deadline, measure, stop.

Every wait in a stage goes through a :class:`Deadline`, which raises :class:`StageError` with
what was awaited and the tail of the worker's log once the stage's time is up or the worker
exited, so a broken stage fails with a reason instead of hanging.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prefstream.settings import Settings
from prefstream.sim.demo import scrape
from prefstream.storage.files import read_watermarks
from prefstream.streams.producer import FeedbackProducer

ROOT = Path(__file__).resolve().parents[1]
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROBE = b"bench-probe: not an event"


class StageError(RuntimeError):
    """A benchmark stage failed or ran past its time limit."""


class Deadline:
    """A stage's time limit; :meth:`check` also fails as soon as a watched worker exited."""

    def __init__(self, stage: str, seconds: float) -> None:
        self.stage, self.seconds = stage, seconds
        self.at = time.monotonic() + seconds
        self.watched: list[tuple[subprocess.Popen[bytes], Path]] = []

    def watch(self, worker: subprocess.Popen[bytes], log: Path, *, add: bool = False) -> None:
        """Watch ``worker`` instead of the workers watched so far (``add``: as well)."""
        self.watched = [*self.watched, (worker, log)] if add else [(worker, log)]

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def check(self, waiting_for: str) -> None:
        for worker, log in self.watched:
            if worker.poll() is not None:
                raise StageError(f"{self.stage}: the worker exited with {worker.returncode} "
                                 f"while waiting for {waiting_for}{_log_tail(log)}")
        if time.monotonic() > self.at:
            tails = "".join(_log_tail(log) for _, log in self.watched)
            raise StageError(f"{self.stage}: no result after the stage's limit of "
                             f"{self.seconds:.0f} s (--stage-timeout), still waiting for "
                             f"{waiting_for}{tails}")


def _log_tail(log: Path, lines: int = 5) -> str:
    if not log.exists():
        return ""
    text = TERMINAL_CODES.sub("", log.read_text(errors="replace"))
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return f"; worker log {log}:\n  " + "\n  ".join(tail) if tail else ""


def start_worker(settings: Settings, log: Path, deadline: Deadline, *, add: bool = False
                 ) -> subprocess.Popen[bytes]:
    """A ``prefstream worker`` process with these settings, watched by ``deadline`` (``add``:
    as well as the workers it already watches)."""
    with open(log, "ab") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefstream.cli", "worker", "--loglevel", "warning"],
            env={**os.environ, **settings.as_env()}, stdout=fh, stderr=subprocess.STDOUT,
            cwd=ROOT)
    deadline.watch(worker, log, add=add)
    return worker


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=30)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents first (Linux ``/proc``; gone ones left out)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return tree


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User plus system CPU seconds of each process so far (Linux ``/proc/<pid>/stat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def metric_sum(settings: Settings, prefix: str) -> float:
    """Sum of every sample of a metric family on the worker's endpoint (0 when not serving)."""
    return sum(v for k, v in scrape(settings).items() if k.startswith(prefix))


def wait_consuming(settings: Settings, deadline: Deadline) -> None:
    """Until the worker consumes every partition: one malformed probe message per partition,
    each dead-lettered, proves it (a fixed sleep would be too short on a busy machine)."""
    before = metric_sum(settings, "prefstream_events_total")
    send_probes(settings)
    while metric_sum(settings, "prefstream_events_total") < before + settings.partitions:
        deadline.check("the worker to consume a probe message on every partition")
        time.sleep(0.2)


def send_probes(settings: Settings) -> None:
    """One malformed probe message to every partition of the events topic (each is
    dead-lettered and counted in ``prefstream_events_total``)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, api_version=(2, 8))
    try:
        for p in range(settings.partitions):
            producer.send(settings.events_topic, key=b"bench-probe", value=PROBE, partition=p)
        producer.flush(timeout=30)
    finally:
        producer.close()


def timed_run(stage: str, n: int, seconds: float, counted: dict[str, float],
              trees: list[list[int]], cpu_first: list[dict[int, float]],
              cpu_last: list[dict[int, float]]) -> dict[str, Any]:
    """A timed worker run's result: ``n`` events in ``seconds``, their outcomes and the CPU per
    event; a run that accepted under half of the events fails the stage (the traffic is not
    what the full pipeline should see: a clock or validation mistake)."""
    if counted.get("accepted", 0) < n / 2:
        who = "the worker" if len(trees) == 1 else f"the {len(trees)} workers"
        raise StageError(f"{stage}: {who} accepted under half of the events ({counted}): the "
                         "traffic is not what the full pipeline should see")
    return {"events_per_s": n / seconds, "seconds": round(seconds, 2), "outcomes": counted,
            "cpu_us_per_event": cpu_per_event(trees, cpu_first, cpu_last, n)}


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set now (``VmRSS``) and its peak (``VmHWM``) of a process and every process it
    started (the worker's pipeline process), in MiB; the peak is the sum of each one's peak, an
    upper bound of the whole's."""
    found = {"VmRSS": 0.0, "VmHWM": 0.0}
    for each in _process_tree(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except FileNotFoundError:  # ended meanwhile
            continue
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in found:
                found[name] += int(value.split()[0]) / 1024
    if not found["VmRSS"]:
        return {"rss_mb": float("nan"), "peak_mb": float("nan")}
    return {"rss_mb": round(found["VmRSS"], 1), "peak_mb": round(found["VmHWM"], 1)}


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux: each thread's ``children`` file)."""
    tree, i = [pid], 0
    while i < len(tree):
        for children in Path(f"/proc/{tree[i]}/task").glob("*/children"):
            try:
                tree += [int(c) for c in children.read_text().split()]
            except FileNotFoundError:
                pass
        i += 1
    return tree


def stored_through(settings: Settings, ends: dict[int, int]) -> dict[int, int]:
    """Per Kafka partition, how many of its messages up to ``ends`` (end offsets) the worker's
    flushes made durable: its watermark file's applied offset plus one, at most the end."""
    marks = read_watermarks(settings.data_dir)
    return {p: min(end, marks[p].applied_offset + 1) if p in marks else 0
            for p, end in ends.items()}


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    producer = FeedbackProducer(bootstrap, topic=topic, max_block_ms=30_000,
                                batch_size=256 * 1024, linger_ms=20)
    started = time.perf_counter()
    for key, value in tqdm(messages, desc=f"produce {topic}", unit="ev", leave=False, disable=None):
        producer.send_raw(key, value)
    producer.flush(timeout_s=300)
    producer.close()
    if producer.failed:
        raise StageError(f"produce: {producer.failed} events not delivered: {producer.errors[:3]}")
    return len(messages) / (time.perf_counter() - started)


def cpu_per_event(trees: list[list[int]], before: list[dict[int, float]],
                   after: list[dict[int, float]], n: int) -> dict[str, float]:
    """CPU µs per event over the timed window: the workers' own processes (``agent``, each
    tree's root: where Faust runs) and their descendants, the pipeline processes
    (``pipeline``), each summed over the workers."""
    out = {"agent": 0.0, "pipeline": 0.0}
    for tree, b, a in zip(trees, before, after, strict=True):
        for pid in tree:
            if pid in a and pid in b:
                out["agent" if pid == tree[0] else "pipeline"] += a[pid] - b[pid]
    return {k: round(v / n * 1e6, 1) for k, v in out.items()}


def outcomes(each: list[Settings]) -> dict[str, float]:
    """``prefstream_events_total`` by outcome, summed over the workers."""
    outcomes: dict[str, float] = {}
    for s in each:
        for k, v in scrape_family(s, "prefstream_events_total"):
            outcome = k.split('"')[1]
            outcomes[outcome] = outcomes.get(outcome, 0.0) + v
    return outcomes


def settled_outcomes(each: list[Settings], n: int) -> dict[str, float]:
    """The workers' outcomes once all ``n`` messages are counted, or after 3 s: the counts may
    trail the files a little (a pipeline process sends its metrics at most every 0.1 s)."""
    settle = time.monotonic() + 3.0
    while sum((counted := outcomes(each)).values()) < n and time.monotonic() < settle:
        time.sleep(0.1)
    return counted


def durable(settings: Settings, ends: dict[int, int], bar: tqdm[Any]) -> bool:
    done = stored_through(settings, ends)
    bar.update(sum(done.values()) - bar.n)
    return all(done[p] >= end for p, end in ends.items())


def scrape_family(settings: Settings, name: str) -> list[tuple[str, float]]:
    return [(k, v) for k, v in scrape(settings).items() if k.startswith(name + "{")]
