"""The worker's pipeline process: validation, sessionizing, pairing and the flush's files, on a
core of their own.

The Faust agent's process (``streams/worker/offload.py``) relays whole batches of raw records
here and keeps Kafka: it sends the dead-letter and late-event records this process returns,
writes the session changelog a flush returns once its rows are durable, and commits the
offsets (``docs/delivery.md``). Commands arrive in order on one pipe and replies go back on
another, each a length-prefixed pickle:

* ``("init", settings, log_level)``: first, once;
* ``("load", partition, clock, slots)``: the Faust table's state of a partition taken over,
  before its first record;
* ``("handle", records)``: ``(topic, partition, offset, key, value, timestamp_ms)`` each;
  replies ``("side", messages)`` when there are dead letters or late events, and
  ``("metrics", snapshot)`` at most every ``METRICS_EVERY_S``;
* ``("flush", fid)``: start a flush (its batch, closed sessions and checkpoint as of now) and
  write it in this process's flush thread; replies ``("written", fid, counts, checkpoint,
  metrics)`` with the checkpoint's slots already JSON, or ``("failed", fid, reason)``;
* ``("finish", fid, committed)``: the flush's offsets are committed: forget what it wrote;
* ``("revoke", partitions)``: drop their state (their next owner replays).

Replies of one command always precede those of later commands, so the agent's process has
every side record of the events a flush covers before that flush's ``written``.

A crash point reached here (``write``) ends the whole worker, as ``kill`` of the worker would:
the agent's process gets the point's signal first. This process dies with the agent's process
(``PR_SET_PDEATHSIG``, and the end of its command pipe) and ignores SIGINT and SIGTERM: a
graceful stop is the agent's to run, and it needs this process until its last flush.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from prefstream.logs import JsonFormatter
from prefstream.streams.core.compact import StoredSlot
from prefstream.streams.core.compact_record import slot_to_json
from prefstream.streams.core.sessionize import Clock
from prefstream.streams.worker import crashpoints
from prefstream.streams.worker.crashpoints import CrashPoints
from prefstream.streams.worker.gctune import tune_gc
from prefstream.streams.worker.pipeline import Checkpoint, FlushJob, Pipeline

log = logging.getLogger(__name__)

HEADER = struct.Struct("!Q")
PR_SET_PDEATHSIG = 1
METRICS_EVERY_S = 0.1  # the metrics endpoint lags the pipeline by at most this much
#: a checkpoint with its slots as JSON (None: a tombstone), as the agent's process saves it
DumpedCheckpoint = list[tuple[int, Clock, dict[str, str | None]]]


def frame(message: Any) -> bytes:
    """``message`` as one length-prefixed pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def read_frame(stream: BinaryIO) -> Any | None:
    """The next message on a blocking stream; None at its end."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    payload = stream.read(size)
    return None if len(payload) < size else pickle.loads(payload)


def dump_checkpoint(checkpoint: Checkpoint) -> DumpedCheckpoint:
    """The checkpoint's slots serialized here, so the agent's process only sends them."""
    return [(p, clock, {key: None if slot is None else slot_to_json(slot)
                        for key, slot in dirty.items()})
            for p, clock, dirty in checkpoint]


class ShippedStore:
    """The pipeline's state store in this process: the state the agent's process shipped at a
    takeover, read once. Saving is the agent's process's (after the flush's rows)."""

    def __init__(self) -> None:
        self.shipped: dict[int, tuple[Clock | None, list[tuple[str, StoredSlot]]]] = {}

    def load(self, kafka_partition: int) -> tuple[Clock | None, list[tuple[str, StoredSlot]]]:
        return self.shipped.pop(kafka_partition, (None, []))

    def save(self, kafka_partition: int, clock: Clock,
             slots: dict[str, StoredSlot | None]) -> None:
        raise RuntimeError("the pipeline process never saves state: the agent's process does")


class WorkerCrashPoints(CrashPoints):
    """Crash points that end the agent's process first: the whole worker stops, as it did when
    the flush ran in the agent's process."""

    def targets(self) -> list[int]:
        # the agent's process first: the worker; then this one (SIGTERM is ignored here)
        return [os.getppid(), os.getpid()]


class Child:
    """Runs the commands of the agent's process on a :class:`Pipeline`."""

    def __init__(self, pipeline: Pipeline, store: ShippedStore, out: BinaryIO) -> None:
        self.pipeline, self.store, self.out = pipeline, store, out
        self.out_lock = threading.Lock()  # the main thread and the flush thread both reply
        # one long-lived flush thread, as in the agent's process before (one malloc arena)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefstream-flush")
        self.jobs: dict[int, FlushJob] = {}
        self.metrics_sent = 0.0  # when the metrics were last sent (monotonic)

    def reply(self, message: Any) -> None:
        data = frame(message)
        with self.out_lock:
            self.out.write(data)
            self.out.flush()

    def dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "handle":
            self.handle(message[1])
        elif kind == "load":
            _, partition, clock, slots = message
            self.store.shipped[partition] = (clock, slots)
        elif kind == "flush":
            fid = message[1]
            job = self.jobs[fid] = self.pipeline.start_flush()
            checkpoint = self.pipeline.take_checkpoint()  # as the job took it
            self.executor.submit(self.write, fid, job, checkpoint)
        elif kind == "finish":
            _, fid, committed = message
            self.pipeline.finish_flush(self.jobs.pop(fid), committed)
        elif kind == "revoke":
            self.pipeline.revoke(message[1])
        else:
            raise ValueError(f"unknown command {kind!r}")

    def handle(self, records: list[tuple[str, int, int, bytes | None, bytes | None, int]]
               ) -> None:
        handle, side = self.pipeline.handle, []
        for topic, partition, offset, key, value, timestamp_ms in records:
            side += handle(topic=topic, partition=partition, offset=offset, key=key,
                           value=value, timestamp_ms=timestamp_ms)
            if not self.metrics_sent:  # the first event shows at once (the benchmark times it)
                self.send_metrics()
        if side:
            self.reply(("side", side))
        if time.monotonic() - self.metrics_sent >= METRICS_EVERY_S:
            self.send_metrics()

    def send_metrics(self) -> None:
        """The metrics as of now, for the agent's process's endpoint."""
        self.reply(("metrics", self.pipeline.metrics.snapshot()))
        self.metrics_sent = time.monotonic()

    def write(self, fid: int, job: FlushJob, checkpoint: Checkpoint) -> None:
        try:
            batch = self.pipeline.write_flush(job)
            dumped = dump_checkpoint(checkpoint)
        except Exception as exc:
            log.exception("flush %d failed", fid)
            self.reply(("failed", fid, repr(exc)))
            return
        self.reply(("written", fid, dict(batch.counts), dumped,
                    self.pipeline.metrics.snapshot()))


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the agent's process ends, however it ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the end of the command pipe still ends it
        pass
    if os.getppid() != parent:  # it ended before the call above
        os._exit(1)


def setup_logging(fmt: str, level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str]) -> int:
    """``python -m prefstream.streams.worker.offload_child <commands fd> <replies fd> <pid>``"""
    die_with_parent(int(argv[3]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    commands = os.fdopen(int(argv[1]), "rb")
    out = os.fdopen(int(argv[2]), "wb")
    _, settings, level = read_frame(commands)
    setup_logging(settings.log_format, level)
    from prefstream.streams.worker import logscrub

    logscrub.install(settings.text_storage)
    store = ShippedStore()
    crashpoints.arm(WorkerCrashPoints.from_env())  # a crash point here ends the whole worker
    child = Child(Pipeline(settings, store), store, out)
    tune_gc()
    while (message := read_frame(commands)) is not None:
        child.dispatch(message)
    logging.shutdown()
    os._exit(0)  # the agent's process is gone: nothing here may outlive it (no thread join)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
