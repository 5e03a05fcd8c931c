"""Crash safety of the worker on the real broker: kill -9 at chosen and at random points, over
one stream, with one worker and with two sharing the partitions; the stored rows must equal
those of an uninterrupted run (the pure pipeline over the same messages), row for row.

The chosen points come from ``streams.worker.crashpoints`` (the worker kills itself there,
as kill -9
would): mid-batch before a flush, between two tables' files of a flush, after the files and the
state changelog but before the offset commit, right after the commit, and while a rebalance
takes partitions away. The random ones are plain SIGKILLs from outside at a random moment.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers.worker import (
    applied,
    assert_equals_uninterrupted,
    is_drained,
    make_settings,
    produce_stream,
    publish,
    start_worker,
    stop,
    wait_for,
)

from prefstream.sim.demo import end_offsets
from prefstream.streams.broker import EmbeddedBroker
from prefstream.streams.worker.crashpoints import CRASH_ENV, SIGNAL_ENV, CrashPoints, parse

pytestmark = pytest.mark.broker



# -- the crash points themselves (pure) ---------------------------------------------------------
def test_crash_points_parse_counts_and_reject_unknown_names() -> None:
    assert parse("") == {}
    assert parse("write:3, commit") == {"write": 3, "commit": 1}
    with pytest.raises(Exception, match="unknown crash point 'flush'.*known: handle"):
        parse("flush:2")
    with pytest.raises(Exception, match="positive integer"):
        parse("write:0")
    assert not CrashPoints({})
    points = CrashPoints({"write": 5})
    points.reach("handle", 100)  # not asked for: nothing counted, nothing killed
    points.reach("write", 4)
    assert points.reached["write"] == 4 and points.reached["handle"] == 0


def test_a_crash_point_kills_the_process_like_kill_9(tmp_path: Path) -> None:
    code = ("from prefstream.streams.worker.crashpoints import CrashPoints\n"
            "p = CrashPoints.from_env()\n"
            "for _ in range(3):\n    p.reach('write')\n    print('alive', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, CRASH_ENV: "write:2"}, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["alive"]


# -- one worker, killed again and again ------------------------------------------------------
#: each run of the worker dies at one of these (None: kill -9 from outside at a random moment);
#: TERM: SIGTERM there instead, a graceful stop that cancels whatever the worker was awaiting
CRASHES = [("checkpoint:1", "TERM"), ("handle:300", "KILL"), ("write:2", "KILL"),
           ("changelog:1", "TERM"), ("checkpoint:1", "KILL"), (None, "KILL"),
           ("commit:2", "KILL")]


@pytest.mark.parametrize("pipeline_process", [False, True], ids=["one-process", "two-process"])
def test_kill_9_and_sigterm_at_every_point_over_one_stream_lose_and_duplicate_nothing(
    broker: EmbeddedBroker, tmp_path: Path, pipeline_process: bool
) -> None:
    settings = make_settings(broker, tmp_path / "data",
                             f"crash-loop-{'two' if pipeline_process else 'one'}",
                             flush_max_events=150, take_max_events=100,
                             pipeline_process=pipeline_process)
    messages = produce_stream(settings, n_events=3000, seed=11)
    targets = end_offsets(settings)
    total = len(messages)
    rng = random.Random(3)
    for i, (crash_at, sig) in enumerate(CRASHES):
        before = applied(settings)
        log_path = tmp_path / f"worker-{i}.log"
        worker = start_worker(settings, log_path, **{CRASH_ENV: crash_at or "", SIGNAL_ENV: sig})
        if crash_at is None:  # from outside, once this run has stored something
            wait_for(lambda: applied(settings) > before, "progress", 60, [worker])  # noqa: B023
            time.sleep(rng.uniform(0.0, 1.0))
            stop(worker, signal.SIGKILL)
        else:
            try:
                worker.wait(timeout=60)
            finally:
                stop(worker, signal.SIGKILL)
            assert f"crash point {crash_at.split(':')[0]} reached" in log_path.read_text(), (
                f"{crash_at} was never reached")
            if sig == "KILL":
                assert worker.returncode == -signal.SIGKILL
            else:  # a requested stop mid-flush is not a failure: clean exit, quiet log
                text = log_path.read_text()
                assert worker.returncode == 0
                assert not [w for w in ("CRITICAL", "Traceback", "flush failed") if w in text]
        assert applied(settings) < total, f"run {i} ({crash_at}) finished the stream"

    final = start_worker(settings, tmp_path / "worker-final.log")
    try:
        wait_for(is_drained(settings, targets, datetime.now(timezone.utc)), "drained stream",
                 120, [final])
    finally:
        stop(final)
    n_rows = assert_equals_uninterrupted(settings, len(messages), tmp_path / "ref")
    n_term = sum(sig == "TERM" for _, sig in CRASHES)
    print(f"{len(CRASHES) - n_term} kill -9 and {n_term} SIGTERM stops survived, "
          f"{n_rows} rows compared")


# -- two workers sharing the partitions ------------------------------------------------------
def test_two_workers_one_killed_during_a_rebalance_and_one_at_random(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A runs alone, B joins and A dies while the rebalance takes partitions from it; B takes
    everything over (state from the changelog), A comes back and they share again; then B is
    killed at a random moment and restarted. The output equals the uninterrupted run."""
    settings = make_settings(broker, tmp_path / "data", "two-workers", flush_max_events=150,
                             take_max_events=100).model_copy(update={"partitions": 4})
    messages = produce_stream(settings, n_events=6000, seed=12, upto=4000)
    logs = tmp_path

    a = start_worker(settings, logs / "a-1.log", **{CRASH_ENV: "revoke:1"})
    wait_for(lambda: applied(settings) > 0, "A's first batch", 60, [a])
    b = start_worker(settings, logs / "b-1.log")
    a.wait(timeout=90)
    assert a.returncode == -signal.SIGKILL, "A was not killed by the rebalance"
    a = start_worker(settings, logs / "a-2.log")
    before = applied(settings)
    wait_for(lambda: applied(settings) > before, "progress with A back", 90, [a, b])
    time.sleep(random.Random(5).uniform(0.0, 0.3))
    stop(b, signal.SIGKILL)
    publish(settings, messages[4000:])  # the rest of the stream comes while B is down
    targets = end_offsets(settings)
    b = start_worker(settings, logs / "b-2.log")
    try:
        wait_for(is_drained(settings, targets, datetime.now(timezone.utc)), "drained stream",
                 150, [a, b])
    finally:
        for w in (a, b):
            w.send_signal(signal.SIGTERM)
        for w in (a, b):
            w.wait(timeout=30)
    assert_equals_uninterrupted(settings, len(messages), tmp_path / "ref")
