"""Where a worker kills itself for crash tests: a test hook, not a setting.

``PREFSTREAM_WORKER_CRASH_AT=write:3`` (read once, when the worker starts) makes the worker
SIGKILL itself the third time it reaches ``write``, exactly as ``kill -9`` would at that moment:
no handler, no flush, no commit. Several points may be given (``handle:700,commit:2``); the
first one reached its count wins. Points, in the order a batch passes them:

* ``handle``: one event handled (the count is in events), its batch not flushed;
* ``write``: one table's rows of a flush written, the other tables not yet;
* ``changelog``: the batch's files and state changelog records durable, the marker that ends
  the checkpoint not yet sent;
* ``checkpoint``: the batch's files and its state changelog durable, offsets not committed;
* ``commit``: offsets committed, the flushed sessions not yet dropped from state;
* ``revoke``: partitions being taken away in a rebalance, before anything is flushed.

``PREFSTREAM_WORKER_CRASH_SIGNAL=TERM`` sends SIGTERM instead, once: the worker goes on from
that point and stops the way an operator's ``kill`` stops it, while the point's work is in
flight.

The worker's code marks each point with :func:`reach` (a no-op unless the variable is set), so
no production constructor takes the hook; :func:`arm` reads the variables, once per process.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

from prefstream.errors import ConfigError

log = logging.getLogger(__name__)

CRASH_ENV = "PREFSTREAM_WORKER_CRASH_AT"
SIGNAL_ENV = "PREFSTREAM_WORKER_CRASH_SIGNAL"
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
CRASH_POINTS = ("handle", "write", "changelog", "checkpoint", "commit", "revoke")


def parse(text: str) -> dict[str, int]:
    """``"write:3,commit"`` -> ``{"write": 3, "commit": 1}``; ``ConfigError`` naming the
    valid points otherwise."""
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        if name not in CRASH_POINTS:
            raise ConfigError(f"{CRASH_ENV}: unknown crash point {name!r} "
                             f"(known: {', '.join(CRASH_POINTS)})")
        if count and (not count.isdigit() or int(count) < 1):
            raise ConfigError(f"{CRASH_ENV}: {item!r}: the count must be a positive integer")
        points[name] = int(count or 1)
    return points


class CrashPoints:
    """Counts the points reached; kills the process when one reaches its count."""

    def __init__(self, points: dict[str, int], sig: signal.Signals = signal.SIGKILL) -> None:
        self.points = points
        self.sig = sig
        self.reached: Counter[str] = Counter()
        self.fired = False

    @classmethod
    def from_env(cls) -> CrashPoints:
        name = os.environ.get(SIGNAL_ENV, "KILL").upper()
        if name not in SIGNALS:
            raise ConfigError(f"{SIGNAL_ENV}: {name!r} is not one of {', '.join(SIGNALS)}")
        return cls(parse(os.environ.get(CRASH_ENV, "")), SIGNALS[name])

    def __bool__(self) -> bool:
        return bool(self.points)

    def reach(self, point: str, n: int = 1) -> None:
        if point not in self.points or self.fired:
            return
        self.reached[point] += n
        if self.reached[point] >= self.points[point]:
            log.warning("crash point %s reached %d times: sending %s to this worker (%s)",
                        point, self.reached[point], self.sig.name, CRASH_ENV)
            self.fired = True
            if self.sig == signal.SIGKILL:
                logging.shutdown()
            for pid in self.targets():
                os.kill(pid, self.sig)

    def targets(self) -> list[int]:
        """The processes signalled, in order: this one (the pipeline process's points end the
        worker's process first)."""
        return [os.getpid()]


#: the points this process crashes at, read from the environment once (see :func:`arm`)
_armed: CrashPoints | None = None


def arm(points: CrashPoints | None = None) -> CrashPoints:
    """Read the crash variables once per process (the worker calls it when it starts, so a bad
    value stops it there, with ``ConfigError``); later calls return the same points.
    ``points``: these instead (the pipeline process's, which end the whole worker)."""
    global _armed
    if points is not None:
        _armed = points
    elif _armed is None:
        _armed = CrashPoints.from_env()
    return _armed


def reach(point: str, n: int = 1) -> None:
    """``point`` was reached ``n`` times: kills the process there if a crash test asked for it;
    otherwise nothing (one check per call)."""
    points = _armed if _armed is not None else arm()
    if points:
        points.reach(point, n)
