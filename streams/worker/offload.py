"""The pipeline in a process of its own, as the Faust agent's process sees it.

On this worker's hot path the Faust agent (fetch, stream, the session changelog's producer) and
the pipeline (validate, sessionize, pair, Parquet) shared one interpreter and its GIL.
:class:`RemotePipeline` runs the :class:`~prefstream.streams.worker.pipeline.Pipeline` in a child
process (``streams/worker/offload_child.py``) and offers the agent and the
:class:`~prefstream.streams.worker.flush.Flusher` the calls they make on a pipeline: raw batches
are relayed whole, a flush's rows are written there, and its checkpoint comes back, already
serialized, with its ``written`` reply. Kafka stays here: side records are sent, the changelog
written through :class:`~prefstream.streams.worker.app.TableStore` and the offsets committed by
the Flusher in the same order as before (rows -> changelog -> offsets, ``docs/delivery.md``).

A child that dies stops the worker (a critical log line naming its exit status, then the app's
crash): every flush not yet written fails, so nothing it handled is ever committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from pydantic import SecretStr

from prefstream.settings import Settings
from prefstream.storage.tables import release_free_memory
from prefstream.streams.metrics import Metrics
from prefstream.streams.worker.flush import Flusher
from prefstream.streams.worker.offload_child import HEADER, DumpedCheckpoint, frame
from prefstream.streams.worker.pipeline import SideMessage, StateStore, flush_due
from prefstream.streams.worker.ticks import tick_key

log = logging.getLogger(__name__)

Record = tuple[str, int, int, bytes | None, bytes | None, int]
F_SETPIPE_SZ = 1031  # Linux: a command pipe that holds a whole batch takes fewer writes
PIPE_BYTES = 1 << 20
DEAD_GRACE_S = 30.0  # a worker whose pipeline process died is stopped within this
#: changed sessions in one checkpoint from which this process trims its heap afterwards
TRIM_AFTER_RECORDS = 2_000


#: settings the pipeline process has no use for: it keeps no Kafka connection
KAFKA_SECRETS = ("kafka_sasl_password", "kafka_ssl_key_password")


def secret_variables() -> frozenset[str]:
    """The ``PREFSTREAM_*`` variables of every secret setting (each ``SecretStr`` field)."""
    return frozenset(f"PREFSTREAM_{name}".upper() for name, info in Settings.model_fields.items()
                     if info.annotation is SecretStr or SecretStr in get_args(info.annotation))


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The pipeline process's environment: this process's without any secret setting. Its
    settings come over the command pipe (:func:`child_settings`); pydantic-settings reads
    variable names in any case, so they are compared in upper case."""
    secret = secret_variables()
    return {k: v for k, v in environ.items() if k.upper() not in secret}


def child_settings(settings: Settings) -> Settings:
    """The settings the pipeline process gets: the keys it uses (pseudonyms, ticks), no Kafka
    password."""
    return settings.model_copy(update=dict.fromkeys(KAFKA_SECRETS))


