"""The embedded broker ends with the process that started it, however that process ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.broker

STARTER = """
import time
from prefstream.streams.broker import EmbeddedBroker
broker = EmbeddedBroker().start()
print(broker._proc.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "\nState:\tZ" not in fh.read()  # a zombie has ended already
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_a_broker_whose_starter_is_killed_outright_stops_too() -> None:
    """kill -9 of a demo or benchmark used to leave its Tansu running on, orphaned."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE,
                               text=True)
    try:
        broker_pid = int(starter.stdout.readline())
        assert alive(broker_pid)
        starter.send_signal(signal.SIGKILL)
        starter.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(broker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(broker_pid), "the broker outlived the process that started it"
    finally:
        if starter.poll() is None:
            starter.kill()
        if "broker_pid" in locals() and alive(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)
