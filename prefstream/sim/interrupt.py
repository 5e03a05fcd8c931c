"""A Ctrl-C that always ends the demo: a deadline after the interrupt.

A Ctrl-C raises ``KeyboardInterrupt`` in the main thread at whatever line it is on, including
inside the fork hooks that ``subprocess.Popen`` runs when the demo starts its broker and worker
(``preexec_fn`` makes it fork). There the exception is printed as "Exception ignored in
_releaseLock" and dropped, and logging's module lock stays held: seen once in about fifty
tries, when kafka-python's admin client then waited on its IO thread, which waited on that
lock, and the demo ran on, stuck, until killed. docs/first-hour.md promises that Ctrl-C stops
the demo within seconds in any phase, so the interrupt also arms a timer that ends the process
if it is still running at the deadline."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: seconds a Ctrl-C gives the demo to stop cleanly (it takes about 0.1 to 4 s)
STOP_DEADLINE_S = 10.0


@contextmanager
def stop_by_deadline(message: str, *, deadline_s: float = STOP_DEADLINE_S) -> Iterator[None]:
    """While the block runs, SIGINT raises ``KeyboardInterrupt`` as usual and arms a timer:
    if the block has not ended ``deadline_s`` later, ``message`` goes to stderr and the process
    exits at once with 130 (``os._exit``: no clean-up that could block again; the demo's
    broker and worker end with it, ``streams.broker.ends_with_parent``). The block's end
    disarms the timer."""
    done = threading.Event()
    armed: list[threading.Thread] = []

    def force() -> None:
        if not done.wait(deadline_s):
            os.write(2, f"{message}\n".encode())
            os._exit(130)

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        if not armed:
            armed.append(threading.Thread(target=force, name="stop-deadline", daemon=True))
            armed[0].start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)

