"""How a training cycle is stopped (SIGTERM, SIGINT) and where it pauses for crash tests.

``PREFSTREAM_TRAINER_PAUSE_AT=train`` (read by ``prefstream trainer``; a test hook, not a
setting) makes a cycle log ``paused at train`` and wait there until it is stopped or killed, so
a test can kill it at a known point. Points, in cycle order: ``load`` (backbone loaded, pairs not
read yet), ``train`` (after the first training step), ``audit`` (held-out evaluation done, the
audit next), ``write`` (the version's temp folder is complete, not renamed) and ``promote`` (the
version is in place, ``current`` not switched yet). No torch import here.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefstream.trainer import Interrupted, TrainerError

log = logging.getLogger(__name__)

PAUSE_ENV = "PREFSTREAM_TRAINER_PAUSE_AT"
PAUSE_POINTS = ("load", "train", "audit", "write", "promote")


def pause_points(text: str) -> frozenset[str]:
    """``"load,train"`` -> the points; ``TrainerError`` naming the valid ones otherwise."""
    points = frozenset(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(points - set(PAUSE_POINTS))
    if unknown:
        raise TrainerError(f"{PAUSE_ENV}: unknown pause point(s) {', '.join(unknown)} "
                           f"(known: {', '.join(PAUSE_POINTS)})")
    return points


@dataclass
class Control:
    """When a cycle stops early (``should_stop``: checked between stages and training steps,
    never once a version is being written) and where it pauses (``pause_at``)."""

    should_stop: Callable[[], bool] = lambda: False
    pause_at: frozenset[str] = frozenset()
    steps: int = 0

    def pause(self, point: str) -> None:
        """Wait here while this point is asked for, until a stop request (or a kill)."""
        if point in self.pause_at:
            log.warning("paused at %s (%s)", point, PAUSE_ENV)
            while not self.should_stop():
                time.sleep(0.05)

    def check(self, point: str) -> None:
        """A stage boundary: pause when asked to, then raise ``Interrupted`` on a stop request."""
        self.pause(point)
        if self.should_stop():
            raise Interrupted(f"stop requested before {point}; no version was written")

    def before_step(self) -> bool:
        """``fit``'s ``should_stop``: pauses at ``train`` once the first step is done."""
        self.steps += 1
        if self.steps == 2:
            self.pause("train")
        return self.should_stop()


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs (old handlers restored)."""
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