def force_exit_later(grace_s: float = DEAD_GRACE_S) -> None:
    """Exit this process in ``grace_s`` unless it ended before: a worker whose pipeline
    process died must stop, and a graceful stop could wait on it."""
    def force() -> None:
        log.critical("the worker did not stop within %.0f s of its pipeline process's end: "
                     "exiting now", grace_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(grace_s, force)
    timer.daemon = True
    timer.start()


class ChildDied(RuntimeError):
    """The pipeline process is gone: nothing it handled since the last commit is durable."""


@dataclass
class Written:
    """A flush the pipeline process made durable: its counts and its checkpoint."""

    counts: Counter[str]
    checkpoint: DumpedCheckpoint = field(default_factory=list)


@dataclass
class RemoteJob:
    """One flush, as :meth:`RemotePipeline.start_flush` started it in the pipeline process."""

    fid: int
    written: asyncio.Future[Written]


class Dumped:
    """A session slot the pipeline process serialized already: ``TableStore.save`` sends it."""

    __slots__ = ("json",)

    def __init__(self, json: str) -> None:
        self.json = json

    def model_dump_json(self) -> str:
        return self.json


class RemoteFlusher(Flusher):
    """The :class:`Flusher` of a :class:`RemotePipeline`: a flush's rows are written in the
    pipeline process; this one waits for them on the event loop, not in a thread."""

    async def write_rows(self, job: RemoteJob) -> Written:  # type: ignore[override]
        return await job.written


class RemotePipeline:
    """The agent's handle on the pipeline process (see the module's docstring)."""

    def __init__(self, settings: Settings, store: StateStore,
                 send_side: Callable[[list[SideMessage]], Awaitable[None]],
                 on_dead: Callable[[BaseException], Awaitable[Any]],
                 stopping: Callable[[], bool]) -> None:
        self.settings, self.store = settings, store
        self.send_side, self.on_dead, self.stopping = send_side, on_dead, stopping
        self.metrics = Metrics()  # the child's, copied as they come, and this process's own
        self.tick_key = tick_key(settings)
        self.shipped: set[int] = set()  # partitions whose table state the child has
        self.jobs: dict[int, RemoteJob] = {}
        self.last_job: RemoteJob | None = None
        self.next_fid = 0
        self.dead: ChildDied | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._starting: asyncio.Future[None] | None = None
        self._reader: asyncio.Future[None] | None = None
        self._events_since_flush = 0
        self._last_flush = time.monotonic()

    # -- the child process ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the pipeline process once (every caller waits for the same start)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._spawn())
        await asyncio.shield(self._starting)

    async def _spawn(self) -> None:
        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        with contextlib.suppress(OSError):  # a larger pipe is only fewer system calls
            fcntl.fcntl(cmd_w, F_SETPIPE_SZ, PIPE_BYTES)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefstream.streams.worker.offload_child",
             str(cmd_r), str(rep_w), str(os.getpid())], pass_fds=(cmd_r, rep_w),
            env=child_env(os.environ))  # no secret it does not need (docs/storage-safety.md)
        os.close(cmd_r)
        os.close(rep_w)
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(cmd_w, "wb", 0))
        self.writer = asyncio.StreamWriter(transport, protocol, None, loop)
        reader = asyncio.StreamReader(loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(rep_r, "rb", 0))
        root = logging.getLogger()  # Faust sets the worker's level on its handlers
        level = max([root.getEffectiveLevel(), *(h.level for h in root.handlers)])
        self._send(("init", child_settings(self.settings), level))
        self._reader = asyncio.ensure_future(self._read(reader))  # held: the loop holds none
        log.info("pipeline process started (pid %d)", self.proc.pid)

    def _send(self, message: tuple[Any, ...]) -> None:
        assert self.writer is not None
        self.writer.write(frame(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                await self._on(pickle.loads(await reader.readexactly(size)))
        except asyncio.IncompleteReadError:
            pass  # the child closed its end: it is exiting
        except Exception as exc:  # a reply it cannot act on: end the child, fail its flushes
            if self.stopping():  # e.g. side records after Faust's producer stopped: expected
                log.info("stopping: a reply of the pipeline process is left unsent (%r); its "
                         "batch is not committed, the next worker reads it again", exc)
            else:
                log.exception("reading from the pipeline process failed: %r", exc)
            assert self.proc is not None
            self.proc.kill()
        assert self.proc is not None
        while self.proc.poll() is None:  # it closed its end: it is about to exit
            await asyncio.sleep(0.05)
        await self._died(self.proc.returncode)

    async def _on(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "side":  # before any later ``written``: sent ahead of that flush's commit
            await self.send_side(message[1])
        elif kind == "metrics":
            self.metrics.update(message[1])
        elif kind == "written":
            _, fid, counts, checkpoint, metrics = message
            self.metrics.update(metrics)
            self.jobs.pop(fid).written.set_result(Written(Counter(counts), checkpoint))
        elif kind == "failed":
            _, fid, reason = message
            self.jobs.pop(fid).written.set_exception(
                RuntimeError(f"flush failed in the pipeline process: {reason}"))

    async def _died(self, code: int) -> None:
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        self.dead = ChildDied(f"the pipeline process (pid {self.proc and self.proc.pid}) "
                              f"ended with {how}")
        for job in self.jobs.values():
            job.written.set_exception(self.dead)
        self.jobs.clear()
        if self.stopping():
            log.info("%s while the worker stops", self.dead)
            return
        log.critical("%s: stopping the worker; nothing it handled since the last commit is "
                     "committed, a restart reads it again", self.dead)
        await self.on_dead(self.dead)

    # -- what the agent and the flusher call -------------------------------------------------
    async def relay(self, records: list[Record]) -> None:
        """Hand a batch of raw records to the pipeline process; returns once it has room for
        the next (its side records come back on their own)."""
        await self.start()
        if self.dead is not None:
            return  # stopping: nothing handled since the last commit gets committed
        for p in sorted({r[1] for r in records} - self.shipped):
            clock, slots = self.store.load(p)  # the table's state, at its first record
            self._send(("load", p, clock, slots))
            self.shipped.add(p)
        self._send(("handle", records))
        self._events_since_flush += len(records)
        assert self.writer is not None
        try:
            await self.writer.drain()
        except ConnectionError:  # it died meanwhile: its reader reports it and stops the worker
            pass

    @property
    def waiting(self) -> int:
        """Events relayed since the last flush started."""
        return self._events_since_flush

    def due(self, *, caught_up: bool = False) -> bool:
        """As ``Pipeline.due``: enough events, events waiting ``flush_interval_s``, or events
        waiting when the worker caught up with a backlog."""
        return flush_due(self.settings, self._events_since_flush, self._last_flush,
                         caught_up=caught_up)

    def start_flush(self) -> RemoteJob:
        """Start a flush in the pipeline process (its batch and checkpoint as of now)."""
        job = RemoteJob(self.next_fid, asyncio.get_running_loop().create_future())
        self.next_fid += 1
        if self.dead is not None:
            job.written.set_exception(self.dead)
        elif self.writer is None:  # nothing was ever relayed
            job.written.set_result(Written(Counter()))
        else:
            self.jobs[job.fid] = job
            self._send(("flush", job.fid))
        self._events_since_flush = 0
        self._last_flush = time.monotonic()
        self.last_job = job
        return job

    def take_checkpoint(self) -> RemoteJob | None:
        """The checkpoint comes with the flush's rows: the job stands for it until then."""
        return self.last_job

    def save_checkpoint(self, job: RemoteJob | None) -> None:
        """Write the job's checkpoint (its rows are durable) to the table's changelog."""
        if job is None:
            return
        for p, clock, dirty in job.written.result().checkpoint:
            self.store.save(p, clock, {key: None if value is None else Dumped(value)  # type: ignore[misc]
                                       for key, value in dirty.items()})

    def finish_flush(self, job: RemoteJob, committed: dict[int, int]) -> None:
        """The job's offsets are committed: the pipeline process forgets what it wrote.

        A large checkpoint (thousands of changed sessions) passed through this process as
        strings and Faust's per-record send objects, all freed by now; the heap keeps such
        blocks for reuse, so they are handed back to the system here, or the resident size
        would stay at the largest checkpoint's high-water mark."""
        if self.dead is None and self.writer is not None:
            self._send(("finish", job.fid, committed))
        checkpoint = job.written.result().checkpoint
        n_records = sum(len(dirty) for _, _, dirty in checkpoint)
        checkpoint.clear()
        if n_records >= TRIM_AFTER_RECORDS:
            release_free_memory()

    def revoke(self, kafka_partitions: Any) -> None:
        """Drop the state of partitions this worker no longer owns."""
        partitions = sorted(set(kafka_partitions))
        self.shipped -= set(partitions)
        if partitions and self.dead is None and self.writer is not None:
            self._send(("revoke", partitions))

    def wall_ms(self) -> int:
        return int(time.time() * 1000)
