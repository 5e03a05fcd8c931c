"""Scale-out stage of the pipeline benchmark: worker processes sharing the partitions in one
consumer group, against one worker timed the same way in the same round.

Each run starts its workers on a fresh, empty topic and waits until the group is formed: one
probe message per partition, sent again until every worker consumed one of the same sending
(so each owns partitions and no member is still to join). The workers are then paused
(``SIGSTOP``) while the traffic is produced, so the producer does not share the 2 cores with
them, and resumed: the run is timed from the resume to every partition's rows being durable.

Why a formed group: two workers started together join in one generation only when their
start-ups end within the broker's join window; otherwise one reads the backlog alone for
seconds and the other's join brings a rebalance (flush, commit, hand-over) in the middle of
the run. Timed from a backlog, the same two workers measured x0.80 to x1.81 of one worker by
round. The rebalance a joining worker brings is the cost of changing the group, measured by
the handover tests, not the group's rate.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm
from workers import (
    Deadline,
    cpu_seconds,
    durable,
    metric_sum,
    process_tree,
    produce,
    send_probes,
    settled_outcomes,
    start_worker,
    stop_worker,
    timed_run,
)

from prefstream.settings import Settings
from prefstream.sim.demo import end_offsets
from prefstream.streams.broker import free_port
from prefstream.streams.worker.run import prepare

#: how long the workers may be paused, as a multiple of the expected produce time, and the
#: session timeout that follows (a paused worker sends no heartbeat; the broker must not drop it)
PAUSE_MARGIN = 3.0
MIN_SESSION_TIMEOUT_S = 12.0


def session_timeout_for(n_events: int, producer_events_per_s: float) -> float:
    """A session timeout no pause to produce ``n_events`` comes near."""
    return max(MIN_SESSION_TIMEOUT_S, PAUSE_MARGIN * n_events / producer_events_per_s)


def formed_group_rate(settings: Settings, messages: list[tuple[bytes, bytes]], workers: int,
                      log: Path, deadline: Deadline) -> dict[str, Any]:
    """Events/s of ``workers`` one-process workers on ``settings.events_topic`` (fresh), timed
    from their resume after ``messages`` were produced to every partition's rows being
    durable (see the module's docstring)."""
    prepare(settings)
    each = [settings] + [settings.model_copy(update={"metrics_port": free_port()})
                         for _ in range(workers - 1)]
    procs = [start_worker(s, log.with_name(f"{log.stem}-{k}{log.suffix}") if k else log,
                          deadline, add=k > 0) for k, s in enumerate(each)]
    n = len(messages)
    try:
        wait_formed(each, deadline)
        trees = [process_tree(p.pid) for p in procs]
        with paused([pid for tree in trees for pid in tree]):
            produce(str(settings.kafka_bootstrap), settings.events_topic, messages)
            ends = end_offsets(settings)
        first, cpu_first = time.perf_counter(), [cpu_seconds(tree) for tree in trees]
        with tqdm(total=sum(ends.values()), desc=f"{workers} workers", unit="ev", leave=False,
                  disable=None) as bar:
            while not durable(settings, ends, bar):
                deadline.check(f"{workers} workers to store all {n} events")
                time.sleep(0.02)
        last, cpu_last = time.perf_counter(), [cpu_seconds(tree) for tree in trees]
        counted = settled_outcomes(each, n)
    finally:
        for proc in procs:
            stop_worker(proc)
    return timed_run("scale-out", n, last - first, counted, trees, cpu_first, cpu_last)


def wait_formed(each: list[Settings], deadline: Deadline) -> None:
    """Until every worker consumed a probe message of the same sending (one per partition):
    each owns partitions, so the group has every member."""
    partitions = each[0].partitions
    while True:
        before = [metric_sum(s, "prefstream_events_total") for s in each]
        send_probes(each[0])
        wait_until = time.monotonic() + 3.0
        while time.monotonic() < wait_until:
            deadline.check("every worker to consume a probe message (the group formed)")
            after = [metric_sum(s, "prefstream_events_total") for s in each]
            if sum(after) - sum(before) >= partitions:
                if all(a > b for a, b in zip(after, before, strict=True)):
                    return
                break  # one worker has every partition: a member is still joining
            time.sleep(0.2)


@contextmanager
def paused(pids: list[int]) -> Iterator[None]:
    """The processes stopped (``SIGSTOP``) for the block, continued (``SIGCONT``) after it."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
