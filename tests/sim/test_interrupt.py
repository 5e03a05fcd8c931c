"""A Ctrl-C ends the demo by a deadline even when a library swallows the interrupt
(prefstream/sim/interrupt.py; docs/first-hour.md: Ctrl-C stops the demo within seconds)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

HEAD = """
import os, signal, time
from prefstream.sim.interrupt import stop_by_deadline

def stuck(seconds, ready=False):  # a library stuck after the interrupt: it swallows it
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if ready:  # said from inside the loop: the interrupt finds it there
                ready = print("ready", flush=True)
            time.sleep(0.05)
        except KeyboardInterrupt:
            pass
"""
STUCK = HEAD + """
with stop_by_deadline("demo: stopped by force", deadline_s=1.0):
    stuck(30, ready=True)
"""
ENDS = HEAD + """
try:
    with stop_by_deadline("demo: stopped by force", deadline_s=0.5):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
except KeyboardInterrupt:
    stuck(1.5)  # past the deadline, after the block: no forced exit
    print("handler restored:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
"""


def test_a_swallowed_interrupt_still_ends_the_process_at_the_deadline() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == "ready\n"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    took = time.monotonic() - sent
    assert (rc, proc.stderr.read()) == (130, "demo: stopped by force\n")
    assert 1.0 <= took < 6, took


def test_a_block_that_ends_disarms_the_deadline() -> None:
    done = subprocess.run([sys.executable, "-c", ENDS], capture_output=True, text=True,
                          timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, "handler restored: True\n", "")
